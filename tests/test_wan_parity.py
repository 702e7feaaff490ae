"""WanDiT against diffusers' WanTransformer3DModel: module by module and end to end, fp32, relative error ≤ 1e-5."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from reference import diffusers_forward, diffusers_wan, rel_err
from uvigu.models import layers, wan_keys
from uvigu.models.wan import WanConfig, WanDiT

TOL = 1e-5

# Tiny architectures that break different assumptions: unequal in/out channels, odd head counts, a head dim whose
# RoPE bands are unequal, a temporal patch > 1, no cross-attention norm.
CONFIGS = {
    "base": WanConfig.preset("tiny", out_channels=12),
    "heads5_hd12": WanConfig.preset("tiny", dim=60, num_heads=5, ffn_dim=72, in_channels=8, out_channels=4,
                                    text_dim=24, freq_dim=16, num_layers=3),
    "patch2x2x1": WanConfig.preset("tiny", patch_size=(2, 2, 1), in_channels=4, out_channels=6, num_layers=1),
    "no_cross_norm": WanConfig.preset("tiny", cross_attn_norm=False, num_heads=1, dim=36, ffn_dim=40),
}
# Latent shapes [B, T, H, W] per config: several frames, non-square.
LATENTS = {"base": (2, 3, 4, 6), "heads5_hd12": (2, 2, 6, 4), "patch2x2x1": (1, 4, 4, 3), "no_cross_norm": (2, 1, 2, 8)}


def _inputs(cfg: WanConfig, latent_shape, seed=0, context_len=7):
    rng = np.random.default_rng(seed)
    b = latent_shape[0]
    x = rng.standard_normal((*latent_shape, cfg.in_channels)).astype(np.float32)
    t = np.linspace(3.0, 997.0, b).astype(np.float32)  # include timesteps near 1000, where angles are large
    ctx = rng.standard_normal((b, context_len, cfg.text_dim)).astype(np.float32)
    return x, t, ctx


def _ours(cfg: WanConfig, ref) -> WanDiT:
    return wan_keys.model_from_params(cfg, wan_keys.diffusers_to_params(ref.state_dict(), cfg))


@nnx.jit
def _forward(model, x, t, ctx):
    return model(x, t, ctx)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    cfg = CONFIGS[request.param]
    return request.param, cfg, diffusers_wan(cfg, seed=sum(map(ord, request.param)))


# ----------------------------------------------------------------------------------------------------------------------
# End to end.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_end_to_end(case, scan_layers):
    name, cfg, ref = case
    cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
    x, t, ctx = _inputs(cfg, LATENTS[name])
    ours = np.asarray(_forward(_ours(cfg, ref), jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    want = diffusers_forward(ref, x, t, ctx)
    assert ours.shape == want.shape == (*LATENTS[name], cfg.out_channels)
    assert rel_err(ours, want) <= TOL, (name, rel_err(ours, want))


def test_jit_matches_eager():
    cfg = CONFIGS["patch2x2x1"]
    ref = diffusers_wan(cfg)
    model = _ours(cfg, ref)
    x, t, ctx = map(jnp.asarray, _inputs(cfg, LATENTS["patch2x2x1"]))
    eager = model(x, t, ctx)
    jitted = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, x, t, ctx)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Module by module.
# ----------------------------------------------------------------------------------------------------------------------


def test_time_path(case):
    _, cfg, ref = case
    model = _ours(cfg, ref)
    t = np.array([0.0, 1.0, 250.5, 999.0, 1000.0], np.float32)
    with torch.no_grad():
        ctx = torch.zeros(len(t), 1, cfg.text_dim)
        temb, tproj, _, _ = ref.condition_embedder(torch.from_numpy(t), ctx)
    e, e0 = model.condition_embedder.time(jnp.asarray(t))
    assert rel_err(e, temb.numpy()) <= TOL
    assert rel_err(np.asarray(e0).reshape(len(t), -1), tproj.numpy()) <= TOL


def test_sinusoid_is_cos_then_sin():
    feats = np.asarray(layers.sinusoidal_embedding(jnp.array([0.0, 10.0]), 8))
    np.testing.assert_allclose(feats[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=0)
    np.testing.assert_allclose(feats[1, 0], math.cos(10.0), rtol=1e-6)  # frequency 1 first, cos half first
    np.testing.assert_allclose(feats[1, 4], math.sin(10.0), rtol=1e-6)


def test_text_embedding(case):
    _, cfg, ref = case
    model = _ours(cfg, ref)
    ctx = np.random.default_rng(1).standard_normal((2, 9, cfg.text_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref.condition_embedder.text_embedder(torch.from_numpy(ctx)).numpy()
    assert rel_err(model.embed_context(jnp.asarray(ctx)), want) <= TOL


def test_rope_tables(case):
    name, cfg, ref = case
    _, T, H, W = LATENTS[name]
    pt, ph, pw = cfg.patch_size
    dummy = torch.zeros(1, cfg.in_channels, T, H, W)
    with torch.no_grad():
        cos_ref, sin_ref = ref.rope(dummy)  # [1, L, 1, K], each angle repeated twice (interleaved)
    cos, sin = layers.wan_rope_3d(cfg.head_dim, (T // pt, H // ph, W // pw))
    np.testing.assert_allclose(np.asarray(cos), cos_ref[0, :, 0, 0::2].numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(sin), sin_ref[0, :, 0, 1::2].numpy(), rtol=0, atol=1e-7)


def test_rope_band_split_for_128():
    # 44 / 42 / 42 real dims for Wan's head dim 128: positions along h only touch channels 44..85.
    cos, _ = layers.wan_rope_3d(128, (1, 2, 1))
    changed = np.nonzero(~np.isclose(np.asarray(cos[1]), np.asarray(cos[0])))[0]
    assert changed.min() == 44 // 2 and changed.max() < (44 + 42) // 2


def test_one_block(case):
    name, cfg, ref = case
    model = _ours(dataclasses.replace(cfg, scan_layers=False), ref)
    rng = np.random.default_rng(2)
    b, T, H, W = LATENTS[name]
    pt, ph, pw = cfg.patch_size
    grid = (T // pt, H // ph, W // pw)
    n_tok = math.prod(grid)
    h = rng.standard_normal((b, n_tok, cfg.dim)).astype(np.float32)
    ctx = rng.standard_normal((b, 5, cfg.dim)).astype(np.float32)
    e0 = rng.standard_normal((b, 6, cfg.dim)).astype(np.float32) * 0.3
    with torch.no_grad():
        rope = ref.rope(torch.zeros(1, cfg.in_channels, T, H, W))
        want = ref.blocks[0](torch.from_numpy(h), torch.from_numpy(ctx), torch.from_numpy(e0), rope).numpy()
    got = model.blocks[0](jnp.asarray(h), jnp.asarray(ctx), jnp.asarray(e0)[:, None], model.video_rope(grid))
    assert rel_err(got, want) <= TOL


def test_per_token_modulation_matches_diffusers_ti2v_path():
    # diffusers' per-token timesteps ([B, L], the Wan2.2 TI2V path) -- the unified model's per-token τ relies on it.
    cfg = CONFIGS["base"]
    ref = diffusers_wan(cfg)
    model = _ours(dataclasses.replace(cfg, scan_layers=False), ref)
    b, T, H, W = LATENTS["base"]
    grid = (T, H // 2, W // 2)
    n_tok = math.prod(grid)
    rng = np.random.default_rng(3)
    t = rng.uniform(0, 1000, (b, n_tok)).astype(np.float32)
    h = rng.standard_normal((b, n_tok, cfg.dim)).astype(np.float32)
    ctx = rng.standard_normal((b, 5, cfg.dim)).astype(np.float32)
    with torch.no_grad():
        _, tproj, _, _ = ref.condition_embedder(torch.from_numpy(t.reshape(-1)), torch.zeros(b, 1, cfg.text_dim),
                                                timestep_seq_len=n_tok)
        rope = ref.rope(torch.zeros(1, cfg.in_channels, T, H, W))
        want = ref.blocks[0](torch.from_numpy(h), torch.from_numpy(ctx), tproj.unflatten(2, (6, -1)), rope).numpy()
    _, e0 = model.condition_embedder.time(jnp.asarray(t))
    got = model.blocks[0](jnp.asarray(h), jnp.asarray(ctx), e0, model.video_rope(grid))
    assert rel_err(got, want) <= TOL
    # The whole model with [B, L] timesteps (what per-frame noise levels in pretraining use).
    x = rng.standard_normal((b, T, H, W, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((b, 7, cfg.text_dim)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(t), torch.from_numpy(text),
                   return_dict=False)[0].permute(0, 2, 3, 4, 1).numpy()
    got = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text))
    assert rel_err(got, want) <= TOL
    with pytest.raises(ValueError, match="timestep must be"):
        model(jnp.asarray(x), jnp.asarray(t[:, :-1]), jnp.asarray(text))


# ----------------------------------------------------------------------------------------------------------------------
# Presets, dtypes, remat, bad input.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,count", [("wan2.1-1.3b", 1_418_996_800), ("wan2.1-14b", 14_288_491_584)])
def test_preset_parameter_counts(preset, count):
    cfg = WanConfig.preset(preset)
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))
    n = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == count
    # The same count as diffusers' own module on the meta device.
    with torch.device("meta"):
        from diffusers import WanTransformer3DModel

        ref = WanTransformer3DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                                    ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers)
    assert sum(p.numel() for p in ref.parameters()) == count
    # And the converter's key table describes exactly these params.
    assert sum(math.prod(s) for s in wan_keys.expected_diffusers_shapes(cfg).values()) == count


# bf16 compute, fp32 storage vs full fp32. Measured ≈ 4e-3 on these configs; bound with margin for bf16's 8-bit
# mantissa accumulated over two blocks.
BF16_BOUND = 2e-2


def test_bf16_compute_close_to_fp32():
    cfg = CONFIGS["base"]
    ref = diffusers_wan(cfg)
    x, t, ctx = map(jnp.asarray, _inputs(cfg, LATENTS["base"]))
    fp32 = np.asarray(_forward(_ours(cfg, ref), x, t, ctx))
    bf16_model = _ours(dataclasses.replace(cfg, dtype="bfloat16"), ref)
    bf16 = _forward(bf16_model, x, t, ctx)
    assert bf16.dtype == jnp.float32  # the head output is returned in float32
    assert bf16_model.blocks.attn1.to_q.kernel[...].dtype == jnp.float32
    err = rel_err(bf16, fp32)
    assert 1e-4 < err <= BF16_BOUND, err  # lower bound: bf16 really ran


def test_bf16_params():
    cfg = dataclasses.replace(CONFIGS["base"], dtype="bfloat16", param_dtype="bfloat16")
    model = _ours(cfg, diffusers_wan(cfg))
    assert model.blocks.ffn.proj_in.kernel[...].dtype == jnp.bfloat16
    x, t, ctx = map(jnp.asarray, _inputs(cfg, LATENTS["base"]))
    out = np.asarray(_forward(model, x, t, ctx))
    assert np.isfinite(out).all() and out.std() > 0


def _loss_and_grads(cfg: WanConfig, ref):
    x, t, ctx = map(jnp.asarray, _inputs(cfg, LATENTS["base"]))

    def loss(m):
        return jnp.mean(jnp.square(m(x, t, ctx)))

    return nnx.jit(nnx.value_and_grad(loss))(_ours(cfg, ref))


@pytest.fixture(scope="module")
def no_remat_grads():
    ref = diffusers_wan(CONFIGS["base"])
    return ref, {scan: _loss_and_grads(dataclasses.replace(CONFIGS["base"], scan_layers=scan), ref)
                 for scan in (True, False)}


@pytest.mark.parametrize("policy,scan_layers", [("full", True), ("dots", True), ("names", True), ("names", False)])
def test_remat_policies_keep_values_and_grads(policy, scan_layers, no_remat_grads):
    ref, baseline = no_remat_grads
    l0, g0 = baseline[scan_layers]
    l1, g1 = _loss_and_grads(dataclasses.replace(CONFIGS["base"], scan_layers=scan_layers, remat_policy=policy), ref)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # The grad really reaches the blocks (a zero grad would make the comparison vacuous).
    assert float(jnp.abs(jax.tree.leaves(g0)[0]).sum()) > 0


def test_bad_inputs_name_the_argument():
    cfg = CONFIGS["base"]
    x, t, ctx = map(jnp.asarray, _inputs(cfg, LATENTS["base"]))

    def call(*args):  # traced abstractly: the checks fire at trace time, no compute needed
        return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))(*args))

    assert call(x, t, ctx).shape == (*x.shape[:-1], cfg.out_channels)
    with pytest.raises(ValueError, match="x must be"):
        call(x[..., :3], t, ctx)
    with pytest.raises(ValueError, match="not divisible by patch size"):
        call(x[:, :, :3], t, ctx)
    with pytest.raises(ValueError, match="timestep must be"):
        call(x, t[:1], ctx)
    with pytest.raises(ValueError, match="context must be"):
        call(x, t, ctx[..., :5])


@pytest.mark.parametrize("bad,match", [
    (dict(dim=50, num_heads=3), "not divisible by num_heads"),
    (dict(dtype="float8"), "dtype"),
    (dict(attention_backend="flash"), "attention_backend"),
    (dict(remat_policy="some"), "remat_policy"),
    (dict(patch_size=(1, 2)), "patch_size"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        WanConfig.preset("tiny", **bad)


def test_unknown_preset():
    with pytest.raises(KeyError, match="known"):
        WanConfig.preset("wan2.2-5b")


def test_config_dict_round_trip():
    cfg = WanConfig.preset("wan2.1-14b", dtype="bfloat16")
    assert WanConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="no field"):
        WanConfig.from_dict({**cfg.to_dict(), "depth": 3})


# ----------------------------------------------------------------------------------------------------------------------
# Attention backends.
# ----------------------------------------------------------------------------------------------------------------------


def test_xla_attention_masks_keys():
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 5, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    out = layers.dot_product_attention(q, k, v, mask)
    # The masked keys of example 0 do not matter: same result as attending over the first three keys only.
    ref = layers.dot_product_attention(q[:1], k[:1, :3], v[:1, :3])
    np.testing.assert_allclose(np.asarray(out[:1]), np.asarray(ref), rtol=1e-6, atol=1e-6)
    # And it equals jax's own implementation.
    want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_in_bf16():
    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(5)
    q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal((2, 256, 4, 128)), jnp.bfloat16), gpu)
               for _ in range(3))
    mask = jax.device_put(jnp.arange(256)[None, :] < jnp.asarray([[200], [256]]), gpu)
    ref = layers.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask)
    got = jax.jit(lambda *a: layers.dot_product_attention(*a, backend="cudnn"))(q, k, v, mask)
    assert got.dtype == jnp.bfloat16
    assert rel_err(got.astype(jnp.float32), ref) <= 1e-2
