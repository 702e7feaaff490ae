"""The released Uni-ViGU checkpoint: a tiny UniViGU (discrete text, released head options) on the tiny diffusers Wan2.1
release of tests/tiny_release.py is exported into the release's state-dict layout (its module names, FSDP / compile
prefixes, torch.save under "model"), converted with `--univigu`, loaded back and compared param by param and output by
output; the folder's conventions reproduce the release's T2V loop; bad checkpoints are refused with exit 2 and leave
no DST part.

The export below is written from the release's `WanUnifiedTransformer` (model/transformer.py) and its
`WanTransformerUnifiedBlock` naming, independently of the converter's own tables.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import tiny_release as tr
from reference import rel_err
from tools.convert_wan_weights.cli import main as convert_main
from uvigu import checkpoint
from uvigu import pipeline as uvigu_pipeline
from uvigu.models import flat_params, wan_keys
from uvigu.models.univigu import UniViGU, UniViGUConfig

TEXT_LEN = 8
FRAMES, SIZE = 5, 32
PARTS = ("univigu", "vae", "umt5", "tokenizer", "pipeline.json")


class NotATensor:  # a pickled object weights_only=True must refuse
    pass


def _release_base_key(dkey: str) -> str:
    """diffusers DiT key -> the release's name for it (its WanUnifiedTransformer renames a few top-level modules)."""
    for theirs, release in (("condition_embedder.time_embedder.", "time_embedding_v.time_embedder."),
                            ("condition_embedder.time_proj.", "time_embedding_v.time_proj."),
                            ("condition_embedder.text_embedder.", "cond_text_embedder."),
                            ("proj_out.", "video_head.proj_out.")):
        if dkey.startswith(theirs):
            return release + dkey[len(theirs):]
    return "scale_shift_table_v" if dkey == "scale_shift_table" else dkey


def export_release(model: UniViGU) -> dict[str, torch.Tensor]:
    """Our UniViGU -> the release's state dict (torch tensors, release names, with FSDP / compile prefixes)."""
    flat = {k: np.asarray(v) for k, v in flat_params.state_to_flat_params(model).items()}
    cfg = model.dit.config
    dit = {k[len("dit."):]: v for k, v in flat.items() if k.startswith("dit.")}
    sd = {_release_base_key(k): v for k, v in wan_keys.params_to_diffusers(dit, cfg).items()}
    lin = lambda prefix, ours: {f"{prefix}.weight": flat[f"{ours}.kernel"].T, f"{prefix}.bias": flat[f"{ours}.bias"]}
    for n in (1, 2):
        sd.update(lin(f"time_embedding_t.time_embedder.linear_{n}", f"text_time.time_embedder.linear_{n}"))
    sd.update(lin("time_embedding_t.time_proj", "text_time.time_proj"))
    sd.update(lin("text_head.linear", "text_head.proj"))
    sd["vocab_embed.weight"] = flat["vocab_embed.embedding"]
    sd["scale_shift_table_t"] = flat["text_head.scale_shift_table"]
    sd["text_head.norm_final.weight"] = flat["text_head.norm_scale"]
    for i in range(cfg.num_layers):
        for theirs, ours in (("net.0.proj", "proj_in"), ("net.2", "proj_out")):
            sd[f"blocks.{i}.ffn_t.{theirs}.weight"] = flat[f"ffn_t.{ours}.kernel"][i].T
            sd[f"blocks.{i}.ffn_t.{theirs}.bias"] = flat[f"ffn_t.{ours}.bias"][i]
    head_dim = cfg.dim // cfg.num_heads
    sd["rotary_emb_text.inv_freq"] = 1.0 / (10000 ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = {}
    for i, (k, v) in enumerate(sorted(sd.items())):
        prefix = ("_fsdp_wrapped_module.", "_orig_mod.", "")[i % 3]
        key = k if not prefix else (f"{prefix}{k}" if "." not in k else k.replace(".", f".{prefix}", 1))
        out[key] = torch.from_numpy(np.array(v, np.float32))
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(source UniViGU, its flat params, the release state dict, the diffusers folder, the converted DST)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("released")
    pipe = tr.build_tiny_pipeline("unipc")
    tr.save_diffusers(pipe, root / "src")
    cfg = dataclasses.replace(tr.wan_config(), scan_layers=True)
    sd = {k: v.detach().numpy() for k, v in pipe.transformer.state_dict().items()}
    dit = wan_keys.model_from_params(cfg, wan_keys.diffusers_to_params(sd, cfg))
    text = UniViGUConfig(text_flow="discrete", vocab_size=len(pipe.tokenizer), max_text_len=TEXT_LEN,
                         ffn_t_init="copy", text_head_norm="weight", text_head_eps=1e-5)
    model = UniViGU.from_wan(dit, text, rngs=nnx.Rngs(7))
    # Every param re-drawn (the base too, so the .pth's base keys must win over the diffusers folder's).
    rng = np.random.default_rng(3)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(a + 0.1 * rng.standard_normal(a.shape), a.dtype), state))
    flat = {k: np.asarray(v) for k, v in flat_params.state_to_flat_params(model).items()}
    release_sd = export_release(model)
    torch.save({"model": release_sd, "step": 100}, root / "ckpt.pth")
    assert convert_main(["--src", str(root / "src"), "--univigu", str(root / "ckpt.pth"), "--dst", str(root / "dst"),
                         "--max_text_len", str(TEXT_LEN)]) == 0
    meta = json.loads((root / "dst" / "pipeline.json").read_text())
    meta["defaults"].update(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2, caption_steps=2)
    (root / "dst" / "pipeline.json").write_text(json.dumps(meta))
    return model, flat, release_sd, root


def test_converted_params_and_outputs_equal_the_source(release):
    model, flat, release_sd, root = release
    assert any(k.startswith("_fsdp_wrapped_module.") for k in release_sd) and any("_orig_mod." in k for k in release_sd)
    loaded = checkpoint.load_pretrained(root / "dst")
    assert isinstance(loaded, UniViGU)
    c = loaded.config
    assert (c.vocab_size, c.discrete_source, c.max_text_len, c.text_head_norm, c.text_head_eps) == (
        model.config.vocab_size, "uniform", TEXT_LEN, "weight", 1e-5)
    got = {k: np.asarray(v) for k, v in flat_params.state_to_flat_params(loaded).items()}
    assert set(got) == set(flat)
    for k in flat:
        np.testing.assert_array_equal(got[k], flat[k], err_msg=k)
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 4)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, c.vocab_size, (2, 6)), jnp.int32)
    args = (video, ids, jnp.array([0.3, 0.9]), jnp.array([0.6, 0.1]),
            jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32), jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool))
    (v_want, t_want), (v_got, t_got) = model(*args), loaded(*args)
    assert rel_err(v_got, v_want) < 1e-6 and rel_err(t_got, t_want) < 1e-6, (rel_err(v_got, v_want),
                                                                             rel_err(t_got, t_want))
    # The weight-only head norm matters: the same params without it give other logits.
    plain = UniViGU(model.dit, dataclasses.replace(model.config, text_head_norm="none"), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model, nnx.All(nnx.Param, lambda p, _: "norm_scale" not in p)))
    assert rel_err(plain(*args)[1], t_want) > 1e-3


def test_pipeline_json_records_the_released_conventions(release):
    *_, root = release
    meta = json.loads((root / "dst" / "pipeline.json").read_text())
    assert meta["scheduler"]["solver"] == "euler" and meta["scheduler"]["shift"] == 3.0
    assert meta["conventions"]["latents"] == "raw" and meta["conventions"]["pad_context"] == "unzeroed"
    pipe = uvigu_pipeline.load(root / "dst")
    assert {k: getattr(pipe.conventions, k) for k in meta["conventions"]} == meta["conventions"]
    assert pipe.conventions.joint_text_update == "released" and pipe.conventions.sigmas == "linspace_shift"
    assert {p.name for p in (root / "dst").iterdir()} == set(PARTS)


def test_conventions_switch_what_they_should(release):
    model, _, _, root = release
    pipe = uvigu_pipeline.load(root / "dst")
    ours = pipe.with_model(pipe.model)
    ours.conventions = uvigu_pipeline.Conventions()
    prompt = "a red circle moves left"
    # Unzeroed padding: the rows of the prompt agree, the padding rows are the encoder's (not zero).
    ids, mask = pipe.tokenize([prompt], 512)
    n = int(mask.sum())
    released, zeroed = np.asarray(pipe.encode_prompt(prompt)), np.asarray(ours.encode_prompt(prompt))
    np.testing.assert_allclose(released[:, :n], zeroed[:, :n], rtol=1e-6, atol=1e-6)
    assert np.all(zeroed[:, n:] == 0) and np.abs(released[:, n:]).min() > 0
    np.testing.assert_allclose(released, np.asarray(pipe.encoder(jnp.asarray(ids), jnp.asarray(mask))), atol=1e-6)
    # Raw latents: decode without un-normalisation.
    z = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 4, 4, 4)), jnp.float32)
    raw, normed = pipe._frames(z), ours._frames(z)
    want = np.clip((np.asarray(pipe.vae.decode_raw(z)) + 1) / 2, 0, 1)
    assert rel_err(raw, want) < 1e-6 and rel_err(raw, normed) > 1e-2
    # T2V text: the prompt's key-padding mask instead of all-visible.
    (_, m_rel), (_, m_ours) = pipe._prompt_text(["a red"]), ours._prompt_text(["a red"])
    assert np.asarray(m_ours).all() and not np.asarray(m_rel).all()
    # The release's grid: shift 3 on linspace(1, 0, N + 1)[:-1], then 0.
    s = np.linspace(1, 0, 5)[:-1]
    np.testing.assert_allclose(uvigu_pipeline.released_sigmas(4, 3.0), np.r_[3 * s / (1 + 2 * s), 0.0], rtol=1e-6)


def test_t2v_reproduces_the_released_loop(release):
    """pipe.t2v on the converted folder == the release's loop written out: prompt tokens (padded, masked) clean at
    text time 0, unzeroed umT5 context, CFG on video with the "" context, Euler x += (σ' − σ)·v_wan on the shifted
    linspace grid, raw-latent decode."""
    _, _, _, root = release
    pipe = uvigu_pipeline.load(root / "dst")
    model, steps, guide = pipe.model, 2, 4.0
    prompt = "a blue"  # shorter than TEXT_LEN: the key-padding mask has padding to hide
    noise = np.random.default_rng(5).standard_normal((1, 2, 4, 4, 4)).astype(np.float32)
    got = pipe.t2v(prompt, latents=noise, guidance_scale=guide, num_inference_steps=steps)

    tok_ids, tok_mask = pipe.tokenize([prompt], TEXT_LEN)
    ids, mask = jnp.asarray(tok_ids), jnp.asarray(tok_mask, bool)
    assert not np.asarray(mask).all()
    enc = lambda p: pipe.encoder(*map(jnp.asarray, pipe.tokenize([p], 512)))
    cond, null = enc(prompt), enc("")
    base = np.linspace(1, 0, steps + 1)[:-1]
    sigmas = np.r_[3 * base / (1 + 2 * base), 0.0]
    x = jnp.asarray(noise)
    for i in range(steps):
        tau_v, tau_t = jnp.array([1 - sigmas[i]], jnp.float32), jnp.ones((1,), jnp.float32)
        v_c = -model(x, ids, tau_v, tau_t, cond, mask)[0]  # Wan's noise − data
        v_u = -model(x, ids, tau_v, tau_t, null, mask)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + guide * (v_c - v_u))
    want = np.clip((np.asarray(pipe.vae.decode_raw(x)) + 1) / 2, 0, 1)
    assert got.shape == (1, FRAMES, SIZE, SIZE, 3) and rel_err(got, want) < 1e-5, rel_err(got, want)


def test_joint_and_caption_run_with_the_released_updates(release):
    _, _, _, root = release
    pipe = uvigu_pipeline.load(root / "dst")
    video, captions = pipe.joint("a red circle", seed=1)
    assert video.shape == (1, FRAMES, SIZE, SIZE, 3) and len(captions) == 1
    again = pipe.joint("a red circle", seed=1)
    np.testing.assert_array_equal(again[0], video)
    assert again[1] == captions
    frames = np.random.default_rng(2).uniform(0, 1, (1, FRAMES, SIZE, SIZE, 3)).astype(np.float32)
    assert pipe.caption(frames, seed=3) == pipe.caption(frames, seed=3)


def _convert_bad(root, name, sd, capsys, extra=None):
    path = root / f"{name}.pth"
    torch.save({"model": sd, **(extra or {})}, path)
    dst = root / f"dst-{name}"
    code = convert_main(["--src", str(root / "src"), "--univigu", str(path), "--dst", str(dst),
                         "--max_text_len", str(TEXT_LEN)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not dst.exists() or not any((dst / p).exists() for p in PARTS), sorted(p.name for p in dst.iterdir())
    return err


def test_bad_checkpoints_are_refused(release, capsys):
    _, _, release_sd, root = release
    strip = lambda k: k.replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "")
    by_clean = {strip(k): k for k in release_sd}
    # Not weights_only-safe: refused, never unpickled with code.
    err = _convert_bad(root, "pickle", dict(release_sd), capsys, extra={"extra": NotATensor()})
    assert "weights_only=True" in err and "refused" in err and "NotATensor" in err, err
    # A missing text key, named.
    sd = dict(release_sd)
    del sd[by_clean["text_head.norm_final.weight"]]
    assert "text_head.norm_final.weight" in _convert_bad(root, "missing", sd, capsys)
    # A mis-shaped FFN_t tensor, named with both shapes.
    sd = dict(release_sd)
    key = by_clean["blocks.1.ffn_t.net.2.bias"]
    sd[key] = torch.zeros(5)
    err = _convert_bad(root, "misshaped", sd, capsys)
    assert "blocks.1.ffn_t.net.2.bias" in err and "(5,)" in err
    # An unexpected key, and text RoPE frequencies that are not ours.
    sd = dict(release_sd)
    sd["blocks.0.ffn_x.weight"] = torch.zeros(3)
    sd[by_clean["rotary_emb_text.inv_freq"]] = sd[by_clean["rotary_emb_text.inv_freq"]] * 1.01
    err = _convert_bad(root, "unexpected", sd, capsys)
    assert "blocks.0.ffn_x.weight" in err and "inv_freq" in err
    # Not a checkpoint at all.
    (root / "junk.pth").write_bytes(b"not a zip")
    code = convert_main(["--src", str(root / "src"), "--univigu", str(root / "junk.pth"), "--dst", str(root / "dj")])
    err = capsys.readouterr().err
    assert code == 2 and "junk.pth" in err and "not a readable torch checkpoint" in err, err
