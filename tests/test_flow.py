"""Tests for uvigu.flow: τ sampling, the Gaussian path and Wan conventions, both text flows, the loss, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from uvigu import flow
from uvigu.models.text_table import TextEmbeddingTable

KEY = jax.random.key(0)
# The per-token losses of the two text flows (the embedding flow's loss does not touch its table).
FLOWS = {"embedding": flow.EmbeddingTextFlow(None), "discrete": flow.DiscreteTextFlow(5)}
N_TAU = 8192  # one sample count for every τ test: each new shape costs an XLA compile on CPU


def _normal(*shape, seed=0):
    """Test data from numpy: jax.random.normal compiles per shape, which dominates a CPU test run."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _ids(*shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32))

# ----------------------------------------------------------------------------------------------------------------------
# τ sampling.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shifted"])
def test_sample_tau_in_unit_interval_and_spread(kind):
    tau = np.asarray(flow.sample_tau(KEY, N_TAU, kind))
    assert tau.shape == (N_TAU,)
    assert tau.min() >= 0.0 and tau.max() <= 1.0
    assert tau.std() > 0.1  # a real distribution, not a constant


def test_uni_tau_independent_per_modality():
    tau_v, tau_t = flow.sample_uni_tau(KEY, N_TAU)
    tau_v, tau_t = np.asarray(tau_v), np.asarray(tau_t)
    assert np.all(tau_v != tau_t)  # separate subkeys, not one draw reused
    assert abs(np.corrcoef(tau_v, tau_t)[0, 1]) < 0.05
    again_v, again_t = flow.sample_uni_tau(KEY, N_TAU)
    np.testing.assert_array_equal(again_v, tau_v)
    np.testing.assert_array_equal(again_t, tau_t)


@pytest.mark.parametrize("mean", [0.0, 1.0, -0.5])
def test_logit_normal_median(mean):
    tau = np.asarray(flow.sample_tau(KEY, N_TAU, "logit_normal", mean=mean, std=1.0))
    assert abs(np.median(tau) - 1.0 / (1.0 + np.exp(-mean))) < 0.015


def test_shifted_tau_leans_to_noise():
    # σ = shift(1 − u) has median shift(1/2) = s/(1+s), so τ = 1 − σ has median 1/(1+s): shift > 1 means noisier.
    shift = 3.0
    tau = np.asarray(flow.sample_tau(KEY, N_TAU, "shifted", shift=shift))
    assert abs(np.median(tau) - 1.0 / (1.0 + shift)) < 0.015
    uniform = np.asarray(flow.sample_tau(KEY, N_TAU, "uniform"))
    assert tau.mean() < uniform.mean() - 0.1


def test_sample_tau_rejects_unknown_kind():
    with pytest.raises(ValueError):
        flow.sample_tau(KEY, 4, "cosine")


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian path and the Wan conventions.
# ----------------------------------------------------------------------------------------------------------------------


def test_interpolation_endpoints_and_velocity():
    z0 = _normal(3, 2, 2, 2, 4, seed=0)  # noise
    z1 = _normal(3, 2, 2, 2, 4, seed=1)  # data
    tau = jnp.array([0.0, 1.0, 0.25])
    z = flow.interpolate(z1, z0, tau)
    np.testing.assert_allclose(z[0], z0[0], atol=0)  # τ = 0 is noise
    np.testing.assert_allclose(z[1], z1[1], atol=0)  # τ = 1 is data
    np.testing.assert_allclose(z[2], 0.75 * z0[2] + 0.25 * z1[2], rtol=1e-6)
    # u is dz/dτ of the path (checked by differentiating the path itself)
    _, dz = jax.jvp(lambda t: flow.interpolate(z1, z0, t), (tau,), (jnp.ones_like(tau),))
    np.testing.assert_allclose(dz, flow.velocity_target(z1, z0), rtol=1e-6)
    np.testing.assert_allclose(flow.velocity_target(z1, z0), z1 - z0)


def test_interpolation_broadcasts_over_text_shape():
    z0, z1 = jnp.zeros((2, 5, 3)), jnp.ones((2, 5, 3))
    z = flow.interpolate(z1, z0, jnp.array([0.2, 0.9]))
    np.testing.assert_allclose(z[0], 0.2)
    np.testing.assert_allclose(z[1], 0.9)


def test_wan_conversions():
    np.testing.assert_allclose(flow.tau_to_wan_timestep(jnp.array([0.0, 0.25, 1.0])), [1000.0, 750.0, 0.0])
    noise, data = _normal(2, 6, seed=0), _normal(2, 6, seed=1)
    wan_raw = noise - data  # what Wan's network is trained to output
    np.testing.assert_allclose(flow.wan_velocity_to_paper(wan_raw), flow.velocity_target(data, noise), rtol=1e-6)
    # the paper velocity recovers the data from any z_τ
    tau = jnp.array([0.1, 0.7])
    z = flow.interpolate(data, noise, tau)
    np.testing.assert_allclose(flow.predict_clean(z, flow.velocity_target(data, noise), tau), data, atol=1e-5)


def test_shift_sigma():
    sigma = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(flow.shift_sigma(sigma, 3.0), [0.0, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose(flow.shift_sigma(sigma, 1.0), sigma)


# ----------------------------------------------------------------------------------------------------------------------
# Text flow "embedding".
# ----------------------------------------------------------------------------------------------------------------------


def test_embedding_round_trip_and_fixed_norm():
    table = TextEmbeddingTable(64, 16, rngs=nnx.Rngs(1))
    ids = _ids(3, 20, vocab=64)
    z = table.embed(ids)
    assert z.shape == (3, 20, 16)
    np.testing.assert_array_equal(table.decode(z), ids)
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 4.0, rtol=1e-5)  # default sqrt(E)
    custom = TextEmbeddingTable(64, 16, rngs=nnx.Rngs(1), row_norm=2.5)
    np.testing.assert_allclose(jnp.linalg.norm(custom.table(), axis=-1), 2.5, rtol=1e-5)


def test_embedding_table_does_not_collapse_under_mse():
    """Steps on losses that an unnormalised table would minimise by shrinking / merging rows."""
    vocab, dim = 32, 16
    table = TextEmbeddingTable(vocab, dim, rngs=nnx.Rngs(2))
    raw_before = np.asarray(table.embedding[...])
    opt = nnx.Optimizer(table, optax.sgd(1.0), wrt=nnx.Param)
    a, b = _ids(4, 8, vocab=vocab, seed=1), _ids(4, 8, vocab=vocab, seed=2)

    def shrink_and_merge(za, zb):
        return jnp.mean(jnp.sum(za**2, -1)) + jnp.mean(jnp.sum((za - zb) ** 2, -1))

    def loss_fn(t):
        return shrink_and_merge(t.embed(a), t.embed(b))

    @nnx.jit
    def step(t, o):
        loss, grads = nnx.value_and_grad(loss_fn)(t)
        o.update(t, grads)
        return loss

    for _ in range(10):
        step(table, opt)
    assert not np.allclose(table.embedding[...], raw_before)  # the optimiser did move the parameter
    np.testing.assert_allclose(jnp.linalg.norm(table.table(), axis=-1), np.sqrt(dim), rtol=1e-5)
    all_ids = jnp.arange(vocab)[None]
    np.testing.assert_array_equal(table.decode(table.embed(all_ids)), all_ids)
    # the same steps on the raw table would have shrunk it: the normalisation is what keeps the norm
    @jax.jit
    def raw_step(e):
        return e - 1.0 * jax.grad(lambda e: shrink_and_merge(e[a], e[b]))(e)

    raw = jnp.asarray(raw_before)
    for _ in range(10):
        raw = raw_step(raw)
    assert jnp.linalg.norm(raw[a[0]], axis=-1).mean() < 0.9 * np.linalg.norm(raw_before[a[0]], axis=-1).mean()


def test_rounding_loss_prefers_the_right_row_and_ignores_padding():
    table = TextEmbeddingTable(20, 8, rngs=nnx.Rngs(3))
    ids = jnp.array([[1, 2, 3, 4]])
    mask = jnp.array([[1, 1, 1, 0]])
    right = flow.rounding_loss(table, table.embed(ids), ids, mask)
    wrong = flow.rounding_loss(table, table.embed((ids + 5) % 20), ids, mask)
    assert right < 0.5 < wrong
    z = table.embed(ids).at[0, 3].set(100.0)  # garbage at the padded position
    np.testing.assert_allclose(flow.rounding_loss(table, z, ids, mask), right, rtol=1e-6)


def test_token_cross_entropy_matches_manual():
    logits = _normal(2, 3, 7)
    ids = jnp.array([[0, 6, 3], [2, 2, 5]])
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    expected = -np.take_along_axis(logp, np.asarray(ids)[..., None], -1)[..., 0]
    np.testing.assert_allclose(flow.token_cross_entropy(logits, ids), expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Text flow "discrete".
# ----------------------------------------------------------------------------------------------------------------------

CORRUPT_SHAPE = (96, 256)  # B S, shared so the corruption kernels compile once


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_discrete_corrupt_clean_end_keeps_everything(source):
    ids = _ids(*CORRUPT_SHAPE, vocab=10)
    out = flow.discrete_corrupt(KEY, ids, jnp.ones((CORRUPT_SHAPE[0],)), 10, source=source, mask_id=10)
    np.testing.assert_array_equal(out, ids)


def test_discrete_corrupt_noise_end_is_all_source():
    ids = _ids(*CORRUPT_SHAPE, vocab=10)
    masked = flow.discrete_corrupt(KEY, ids, jnp.zeros((CORRUPT_SHAPE[0],)), 10, source="mask", mask_id=10)
    np.testing.assert_array_equal(masked, 10)
    # uniform source: data all 0, so "kept" would show as 0; a uniform draw shows 0 one time in V
    zeros = jnp.zeros(CORRUPT_SHAPE, jnp.int32)
    uniform = np.asarray(flow.discrete_corrupt(KEY, zeros, jnp.zeros((CORRUPT_SHAPE[0],)), 8, source="uniform"))
    assert set(np.unique(uniform)) == set(range(8))
    assert abs((uniform == 0).mean() - 1.0 / 8.0) < 0.01


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_discrete_keep_rate_is_kappa(power):
    taus = jnp.repeat(jnp.array([0.2, 0.5, 0.8]), CORRUPT_SHAPE[0] // 3)
    ids = jnp.zeros(CORRUPT_SHAPE, jnp.int32)
    out = np.asarray(flow.discrete_corrupt(KEY, ids, taus, 8, source="mask", mask_id=8, scheduler_power=power))
    kept = (out == 0).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(kept, np.array([0.2, 0.5, 0.8]) ** power, atol=0.025)  # ≥ 4.5 std errors
    assert set(np.unique(out)) <= {0, 8}


def test_mask_source_needs_mask_id():
    with pytest.raises(ValueError):
        flow.discrete_corrupt(KEY, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,)), 8, source="mask")


# ----------------------------------------------------------------------------------------------------------------------
# The combined loss.
# ----------------------------------------------------------------------------------------------------------------------


def _loss_inputs(text_last_dim):
    video_pred = _normal(2, 1, 2, 2, 3, seed=0)
    video_target = _normal(2, 1, 2, 2, 3, seed=1)
    text_pred = _normal(2, 4, text_last_dim, seed=2)
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
    return video_pred, video_target, text_pred, mask


@pytest.mark.parametrize("text_flow", ["embedding", "discrete"])
def test_loss_ignores_padding(text_flow):
    video_pred, video_target, text_pred, mask = _loss_inputs(5)
    text_target = _normal(2, 4, 5, seed=3) if text_flow == "embedding" else _ids(2, 4, vocab=5, seed=3)
    base, _ = flow.uni_flow_loss(video_pred, video_target, text_pred, text_target, mask, text_flow=FLOWS[text_flow])
    padded_changed = text_pred.at[0, 3].add(7.0).at[1, 2:].add(-3.0)
    same, _ = flow.uni_flow_loss(video_pred, video_target, padded_changed, text_target, mask, text_flow=FLOWS[text_flow])
    np.testing.assert_allclose(same, base, rtol=1e-6)
    valid_changed = text_pred.at[1, 1].add(jnp.arange(text_pred.shape[-1], dtype=jnp.float32))  # not a softmax no-op
    other, _ = flow.uni_flow_loss(video_pred, video_target, valid_changed, text_target, mask, text_flow=FLOWS[text_flow])
    assert abs(float(other) - float(base)) > 1e-3


def test_loss_equals_lambda_weighted_sum_form():
    video_pred, video_target, text_pred, mask = _loss_inputs(5)
    text_target = _normal(2, 4, 5, seed=3)
    loss, parts = flow.uni_flow_loss(video_pred, video_target, text_pred, text_target, mask,
                                     text_flow=FLOWS["embedding"])
    vp, vt, tp, tt, m = map(np.asarray, (video_pred, video_target, text_pred, text_target, mask))
    # explicit: per-token losses (mean over channels / E), summed, λ_v = 1, λ_t = |z_v| / |z_t|, all over |z_v|
    video_tokens = ((vp - vt) ** 2).mean(-1).reshape(-1)  # 2·1·2·2 = 8 tokens
    text_tokens = [((tp[b, s] - tt[b, s]) ** 2).mean() for b in range(2) for s in range(4) if m[b, s]]
    n_v, n_t = len(video_tokens), len(text_tokens)
    assert (n_v, n_t) == (8, 5)
    lam_t = n_v / n_t
    explicit = (1.0 * video_tokens.sum() + lam_t * sum(text_tokens)) / n_v
    np.testing.assert_allclose(loss, explicit, rtol=1e-6)
    np.testing.assert_allclose(parts["video"], video_tokens.mean(), rtol=1e-6)
    np.testing.assert_allclose(parts["text"], np.mean(text_tokens), rtol=1e-6)


def test_loss_discrete_uses_cross_entropy():
    video_pred, video_target, logits, mask = _loss_inputs(6)
    ids = _ids(2, 4, vocab=6, seed=3)
    _, parts = flow.uni_flow_loss(video_pred, video_target, logits, ids, mask, text_flow=FLOWS["discrete"])
    ce = np.asarray(flow.token_cross_entropy(logits, ids))
    np.testing.assert_allclose(parts["text"], (ce * np.asarray(mask)).sum() / 5.0, rtol=1e-6)


def test_loss_example_weights_mask_examples():
    video_pred, video_target, text_pred, mask = _loss_inputs(5)
    text_target = _normal(2, 4, 5, seed=3)
    _, parts = flow.uni_flow_loss(
        video_pred, video_target, text_pred, text_target, mask,
        video_weight=jnp.array([0.0, 1.0]), text_weight=jnp.array([1.0, 0.0]), text_flow=FLOWS["embedding"],
    )  # fmt: skip
    _, only_second = flow.uni_flow_loss(video_pred[1:], video_target[1:], text_pred[1:], text_target[1:], mask[1:],
                                        text_flow=FLOWS["embedding"])
    _, only_first = flow.uni_flow_loss(video_pred[:1], video_target[:1], text_pred[:1], text_target[:1], mask[:1],
                                       text_flow=FLOWS["embedding"])
    np.testing.assert_allclose(parts["video"], only_second["video"], rtol=1e-6)
    np.testing.assert_allclose(parts["text"], only_first["text"], rtol=1e-6)
    # everything masked: zero, not NaN
    total, _ = flow.uni_flow_loss(
        video_pred, video_target, text_pred, text_target, mask, video_weight=jnp.zeros(2), text_weight=jnp.zeros(2),
        text_flow=FLOWS["embedding"])
    assert float(total) == 0.0


# ----------------------------------------------------------------------------------------------------------------------
# Condition dropout.
# ----------------------------------------------------------------------------------------------------------------------


def test_drop_condition():
    context = _normal(4000, 3, 2) + 5.0  # never zero
    np.testing.assert_array_equal(flow.drop_condition(KEY, context, 0.0), context)
    np.testing.assert_array_equal(flow.drop_condition(KEY, context, 1.0), 0.0)
    null = jnp.full((3, 2), -1.0)
    np.testing.assert_array_equal(flow.drop_condition(KEY, context, 1.0, null), -1.0)
    half = np.asarray(flow.drop_condition(KEY, context, 0.5))
    dropped = np.all(half == 0.0, axis=(1, 2))
    kept = np.all(half == np.asarray(context), axis=(1, 2))
    assert np.all(dropped ^ kept)  # whole examples are dropped, never parts
    assert abs(dropped.mean() - 0.5) < 0.03


def test_mix_tasks_rates_identity_and_exclusivity():
    tau_v = jnp.full((20000,), 0.4)
    tau_t = jnp.full((20000,), 0.6)
    same_v, same_t = flow.mix_tasks(jax.random.key(0), tau_v, tau_t, 0.0, 0.0)  # the paper: untouched
    np.testing.assert_array_equal(np.asarray(same_v), np.asarray(tau_v))
    np.testing.assert_array_equal(np.asarray(same_t), np.asarray(tau_t))
    mixed_v, mixed_t = flow.mix_tasks(jax.random.key(0), tau_v, tau_t, 0.2, 0.3)
    v2t, t2v = np.asarray(mixed_v) == 1.0, np.asarray(mixed_t) == 1.0
    assert abs(v2t.mean() - 0.2) < 0.015 and abs(t2v.mean() - 0.3) < 0.015
    assert not (v2t & t2v).any()  # an example is one task or the other
    np.testing.assert_array_equal(np.asarray(mixed_v)[~v2t], np.float32(0.4))  # the rest keep their τ
    np.testing.assert_array_equal(np.asarray(mixed_t)[~t2v], np.float32(0.6))
