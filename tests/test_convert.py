"""The weight converter (`python -m tools.convert_wan_weights`) end to end, on tiny random diffusers models.

Every accepted layout (diffusers transformer, diffusers pipeline, original release with and without the
`model.diffusion_model.` prefix, sharded, bf16) must convert into a folder that `load_pretrained` turns into a WanDiT
whose output equals diffusers' on the same weights; every bad input must exit non-zero, name the culprit and leave no
`DST/dit` behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx

from reference import diffusers_forward, diffusers_wan, rel_err
from tools.convert_wan_weights import convert, main
from tools.convert_wan_weights.safetensors_io import (
    SafetensorsError,
    SafetensorsFile,
    open_safetensors_index,
    write_safetensors,
    write_sharded_safetensors,
)
from uvigu.checkpoint import load_pretrained, read_param_metadata
from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
CFG = WanConfig.preset("tiny", out_channels=12)  # in != out channels on purpose
LATENT = (2, 3, 4, 6)  # B, T, H, W


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures: one random diffusers model, its state dict and output; folder writers for every layout.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    model = diffusers_wan(CFG, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*LATENT, CFG.in_channels)).astype(np.float32)
    t = np.array([37.0, 912.0], np.float32)
    ctx = rng.standard_normal((LATENT[0], 7, CFG.text_dim)).astype(np.float32)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return dict(model=model, state=state, inputs=(x, t, ctx), out=diffusers_forward(model, x, t, ctx))


_forward = nnx.jit(lambda m, x, t, c: m(x, t, c))


def ours_out(dst, inputs, **overrides) -> np.ndarray:
    model = load_pretrained(dst, **overrides)
    return np.asarray(_forward(model, *map(jnp.asarray, inputs)))


def original_config(**changes) -> dict:
    """What the Wan-AI release's config.json holds: no text_dim, no patch_size (they are the defaults there)."""
    cfg = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": CFG.dim, "eps": CFG.eps,
           "ffn_dim": CFG.ffn_dim, "freq_dim": CFG.freq_dim, "in_dim": CFG.in_channels, "model_type": "t2v",
           "num_heads": CFG.num_heads, "num_layers": CFG.num_layers, "out_dim": CFG.out_channels, "text_len": 512}
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


def write_original(folder: Path, state: dict, *, prefix: str = "", shards: int = 1, config: dict | None = None,
                   rename: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + (wan_keys.diffusers_to_original_key(k) if rename else k): v for k, v in state.items()}
    if shards == 1:
        write_safetensors(folder / "diffusion_pytorch_model.safetensors", tensors)
    else:
        write_sharded_safetensors(folder, tensors, shards)
    (folder / "config.json").write_text(json.dumps(config or original_config()))
    return folder


def write_diffusers(folder: Path, state: dict, *, config_changes: dict | None = None) -> Path:
    """A diffusers transformer folder from a (possibly edited) state dict: the real config of the reference model."""
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", state, {"format": "pt"})
    config = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.42.1", "added_kv_proj_dim": None,
              "attention_head_dim": CFG.head_dim, "cross_attn_norm": True, "eps": CFG.eps, "ffn_dim": CFG.ffn_dim,
              "freq_dim": CFG.freq_dim, "image_dim": None, "in_channels": CFG.in_channels,
              "num_attention_heads": CFG.num_heads, "num_layers": CFG.num_layers, "out_channels": CFG.out_channels,
              "patch_size": list(CFG.patch_size), "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
              "rope_max_seq_len": 1024, "text_dim": CFG.text_dim}
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def write_pipeline(folder: Path, transformer_model) -> Path:
    transformer_model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }))
    return folder


def expected_fill_counts() -> dict[str, list[int]]:
    return {p: [1] * (CFG.num_layers if p.startswith("blocks.") else 1)
            for p in wan_keys.expected_param_shapes(CFG)}


def run_main(src: Path, dst: Path, *extra: str, capsys=None) -> tuple[int, str]:
    code = main(["--src", str(src), "--dst", str(dst), *extra])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


# ----------------------------------------------------------------------------------------------------------------------
# Happy paths: output parity with diffusers, every slot filled once, bitwise round trip.
# ----------------------------------------------------------------------------------------------------------------------


LAYOUTS = ["diffusers-transformer", "diffusers-pipeline", "original", "original-prefixed", "original-sharded"]


def _make_source(layout: str, tmp_path: Path, reference) -> Path:
    src = tmp_path / "src"
    if layout == "diffusers-transformer":
        reference["model"].save_pretrained(src)
    elif layout == "diffusers-pipeline":
        write_pipeline(src, reference["model"])
    elif layout == "original":
        write_original(src, reference["state"])
    elif layout == "original-prefixed":
        write_original(src, reference["state"], prefix=wan_keys.ORIGINAL_PREFIX)
    elif layout == "original-sharded":
        write_original(src, reference["state"], shards=2)
    return src


@pytest.mark.parametrize("layout", LAYOUTS)
def test_convert_matches_diffusers(layout, tmp_path, reference):
    src = _make_source(layout, tmp_path, reference)
    result = convert(src, tmp_path / "dst", log=lambda *_: None)
    assert result.source.kind == layout.split("-prefixed")[0].split("-sharded")[0]
    assert result.fill_counts == expected_fill_counts()
    assert result.tensor_count == len(reference["state"])
    assert result.parameter_count == sum(v.size for v in reference["state"].values())
    if layout == "original-sharded":
        assert len(result.source.weight_files) == 2
    if layout.startswith("original"):  # text_dim and patch_size were left out of config.json: read off the shapes
        notes = " ".join(result.source.notes)
        assert "text_dim=32" in notes and "patch_size=(1, 2, 2)" in notes
    ours = ours_out(tmp_path / "dst", reference["inputs"])
    assert rel_err(ours, reference["out"]) <= TOL


def test_round_trip_is_bitwise(tmp_path, reference):
    src = write_original(tmp_path / "src", reference["state"], prefix=wan_keys.ORIGINAL_PREFIX, shards=2)
    convert(src, tmp_path / "dst", log=lambda *_: None)
    for scan_layers in (True, False):
        model = load_pretrained(tmp_path / "dst", scan_layers=scan_layers)
        flat = wan_keys.state_to_flat_params(model)
        if not scan_layers:
            flat = wan_keys.stack_blocks(flat, CFG.num_layers)
        back = wan_keys.params_to_diffusers({k: np.asarray(v) for k, v in flat.items()}, model.config)
        assert set(back) == set(reference["state"])
        for key, want in reference["state"].items():
            assert back[key].dtype == want.dtype and np.array_equal(back[key], want), key


# diffusers keeps these modules in float32 when it loads a bf16 Wan; saved from there, a "bf16" checkpoint is mixed.
_FP32_MODULES = ("time_embedder", "scale_shift_table", "norm2")


@pytest.mark.parametrize("how", ["bf16-source", "mixed-source", "dtype-flag"])
def test_bfloat16(how, tmp_path, reference):
    """bf16 checkpoints (or --dtype bfloat16) store bf16 params (--dtype keep: mixed sources keep their fp32 params);
    run in fp32 they equal diffusers run in fp32 on the same bf16-rounded weights."""
    def bf16(a):
        return a.astype(ml_dtypes.bfloat16)

    if how == "bf16-source":
        diffusers_wan(CFG, seed=3, dtype=torch.bfloat16).save_pretrained(tmp_path / "src")
        stored = {k: bf16(v) for k, v in reference["state"].items()}
        extra = []
    elif how == "mixed-source":
        stored = {k: v if any(m in k for m in _FP32_MODULES) else bf16(v) for k, v in reference["state"].items()}
        write_diffusers(tmp_path / "src", stored)
        extra = []
    else:
        reference["model"].save_pretrained(tmp_path / "src")
        stored = {k: bf16(v) for k, v in reference["state"].items()}
        extra = ["--dtype", "bfloat16"]
    assert main(["--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), *extra]) == 0
    assert json.loads((tmp_path / "dst/dit/config.json").read_text())["config"]["param_dtype"] == "bfloat16"
    loaded = load_pretrained(tmp_path / "dst")
    assert {str(v.dtype) for v in wan_keys.state_to_flat_params(loaded).values()} == {"bfloat16"}
    on_disk = {k: str(v.dtype) for k, v in read_param_metadata(tmp_path / "dst").items()}
    if how == "mixed-source":
        assert on_disk["condition_embedder.time_embedder.linear_1.kernel"] == "float32"
        assert on_disk["blocks.scale_shift_table"] == on_disk["blocks.norm2.scale"] == "float32"
        assert on_disk["blocks.attn1.to_q.kernel"] == on_disk["condition_embedder.time_proj.kernel"] == "bfloat16"
    else:
        assert set(on_disk.values()) == {"bfloat16"}

    rounded = diffusers_wan(CFG, seed=3)
    rounded.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in stored.items()})
    want = diffusers_forward(rounded, *reference["inputs"])
    assert rel_err(ours_out(tmp_path / "dst", reference["inputs"], param_dtype="float32"), want) <= TOL


def test_subprocess_happy_path(tmp_path, reference):
    src = write_original(tmp_path / "src", reference["state"])
    proc = subprocess.run(
        [sys.executable, "-m", "tools.convert_wan_weights", "--src", str(src), "--dst", str(tmp_path / "dst")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    for field in ("original", "tensors:    69", "parameters:", "dtype:      float32", str(tmp_path / "dst" / "dit"),
                  "wall time:"):
        assert field in proc.stdout, (field, proc.stdout)
    meta = json.loads((tmp_path / "dst/dit/config.json").read_text())
    assert meta["model"] == "wan_dit" and meta["format_version"] == 1
    assert meta["config"]["dim"] == CFG.dim and meta["source"]["kind"] == "original"


def test_overwrite(tmp_path, reference, capsys):
    src = write_original(tmp_path / "src", reference["state"])
    dst = tmp_path / "dst"
    assert run_main(src, dst)[0] == 0
    stamp = (dst / "dit/config.json").read_text()
    code, err = run_main(src, dst, capsys=capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert (dst / "dit/config.json").read_text() == stamp
    # a failing --overwrite keeps the old folder
    (src / "config.json").write_text(json.dumps(original_config(dim=64, num_heads=4)))
    assert run_main(src, dst, "--overwrite")[0] == 2
    assert (dst / "dit/config.json").read_text() == stamp
    (src / "config.json").write_text(json.dumps(original_config()))
    assert run_main(src, dst, "--overwrite", "--dtype", "bfloat16")[0] == 0
    assert json.loads((dst / "dit/config.json").read_text())["config"]["param_dtype"] == "bfloat16"
    assert sorted(p.name for p in dst.iterdir()) == ["dit"]  # no staging or retired folders left


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: exit 2, the message names the key / file / field, no DST/dit.
# ----------------------------------------------------------------------------------------------------------------------


def _edited(state, drop=(), add=None, replace=None):
    out = {k: v for k, v in state.items() if k not in drop}
    out.update(add or {})
    out.update(replace or {})
    return out


def _bad_sources():
    """name -> (build(tmp_path, state) -> src folder, strings the error message must contain)."""
    d = CFG.dim

    def truncated_shard(tmp, state):
        src = write_original(tmp / "src", state, shards=2)
        shard = src / "diffusion_pytorch_model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
        return src

    def corrupt_header(tmp, state):
        src = write_original(tmp / "src", state)
        f = src / "diffusion_pytorch_model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[8:20] = b"#not json!!#"
        f.write_bytes(bytes(raw))
        return src

    def huge_header(tmp, state):
        src = write_original(tmp / "src", state)
        f = src / "diffusion_pytorch_model.safetensors"
        raw = bytearray(f.read_bytes())
        raw[:8] = (len(raw) * 2).to_bytes(8, "little")
        f.write_bytes(bytes(raw))
        return src

    def missing_shard(tmp, state):
        src = write_original(tmp / "src", state, shards=2)
        (src / "diffusion_pytorch_model-00001-of-00002.safetensors").unlink()
        return src

    def duplicate(tmp, state):
        tensors = {wan_keys.diffusers_to_original_key(k): v for k, v in state.items()}
        tensors[wan_keys.ORIGINAL_PREFIX + "blocks.1.self_attn.q.weight"] = tensors["blocks.1.self_attn.q.weight"]
        src = tmp / "src"
        src.mkdir()
        write_safetensors(src / "diffusion_pytorch_model.safetensors", tensors)
        (src / "config.json").write_text(json.dumps(original_config()))
        return src

    def unrecognised(tmp, state):
        src = tmp / "src"
        src.mkdir()
        (src / "weights.bin").write_bytes(b"\0" * 16)
        return src

    def unrecognised_config(tmp, state):
        src = tmp / "src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 64}))
        return src

    def i2v_keys(tmp, state):
        extra = {"img_emb.proj.1.weight": np.ones((d, 8), np.float32)}
        return write_original(tmp / "src", _edited({wan_keys.diffusers_to_original_key(k): v
                                                    for k, v in state.items()}, add=extra), rename=False)

    return {
        "missing-key": (lambda tmp, s: write_original(tmp / "src", _edited(s, drop=["blocks.1.attn2.to_k.weight"])),
                        ["missing", "blocks.1.attn2.to_k.weight"]),
        "extra-key": (lambda tmp, s: write_diffusers(tmp / "src", _edited(
            s, add={"blocks.0.attn1.to_qkv.weight": np.ones((3 * d, d), np.float32)})),
                      ["unexpected", "blocks.0.attn1.to_qkv.weight"]),
        "mis-shaped": (lambda tmp, s: write_diffusers(tmp / "src", _edited(
            s, replace={"blocks.1.ffn.net.0.proj.bias": np.ones((CFG.ffn_dim - 1,), np.float32)})),
                       ["blocks.1.ffn.net.0.proj.bias", f"expected ({CFG.ffn_dim},)", f"got ({CFG.ffn_dim - 1},)"]),
        "duplicate": (duplicate, ["duplicate", "blocks.1.self_attn.q.weight",
                                  wan_keys.ORIGINAL_PREFIX + "blocks.1.self_attn.q.weight"]),
        "truncated-shard": (truncated_shard, ["truncated", "diffusion_pytorch_model-00002-of-00002.safetensors"]),
        "corrupt-header": (corrupt_header, ["corrupt header", "diffusion_pytorch_model.safetensors"]),
        "header-past-end": (huge_header, ["header length", "diffusion_pytorch_model.safetensors"]),
        "missing-shard": (missing_shard, ["missing", "diffusion_pytorch_model-00001-of-00002.safetensors"]),
        "config-dim-disagrees": (lambda tmp, s: write_original(tmp / "src", s, config=original_config(
            dim=64, num_heads=4)), ["config.json", "dim=64", "48"]),
        "config-in-dim-disagrees": (lambda tmp, s: write_original(tmp / "src", s, config=original_config(
            in_dim=4)), ["in_dim", "4", "16"]),
        "diffusers-config-disagrees": (lambda tmp, s: write_diffusers(tmp / "src", s, config_changes={
            "ffn_dim": 128}), ["ffn_dim=128", "96"]),
        "unrecognised-folder": (unrecognised, ["looked for", "model_index.json", "config.json"]),
        "unrecognised-config": (unrecognised_config, ["not a Wan2.1 config", "looked for"]),
        "missing-src": (lambda tmp, s: tmp / "nowhere", ["no such file or folder"]),
        "i2v-original-config": (lambda tmp, s: write_original(tmp / "src", s, config=original_config(
            model_type="i2v")), ["model_type='i2v'", "text-to-video"]),
        "i2v-diffusers-config": (lambda tmp, s: write_diffusers(tmp / "src", s, config_changes={
            "image_dim": 1280}), ["image_dim=1280", "text-to-video"]),
        "i2v-keys": (i2v_keys, ["img_emb.proj.1.weight", "text-to-video"]),
        "original-config-diffusers-names": (lambda tmp, s: write_original(tmp / "src", s, rename=False),
                                            ["diffusers names", "config.json", "original"]),
        "diffusers-config-original-names": (lambda tmp, s: write_diffusers(tmp / "src", {
            wan_keys.diffusers_to_original_key(k): v for k, v in s.items()}), ["original Wan names", "diffusers"]),
    }


BAD = _bad_sources()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input(name, tmp_path, reference, capsys):
    build, needles = BAD[name]
    src = build(tmp_path, reference["state"])
    dst = tmp_path / "dst"
    code, err = run_main(src, dst, capsys=capsys)
    assert code == 2, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert not (dst / "dit").exists()
    assert not dst.exists() or not any(dst.iterdir())


def test_pth_source(tmp_path, reference):
    """Older repacks ship a torch .pth: read (memory-mapped) through torch, next to VAE / T5 .pth files it skips."""
    src = tmp_path / "src"
    src.mkdir()
    torch.save({wan_keys.diffusers_to_original_key(k): torch.from_numpy(v).to(torch.bfloat16)
                for k, v in reference["state"].items()}, src / "wan_t2v.pth")
    torch.save({"decoder.weight": torch.ones(2)}, src / "Wan2.1_VAE.pth")
    (src / "config.json").write_text(json.dumps(original_config()))
    result = convert(src, tmp_path / "dst", log=lambda *_: None)
    assert [p.name for p in result.source.weight_files] == ["wan_t2v.pth"]
    assert result.dtype == "bfloat16" and result.fill_counts == expected_fill_counts()
    model = load_pretrained(tmp_path / "dst")
    want = torch.from_numpy(reference["state"]["blocks.1.attn1.to_q.weight"]).to(torch.bfloat16).float().numpy()
    got = np.asarray(model.blocks.attn1.to_q.kernel[...][1].astype(jnp.float32)).T
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------------------------------------------------
# The safetensors reader on its own.
# ----------------------------------------------------------------------------------------------------------------------


def test_safetensors_reader_matches_reference_library(tmp_path):
    from safetensors.numpy import save_file
    from safetensors.torch import save_file as save_torch

    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "f16": rng.standard_normal(4).astype(np.float16),
              "f64": np.array(2.5), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
              "empty": np.zeros((0, 3), np.float32)}
    save_file(arrays, str(tmp_path / "np.safetensors"))
    f = SafetensorsFile(tmp_path / "np.safetensors")
    assert sorted(f.keys()) == sorted(arrays)
    for k, v in arrays.items():
        got = f.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape and np.array_equal(got, v), k
        assert not got.flags.writeable
        f.release(k)
        assert np.array_equal(f.get(k), v)  # released pages fault back in

    bf16 = torch.randn(7, 3).to(torch.bfloat16)
    save_torch({"w": bf16}, str(tmp_path / "bf16.safetensors"))
    got = SafetensorsFile(tmp_path / "bf16.safetensors").get("w")
    assert got.dtype == ml_dtypes.bfloat16
    assert np.array_equal(got.view(np.int16), bf16.view(torch.int16).numpy())

    # our writer, read back by the reference library
    from safetensors.numpy import load_file

    write_safetensors(tmp_path / "ours.safetensors", arrays)
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())


def test_safetensors_validation(tmp_path):
    a = {"a": np.ones((4, 4), np.float32), "b": np.ones(3, np.float32)}
    path = tmp_path / "x.safetensors"
    write_safetensors(path, a)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])

    def rewrite(h):
        body = json.dumps(h).encode()
        body += b" " * (-len(body) % 8)
        path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])

    h = json.loads(json.dumps(header))
    h["a"]["shape"] = [4, 5]
    rewrite(h)
    with pytest.raises(SafetensorsError, match=r"tensor 'a'.*needs 80"):
        SafetensorsFile(path)
    h = json.loads(json.dumps(header))
    h["b"]["data_offsets"] = [h["b"]["data_offsets"][0] + 1000, h["b"]["data_offsets"][1] + 1000]
    rewrite(h)
    with pytest.raises(SafetensorsError, match=r"x.safetensors: tensor 'b'.*truncated"):
        SafetensorsFile(path)
    h = json.loads(json.dumps(header))
    h["b"]["dtype"] = "Q7"
    rewrite(h)
    with pytest.raises(SafetensorsError, match="unsupported dtype 'Q7'"):
        SafetensorsFile(path)
    h = json.loads(json.dumps(header))
    h["b"]["data_offsets"] = h["a"]["data_offsets"][:1] + [h["a"]["data_offsets"][0] + 12]
    rewrite(h)
    with pytest.raises(SafetensorsError, match="overlap"):
        SafetensorsFile(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="truncated"):
        SafetensorsFile(path)

    index = write_sharded_safetensors(tmp_path / "sharded", {f"t{i}": np.full(8, i, np.float32) for i in range(5)}, 2)
    assert len(open_safetensors_index(index)) == 5
    meta = json.loads(index.read_text())
    meta["weight_map"]["t9"] = meta["weight_map"]["t0"]
    index.write_text(json.dumps(meta))
    with pytest.raises(SafetensorsError, match="'t9'"):
        open_safetensors_index(index)
