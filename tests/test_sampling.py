"""Tests for uvigu.sampling: the schedule and both ODE solvers against diffusers, analytic fields, CFG, the discrete
mixture sampler, and V2T / joint wiring (velocity callables stand in for the model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from flax import nnx

from uvigu.models.text_table import TextEmbeddingTable
from uvigu import flow, sampling

KEY = jax.random.key(0)
VIDEO_SHAPE = (2, 2, 2, 2, 4)  # B T H W C
IDS_SHAPE = (2, 6)  # B S
EMBED_SHAPE = (2, 6, 8)  # B S E
CONTEXT = jnp.zeros((2, 5, 6))  # B S_c D_c
# Shapes are shared across tests on purpose: every new shape costs XLA compiles (jax.random.normal alone takes
# seconds per shape on CPU), so test data comes from numpy and the samplers always see the same shapes.


def _normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _ids(*shape, vocab, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape).astype(np.int32))


# A fixed deterministic "model" in Wan's convention (it outputs noise − data), a function of sample and σ.
_RNG = np.random.default_rng(0)
_A = (0.4 * _RNG.normal(size=(4, 4))).astype(np.float32)
_BIAS = _RNG.normal(size=(4,)).astype(np.float32)


def _wan_model_torch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x @ torch.from_numpy(_A) + sigma * torch.from_numpy(_BIAS) + 0.3 * sigma**2 * x


def _paper_velocity(z, tau):
    """The same model as a paper-convention velocity field: v = −wan_output at σ = 1 − τ."""
    sigma = 1.0 - tau
    return flow.wan_velocity_to_paper(z @ jnp.asarray(_A) + sigma * jnp.asarray(_BIAS) + 0.3 * sigma**2 * z)


def _start_noise():
    return np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# Schedule and solvers vs diffusers.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (4, 3.0), (10, 5.0), (50, 5.0), (30, 12.0)])
def test_shifted_sigmas_match_diffusers_flow_match_euler(num_steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)
    scheduler.set_timesteps(num_steps)
    ours = np.asarray(sampling.wan_shifted_sigmas(num_steps, shift))
    assert ours.shape == (num_steps + 1,)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), atol=1e-6, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_euler_matches_diffusers_flow_match_euler():
    num_steps, shift = 8, 5.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps)
    x0 = _start_noise()
    x = torch.from_numpy(x0)
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(_wan_model_torch(x, scheduler.sigmas[i]), t, x).prev_sample
    ours = sampling.integrate(_paper_velocity, jnp.asarray(x0), sampling.wan_shifted_sigmas(num_steps, shift), "euler")
    np.testing.assert_allclose(ours, x.numpy(), rtol=1e-5, atol=1e-5)


def _run_diffusers_unipc(scheduler, x0):
    x = torch.from_numpy(x0)
    for i, t in enumerate(scheduler.timesteps):  # the model sees the scheduler's own σ_i (timesteps are int64)
        x = scheduler.step(_wan_model_torch(x, scheduler.sigmas[i]), t, x).prev_sample
    return x.numpy()


@pytest.mark.parametrize("num_steps,shift", [(6, 5.0), (13, 3.0)])
def test_unipc_matches_diffusers_on_its_schedule(num_steps, shift):
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2
    )
    scheduler.set_timesteps(num_steps)
    x0 = _start_noise()
    expected = _run_diffusers_unipc(scheduler, x0)
    ours = sampling.integrate(_paper_velocity, jnp.asarray(x0), jnp.asarray(scheduler.sigmas.numpy()), "unipc")
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(ours) / scale, expected / scale, atol=1e-5)


@pytest.mark.parametrize("num_steps,shift", [(2, 5.0), (12, 3.0)])
def test_unipc_matches_diffusers_on_wan_schedule(num_steps, shift):
    """Our schedule (σ_0 = 1 exactly) through diffusers' UniPC: it shifts the sigmas it is given and nudges σ_0."""
    unshifted = np.linspace(1.0, float(flow.shift_sigma(1e-3, shift)), num_steps)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2
    )
    scheduler.set_timesteps(sigmas=unshifted)
    x0 = _start_noise()
    expected = _run_diffusers_unipc(scheduler, x0)
    ours = sampling.integrate(_paper_velocity, jnp.asarray(x0), sampling.wan_shifted_sigmas(num_steps, shift), "unipc")
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(ours) / scale, expected / scale, atol=1e-5)


def test_unknown_solver_raises():
    with pytest.raises(ValueError):
        sampling.integrate(_paper_velocity, jnp.zeros((1, 4)), sampling.wan_shifted_sigmas(3, 1.0), "heun")


# ----------------------------------------------------------------------------------------------------------------------
# Analytic fields.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_constant_field_is_integrated_exactly(solver):
    x0 = _normal(2, 3)
    c = jnp.array([0.5, -2.0, 3.0])
    sigmas = sampling.wan_shifted_sigmas(7, 5.0)
    out = sampling.integrate(lambda z, tau: jnp.broadcast_to(c, z.shape), x0, sigmas, solver)
    np.testing.assert_allclose(out, x0 + c, atol=2e-5)  # τ runs 0 -> 1, so the displacement is c·1


def _point_mass_fn(x1):
    """Exact flow of a point mass at x1, as a model: v = (x1 − z) / (1 − τ_v). Lands on x1 exactly."""

    def velocity_fn(video, text, tau_v, tau_t, context, text_mask):
        v = (x1 - video) / (1.0 - tau_v)[:, None, None, None, None]
        return v, jnp.zeros_like(text)

    return velocity_fn


@pytest.mark.parametrize("solver", ["euler", "unipc"])
def test_t2v_point_mass_lands_on_target(solver):
    x1 = _normal(*VIDEO_SHAPE, seed=5)
    out = sampling.sample_t2v(
        _point_mass_fn(x1), KEY, VIDEO_SHAPE, jnp.zeros(EMBED_SHAPE), CONTEXT, num_steps=6, shift=5.0, solver=solver
    )
    np.testing.assert_allclose(out, x1, atol=1e-5)


def test_gaussian_data_flow_convergence_order():
    """Data N(μ, s²I): the exact marginal flow maps noise z0 to μ + s·z0. Doubling the steps cuts UniPC's error by
    more than 4 (second order or better), and UniPC beats Euler on the same grid."""
    mu, s = 1.5, 1.0

    def velocity(z, tau):
        clean = mu + tau * s**2 / ((1 - tau) ** 2 + tau**2 * s**2) * (z - tau * mu)  # E[x1 | z_τ]
        return (clean - z) / (1 - tau)

    z0 = _normal(64)

    def error(num_steps, solver):
        out = sampling.integrate(velocity, z0, sampling.wan_shifted_sigmas(num_steps, 3.0), solver)
        return float(jnp.abs(out - (mu + s * z0)).max())

    unipc_coarse, unipc_fine = error(40, "unipc"), error(80, "unipc")
    assert unipc_coarse / unipc_fine > 4.0  # Euler's error only halves here (first order)
    assert unipc_fine < 0.3 * error(80, "euler")


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance.
# ----------------------------------------------------------------------------------------------------------------------


def _context_target_fn(calls):
    """Flow of a point mass whose location is the mean of the context: cond and null contexts pull to different
    points, so the guided sample lands on b + g·(a − b). Records the batch size of every (traced) call."""

    def velocity_fn(video, text, tau_v, tau_t, context, text_mask):
        calls.append(video.shape[0])
        target = jnp.mean(context, axis=(1, 2))[:, None, None, None, None]
        return (target - video) / (1.0 - tau_v)[:, None, None, None, None], jnp.zeros_like(text)

    return velocity_fn


def test_cfg_scale_one_is_conditional_and_guidance_extrapolates():
    text = jnp.zeros(EMBED_SHAPE)
    context = jnp.full((2, 5, 6), 2.0).at[1].set(-1.0)  # targets a = 2, -1
    null = jnp.full((5, 6), 0.5)  # target b = 0.5
    calls = []
    fn = _context_target_fn(calls)
    common = dict(num_steps=5, shift=5.0, solver="unipc")
    conditional = sampling.sample_t2v(fn, KEY, VIDEO_SHAPE, text, context, None, **common)
    assert calls == [2]
    calls.clear()
    scale_one = sampling.sample_t2v(fn, KEY, VIDEO_SHAPE, text, context, null, 1.0, **common)
    assert calls == [4]  # cond and uncond in ONE call, batch 2B
    np.testing.assert_allclose(scale_one, conditional, atol=1e-5)
    guided = sampling.sample_t2v(fn, KEY, VIDEO_SHAPE, text, context, null, 3.0, **common)
    np.testing.assert_allclose(guided[0], 0.5 + 3.0 * (2.0 - 0.5), atol=1e-4)
    np.testing.assert_allclose(guided[1], 0.5 + 3.0 * (-1.0 - 0.5), atol=1e-4)


def test_t2v_is_jittable_and_deterministic():
    def fn(video, text, tau_v, tau_t, context, text_mask):  # not exactly solvable: the result depends on the noise
        return jnp.tanh(video) * tau_v[:, None, None, None, None] - video, jnp.zeros_like(text)

    jitted = jax.jit(  # guidance scale and shift traced; step count and solver static
        lambda key, scale, shift: sampling.sample_t2v(
            fn, key, VIDEO_SHAPE, jnp.zeros(EMBED_SHAPE), CONTEXT, jnp.zeros((5, 6)), scale, 4, shift, "unipc"
        )
    )
    a = jitted(KEY, 2.0, 3.0)
    np.testing.assert_array_equal(a, jitted(KEY, 2.0, 3.0))
    assert np.abs(np.asarray(jitted(jax.random.key(1), 2.0, 3.0)) - np.asarray(a)).max() > 1e-2
    assert np.all(np.isfinite(np.asarray(a)))


# ----------------------------------------------------------------------------------------------------------------------
# Discrete text (mixture path).
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_mixture_step_jump_rate(power):
    ids = jnp.full((64, 256), 9, jnp.int32)  # all mask
    logits = 50.0 * jax.nn.one_hot(jnp.full((64, 256), 3), 10)
    out = np.asarray(flow.mixture_euler_step(KEY, ids, logits, 0.5, 0.75, power))
    assert set(np.unique(out)) == {3, 9}
    expected = (0.75**power - 0.5**power) / (1.0 - 0.5**power)
    assert abs((out == 3).mean() - expected) < 0.01
    final = flow.mixture_euler_step(KEY, ids, logits, 0.9, 1.0, power)
    np.testing.assert_array_equal(final, 3)  # the last step moves every token


def _discrete_logits_fn(target, vocab, seen):
    """A model that is certain the clean text is `target`; checks the video is given clean (τ_v = 1)."""

    def velocity_fn(video, text, tau_v, tau_t, context, text_mask):
        seen.append((text.dtype, text.shape))
        logits = 30.0 * jax.nn.one_hot(target, vocab) * tau_v[:, None, None]  # τ_v ≠ 1 would soften it
        return jnp.zeros_like(video), logits

    return velocity_fn


@pytest.mark.parametrize("source", ["uniform", "mask"])
def test_v2t_discrete_recovers_certain_target(source):
    vocab = 12
    target = _ids(*IDS_SHAPE, vocab=vocab - 1, seed=3)
    video = jnp.zeros(VIDEO_SHAPE)
    seen = []
    out = sampling.sample_v2t(
        _discrete_logits_fn(target, vocab, seen), KEY, video,
        flow.DiscreteTextFlow(vocab - 1, source=source, mask_id=vocab - 1), IDS_SHAPE[1], CONTEXT, num_steps=8,
        shift=3.0,
    )  # fmt: skip
    np.testing.assert_array_equal(out, target)
    assert seen[0][0] == jnp.int32 and seen[0][1] == IDS_SHAPE  # the model is fed ids


def test_v2t_discrete_is_random_but_deterministic_given_key():
    vocab = 50

    def uniform_fn(video, text, tau_v, tau_t, context, text_mask):
        return jnp.zeros_like(video), jnp.zeros(text.shape + (vocab,))

    video = jnp.zeros(VIDEO_SHAPE)
    run = jax.jit(lambda key: sampling.sample_v2t(uniform_fn, key, video, flow.DiscreteTextFlow(vocab), IDS_SHAPE[1],
                                                  CONTEXT, num_steps=4, shift=1.0))
    a, b, c = run(KEY), run(KEY), run(jax.random.key(9))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).mean() > 0.5


def test_token_draw_temperature():
    """Draws follow softmax(logits / T): the inverse-CDF draw on an even grid of uniforms gives each token its
    probability to within the grid step; T = 0 is the argmax whatever the uniforms; T < 0 is refused."""
    logits = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4]))
    grid = (jnp.arange(4000, dtype=jnp.float32) + 0.5) / 4000
    for temperature in (1.0, 0.5, 2.0):
        draws = np.asarray(flow.draw_tokens(grid[None], jnp.broadcast_to(logits, (1, 4000, 4)), temperature))
        want = np.asarray(jax.nn.softmax(logits / temperature))
        np.testing.assert_allclose(np.bincount(draws[0], minlength=4) / 4000, want, atol=1e-3)
    np.testing.assert_array_equal(flow.draw_tokens(grid[None], jnp.broadcast_to(logits, (1, 4000, 4)), 0.0), 3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        flow.draw_tokens(grid[None], jnp.broadcast_to(logits, (1, 4000, 4)), -1.0)


def test_v2t_and_joint_at_temperature_zero_take_the_most_likely_tokens():
    """A model whose posterior is the same mild preference at every step: greedy captions are that preference at
    every position for every key; at temperature 1 they are draws, so other tokens appear."""
    vocab = 8
    target = _ids(*IDS_SHAPE, vocab=vocab, seed=4)

    def mild_fn(video, text, tau_v, tau_t, context, text_mask):
        return jnp.zeros_like(video), 1.0 * jax.nn.one_hot(target, vocab)  # p(target) = e / (e + 7) ≈ 0.28

    video, text_flow = jnp.zeros(VIDEO_SHAPE), flow.DiscreteTextFlow(vocab)
    for key in (KEY, jax.random.key(5)):
        greedy = sampling.sample_v2t(mild_fn, key, video, text_flow, IDS_SHAPE[1], CONTEXT, num_steps=4,
                                     text_temperature=0.0)
        np.testing.assert_array_equal(greedy, target)
        _, joint = sampling.sample_joint(mild_fn, key, VIDEO_SHAPE, text_flow, IDS_SHAPE[1], CONTEXT, num_steps=4,
                                         text_temperature=0.0)
        np.testing.assert_array_equal(joint, target)
    drawn = sampling.sample_v2t(mild_fn, KEY, video, text_flow, IDS_SHAPE[1], CONTEXT, num_steps=4)
    assert (np.asarray(drawn) != np.asarray(target)).any()


# ----------------------------------------------------------------------------------------------------------------------
# Embedding text: V2T and joint.
# ----------------------------------------------------------------------------------------------------------------------


def test_v2t_embedding_exact_flow_decodes_target():
    table = TextEmbeddingTable(40, 8, rngs=nnx.Rngs(0))
    target = _ids(*IDS_SHAPE, vocab=40, seed=4)
    x1 = table.embed(target)

    def velocity_fn(video, text, tau_v, tau_t, context, text_mask):
        v_text = (x1 - text) / (1.0 - tau_t)[:, None, None] * tau_v[:, None, None]  # needs τ_v = 1 to land
        return jnp.zeros_like(video), v_text

    out = sampling.sample_v2t(
        velocity_fn, KEY, jnp.zeros(VIDEO_SHAPE), flow.EmbeddingTextFlow(table), EMBED_SHAPE[1], CONTEXT,
        num_steps=6, shift=3.0, solver="unipc",
    )  # fmt: skip
    np.testing.assert_array_equal(out, target)


def test_joint_embedding_shares_one_tau_grid():
    table = TextEmbeddingTable(40, 8, rngs=nnx.Rngs(0))
    target = _ids(*IDS_SHAPE, vocab=40, seed=4)
    t1, v1 = table.embed(target), _normal(*VIDEO_SHAPE, seed=5)

    def velocity_fn(video, text, tau_v, tau_t, context, text_mask):
        # each modality's field is written with the OTHER modality's τ: exact only if τ_v == τ_t at every call
        v_video = (v1 - video) / (1.0 - tau_t)[:, None, None, None, None]
        v_text = (t1 - text) / (1.0 - tau_v)[:, None, None]
        return v_video, v_text

    video, ids = sampling.sample_joint(
        velocity_fn, KEY, VIDEO_SHAPE, flow.EmbeddingTextFlow(table), EMBED_SHAPE[1], CONTEXT,
        num_steps=6, shift=5.0, solver="unipc",
    )  # fmt: skip
    np.testing.assert_allclose(video, v1, atol=1e-5)
    np.testing.assert_array_equal(ids, target)


def test_joint_discrete_with_guidance():
    """CFG in joint sampling: the conditional half (the prompt context) pulls the video to v1, the unconditional half
    (the null context) to u1, so the guided field aims at u1 + g·(v1 − u1), which Euler reaches exactly on these
    straight fields; the text follows the conditional half only (the unconditional logits point elsewhere)."""
    vocab, guide = 12, 4.0
    target, other = _ids(*IDS_SHAPE, vocab=vocab, seed=3), _ids(*IDS_SHAPE, vocab=vocab, seed=4)
    v1, u1 = _normal(*VIDEO_SHAPE, seed=5), _normal(*VIDEO_SHAPE, seed=6)
    calls = []

    def velocity_fn(video, text, tau_v, tau_t, context, text_mask):
        calls.append(video.shape[0])
        rows = jnp.arange(video.shape[0]) % 2  # the cond and uncond halves both hold examples 0, 1
        uncond = jnp.all(context == 0, axis=(1, 2))  # [2B]: which rows carry the null context
        goal = jnp.where(uncond[:, None, None, None, None], u1[rows], v1[rows])
        v_video = (goal - video) / (1.0 - tau_t)[:, None, None, None, None]
        logits = 30.0 * jax.nn.one_hot(jnp.where(uncond[:, None], other[rows], target[rows]), vocab)
        return v_video, logits

    video, ids = sampling.sample_joint(
        velocity_fn, KEY, VIDEO_SHAPE, flow.DiscreteTextFlow(vocab), IDS_SHAPE[1], jnp.ones_like(CONTEXT),
        jnp.zeros((5, 6)), guide, num_steps=5, shift=3.0, solver="euler",
    )  # fmt: skip
    assert calls == [4]
    np.testing.assert_allclose(video, u1 + guide * (v1 - u1), atol=1e-4)
    np.testing.assert_array_equal(ids, target)
