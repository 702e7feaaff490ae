"""Samplers for T2V, V2T and joint generation: fixed step count, `lax.scan`, deterministic given a key.

They are written against a generic velocity callable with the unified model's call signature,

    velocity_fn(video, text, tau_v, tau_t, context, text_mask) -> (video_velocity, text_out)

video [B,T,H,W,C], text [B,S,E] embeddings (embedding flow) or [B,S] int ids (discrete flow), tau_v / tau_t [B] in the
paper's convention (τ = 1 clean), context [B,S_c,D_c], text_mask [B,S] or None; video_velocity is the paper velocity
dz/dτ (the model has already negated Wan's noise − data), text_out a velocity [B,S,E] or logits [B,S,V]. So the
samplers do not depend on the model class, and analytic fields can stand in for the network in tests.

Schedule: Wan's shifted sigmas (σ 1 → 0, `wan_shifted_sigmas`), τ = 1 − σ. Gaussian states are integrated by
  * "euler": z_{i+1} = z_i + (τ_{i+1} − τ_i)·v̂, as diffusers' FlowMatchEulerDiscreteScheduler;
  * "unipc": UniPC-bh2 (B(h) = expm1), order 2, data (x0) prediction with flow sigmas (α = 1 − σ), exactly
    what diffusers' UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2)
    does step by step, including its first-order warm-up step, its first-order last step (lower_order_final) and
    its nudge of σ_0 = 1 down by 1e-6 (which keeps λ = log(α/σ) finite).
Both are linear multistep methods whose weights depend only on the schedule, so the weights are computed once
(`_euler_weights` / `_unipc_weights`) and the scan body is one model call and two linear combinations.

Text moves with its flow object (`uvigu.flow.TextFlow`): Gaussian (embedding) text joins the solver's state; discrete
text is advanced by the flow's `step` (a mixture step) in the same loop, on the same τ grid.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from uvigu.flow import WAN_NUM_TRAIN_TIMESTEPS, TextFlow, shift_sigma

Solver = Literal["euler", "unipc"]

# velocity_fn(video, text, tau_v, tau_t, context, text_mask) -> (video_velocity, text_out); see the module docstring.
VelocityFn = Callable[[Array, Array, Array, Array, Array, Array | None], tuple[Array, Array]]

# diffusers' UniPC lowers σ_0 by this much when it is 1, so that λ_0 = log(α_0/σ_0) is finite.
_UNIPC_SIGMA_MAX_NUDGE = 1e-6

# ----------------------------------------------------------------------------------------------------------------------
# Schedule.
# ----------------------------------------------------------------------------------------------------------------------


def wan_shifted_sigmas(
    num_steps: int, shift: float | Float[Array, ""], num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS
) -> Float[Array, "N+1"]:
    """Wan's inference σ schedule, num_steps + 1 values from 1 down to a terminal 0 (σ = 1 − τ).

    Reproduces diffusers' FlowMatchEulerDiscreteScheduler(shift=s, num_train_timesteps=1000).set_timesteps(n).sigmas:
    that scheduler shifts its 1000 training sigmas at construction (so σ_max = shift(1) = 1 and
    σ_min = shift(1/1000)), takes n points linearly spaced between them, shifts those AGAIN, and appends 0. The last
    nonzero σ is therefore shift(shift(1/1000)): the double shift is diffusers', kept for parity. (diffusers' UniPC
    and Wan's own scheduler instead shift linspace(1, 1/1000 or 0, n + 1)[:-1]; hand such a grid to `integrate`
    for parity with them.)
    """
    sigma_min = shift_sigma(jnp.float32(1.0 / num_train_timesteps), shift)
    base = jnp.linspace(jnp.float32(1.0), sigma_min, num_steps, dtype=jnp.float32)
    return jnp.concatenate([shift_sigma(base, shift), jnp.zeros((1,), jnp.float32)])


def linear_shifted_sigmas(
    num_steps: int, shift: float, num_train_timesteps: int = WAN_NUM_TRAIN_TIMESTEPS
) -> Float[Array, "N+1"]:
    """The grid of diffusers' UniPCMultistepScheduler(use_flow_sigmas=True) and of Wan's own scheduler:
    σ = shift(linspace(1, 1/num_train_timesteps, N + 1)[:-1]), then a terminal 0 (one shift, unlike
    `wan_shifted_sigmas`). Computed in float64 on the host, as diffusers does, then float32."""
    base = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    shifted = shift * base / (1.0 + (shift - 1.0) * base)
    return jnp.asarray(np.concatenate([shifted, [0.0]]), jnp.float32)


SCHEDULE_OF_SOLVER = {"unipc": linear_shifted_sigmas, "euler": wan_shifted_sigmas}


def schedule(solver: Solver, num_steps: int, shift: float) -> Float[Array, "N+1"]:
    """The σ grid diffusers' scheduler of that solver uses for Wan (UniPC: `linear_shifted_sigmas`; FlowMatch Euler:
    `wan_shifted_sigmas`)."""
    if solver not in SCHEDULE_OF_SOLVER:
        raise ValueError(f"unknown solver {solver!r}; expected one of {sorted(SCHEDULE_OF_SOLVER)}")
    return SCHEDULE_OF_SOLVER[solver](num_steps, shift)


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian solvers as precomputed linear multistep weights.
# ----------------------------------------------------------------------------------------------------------------------


class _StepWeights(NamedTuple):
    """Per-step weights [N] of one multistep solver, in data-prediction form (m_i = x0 estimate at step i).

    Corrector (UniC), applied to the sample the model was just evaluated at:
        x_i <- c_self·x_i + c_prev·x_{i−1} + c_m1·m_{i−1} + c_m2·m_{i−2} + c_now·m_i
    (x_{i−1} is the previous *corrected* sample; no correction is c_self = 1, the rest 0.)
    Predictor, from the corrected x_i to the next grid point:
        x_{i+1} = p_x·x_i + p_m0·m_i + p_m1·m_{i−1}
    """

    c_self: Float[Array, "N"]
    c_prev: Float[Array, "N"]
    c_m1: Float[Array, "N"]
    c_m2: Float[Array, "N"]
    c_now: Float[Array, "N"]
    p_x: Float[Array, "N"]
    p_m0: Float[Array, "N"]
    p_m1: Float[Array, "N"]


@jax.jit
def _euler_weights(sigmas: Float[Array, "N+1"]) -> _StepWeights:
    """Euler in x0 form: with m = x + σ_i·v, (σ_{i+1}/σ_i)·x + (1 − σ_{i+1}/σ_i)·m = x + (σ_i − σ_{i+1})·v, the
    same update as diffusers' FlowMatchEuler (σ_i > 0 for every i < N, so the ratio is finite)."""
    n = sigmas.shape[0] - 1
    zeros, ones = jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)
    ratio = sigmas[1:] / sigmas[:-1]
    return _StepWeights(ones, zeros, zeros, zeros, zeros, ratio, 1.0 - ratio, zeros)


@jax.jit
def _unipc_weights(sigmas: Float[Array, "N+1"]) -> _StepWeights:
    """UniPC-bh2, order 2, data prediction, flow sigmas (α = 1 − σ, λ = log α − log σ), as diffusers steps it.

    Orders (static, from N alone): predictor i uses order min(2, N − i, i + 1), so step 0 is first order (no history)
    and so is the last step (lower_order_final); the corrector at step i uses the order of predictor i − 1 and is
    skipped at step 0. With h = λ_t − λ_s and B = e^{−h} − 1 (predict-x0 runs in −h; bh2 takes B(h) = this too):
      predictor s = σ_i -> t = σ_{i+1}:
        x_t = (σ_t/σ_s)·x − α_t·B·m_i − α_t·B·½·(m_{i−1} − m_i)/r,    r = (λ_{i−1} − λ_i)/h   (order-2 term)
      corrector at t = σ_i from s = σ_{i−1}, with the fresh output m_i:
        order 1: x_t = (σ_t/σ_s)·x_{i−1} − α_t·B·m_{i−1} − α_t·B·½·(m_i − m_{i−1})
        order 2: ... − α_t·B·[ρ0·(m_{i−2} − m_{i−1})/r + ρ1·(m_i − m_{i−1})],  r = (λ_{i−2} − λ_{i−1})/h,
                 (ρ0, ρ1) solving [[1, 1], [r, 1]]·ρ = (b1, b2), b1 = φ2/B, b2 = 2·(φ2/(−h) − ½)/B, φ2 = B/(−h) − 1.
    The last predictor lands on σ = 0 (λ = +∞, B = −1) and returns m exactly. Vectorised over steps: lanes where a
    term does not apply are computed on harmless stand-in values and then zeroed with `where`, so no ∞·0 reaches
    the result. Jitted: the weights depend only on the grid, and one compile per step count beats eager dispatch.
    """
    n = sigmas.shape[0] - 1
    step = np.arange(n)
    prev, prev2 = np.maximum(step - 1, 0), np.maximum(step - 2, 0)
    order_p = np.minimum(np.minimum(2, n - step), step + 1)
    order_c = np.where(step > 0, order_p[prev], 0)  # 0 = no corrector
    alphas = 1.0 - sigmas
    lambdas = jnp.log(alphas) - jnp.log(sigmas)  # [N+1]; +inf at the terminal σ = 0

    # ---- predictor (UniP), σ_i -> σ_{i+1} ----
    h = lambdas[1:] - lambdas[:-1]
    b_h = jnp.expm1(-h)
    p_x = sigmas[1:] / sigmas[:-1]
    p_m0 = -alphas[1:] * b_h
    second = order_p == 2
    r = jnp.where(second, (lambdas[prev] - lambdas[step]) / jnp.where(second, h, 1.0), 1.0)
    history = jnp.where(second, alphas[1:] * b_h * 0.5 / r, 0.0)  # weight of (m_{i−1} − m_i), negated
    p_m1, p_m0 = -history, p_m0 + history

    # ---- corrector (UniC) at σ_i, from σ_{i−1} ----
    on, second = order_c > 0, order_c == 2
    h = jnp.where(on, lambdas[step] - lambdas[prev], 1.0)
    b_h = jnp.expm1(-h)
    r = jnp.where(second, (lambdas[prev2] - lambdas[prev]) / h, 2.0)
    phi2 = b_h / (-h) - 1.0
    b1 = phi2 / b_h
    b2 = 2.0 * (phi2 / (-h) - 0.5) / b_h
    rho_hist = jnp.where(second, (b2 - b1) / (r - 1.0), 0.0)
    rho_now = jnp.where(second, b1 - rho_hist, 0.5)
    scale = jnp.where(on, alphas[:-1] * b_h, 0.0)  # α_t·B
    # x_t = (σ_t/σ_s)·x_{i−1} − α_t·B·m_{i−1} − α_t·B·[ρ_hist·(m_{i−2} − m_{i−1})/r + ρ_now·(m_i − m_{i−1})]
    c_self = jnp.where(on, 0.0, 1.0)
    c_prev = jnp.where(on, sigmas[:-1] / sigmas[prev], 0.0)
    c_m1 = -scale + scale * (rho_hist / r + rho_now)
    c_m2 = -scale * rho_hist / r
    c_now = -scale * rho_now
    return _StepWeights(c_self, c_prev, c_m1, c_m2, c_now, p_x, p_m0, p_m1)


def _combine(weights: tuple, trees: tuple) -> Any:
    """Σ_k weights[k]·trees[k], leaf by leaf (the Gaussian state may be one array or a (video, text) pair)."""
    return jax.tree.map(lambda *leaves: sum(w.astype(leaves[0].dtype) * x for w, x in zip(weights, leaves)), *trees)


class _SteppedText(NamedTuple):
    """Non-Gaussian (discrete) text carried through the loop: its state, the loop's key, the flow that steps it and
    the temperature of its draws."""

    ids: Int[Array, "B S"]
    key: PRNGKeyArray
    flow: TextFlow
    temperature: float = 1.0


def _solve(
    evaluate: Callable[[Any, Int[Array, "B S"] | None, Float[Array, ""]], tuple[Any, Float[Array, "B S V"] | None]],
    x: Any,
    sigmas: Float[Array, "N+1"],
    solver: Solver,
    text: _SteppedText | None = None,
) -> tuple[Any, Int[Array, "B S"] | None]:
    """The shared loop: at each grid point call `evaluate(x, ids, τ)` once -> (velocity of the Gaussian state x,
    logits for the discrete ids or None), update x with the solver's weights and the ids with a mixture step.
    `x` is any pytree of arrays (or None when only discrete text moves). Returns (x at σ = 0, ids at τ = 1)."""
    if solver == "unipc":
        sigmas = sigmas.at[0].set(
            jnp.where(jnp.abs(sigmas[0] - 1.0) < _UNIPC_SIGMA_MAX_NUDGE, sigmas[0] - _UNIPC_SIGMA_MAX_NUDGE, sigmas[0])
        )
        weights = _unipc_weights(sigmas)
    elif solver == "euler":
        weights = _euler_weights(sigmas)
    else:
        raise ValueError(f"unknown solver {solver!r}; expected 'euler' or 'unipc'")
    taus = 1.0 - sigmas
    n = sigmas.shape[0] - 1
    ids = None if text is None else text.ids
    keys = None if text is None else jax.random.split(text.key, n)

    def step(carry, per_step):
        x, x_prev, m_prev, m_prev2, ids = carry
        sigma, tau, tau_next, w, key = per_step
        velocity, logits = evaluate(x, ids, tau)
        m = jax.tree.map(lambda xx, vv: xx + sigma.astype(xx.dtype) * vv.astype(xx.dtype), x, velocity)
        x_corr = _combine((w.c_self, w.c_prev, w.c_m1, w.c_m2, w.c_now), (x, x_prev, m_prev, m_prev2, m))
        x_next = _combine((w.p_x, w.p_m0, w.p_m1), (x_corr, m, m_prev))
        if ids is not None:
            ids = text.flow.step(key, ids, logits, tau, tau_next, text.temperature)
        return (x_next, x_corr, m, m_prev, ids), None

    zeros = jax.tree.map(jnp.zeros_like, x)
    (x, *_, ids), _ = jax.lax.scan(
        step, (x, zeros, zeros, zeros, ids), (sigmas[:-1], taus[:-1], taus[1:], weights, keys)
    )
    return x, ids


def integrate(
    velocity: Callable[[Any, Float[Array, ""]], Any],
    x: Any,
    sigmas: Float[Array, "N+1"],
    solver: Solver = "unipc",
) -> Any:
    """Integrates dx/dτ = velocity(x, τ) (paper convention, τ = 1 − σ scalar) from σ = sigmas[0] to sigmas[-1]
    on a pytree x. The Gaussian half of every sampler; public so solvers can be checked against analytic fields
    and against diffusers on any schedule."""
    final, _ = _solve(lambda state, _ids, tau: (velocity(state, tau), None), x, sigmas, solver)
    return final


# ----------------------------------------------------------------------------------------------------------------------
# Task samplers.
# ----------------------------------------------------------------------------------------------------------------------


def _call_with_guidance(
    velocity_fn: VelocityFn,
    video: Float[Array, "B T H W C"],
    text: Array,
    tau_v: Float[Array, "B"],
    tau_t: Float[Array, "B"],
    context: Float[Array, "B S_c D_c"],
    null_context: Array | None,
    guidance_scale: float | Float[Array, ""],
    text_mask: Array | None,
) -> tuple[Float[Array, "B T H W C"], Array]:
    """One model call; with a null context, classifier-free guidance on the VIDEO velocity only:
    v = v_uncond + g·(v_cond − v_uncond), the conditional and unconditional halves run as one batch of 2B.
    The text output is always the conditional one (the released code guides video only)."""
    if null_context is None:
        return velocity_fn(video, text, tau_v, tau_t, context, text_mask)
    batch = video.shape[0]
    null = jnp.broadcast_to(null_context, context.shape).astype(context.dtype)

    def twice(a):
        return None if a is None else jnp.concatenate([a, a], axis=0)

    both_contexts = jnp.concatenate([context, null], axis=0)  # [2B, S_c, D_c]: cond first, then uncond
    v_video, text_out = velocity_fn(
        twice(video), twice(text), twice(tau_v), twice(tau_t), both_contexts, twice(text_mask)
    )
    v_cond, v_uncond = v_video[:batch], v_video[batch:]
    return v_uncond + guidance_scale * (v_cond - v_uncond), text_out[:batch]


def sample_t2v(
    velocity_fn: VelocityFn,
    key: PRNGKeyArray,
    video_shape: tuple[int, int, int, int, int],
    text: Float[Array, "B S E"] | Int[Array, "B S"],
    context: Float[Array, "B S_c D_c"],
    null_context: Float[Array, "S_c D_c"] | Float[Array, "B S_c D_c"] | None = None,
    guidance_scale: float | Float[Array, ""] = 5.0,
    num_steps: int = 50,
    shift: float | Float[Array, ""] = 5.0,
    solver: Solver = "unipc",
    text_mask: Float[Array, "B S"] | None = None,
    *,
    sigmas: Float[Array, "N+1"] | None = None,
    noise: Float[Array, "B T H W C"] | None = None,
) -> Float[Array, "B T H W C"]:
    """Text -> video: the prompt's text is held clean (τ_t = 1, as the released code feeds it), the video latents are
    integrated from N(0, I) along Wan's shifted schedule. CFG on the video velocity when `null_context` is given
    (None = conditional only). Defaults are Wan's (50 steps, shift 5, guide 5); the released code uses 100/3/5.
    `sigmas` replaces the grid `wan_shifted_sigmas(num_steps, shift)` (e.g. `schedule("unipc", ...)`); `noise`, the
    initial latents (else drawn from `key`)."""
    batch = video_shape[0]
    if noise is None:
        noise = jax.random.normal(key, video_shape, jnp.float32)
    clean = jnp.ones((batch,), jnp.float32)

    def evaluate(video, _ids, tau):
        v_video, _ = _call_with_guidance(
            velocity_fn, video, text, jnp.full((batch,), tau), clean, context, null_context, guidance_scale, text_mask
        )
        return v_video, None

    grid = wan_shifted_sigmas(num_steps, shift) if sigmas is None else sigmas
    video, _ = _solve(evaluate, noise, grid, solver)
    return video


def sample_v2t(
    velocity_fn: VelocityFn,
    key: PRNGKeyArray,
    video: Float[Array, "B T H W C"],
    text_flow: TextFlow,
    text_len: int,
    context: Float[Array, "B S_c D_c"],
    *,
    num_steps: int = 50,
    shift: float | Float[Array, ""] = 5.0,
    solver: Solver = "unipc",
    text_mask: Float[Array, "B S"] | None = None,
    sigmas: Float[Array, "N+1"] | None = None,
    text_temperature: float = 1.0,
) -> Int[Array, "B S"]:
    """Video -> text: the video is held clean (τ_v = 1) and `text_len` tokens are generated from the flow's source,
    on τ = 1 − `wan_shifted_sigmas(num_steps, shift)`. Gaussian text is integrated with `solver`; discrete text moves
    by the flow's step (`solver` unused), drawing from the model's posterior at `text_temperature` (0: greedy; the
    Gaussian flows have no draw to temper). Returns ids [B, S] (padding positions included)."""
    batch = video.shape[0]
    key_text, key_loop = jax.random.split(key)
    clean = jnp.ones((batch,), jnp.float32)
    sigmas = wan_shifted_sigmas(num_steps, shift) if sigmas is None else sigmas
    start = text_flow.source(key_text, batch, text_len)

    def evaluate(text, ids, tau):
        _, out = velocity_fn(video, text if text_flow.gaussian else ids, clean, jnp.full((batch,), tau), context,
                             text_mask)
        return (out, None) if text_flow.gaussian else (None, out)

    if text_flow.gaussian:
        text, _ = _solve(evaluate, start, sigmas, solver)
        return text_flow.decode(text)
    _, ids = _solve(evaluate, None, sigmas, "euler", _SteppedText(start, key_loop, text_flow, text_temperature))
    return text_flow.decode(ids)


def sample_joint(
    velocity_fn: VelocityFn,
    key: PRNGKeyArray,
    video_shape: tuple[int, int, int, int, int],
    text_flow: TextFlow,
    text_len: int,
    context: Float[Array, "B S_c D_c"],
    null_context: Float[Array, "S_c D_c"] | Float[Array, "B S_c D_c"] | None = None,
    guidance_scale: float | Float[Array, ""] = 5.0,
    *,
    num_steps: int = 50,
    shift: float | Float[Array, ""] = 5.0,
    solver: Solver = "unipc",
    text_mask: Float[Array, "B S"] | None = None,
    sigmas: Float[Array, "N+1"] | None = None,
    noise: Float[Array, "B T H W C"] | None = None,
    text_temperature: float = 1.0,
) -> tuple[Float[Array, "B T H W C"], Int[Array, "B S"]]:
    """Joint generation: video and text both start from their sources and move together on ONE τ grid
    (τ_v = τ_t at every call), one model call per step. The video always uses `solver`; Gaussian text joins the
    same state (so the same solver), discrete text takes its flow's step on the same grid (at `text_temperature`,
    as in `sample_v2t`). CFG, when a null context is given, applies to the video velocity only. Returns (video
    latents, text ids)."""
    batch = video_shape[0]
    key_video, key_text, key_loop = jax.random.split(key, 3)
    video_noise = jax.random.normal(key_video, video_shape, jnp.float32) if noise is None else noise
    sigmas = wan_shifted_sigmas(num_steps, shift) if sigmas is None else sigmas
    start = text_flow.source(key_text, batch, text_len)

    def call(video, text, tau):
        taus = jnp.full((batch,), tau)
        return _call_with_guidance(
            velocity_fn, video, text, taus, taus, context, null_context, guidance_scale, text_mask
        )

    if text_flow.gaussian:
        (video, text), _ = _solve(lambda state, _ids, tau: (call(*state, tau), None), (video_noise, start), sigmas,
                                  solver)
        return video, text_flow.decode(text)
    video, ids = _solve(lambda video, ids, tau: call(video, ids, tau), video_noise, sigmas, solver,
                        _SteppedText(start, key_loop, text_flow, text_temperature))
    return video, text_flow.decode(ids)
