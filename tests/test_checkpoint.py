"""`uvigu.checkpoint`: model folders written by `save_pretrained`, read back by `load_pretrained` with overrides, in the
scanned or looped layout, optionally straight onto a mesh."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from reference import rel_err
from xla_env import host_device_flags
from uvigu import checkpoint
from uvigu.checkpoint import CheckpointError, load_pretrained, save_pretrained
from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig, WanDiT

REPO = Path(__file__).resolve().parents[1]
CFG = WanConfig.preset("tiny", out_channels=12)


def random_params(config: WanConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat stacked params, every one drawn non-zero (WanDiT's zero-init head would make every output 0). Made with
    numpy from the shape table rather than by initialising a WanDiT: the first eager init costs ~10 s on a CPU."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(shape) * 0.2 + (1.0 if k.endswith("scale") else 0.0)).astype(np.float32)
            for k, shape in wan_keys.expected_param_shapes(config).items()}


def random_model(tmp: Path, config: WanConfig = CFG, seed: int = 0) -> WanDiT:
    checkpoint.save_params(tmp / f"random-{seed}" / "dit", checkpoint.WAN_DIT, config, random_params(config, seed),
                           overwrite=True)
    return load_pretrained(tmp / f"random-{seed}")


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 4, 6, CFG.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, CFG.text_dim)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray([37.0, 912.0]), jnp.asarray(ctx)


_forward = nnx.jit(lambda m, x, t, c: m(x, t, c))


def out(model):
    return np.asarray(_forward(model, *inputs()))


def flat_numpy(model, stacked: bool = True) -> dict[str, np.ndarray]:
    flat = {k: np.asarray(v) for k, v in wan_keys.state_to_flat_params(model).items()}
    return wan_keys.stack_blocks(flat, model.config.num_layers) if stacked and not model.config.scan_layers else flat


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(DST, its params, the loaded model's output): the model folder is DST/dit, as the converter writes it."""
    dst = tmp_path_factory.mktemp("ckpt")
    params = random_params(CFG)
    checkpoint.save_params(dst / "dit", checkpoint.WAN_DIT, CFG, params, source={"kind": "test"})
    return dst, params, out(load_pretrained(dst))


def test_round_trip(saved, tmp_path):
    dst, params, want = saved
    for path in (dst, dst / "dit"):  # a converted DST or the model folder itself
        loaded = load_pretrained(path)
        assert loaded.config == CFG
        got = flat_numpy(loaded)
        assert set(got) == set(params)
        for k, v in params.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k
    meta = json.loads((dst / "dit/config.json").read_text())
    assert meta["model"] == "wan_dit" and meta["format_version"] == 1 and meta["source"] == {"kind": "test"}
    assert sorted(p.name for p in (dst / "dit").iterdir()) == ["config.json", "params"]
    # a module saved with save_pretrained loads back identical
    save_pretrained(tmp_path / "dit", loaded)
    assert np.array_equal(out(load_pretrained(tmp_path)), want)


def test_looped_layout(saved, tmp_path):
    dst, params, want = saved
    looped = load_pretrained(dst, scan_layers=False)
    assert isinstance(looped.blocks, nnx.List) and len(looped.blocks) == CFG.num_layers
    assert looped.blocks[1].attn1.to_q.kernel.shape == (CFG.dim, CFG.dim)
    assert rel_err(out(looped), want) <= 1e-6
    # saving a looped model writes the canonical stacked layout
    save_pretrained(tmp_path / "dit", looped)
    assert json.loads((tmp_path / "dit/config.json").read_text())["config"]["scan_layers"] is True
    again = load_pretrained(tmp_path)
    assert again.config.scan_layers
    for k, v in params.items():
        assert np.array_equal(flat_numpy(again)[k], v), k


def test_dtype_overrides(saved):
    dst, params, want = saved
    bf16 = load_pretrained(dst, dtype="bfloat16", param_dtype="bfloat16")
    assert bf16.config.dtype == bf16.config.param_dtype == "bfloat16"
    assert {str(v.dtype) for v in wan_keys.state_to_flat_params(bf16).values()} == {"bfloat16"}
    np.testing.assert_array_equal(  # restored by rounding the stored fp32 values
        np.asarray(bf16.blocks.ffn.proj_in.kernel[...]),
        params["blocks.ffn.proj_in.kernel"].astype(jnp.bfloat16))
    assert rel_err(out(bf16), want) < 5e-2
    assert checkpoint.load_config(dst, remat_policy="full", attention_backend="cudnn").remat_policy == "full"
    # Dtypes as Flax users write them: a jnp scalar type, a numpy type or dtype, or the name.
    for given, name in ((jnp.bfloat16, "bfloat16"), (np.float32, "float32"), (np.dtype("bfloat16"), "bfloat16"),
                        (jnp.float32, "float32")):
        assert checkpoint.load_config(dst, dtype=given, param_dtype=given).param_dtype == name
    f32 = load_pretrained(dst, dtype=jnp.float32)
    assert f32.config.dtype == "float32" and rel_err(out(f32), want) < 1e-6


def test_scan_layers_is_an_execution_choice_at_init():
    """From the same seed, a looped model (DiT, and UniViGU's text FFNs) starts from exactly the stacked model's
    params: switching `scan_layers` (the toy configs loop, the real ones scan) never changes a run's model."""
    from uvigu.models.univigu import UniViGU, UniViGUConfig

    ucfg = UniViGUConfig(text_flow="discrete", vocab_size=40, max_text_len=8, ffn_t_dim=24)
    flat = {}
    for scan in (True, False):
        wcfg = dataclasses.replace(CFG, scan_layers=scan)
        model = UniViGU(WanDiT(wcfg, rngs=nnx.Rngs(3)), ucfg, rngs=nnx.Rngs(4))
        params = {k: np.asarray(v) for k, v in wan_keys.state_to_flat_params(model).items()}
        flat[scan] = params if scan else wan_keys.stack_blocks(params, CFG.num_layers, ("dit.blocks", "ffn_t"))
    assert set(flat[True]) == set(flat[False])
    for k, v in flat[True].items():
        np.testing.assert_array_equal(flat[False][k], v, err_msg=k)
    assert not np.array_equal(flat[True]["dit.blocks.attn1.to_q.kernel"][0],
                              flat[True]["dit.blocks.attn1.to_q.kernel"][1])  # layers differ from one another


@pytest.mark.parametrize("scan_layers", [True, False])
def test_univigu_folder_round_trip(tmp_path, scan_layers):
    """A UniViGU saves as one folder (DiT + text side, stacks stacked on disk) and loads back as a UniViGU, in either
    layer layout, with execution overrides applied to its DiT."""
    from uvigu.models.univigu import UniViGU, UniViGUConfig

    wcfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    ucfg = UniViGUConfig(text_flow="discrete", vocab_size=40, max_text_len=8, ffn_t_dim=24)
    model = UniViGU(WanDiT(wcfg, rngs=nnx.Rngs(0)), ucfg, rngs=nnx.Rngs(1))
    checkpoint.save_pretrained(tmp_path / "univigu", model)
    meta = json.loads((tmp_path / "univigu/config.json").read_text())
    assert meta["model"] == "univigu" and meta["config"]["wan"]["scan_layers"] is True
    assert meta["config"]["univigu"]["ffn_t_dim"] == 24
    loaded = load_pretrained(tmp_path, scan_layers=not scan_layers, dtype=jnp.float32)  # DST root: finds univigu/
    assert isinstance(loaded, UniViGU) and loaded.config == ucfg and loaded.dit.config.scan_layers is (not scan_layers)
    want = wan_keys.state_to_flat_params(model)
    got = wan_keys.state_to_flat_params(loaded)
    num = CFG.num_layers
    prefixes = ("dit.blocks", "ffn_t")
    if scan_layers:
        got = wan_keys.stack_blocks({k: np.asarray(v) for k, v in got.items()}, num, prefixes)
    else:
        want = wan_keys.stack_blocks({k: np.asarray(v) for k, v in want.items()}, num, prefixes)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
    with pytest.raises(CheckpointError, match="text_flow"):
        load_pretrained(tmp_path, text_flow="embedding")
    with pytest.raises(CheckpointError, match="holds a univigu, not a wan_dit"):
        load_pretrained(tmp_path / "univigu", kind="wan_dit")


def test_override_errors(saved):
    dst, _, _ = saved
    with pytest.raises(CheckpointError, match=r"unknown override\(s\) \['dimension', 'scan'\]"):
        load_pretrained(dst, dimension=64, scan=True)
    with pytest.raises(CheckpointError, match=r"num_layers: checkpoint 2, override 3"):
        load_pretrained(dst, num_layers=3)
    with pytest.raises(CheckpointError, match="invalid override"):
        load_pretrained(dst, param_dtype="int8")
    assert load_pretrained(dst, num_layers=2, patch_size=[1, 2, 2]).config.num_layers == 2  # same value is fine


def test_bad_folders(saved, tmp_path):
    dst, _, _ = saved
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path)

    def variant(name, edit):
        folder = tmp_path / name / "dit"
        folder.mkdir(parents=True)
        (folder / "params").symlink_to(dst / "dit" / "params")
        meta = json.loads((dst / "dit/config.json").read_text())
        edit(meta)
        (folder / "config.json").write_text(json.dumps(meta))
        return folder

    with pytest.raises(CheckpointError, match="unknown model kind 'unet'"):
        load_pretrained(variant("kind", lambda m: m.update(model="unet")))
    with pytest.raises(CheckpointError, match="format_version 7"):
        load_pretrained(variant("version", lambda m: m.update(format_version=7)))
    with pytest.raises(CheckpointError, match="no 'model' field"):
        load_pretrained(variant("diffusers", lambda m: m.pop("model")))
    with pytest.raises(CheckpointError, match=r"mis-shaped tensor\(s\): .*blocks\.ffn\.proj_in\.bias: expected \(2, 64\), got \(2, 96\)"):
        load_pretrained(variant("shapes", lambda m: m["config"].update(ffn_dim=64)))


def test_save_is_atomic(tmp_path, tmp_path_factory, monkeypatch):
    scratch = tmp_path_factory.mktemp("scratch")
    model = random_model(scratch, seed=1)
    with pytest.raises(CheckpointError, match="mis-shaped tensor\\(s\\): blocks.attn1.to_q.bias"):
        flat = flat_numpy(model)
        flat["blocks.attn1.to_q.bias"] = flat["blocks.attn1.to_q.bias"][:, :-1]
        checkpoint.save_params(tmp_path / "dit", checkpoint.WAN_DIT, CFG, flat)
    assert list(tmp_path.iterdir()) == []

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(checkpoint.ocp.Checkpointer, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            save_pretrained(tmp_path / "dit", model)
    assert list(tmp_path.iterdir()) == []  # no dit, no staging folder

    save_pretrained(tmp_path / "dit", model)
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(tmp_path / "dit", random_model(scratch, seed=2))
    save_pretrained(tmp_path / "dit", random_model(scratch, seed=2), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]
    assert np.array_equal(flat_numpy(load_pretrained(tmp_path))["proj_out.bias"],
                          random_params(CFG, seed=2)["proj_out.bias"])


def test_restore_onto_mesh(saved):
    """On 8 fake CPU devices, params arrive already sharded by their logical axes (scanned and looped) and hold the
    stored values."""
    dst, params, _ = saved
    np.save(dst / "to_q.npy", params["blocks.attn1.to_q.kernel"])
    script = textwrap.dedent(f"""
        import numpy as np, jax
        from uvigu import sharding
        from uvigu.checkpoint import load_pretrained
        assert jax.device_count() == 8
        mesh = sharding.make_mesh({{"fsdp": 4, "tensor": 2}})
        want = np.load({str(dst / "to_q.npy")!r})
        for scan in (True, False):
            m = load_pretrained({str(dst)!r}, mesh=mesh, scan_layers=scan, param_dtype="bfloat16")
            q = m.blocks.attn1.to_q.kernel[...] if scan else m.blocks[1].attn1.to_q.kernel[...]
            spec = tuple(q.sharding.spec)
            assert spec == ((None, "fsdp", "tensor") if scan else ("fsdp", "tensor")), spec
            assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape[-2:] == (48 // 4, 48 // 2)
            assert q.dtype == jax.numpy.bfloat16
            np.testing.assert_array_equal(np.asarray(q), (want if scan else want[1]).astype(q.dtype))
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": host_device_flags(8)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
