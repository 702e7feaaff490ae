"""The unified model: the pretrained prior survives wrapping, per-token modulation, routing, freezing, samplers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from uvigu import flow, sampling
from uvigu.models import wan_keys
from uvigu.models.univigu import UniViGU, UniViGUConfig, text_params
from uvigu.models.wan import WanConfig

V, E, S = 50, 8, 7
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((2, 3, 4, 6, 16)), jnp.float32)
CTX = jnp.asarray(RNG.standard_normal((2, 5, 32)), jnp.float32)
TAU_V = jnp.array([0.3, 0.9])
TAU_T = jnp.array([0.1, 0.6])
IDS = jnp.asarray(RNG.integers(0, V, (2, S)), jnp.int32)
MASK = jnp.asarray([[1] * S, [1] * 4 + [0] * (S - 4)], bool)


def _flat(cfg: WanConfig, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) * 0.2 for k, s in wan_keys.expected_param_shapes(cfg).items()}


FLAT = _flat(WanConfig.preset("tiny"))


def _model(text_flow="embedding", scan_layers=True, **kw) -> UniViGU:
    dit = wan_keys.model_from_params(WanConfig.preset("tiny", scan_layers=scan_layers), FLAT)
    cfg = UniViGUConfig(text_flow=text_flow, vocab_size=V, text_latent_dim=E, max_text_len=16, **kw)
    return UniViGU.from_wan(dit, cfg, rngs=nnx.Rngs(1))


def _text(model: UniViGU, n=S):
    if model.config.text_flow == "embedding":
        return jnp.asarray(np.random.default_rng(1).standard_normal((2, n, E)), jnp.float32)
    return IDS[:, :n]


@nnx.jit
def _call(model, video, text, tau_v, tau_t, context, text_mask):
    return model(video, text, tau_v, tau_t, context, text_mask)


@pytest.mark.parametrize("text_flow", ["embedding", "discrete"])
@pytest.mark.parametrize("scan_layers", [True, False], ids=["scanned", "looped"])
def test_empty_text_keeps_the_pretrained_prior(text_flow, scan_layers):
    model = _model(text_flow, scan_layers)
    want = -model.dit(X, flow.tau_to_wan_timestep(TAU_V), CTX)
    video_v, text_out = model(X, _text(model, 0), TAU_V, TAU_T, CTX)
    assert text_out.shape[1] == 0
    np.testing.assert_allclose(np.asarray(video_v), np.asarray(want), rtol=0, atol=1e-6 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("text_flow", ["embedding", "discrete"])
def test_output_shapes_and_text_latent_dim(text_flow):
    model = _model(text_flow)
    video_v, text_out = _call(model, X, _text(model), TAU_V, TAU_T, CTX, MASK)
    assert video_v.shape == X.shape and video_v.dtype == jnp.float32
    assert text_out.shape == ((2, S, E) if text_flow == "embedding" else (2, S, V))
    assert model.text_latent_dim == (E if text_flow == "embedding" else None)


def test_video_tokens_use_tau_v_and_text_tokens_use_tau_t():
    model = _model("discrete")
    nnx.update(model.text_head, jax.tree.map(lambda p: p + 0.1, nnx.state(model.text_head, nnx.Param)))
    no_text_v, _ = model(X, _text(model, 0), TAU_V, TAU_T, CTX)
    # With every text key masked, video tokens cannot see text: their output is the S = 0 one (modulated by τ_v),
    # whatever τ_t is.
    hidden = jnp.zeros((2, S), bool)
    for tau_t in (TAU_T, 1.0 - TAU_T):
        video_v, _ = _call(model, X, _text(model), TAU_V, tau_t, CTX, hidden)
        np.testing.assert_allclose(np.asarray(video_v), np.asarray(no_text_v), rtol=0,
                                   atol=1e-5 * float(jnp.abs(no_text_v).max()))
    # Text tokens are modulated by τ_t: changing it (video fixed) changes the text output...
    _, text_a = _call(model, X, _text(model), TAU_V, TAU_T, CTX, hidden)
    _, text_b = _call(model, X, _text(model), TAU_V, 1.0 - TAU_T, CTX, hidden)
    assert float(jnp.abs(text_a - text_b).max()) > 1e-3
    # ...through the text time path: perturbing it changes the text output and leaves the video untouched.
    nnx.update(model.text_time, jax.tree.map(lambda p: p * 1.5, nnx.state(model.text_time, nnx.Param)))
    video_c, text_c = _call(model, X, _text(model), TAU_V, TAU_T, CTX, hidden)
    np.testing.assert_allclose(np.asarray(video_c), np.asarray(no_text_v), rtol=0,
                               atol=1e-5 * float(jnp.abs(no_text_v).max()))
    assert float(jnp.abs(text_c - text_a).max()) > 1e-3


def test_text_padding_is_invisible():
    model = _model("embedding")
    nnx.update(model.text_head, jax.tree.map(lambda p: p + 0.1, nnx.state(model.text_head, nnx.Param)))
    text = _text(model)
    changed = text.at[1, 4:].set(123.0)  # only padded positions of example 1 differ
    v1, t1 = _call(model, X, text, TAU_V, TAU_T, CTX, MASK)
    v2, t2 = _call(model, X, changed, TAU_V, TAU_T, CTX, MASK)
    np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(t2[1, :4]), np.asarray(t1[1, :4]), atol=1e-5)


@pytest.mark.parametrize("text_flow", ["embedding", "discrete"])
def test_gradients_reach_text_side_and_frozen_video_moves_nothing_else(text_flow):
    model = _model(text_flow)
    nnx.update(model.text_head, jax.tree.map(lambda p: p + 0.05, nnx.state(model.text_head, nnx.Param)))
    text = _text(model)
    target = jnp.zeros((2, S, E)) if text_flow == "embedding" else IDS

    def loss_fn(m):
        video_v, text_out = m(X, text, TAU_V, TAU_T, CTX, MASK)
        loss, _ = flow.uni_flow_loss(video_v, jnp.zeros_like(X), text_out, target, MASK, text_flow=m.text_flow)
        return loss

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    flat_g = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
    for prefix in ("ffn_t.", "text_time.", "text_head.", "text_proj_in." if text_flow == "embedding" else "vocab_"):
        norms = [float(jnp.abs(g).sum()) for k, g in flat_g.items() if k.startswith(prefix)]
        assert norms and max(norms) > 0, prefix

    before = wan_keys.state_to_flat_params(model)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.All(nnx.Param, text_params))
    opt.update(model, nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.All(nnx.Param, text_params))))(model))
    after = wan_keys.state_to_flat_params(model)
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved and all(not k.startswith("dit.") for k in moved)
    assert any(k.startswith("ffn_t.") for k in moved)


def test_ffn_t_init_switch_and_width():
    fresh, copied = _model(ffn_t_init="fresh"), _model(ffn_t_init="copy")
    dit_ffn = copied.dit.blocks.ffn.proj_in.kernel[...]
    np.testing.assert_array_equal(np.asarray(copied.ffn_t.proj_in.kernel[...]), np.asarray(dit_ffn))
    assert not np.allclose(np.asarray(fresh.ffn_t.proj_in.kernel[...]), np.asarray(dit_ffn))
    # A copy is a copy, not an alias: training FFN_t must not move FFN_v.
    copied.ffn_t.proj_in.kernel[...] = copied.ffn_t.proj_in.kernel[...] + 1.0
    np.testing.assert_array_equal(np.asarray(copied.dit.blocks.ffn.proj_in.kernel[...]), np.asarray(dit_ffn))
    looped = _model(ffn_t_init="copy", scan_layers=False)
    np.testing.assert_array_equal(np.asarray(looped.ffn_t[1].proj_out.kernel[...]),
                                  np.asarray(looped.dit.blocks[1].ffn.proj_out.kernel[...]))
    narrow = _model(ffn_t_dim=24)
    assert narrow.ffn_t.proj_in.kernel.shape == (2, 48, 24)
    assert _call(narrow, X, _text(narrow), TAU_V, TAU_T, CTX, MASK)[1].shape == (2, S, E)
    with pytest.raises(ValueError, match="ffn_t_init='copy' needs"):
        _model(ffn_t_init="copy", ffn_t_dim=24)


def test_text_time_path_starts_as_a_copy_of_wan():
    model = _model()
    e_v, e0_v = model.dit.condition_embedder.time(jnp.array([100.0, 700.0]))
    e_t, e0_t = model.text_time.time(jnp.array([100.0, 700.0]))
    np.testing.assert_array_equal(np.asarray(e_t), np.asarray(e_v))
    np.testing.assert_array_equal(np.asarray(e0_t), np.asarray(e0_v))


def test_scanned_and_looped_agree():
    a, b = _model("discrete", True), _model("discrete", False)
    # Same text-side weights in both layouts (fresh FFN_t differ by layout): copy a's into b.
    for i in range(2):
        nnx.update(b.ffn_t[i], jax.tree.map(lambda p: p[i], nnx.state(a.ffn_t, nnx.Param)))
    for name in ("text_time", "text_head", "vocab_embed"):
        nnx.update(getattr(b, name), nnx.state(getattr(a, name), nnx.Param))
    nnx.update(a.text_head, jax.tree.map(lambda p: p + 0.1, nnx.state(a.text_head, nnx.Param)))
    nnx.update(b.text_head, jax.tree.map(lambda p: p + 0.1, nnx.state(b.text_head, nnx.Param)))
    va, ta = _call(a, X, IDS, TAU_V, TAU_T, CTX, MASK)
    vb, tb = _call(b, X, IDS, TAU_V, TAU_T, CTX, MASK)
    np.testing.assert_allclose(np.asarray(vb), np.asarray(va), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tb), np.asarray(ta), rtol=1e-5, atol=1e-5)


def test_embedding_round_trip_through_the_model():
    model = _model("embedding")
    ids = jnp.asarray(np.random.default_rng(3).integers(0, V, (3, 11)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(model.text_flow.decode(model.text_flow.clean(ids))), np.asarray(ids))


def test_embedding_table_does_not_collapse_in_training():
    """A short text-only training run of the embedding flow (MSE on the velocity + rounding CE): the table's rows keep
    their norm, its raw param moves, and every token still decodes to itself."""
    model = _model("embedding")
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.All(nnx.Param, text_params))
    ids = jnp.asarray(np.random.default_rng(4).integers(0, V, (2, S)), jnp.int32)
    raw0 = np.asarray(model.text_table.embedding[...]).copy()

    def loss_fn(m, key):
        k_tau, k_noise = jax.random.split(key)
        tau_t = jax.random.uniform(k_tau, (2,))
        z1 = m.text_flow.clean(ids)
        z0 = jax.random.normal(k_noise, z1.shape)
        zt = flow.interpolate(z1, z0, tau_t)
        _, v_t = m(X, zt, jnp.ones((2,)), tau_t, CTX, None)
        mse = jnp.mean(jnp.square(v_t - flow.velocity_target(z1, z0)))
        return mse + flow.rounding_loss(m.text_table, flow.predict_clean(zt, v_t, tau_t), ids, jnp.ones((2, S)))

    @nnx.jit
    def step(model, opt, key):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.All(nnx.Param, text_params)))(model, key)
        opt.update(model, grads)

    keys = [jax.random.key(i) for i in range(4)]  # a fixed set of (τ, noise) draws, cycled: the loss on them must fall
    eval_loss = nnx.jit(lambda m: jnp.mean(jnp.stack([loss_fn(m, k) for k in keys])))
    before = float(eval_loss(model))
    for i in range(16):
        step(model, opt, keys[i % len(keys)])
    after = float(eval_loss(model))
    table = np.asarray(model.text_table.table())
    np.testing.assert_allclose(np.linalg.norm(table, axis=-1), np.sqrt(E), rtol=1e-5)
    assert np.abs(np.asarray(model.text_table.embedding[...]) - raw0).max() > 1e-3
    all_ids = jnp.arange(V, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(np.asarray(model.text_flow.decode(model.text_flow.clean(all_ids))), np.asarray(all_ids))
    assert after < before, (before, after)  # deterministic: the same draws before and after


@pytest.mark.parametrize("text_flow", ["embedding", "discrete"])
def test_samplers_drive_the_model(text_flow):
    model = _model(text_flow)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, key):
        m = nnx.merge(graphdef, state)
        velocity = m.as_velocity_fn()
        video = sampling.sample_t2v(velocity, key, X.shape, _text(m) if text_flow == "embedding" else IDS, CTX,
                                    null_context=jnp.zeros_like(CTX), guidance_scale=3.0, num_steps=3, shift=3.0,
                                    solver="unipc", text_mask=MASK)
        ids = sampling.sample_v2t(velocity, key, X, m.text_flow, S, CTX, num_steps=3, shift=3.0, solver="euler",
                                  text_mask=MASK)
        return video, ids

    v1, ids1 = run(state, jax.random.key(0))
    v2, ids2 = run(state, jax.random.key(0))
    assert v1.shape == X.shape and np.isfinite(np.asarray(v1)).all()
    assert ids1.shape == (2, S) and int(ids1.min()) >= 0 and int(ids1.max()) < V
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    np.testing.assert_array_equal(np.asarray(ids1), np.asarray(ids2))


def test_bad_inputs_name_the_argument():
    emb, disc = _model("embedding"), _model("discrete")
    text = _text(emb)
    with pytest.raises(ValueError, match="text_mask must be"):
        emb(X, text, TAU_V, TAU_T, CTX, MASK[:, :3])
    with pytest.raises(ValueError, match=r"text must be noisy text latents \[B, S, E=8\]"):
        emb(X, text[..., :5], TAU_V, TAU_T, CTX)
    with pytest.raises(ValueError, match="x must be"):
        emb(X[..., :4], text, TAU_V, TAU_T, CTX)
    with pytest.raises(ValueError, match="tau_t must have batch 2"):
        emb(X, text, TAU_V, TAU_T[:1], CTX)
    with pytest.raises(ValueError, match="token ids"):
        disc(X, text, TAU_V, TAU_T, CTX)
    with pytest.raises(ValueError, match=r"text ids must be in \[0, 50\) \(vocab_size=50\)"):
        disc(X, IDS.at[0, 0].set(V), TAU_V, TAU_T, CTX)
    with pytest.raises(ValueError, match="exceeds max_text_len"):
        disc(X, jnp.zeros((2, 17), jnp.int32), TAU_V, TAU_T, CTX)
    with pytest.raises(ValueError, match="text_flow"):
        UniViGUConfig(text_flow="diffusion")


@pytest.mark.parametrize("policy,scan_layers", [("full", True), ("names", False)])
def test_remat_keeps_values_and_grads(policy, scan_layers):
    """Remat must not change the unified model's numbers (it once failed to trace: RoPE's static per-segment flags
    went through remat as tracers)."""
    def loss_and_grads(model):
        def loss_fn(m):
            video_v, text_out = m(X, IDS, TAU_V, TAU_T, CTX, MASK)
            return jnp.mean(jnp.square(video_v)) + jnp.mean(jnp.square(text_out))
        return nnx.jit(nnx.value_and_grad(loss_fn))(model)

    base = _model("discrete", scan_layers)
    nnx.update(base.text_head, jax.tree.map(lambda p: p + 0.1, nnx.state(base.text_head, nnx.Param)))
    remat = nnx.merge(*nnx.split(base))  # same weights...
    remat.dit.config = dataclasses.replace(base.dit.config, remat_policy=policy)  # ...run with remat
    l0, g0 = loss_and_grads(base)
    l1, g1 = loss_and_grads(remat)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_exact_v2t_examples_drop_the_prompt_and_the_rest_keep_it():
    """train.unified_flow_loss: examples made exact V2T (clean video) see the null context with probability
    clean_video_cond_dropout (captioning runs from the video alone), the rest with cond_dropout."""
    import ml_collections

    from uvigu import train

    model = _model("discrete")
    # Zero-initialised params (the text head) made random, so the text loss depends on what the model sees.
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda p: p + 0.2 * jax.random.normal(jax.random.key(5), p.shape) if not jnp.any(p) else p, params))
    batch = {"latents": X, "text_ids": IDS, "text_mask": MASK, "context": CTX}

    def loss(context, **flow_config):
        fc = ml_collections.ConfigDict(dict(tau_sampling="uniform", tau_shift=3.0, tau_mean=0.0, tau_std=1.0,
                                            clean_text_prob=0.0, rounding_weight=0.0, **flow_config))
        return float(train.unified_flow_loss(model, dict(batch, context=context), jax.random.key(3), fc)[0])

    other = CTX + 1.0
    v2t = dict(clean_video_prob=1.0, cond_dropout=0.0)
    # Every example exact V2T: the prompt is never seen, whatever it is ...
    assert loss(CTX, clean_video_cond_dropout=1.0, **v2t) == loss(other, clean_video_cond_dropout=1.0, **v2t)
    # ... unless their own dropout says keep it; and with no exact V2T examples cond_dropout alone decides.
    assert loss(CTX, clean_video_cond_dropout=0.0, **v2t) != loss(other, clean_video_cond_dropout=0.0, **v2t)
    gen = dict(clean_video_prob=0.0, clean_video_cond_dropout=1.0)
    assert loss(CTX, cond_dropout=0.0, **gen) != loss(other, cond_dropout=0.0, **gen)
    assert loss(CTX, cond_dropout=1.0, **gen) == loss(other, cond_dropout=1.0, **gen)
