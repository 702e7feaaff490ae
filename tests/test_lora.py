"""LoRA: parity with diffusers + PEFT (unmerged and merged, fp32, relative error ≤ 1e-5), the three file layouts
(round trips, and diffusers' own converters reading what we write), scanned and looped layouts, UniViGU's FFN_t,
identity of a fresh adapter, the trainable filter, and errors that name what is wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from reference import diffusers_forward, diffusers_wan, rel_err
from xla_env import host_device_flags
from uvigu.models import lora, lora_formats, wan_keys
from uvigu.models.lora import LoRAConfig, LoRAWeight
from uvigu.models.univigu import UniViGUConfig, UniViGUModelConfig
from uvigu.models.wan import WanConfig

TOL = 1e-5
CFG = WanConfig.preset("tiny", out_channels=12)  # 2 layers, dim 48, 3 heads
LATENT = (2, 3, 4, 6)  # B, T, H, W
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"]
RANK, ALPHA = 4, 6.0  # α ≠ R so a lost α shows


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*LATENT, CFG.in_channels)).astype(np.float32)
    t = np.array([37.0, 912.0], np.float32)
    ctx = rng.standard_normal((LATENT[0], 7, CFG.text_dim)).astype(np.float32)
    return x, t, ctx


@nnx.jit
def _forward(model, x, t, ctx):
    return model(x, t, ctx)


def _run(model):
    return np.asarray(_forward(model, *map(jnp.asarray, _inputs())))


def _ours(base_state_dict, scan_layers=True):
    cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
    return wan_keys.model_from_params(cfg, wan_keys.diffusers_to_params(base_state_dict, cfg))


def _random_adapters(names_shapes, rank=RANK, alpha=ALPHA, seed=0) -> lora.Adapters:
    rng = np.random.default_rng(seed)
    return {n: LoRAWeight(rng.standard_normal((i, rank)).astype(np.float32) * 0.3,
                          rng.standard_normal((rank, o)).astype(np.float32) * 0.3, alpha)
            for n, (i, o) in names_shapes.items()}


def _block_adapters(num_layers=CFG.num_layers, dim=CFG.dim, ffn=CFG.ffn_dim, ffn_t=None, **kw) -> lora.Adapters:
    shapes = {}
    for i in range(num_layers):
        for target, d in lora.BLOCK_LINEARS.items():
            if target.startswith("ffn_t") and ffn_t is None:
                continue
            f = ffn_t if target.startswith("ffn_t") else ffn
            io = (dim, f) if target.endswith("proj_in") else (f, dim) if target.endswith("proj_out") else (dim, dim)
            shapes[f"blocks.{i}.{d}"] = io
    return _random_adapters(shapes, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Parity with diffusers + PEFT.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_case():
    """A tiny random diffusers Wan with a PEFT adapter (random non-zero A and B, α ≠ R, proj_out at rank 2)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = diffusers_wan(CFG, seed=3)
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    config = dict(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGETS, rank_pattern={"proj_out": 2},
                  alpha_pattern={"proj_out": 5.0}, init_lora_weights=False)
    ref.add_adapter(LoraConfig(**config))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(ref).items()}
    return ref, base, state, config


def test_peft_state_dict_reads_as_diffusers_layout(peft_case):
    _, _, state, config = peft_case
    adapters, fmt = lora_formats.from_state_dict(state, adapter_config=config)
    assert fmt == "diffusers"
    assert len(adapters) == CFG.num_layers * 10 + 1
    assert adapters["blocks.1.attn2.to_out.0"].alpha == ALPHA and adapters["blocks.1.attn2.to_out.0"].rank == RANK
    assert (adapters["proj_out"].rank, adapters["proj_out"].alpha) == (2, 5.0)
    np.testing.assert_array_equal(adapters["blocks.0.ffn.net.2"].b, state["blocks.0.ffn.net.2.lora_B.weight"].numpy().T)


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_parity_unmerged(peft_case, scan_layers):
    ref, base, state, config = peft_case
    adapters, _ = lora_formats.from_state_dict(state, adapter_config=config)
    model = lora.attach_adapters(_ours(base, scan_layers), adapters)
    got, want = _run(model), diffusers_forward(ref, *_inputs())
    err = rel_err(got, want)
    print(f"LoRA unmerged parity ({'scanned' if scan_layers else 'looped'}): {err:.2e}")
    assert err <= TOL
    # The adapter matters: the base model alone is far from it.
    assert rel_err(_run(_ours(base, scan_layers)), want) > 1e-2


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_parity_merged(peft_case, scan_layers):
    ref, base, state, config = peft_case
    adapters, _ = lora_formats.from_state_dict(state, adapter_config=config)
    merged = lora.merge_lora(_ours(base, scan_layers), adapters)
    assert not lora.has_lora(merged)
    want = diffusers_forward(ref, *_inputs())
    err = rel_err(_run(merged), want)
    print(f"LoRA merged parity ({'scanned' if scan_layers else 'looped'}): {err:.2e}")
    assert err <= TOL
    # The merged kernel is PEFT's merged weight (W + s·B·A), transposed.
    from peft.tuners.lora import Linear as PeftLinear

    layer = ref.blocks[1].attn1.to_q
    assert isinstance(layer, PeftLinear)
    with torch.no_grad():
        w_merged = layer.get_base_layer().weight + layer.get_delta_weight("default")
    ours = merged.blocks.attn1.to_q.kernel[...][1] if scan_layers else merged.blocks[1].attn1.to_q.kernel[...]
    assert rel_err(ours, w_merged.numpy().T) <= TOL


def test_parity_scaled_merge_matches_diffusers_adapter_weight(peft_case):
    ref, base, state, config = peft_case
    adapters, _ = lora_formats.from_state_dict(state, adapter_config=config)
    ref.set_adapters(["default"], weights=[0.4])
    try:
        want = diffusers_forward(ref, *_inputs())
    finally:
        ref.set_adapters(["default"], weights=[1.0])
    assert rel_err(_run(lora.merge_lora(_ours(base), adapters, scale=0.4)), want) <= TOL
    assert rel_err(_run(lora.attach_adapters(_ours(base, False), adapters, scale=0.4)), want) <= TOL


def test_parity_after_peft_merge(peft_case):
    # PEFT's own merged model (weights folded in place) against our merged one.
    ref, base, state, config = peft_case
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapters, _ = lora_formats.from_state_dict(state, adapter_config=config)
    ours = _run(lora.merge_lora(_ours(base), adapters))
    layers = [m for m in ref.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.merge()
    try:
        want = diffusers_forward(ref, *_inputs())
    finally:
        for m in layers:
            m.unmerge()
    assert rel_err(ours, want) <= TOL


@pytest.mark.parametrize("fmt", lora_formats.FORMATS)
def test_diffusers_reads_what_we_write(tmp_path, fmt):
    """Our file in each layout, read by diffusers' WanLoraLoaderMixin (its own converters) into a diffusers model,
    gives the forward our model gives with the same adapters."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    ref = diffusers_wan(CFG, seed=5)
    base = {k: v.clone() for k, v in ref.state_dict().items()}
    adapters = _block_adapters(alpha=ALPHA, seed=2)  # musubi's converter in diffusers takes block Linears only
    path = lora_formats.save_lora(adapters, tmp_path / f"{fmt}.safetensors", fmt)
    state, metadata = WanLoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    ref.load_lora_adapter(state, prefix="transformer", adapter_name="ours", metadata=metadata)
    want = diffusers_forward(ref, *_inputs())
    got = _run(lora.merge_lora(_ours(base), lora_formats.load_lora(path)[0]))
    err = rel_err(got, want)
    print(f"diffusers reads our {fmt} file: {err:.2e}")
    assert err <= TOL


# ----------------------------------------------------------------------------------------------------------------------
# Formats.
# ----------------------------------------------------------------------------------------------------------------------


def _mixed_adapters() -> lora.Adapters:
    """Block Linears incl. UniViGU's FFN_t at two ranks and two α, plus top-level Linears."""
    adapters = _block_adapters(ffn_t=24)
    adapters.update(_block_adapters(num_layers=1, ffn_t=24, rank=2, alpha=1.5, seed=4))
    adapters.update(_random_adapters({"proj_out": (48, 64), "condition_embedder.time_proj": (48, 288)}, rank=3,
                                     alpha=3.0, seed=5))
    return adapters


def _assert_same(a: lora.Adapters, b: lora.Adapters):
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].a, b[name].a, err_msg=name)
        np.testing.assert_array_equal(a[name].b, b[name].b, err_msg=name)
        assert a[name].alpha == b[name].alpha, name


@pytest.mark.parametrize("fmt", lora_formats.FORMATS)
def test_round_trip_each_format(tmp_path, fmt):
    adapters = _mixed_adapters()
    path = lora_formats.save_lora(adapters, tmp_path / "lora.safetensors", fmt)
    back, detected = lora_formats.load_lora(path)
    assert detected == fmt
    _assert_same(back, adapters)
    tensors, _ = lora_formats.to_state_dict(adapters, fmt)
    sample = {"diffusers": "transformer.blocks.1.attn1.to_q.lora_A.weight",
              "original": "diffusion_model.blocks.1.self_attn.q.lora_A.weight",
              "musubi": "lora_unet_blocks_1_self_attn_q.lora_down.weight"}[fmt]
    assert tensors[sample].shape == (RANK, CFG.dim)  # torch layout [R, I]
    if fmt != "diffusers":
        alpha_key = sample.replace(".lora_A.weight", ".alpha").replace(".lora_down.weight", ".alpha")
        assert float(tensors[alpha_key]) == ALPHA
    ffn_t = {"diffusers": "transformer.blocks.0.ffn_t.net.0.proj.lora_B.weight",
             "original": "diffusion_model.blocks.0.ffn_t.0.lora_B.weight",
             "musubi": "lora_unet_blocks_0_ffn_t_0.lora_up.weight"}[fmt]
    assert tensors[ffn_t].shape == (24, 2)


def test_bf16_files_and_peft_folder(tmp_path):
    adapters = _block_adapters()
    path = lora_formats.save_lora(adapters, tmp_path / "bf16.safetensors", "musubi", dtype="bfloat16")
    back, _ = lora_formats.load_lora(path)
    assert back["blocks.0.attn1.to_q"].a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(back["blocks.0.attn1.to_q"].a, adapters["blocks.0.attn1.to_q"].a.astype(jnp.bfloat16))
    # A PEFT folder: bare keys with `base_model.model.` and an adapter_config.json holding α.
    folder = tmp_path / "peft"
    folder.mkdir()
    from safetensors.numpy import save_file

    tensors, _ = lora_formats.to_state_dict(adapters, "diffusers")
    save_file({"base_model.model." + k[len("transformer."):]: v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2.0, "use_rslora": true}')
    back, fmt = lora_formats.load_lora(folder)
    assert fmt == "diffusers" and back["blocks.1.ffn.net.2"].alpha == pytest.approx(2.0 * 2.0)  # rsLoRA: α√R
    # Without any α: α = R (scale 1), diffusers' rule; or the caller's.
    bare = {k: v for k, v in tensors.items()}
    assert lora_formats.from_state_dict(bare)[0]["blocks.0.attn1.to_k"].scale == 1.0
    assert lora_formats.from_state_dict(bare, alpha=8.0)[0]["blocks.0.attn1.to_k"].scale == 2.0


@pytest.mark.parametrize("bad,match", [
    ({"transformer.blocks.0.attn1.norm_q.lora_A.weight": np.zeros((2, 48))}, "norm_q"),
    ({"diffusion_model.blocks.0.modulation.lora_A.weight": np.zeros((2, 48)),
      "diffusion_model.blocks.0.modulation.lora_B.weight": np.zeros((48, 2))}, "modulation"),
    ({"lora_unet_blocks_0_self_attn_z.lora_down.weight": np.zeros((2, 48))}, "self_attn_z"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 48))}, "only its A"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 48)),
      "lora_unet_blocks_0_self_attn_q.lora_up.weight": np.zeros((48, 2))}, "mix layouts"),
    ({"diffusion_model.blocks.0.self_attn.q.diff_b": np.zeros((48,))}, "unsupported"),
    ({"transformer.blocks.0.attn1.to_q.weight": np.zeros((48, 48))}, "not a lora_A"),
    ({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.zeros((2, 48)),
      "transformer.blocks.0.attn1.to_q.lora_B.weight": np.zeros((48, 3))}, "are not"),
])
def test_bad_state_dicts_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        lora_formats.from_state_dict(bad)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora_formats.load_lora(tmp_path / "missing.safetensors")
    (tmp_path / "x.pt").write_bytes(b"0")
    with pytest.raises(ValueError, match="only .safetensors"):
        lora_formats.load_lora(tmp_path / "x.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="cannot read LoRA file"):
        lora_formats.load_lora(tmp_path / "broken.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA format"):
        lora_formats.save_lora(_block_adapters(), tmp_path / "a.safetensors", "kohya")
    with pytest.raises(ValueError, match="text_head.proj"):
        lora_formats.save_lora(_random_adapters({"text_head.proj": (48, 8)}), tmp_path / "a.safetensors")


# ----------------------------------------------------------------------------------------------------------------------
# The model side: layouts, identity, UniViGU, errors.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_state():
    return {k: v.clone() for k, v in diffusers_wan(CFG, seed=7).state_dict().items()}


def test_fresh_adapter_is_identity_and_tagged_like_the_kernel(base_state):
    for scan in (True, False):
        model = _ours(base_state, scan)
        before = _run(model)
        lora.add_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(0))
        # B = 0: the adapters add exact zeros. The model with them is a separately compiled program, so it matches
        # the base model to float rounding (bit for bit only where XLA happens to emit both alike).
        q = model.blocks.attn1.to_q if scan else model.blocks[1].attn1.to_q
        assert not np.any(np.asarray(q.lora_b[...])) and np.any(np.asarray(q.lora_a[...]))
        np.testing.assert_allclose(_run(model), before, rtol=1e-5, atol=1e-5)
        assert isinstance(q, lora.LoRALinear) and q.scale == ALPHA / RANK
        lead = ("layers",) if scan else ()
        assert q.lora_a.get_metadata()["out_sharding"] == (*lead, "embed", None)
        assert q.lora_b.get_metadata()["out_sharding"] == (*lead, None, "heads")
        assert q.lora_a.shape == (*((2,) if scan else ()), 48, RANK)
        assert float(jnp.abs(q.lora_a[...]).max()) > 0  # A is random, only B starts at zero
        # The base param paths did not move (a base checkpoint loads as before).
        base_paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
        assert base_paths == {".".join(map(str, p)) for p, _ in
                              nnx.to_flat_state(nnx.state(_ours(base_state, scan), nnx.Param))}
        n_lora = len(nnx.to_flat_state(nnx.state(model, lora.lora_filter)))
        assert n_lora == 2 * 10 * (1 if scan else CFG.num_layers)  # ffn_t targets skipped on a plain WanDiT


def test_scanned_and_looped_hold_the_same_adapters(base_state):
    adapters = _block_adapters(seed=9)
    outs, back = [], []
    for scan in (True, False):
        model = lora.add_lora(_ours(base_state, scan), LoRAConfig(rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(0))
        lora.set_adapters(model, adapters)
        back.append(lora.get_adapters(model))
        outs.append(_run(model))
    _assert_same(back[0], adapters)
    _assert_same(back[1], adapters)
    assert rel_err(outs[0], outs[1]) <= TOL
    merged = _run(lora.merge_lora(_ours(base_state), adapters))
    assert rel_err(outs[0], merged) <= TOL
    # Unwrapping with merge keeps the function; unmerge restores the base.
    model = lora.set_adapters(lora.add_lora(_ours(base_state), LoRAConfig(rank=RANK, alpha=ALPHA),
                                            rngs=nnx.Rngs(0)), adapters)
    lora.remove_lora(model, merge=True)
    assert not lora.has_lora(model) and type(model.blocks.attn1.to_q) is nnx.Linear
    assert rel_err(_run(model), merged) <= TOL
    base = _run(_ours(base_state))
    assert rel_err(_run(lora.unmerge_lora(model, adapters)), base) <= TOL


def test_set_adapters_pads_rank_and_folds_alpha(base_state):
    small = _block_adapters(rank=2, alpha=5.0, seed=3)
    model = lora.add_lora(_ours(base_state), LoRAConfig(rank=RANK, alpha=ALPHA), rngs=nnx.Rngs(0))
    lora.set_adapters(model, small)
    assert rel_err(_run(model), _run(lora.merge_lora(_ours(base_state), small))) <= TOL


def test_extract_recovers_a_merged_adapter(base_state):
    adapters = _block_adapters(seed=4)
    tuned = lora.merge_lora(_ours(base_state), adapters)
    extracted = lora.extract_lora(_ours(base_state), tuned, rank=RANK)
    assert sorted(extracted) == sorted(adapters)
    for name, w in adapters.items():
        assert rel_err(extracted[name].delta(), w.delta()) <= 1e-4, name


def test_top_level_targets_wrap_and_unwrap(base_state):
    model = _ours(base_state)
    targets = ("condition_embedder.time_embedder.linear_1", "proj_out")
    lora.add_lora(model, LoRAConfig(rank=2, targets=targets), rngs=nnx.Rngs(0))
    assert isinstance(model.condition_embedder.time_embedder["linear_1"], lora.LoRALinear)
    assert sorted(lora.get_adapters(model)) == sorted(targets)
    lora.remove_lora(model, merge=False)
    assert type(model.proj_out) is nnx.Linear and not lora.has_lora(model)


def test_model_side_errors(base_state):
    model = _ours(base_state)
    with pytest.raises(ValueError, match=r"\['attn3.to_q'\] name no Linear"):
        lora.add_lora(model, LoRAConfig(targets=("attn1.to_q", "attn3.to_q")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="blocks.5.attn1.to_q"):
        lora.merge_lora(model, _random_adapters({"blocks.5.attn1.to_q": (48, 48)}))
    with pytest.raises(ValueError, match=r"blocks.0.ffn.net.2: adapter maps 48 -> 48, the Linear 96 -> 48"):
        lora.merge_lora(model, _random_adapters({"blocks.0.ffn.net.2": (48, 48)}))
    with pytest.raises(ValueError, match="blocks.0.norm2"):
        lora.merge_lora(model, _random_adapters({"blocks.0.norm2": (48, 48)}))
    lora.add_lora(model, LoRAConfig(rank=2, targets=("attn1.to_q",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(model, LoRAConfig(rank=2, targets=("attn1.to_q",)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="get no weights"):
        lora.set_adapters(model, {})
    with pytest.raises(ValueError, match="rank 4 > the module's rank 2"):
        lora.set_adapters(model, {k: v for k, v in _block_adapters().items() if "attn1.to_q" in k})
    with pytest.raises(ValueError, match="has no adapter in the model"):
        lora.set_adapters(model, _block_adapters(rank=2))


@pytest.mark.parametrize("bad,match", [(dict(rank=0), "rank"), (dict(alpha=-1.0), "alpha"),
                                       (dict(targets=()), "targets"), (dict(param_dtype="float8"), "param_dtype")])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**bad)


def _univigu(scan_layers: bool):
    wan = dataclasses.replace(WanConfig.preset("tiny", num_layers=2), scan_layers=scan_layers)
    cfg = UniViGUModelConfig(wan, UniViGUConfig(text_flow="discrete", vocab_size=32, max_text_len=8, ffn_t_dim=24))
    model = cfg.build(nnx.Rngs(0))
    for i, head in enumerate((model.dit.proj_out, model.text_head.proj)):  # zero-init heads would hide everything
        head.kernel[...] = jax.random.normal(jax.random.key(i), head.kernel.shape) * 0.3
    return model


def test_univigu_ffn_t_adapters(tmp_path):
    model = _univigu(scan_layers=True)
    rng = np.random.default_rng(0)
    args = (jnp.asarray(rng.standard_normal((1, 1, 4, 4, 16)), jnp.float32), jnp.asarray(rng.integers(0, 32, (1, 5))),
            jnp.asarray([0.3]), jnp.asarray([0.6]), jnp.asarray(rng.standard_normal((1, 6, 32)), jnp.float32))
    call = nnx.jit(lambda m, *a: m(*a))
    base = call(model, *args)
    lora.add_lora(model, LoRAConfig(rank=3), rngs=nnx.Rngs(1))
    assert isinstance(model.ffn_t.proj_in, lora.LoRALinear) and model.ffn_t.proj_in.lora_a.shape == (2, 48, 3)
    assert not np.any(np.asarray(model.ffn_t.proj_in.lora_b[...]))
    fresh = call(model, *args)
    for got, want in zip(fresh, base):  # (B = 0; a separately compiled program: equal to float rounding)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    adapters = _block_adapters(ffn_t=24, rank=3, alpha=3.0, seed=6)
    lora.set_adapters(model, adapters)
    assert "blocks.1.ffn_t.net.0.proj" in lora.get_adapters(model)
    unmerged = call(model, *args)
    path = lora_formats.save_lora(lora.get_adapters(model), tmp_path / "u.safetensors", "musubi")
    merged = call(lora.merge_lora(_univigu(scan_layers=True), lora_formats.load_lora(path)[0]), *args)
    for got, want, b in zip(merged, unmerged, base):
        assert rel_err(got, want) <= TOL and rel_err(want, b) > 1e-3
    # The looped layout names the same adapters (`ffn_t.{i}` in the graph, blocks.{i}.ffn_t... in files).
    looped = lora.add_lora(_univigu(scan_layers=False), LoRAConfig(rank=3), rngs=nnx.Rngs(1))
    assert isinstance(looped.ffn_t[1].proj_out, lora.LoRALinear)
    _assert_same(lora.get_adapters(lora.set_adapters(looped, adapters)), adapters)
    before = np.asarray(_univigu(scan_layers=False).ffn_t[1].proj_in.kernel[...])
    merged_looped = lora.merge_lora(_univigu(scan_layers=False), adapters)
    delta = np.asarray(merged_looped.ffn_t[1].proj_in.kernel[...]) - before
    assert rel_err(delta, adapters["blocks.1.ffn_t.net.0.proj"].delta()) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# Training: only the adapters move.
# ----------------------------------------------------------------------------------------------------------------------


def test_trainable_filter_moves_only_adapters(base_state):
    model = lora.add_lora(_ours(base_state), LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora.lora_filter)
    # The optimiser state covers exactly the adapters (Adam: two moments per adapter factor).
    lora_leaves = jax.tree.leaves(nnx.state(model, lora.lora_filter))
    opt_arrays = [x for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if np.ndim(x) > 0]
    assert sorted(x.shape for x in opt_arrays) == sorted([x.shape for x in lora_leaves] * 2)
    base_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, lora.lora_filter))
    x, t, ctx = map(jnp.asarray, _inputs())

    @nnx.jit
    def step(model, optimizer):
        def loss(m):
            return jnp.mean(jnp.square(m(x, t, ctx) - 1.0))

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, lora.lora_filter))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.Param)), base_before)
    after = jax.tree.map(np.asarray, nnx.state(model, lora.lora_filter))
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(lora_before))]
    assert all(moved), "every adapter factor moves (B at step 1, A once B is non-zero)"


# ----------------------------------------------------------------------------------------------------------------------
# Sharding: 8 fake CPU devices (a subprocess: the device count is fixed when JAX starts).
# ----------------------------------------------------------------------------------------------------------------------

SHARDED_WORKER = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from uvigu import sharding
    from uvigu.models import lora, wan_keys
    from uvigu.models.wan import WanConfig, WanDiT

    assert jax.device_count() == 8
    cfg = WanConfig.preset("tiny")
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s).astype(np.float32) * 0.2 for k, s in wan_keys.expected_param_shapes(cfg).items()}
    adapters = {f"blocks.{i}.{d}": lora.LoRAWeight(rng.standard_normal((48, 4)) * 0.3,
                                                   rng.standard_normal((4, 48)) * 0.3, 6.0)
                for i in range(2) for d in ("attn1.to_q", "attn2.to_out.0")}
    x = jnp.asarray(rng.standard_normal((4, 2, 4, 4, 16)), jnp.float32)
    t = jnp.asarray([10.0, 300.0, 600.0, 990.0])
    ctx = jnp.asarray(rng.standard_normal((4, 5, 32)), jnp.float32)
    forward = nnx.jit(lambda m, x, t, c: m(x, t, c))
    spec = lambda v: list(v[...].sharding.spec) + [None] * (v[...].ndim - len(v[...].sharding.spec))

    def sharded_base():
        model = wan_keys.model_from_params(cfg, flat)
        graphdef, state = nnx.split(model)
        return nnx.merge(graphdef, jax.device_put(state, sharding.state_shardings(state, mesh)))

    out = {}
    # Born sharded: the adapters of a model built by sharded_init sit in their shards.
    fresh = sharding.sharded_init(lambda: lora.add_lora(WanDiT(cfg, rngs=nnx.Rngs(0)), lora.LoRAConfig(rank=4),
                                                        rngs=nnx.Rngs(1)), mesh)
    out["init_a"], out["init_b"] = spec(fresh.blocks.attn1.to_q.lora_a), spec(fresh.blocks.attn1.to_q.lora_b)
    out["init_ffn_b"] = spec(fresh.blocks.ffn.proj_in.lora_b)
    # Attached to an already-sharded model: placed next to the kernel; same numbers as one device.
    want = np.asarray(forward(lora.attach_adapters(wan_keys.model_from_params(cfg, flat), adapters), x, t, ctx))
    model = lora.attach_adapters(sharded_base(), adapters)
    out["attach_a"], out["attach_b"] = spec(model.blocks.attn2.to_out.lora_a), spec(model.blocks.attn2.to_out.lora_b)
    with jax.set_mesh(mesh):
        got = forward(model, x, t, ctx)
    out["attach_err"] = float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
    merged = lora.merge_lora(sharded_base(), adapters)
    out["merged_kernel"] = spec(merged.blocks.attn1.to_q.kernel)
    with jax.set_mesh(mesh):
        got = forward(merged, x, t, ctx)
    out["merged_err"] = float(np.linalg.norm(np.asarray(got) - want) / np.linalg.norm(want))
    print("RESULTS" + json.dumps(out))
    """
)


def test_adapters_shard_like_their_kernels():
    env = dict(os.environ, XLA_FLAGS=host_device_flags(8), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_WORKER], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))[len("RESULTS"):])
    print(out)
    # A [L, I, R]: I split like the kernel's input (embed -> fsdp); B [L, R, O]: O like its output (heads -> tensor).
    assert out["init_a"] == [None, "fsdp", None] and out["init_b"] == [None, None, "tensor"]
    assert out["init_ffn_b"] == [None, None, "tensor"]  # mlp -> tensor
    # to_out maps heads -> embed
    assert out["attach_a"] == [None, "tensor", None] and out["attach_b"] == [None, None, "fsdp"]
    assert out["merged_kernel"] == [None, "fsdp", "tensor"]
    assert out["attach_err"] <= TOL and out["merged_err"] <= TOL
