"""The uni-flow: noise levels, interpolation paths, targets and the combined loss (pure, jittable functions).

Time convention (the paper's, used everywhere in this package outside the Wan network itself): τ ∈ [0, 1] with
τ = 1 CLEAN data and τ = 0 pure noise. The Gaussian path is z_τ = (1 − τ)·z0 + τ·z1 with z0 ~ N(0, I) noise and z1
data, so the target velocity is u = dz/dτ = z1 − z0.

Wan's network runs the other way: σ = 1 − τ (σ = 1 noise), timestep = σ·1000, and it predicts (noise − data) = −u.
The three conversions below (`tau_to_wan_timestep`, `wan_velocity_to_paper`, `shift_sigma`) are the only places that
know this; getting any of them backwards silently throws away the pretrained prior, so they are tested on their own.

Text has two flows (DESIGN §4), chosen once by name (`UniViGUConfig.text_flow`) and from then on used through an
object with one interface (`TextFlow`: source, corruption and target, per-token loss, solver step, decoding), which
the model, the losses, the samplers and the evaluation call:
  * `EmbeddingTextFlow` (the paper): a Gaussian flow in the space of a learnable embedding table
    (`uvigu.models.text_table.TextEmbeddingTable`), decoded by nearest row;
  * `DiscreteTextFlow` (the released code): a mixture path over token ids trained with cross-entropy.

Shape letters: B batch, T/H/W latent frames/height/width, C channels, S text tokens, E text latent dim, V vocab,
S_c/D_c prompt-context tokens/width.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

TauKind = Literal["uniform", "logit_normal", "shifted"]
TextFlowName = Literal["embedding", "discrete"]
DiscreteSource = Literal["uniform", "mask"]

WAN_NUM_TRAIN_TIMESTEPS = 1000

# ----------------------------------------------------------------------------------------------------------------------
# Conventions: paper τ <-> Wan σ / timestep / velocity.
# ----------------------------------------------------------------------------------------------------------------------


def tau_to_wan_timestep(tau: Float[Array, "*B"]) -> Float[Array, "*B"]:
    """Paper τ (1 = clean) -> Wan timestep σ·1000 with σ = 1 − τ (1000 = pure noise), what `WanDiT` is called with."""
    return (1.0 - tau) * WAN_NUM_TRAIN_TIMESTEPS


def wan_velocity_to_paper(v_wan: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    """Wan's raw prediction (noise − data) -> the paper's velocity dz/dτ = data − noise. It is an involution, so the
    same negation also maps a paper velocity back to Wan's convention."""
    return -v_wan


def shift_sigma(sigma: Float[Array, "*B"], shift: float | Float[Array, ""]) -> Float[Array, "*B"]:
    """Wan / SD3 timestep shift σ' = s·σ / (1 + (s − 1)·σ), on σ = 1 − τ (σ = 1 noise). For s > 1 it moves every
    interior σ towards 1, i.e. spends more of the schedule (or of the training τ's) at high noise, where large
    latents need it; σ = 0 and σ = 1 are fixed points."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def predict_clean(
    z_tau: Float[Array, "B *rest"], velocity: Float[Array, "B *rest"], tau: Float[Array, "B"]
) -> Float[Array, "B *rest"]:
    """Clean-data estimate from a velocity prediction: ẑ1 = z_τ + (1 − τ)·v̂ (exact when v̂ = z1 − z0, because
    z_τ + (1 − τ)(z1 − z0) = z1). Used for the embedding flow's rounding loss and by the samplers' x0 form."""
    return z_tau + _per_example(1.0 - tau, z_tau) * velocity


def _per_example(tau: Float[Array, "B"], like: Array) -> Float[Array, "B *ones"]:
    """[B] -> [B, 1, ..., 1] so a per-example scalar broadcasts over any trailing shape of `like`."""
    return jnp.reshape(tau, tau.shape + (1,) * (like.ndim - tau.ndim)).astype(like.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Noise levels.
# ----------------------------------------------------------------------------------------------------------------------


def sample_tau(
    key: PRNGKeyArray,
    batch: int,
    kind: TauKind = "uniform",
    *,
    shift: float = 3.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> Float[Array, "B"]:
    """Per-example training noise levels τ ∈ [0, 1] (1 = clean).

    kind:
      "uniform"      τ ~ U[0, 1).
      "logit_normal" τ = sigmoid(mean + std·n), n ~ N(0, 1) (SD3's choice; median τ = sigmoid(mean)). Since sigmoid
                     is odd around 0, this is the same law as a logit-normal σ with mean −mean.
      "shifted"      u ~ U[0, 1), σ = shift_sigma(1 − u, shift), τ = 1 − σ: the training counterpart of Wan's
                     shifted inference schedule; median τ = 1 / (1 + shift), so shift > 1 favours noisy τ.
    """
    if kind == "uniform":
        return jax.random.uniform(key, (batch,), jnp.float32)
    if kind == "logit_normal":
        return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    if kind == "shifted":
        u = jax.random.uniform(key, (batch,), jnp.float32)
        return 1.0 - shift_sigma(1.0 - u, shift)
    raise ValueError(f"unknown tau kind {kind!r}; expected 'uniform', 'logit_normal' or 'shifted'")


def sample_uni_tau(
    key: PRNGKeyArray,
    batch: int,
    kind: TauKind = "uniform",
    *,
    shift: float = 3.0,
    mean: float = 0.0,
    std: float = 1.0,
) -> tuple[Float[Array, "B"], Float[Array, "B"]]:
    """(τ_v, τ_t): video and text noise levels drawn independently per example from separate subkeys, so training
    sees every (τ_v, τ_t) combination, including the understanding (τ_v ≈ 1) and generation (τ_t ≈ 1) corners."""
    key_v, key_t = jax.random.split(key)
    tau_v = sample_tau(key_v, batch, kind, shift=shift, mean=mean, std=std)
    tau_t = sample_tau(key_t, batch, kind, shift=shift, mean=mean, std=std)
    return tau_v, tau_t


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian flow (video, and text in the embedding variant).
# ----------------------------------------------------------------------------------------------------------------------


def mix_tasks(
    key: PRNGKeyArray,
    tau_v: Float[Array, "B"],
    tau_t: Float[Array, "B"],
    clean_video_prob: float,
    clean_text_prob: float,
) -> tuple[Float[Array, "B"], Float[Array, "B"]]:
    """Optionally turns some examples into pure understanding (τ_v = 1) or pure generation (τ_t = 1) examples.

    The paper samples τ_v and τ_t independently and nothing else (both probabilities 0: identity). With a continuous
    τ, the exact inference tasks (V2T at τ_v = 1, T2V at τ_t = 1) are then only approached, rarely: under
    logit-normal sampling τ_v > 0.8 in ~8 % of examples. A small model trained for a few hundred steps (the toy
    world's demo) learns captioning far faster when some examples are V2T exactly. An example is made V2T with
    probability `clean_video_prob`, else T2V with probability `clean_text_prob` (never both)."""
    u = jax.random.uniform(key, tau_v.shape)
    to_v2t = u < clean_video_prob
    to_t2v = (~to_v2t) & (u < clean_video_prob + clean_text_prob)
    return jnp.where(to_v2t, 1.0, tau_v), jnp.where(to_t2v, 1.0, tau_t)


def interpolate(
    z1: Float[Array, "B *rest"], z0: Float[Array, "B *rest"], tau: Float[Array, "B"]
) -> Float[Array, "B *rest"]:
    """z_τ = (1 − τ)·z0 + τ·z1 with τ [B] broadcast over every trailing dim (video [B,T,H,W,C] or text [B,S,E])."""
    t = _per_example(tau, z1)
    return (1.0 - t) * z0 + t * z1


def velocity_target(z1: Float[Array, "B *rest"], z0: Float[Array, "B *rest"]) -> Float[Array, "B *rest"]:
    """u = dz_τ/dτ = z1 − z0: constant along each straight path, which is what the network regresses."""
    return z1 - z0


def token_cross_entropy(logits: Float[Array, "B S V"], ids: Int[Array, "B S"]) -> Float[Array, "B S"]:
    """Per-token −log softmax(logits)[id], in fp32. The discrete flow's loss and the embedding flow's rounding loss."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def rounding_loss(
    table: Any,
    z_pred_clean: Float[Array, "B S E"],
    ids: Int[Array, "B S"],
    text_mask: Float[Array, "B S"] | Bool[Array, "B S"],
) -> Float[Array, ""]:
    """Mean over valid tokens of the cross-entropy of `table.rounding_logits(ẑ1)` against the clean ids, where
    ẑ1 = `predict_clean(z_τ, v̂, τ)`. Added to the embedding-flow loss by the trainer, with its own weight."""
    ce = token_cross_entropy(table.rounding_logits(z_pred_clean), ids)
    mask = text_mask.astype(jnp.float32)
    return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Text flow "discrete": mixture path over token ids.
# ----------------------------------------------------------------------------------------------------------------------


def polynomial_kappa(tau: Float[Array, "*B"], power: float = 1.0) -> Float[Array, "*B"]:
    """The mixture path's scheduler κ(τ) = τ^power: the probability that a token already shows its clean value."""
    return jnp.power(tau, power)


def discrete_source_sample(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    vocab_size: int,
    source: DiscreteSource = "uniform",
    mask_id: int | None = None,
) -> Int[Array, "*shape"]:
    """Samples of the discrete flow's source p0 (the τ = 0 end): uniformly random ids in [0, vocab_size), or
    `mask_id` everywhere (an absorbing / masked-diffusion source)."""
    if source == "uniform":
        return jax.random.randint(key, shape, 0, vocab_size, dtype=jnp.int32)
    if source == "mask":
        if mask_id is None:
            raise ValueError("source='mask' needs a mask_id")
        return jnp.full(shape, mask_id, jnp.int32)
    raise ValueError(f"unknown discrete source {source!r}; expected 'uniform' or 'mask'")


def discrete_corrupt(
    key: PRNGKeyArray,
    ids: Int[Array, "B S"],
    tau: Float[Array, "B"],
    vocab_size: int,
    source: DiscreteSource = "uniform",
    mask_id: int | None = None,
    scheduler_power: float = 1.0,
) -> Int[Array, "B S"]:
    """x_τ ~ κ(τ)·δ(x1) + (1 − κ(τ))·p0, independently per token: keep the clean id with probability κ(τ) = τ^power,
    else replace it with a source sample. With a uniform source a replaced token can land on its clean id by chance,
    so the observed "unchanged" rate is κ + (1 − κ)/V."""
    key_keep, key_source = jax.random.split(key)
    kappa = polynomial_kappa(tau, scheduler_power)[:, None]
    keep = jax.random.uniform(key_keep, ids.shape, jnp.float32) < kappa
    noise = discrete_source_sample(key_source, ids.shape, vocab_size, source, mask_id)
    return jnp.where(keep, ids.astype(jnp.int32), noise)


def mixture_euler_step(
    key: PRNGKeyArray,
    ids: Int[Array, "B S"],
    logits: Float[Array, "B S V"],
    tau: Float[Array, ""] | Float[Array, "B"],
    tau_next: Float[Array, ""] | Float[Array, "B"],
    power: float = 1.0,
    temperature: float = 1.0,
) -> Int[Array, "B S"]:
    """One step of the mixture-path discrete flow from τ to τ_next (κ(τ) = τ^power).

    Draw x1 ~ p(x1 | x_τ) = softmax(logits) per token, then move each token to its x1 with probability
    (κ(τ_next) − κ(τ)) / (1 − κ(τ)): the chance that a token still showing source at τ shows data at τ_next under
    the mixture path, so the step is exact in discrete time when the model's posterior is. At τ_next = 1 that
    probability is exactly 1 and every token takes its sample (the final step returns the sample).

    `temperature` (a Python float) draws x1 from softmax(logits / temperature) instead; 0 takes the most likely
    token (greedy decoding). 1 is the flow's own law.
    """
    u_x1, u_jump = jax.random.uniform(key, (2,) + ids.shape, jnp.float32)  # one draw for both decisions
    x1 = draw_tokens(u_x1, logits, temperature)
    kappa, kappa_next = polynomial_kappa(tau, power), polynomial_kappa(tau_next, power)
    p_jump = (kappa_next - kappa) / (1.0 - kappa)
    p_jump = jnp.reshape(p_jump, jnp.shape(p_jump) + (1,) * (ids.ndim - jnp.ndim(p_jump)))
    return jnp.where(u_jump < p_jump, x1, ids.astype(jnp.int32))


def draw_tokens(uniform: Float[Array, "B S"], logits: Float[Array, "B S V"], temperature: float = 1.0
                ) -> Int[Array, "B S"]:
    """One token per position from softmax(logits / temperature), by `_sample_categorical` on `uniform`;
    temperature 0 (a Python float, as every temperature here) takes the argmax instead."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return _sample_categorical(uniform, logits if temperature == 1 else logits.astype(jnp.float32) / temperature)


def _sample_categorical(uniform: Float[Array, "B S"], logits: Float[Array, "B S V"]) -> Int[Array, "B S"]:
    """One draw per token from softmax(logits) by inverting the CDF with one uniform per token: the first index
    whose cumulative probability reaches (1 − u)·total, with 1 − u ∈ (0, 1] so a zero-probability id is never
    returned. Same law as `jax.random.categorical`, which draws V Gumbels per token and whose log(−log u) alone
    takes XLA:CPU seconds to compile."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    index = jnp.sum(cdf < (1.0 - uniform)[..., None] * cdf[..., -1:], axis=-1)
    return jnp.minimum(index, logits.shape[-1] - 1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------------------
# The two text flows behind one interface.
# ----------------------------------------------------------------------------------------------------------------------


class TextFlow(Protocol):
    """What the model, the losses, the samplers and the evaluation need of a text flow.

    `gaussian`: True when the text state is a continuous latent that a Gaussian solver integrates with the video
    (its velocity comes out of the model); False when it is token ids moved by `step` on the model's logits.
    """

    name: str
    gaussian: bool

    def source(self, key: PRNGKeyArray, batch: int, length: int) -> Array:
        """The τ = 0 end: [B, S, E] noise or [B, S] source ids."""

    def corrupt(self, key: PRNGKeyArray, ids: Int[Array, "B S"], tau: Float[Array, "B"]) -> tuple[Array, Array]:
        """(model input at τ, training target) for clean ids."""

    def clean(self, ids: Int[Array, "B S"]) -> Array:
        """The model input for clean text (τ = 1), e.g. the prompt fed to T2V."""

    def token_loss(self, prediction: Array, target: Array) -> Float[Array, "B S"]:
        """Per-token loss of the model's text output against `corrupt`'s target."""

    def step(self, key: PRNGKeyArray, state: Array, output: Array, tau, tau_next, temperature: float = 1.0) -> Array:
        """One solver step of a non-Gaussian state from τ to τ_next given the model's output (`temperature`: of the
        draw from the model's posterior; 0 = its most likely value)."""

    def decode(self, state: Array) -> Int[Array, "B S"]:
        """Token ids of a final (τ = 1) state."""

    def auxiliary_loss(self, text_in: Array, prediction: Array, tau: Float[Array, "B"], ids: Int[Array, "B S"],
                       text_mask: Array) -> Float[Array, ""] | None:
        """A flow's own extra training term (the embedding flow's rounding loss), or None."""


class EmbeddingTextFlow:
    """The paper's text flow: z_t,1 = Ê[y] in a learnable fixed-norm table, Gaussian path from N(0, I), velocity
    MSE per token (averaged over E), decoded by the most similar row. `table` is the model's
    `TextEmbeddingTable` (its `embed`, `decode`, `rounding_logits`, `dim`)."""

    name = "embedding"
    gaussian = True

    def __init__(self, table):
        self.table = table

    def source(self, key, batch, length):
        return jax.random.normal(key, (batch, length, self.table.dim), jnp.float32)

    def corrupt(self, key, ids, tau):
        z1 = self.table.embed(ids)
        z0 = jax.random.normal(key, z1.shape, z1.dtype)
        return interpolate(z1, z0, tau), velocity_target(z1, z0)

    def clean(self, ids):
        return self.table.embed(ids)

    def token_loss(self, prediction, target):
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)

    def step(self, key, state, output, tau, tau_next, temperature=1.0):
        raise TypeError("the embedding text flow is integrated by the Gaussian solver, not stepped")

    def decode(self, state):
        return self.table.decode(state)

    def auxiliary_loss(self, text_in, prediction, tau, ids, text_mask):
        """The rounding loss: cross-entropy of the predicted clean embedding ẑ1 = z_τ + (1 − τ)·v̂ against the clean ids: what keeps the
        table from collapsing under the MSE alone (see `rounding_loss`)."""
        return rounding_loss(self.table, predict_clean(text_in, prediction, tau), ids, text_mask)


class DiscreteTextFlow:
    """The released code's text flow: a mixture path over token ids, κ(τ) = τ^power, from a uniform or an absorbing
    ("mask", id `mask_id`) source; cross-entropy of the logits against the clean ids; `mixture_euler_step`."""

    name = "discrete"
    gaussian = False

    def __init__(self, vocab_size: int, *, source: DiscreteSource = "uniform", mask_id: int | None = None,
                 scheduler_power: float = 1.0):
        if source not in ("uniform", "mask"):
            raise ValueError(f"unknown discrete source {source!r}; expected 'uniform' or 'mask'")
        if source == "mask" and mask_id is None:
            raise ValueError("source='mask' needs a mask_id")
        self.vocab_size, self.source_kind, self.mask_id = vocab_size, source, mask_id
        self.scheduler_power = scheduler_power

    def source(self, key, batch, length):
        return discrete_source_sample(key, (batch, length), self.vocab_size, self.source_kind, self.mask_id)

    def corrupt(self, key, ids, tau):
        noisy = discrete_corrupt(key, ids, tau, self.vocab_size, self.source_kind, self.mask_id, self.scheduler_power)
        return noisy, ids

    def clean(self, ids):
        return ids

    def token_loss(self, prediction, target):
        return token_cross_entropy(prediction, target)

    def step(self, key, state, output, tau, tau_next, temperature=1.0):
        return mixture_euler_step(key, state, output, tau, tau_next, self.scheduler_power, temperature)

    def auxiliary_loss(self, text_in, prediction, tau, ids, text_mask):
        return None

    def decode(self, state):
        return state


# ----------------------------------------------------------------------------------------------------------------------
# The combined loss.
# ----------------------------------------------------------------------------------------------------------------------


def uni_flow_loss(
    video_pred: Float[Array, "B T H W C"],
    video_target: Float[Array, "B T H W C"],
    text_pred: Float[Array, "B S E"] | Float[Array, "B S V"],
    text_target: Float[Array, "B S E"] | Int[Array, "B S"],
    text_mask: Float[Array, "B S"] | Bool[Array, "B S"],
    *,
    text_flow: TextFlow,
    video_weight: Float[Array, "B"] | None = None,
    text_weight: Float[Array, "B"] | None = None,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """L = L_v + L_t with

        L_v = Σ_b w_v,b Σ_{l,c} (v̂_v − u_v)²_{b,l,c} / (C · Σ_b w_v,b · L)        (mean over video elements)
        L_t = Σ_{b,s} w_t,b m_{b,s} ℓ_{b,s} / Σ_{b,s} w_t,b m_{b,s}                (mean over valid text tokens)

    where L = T·H·W video tokens per example, m = `text_mask` (1 = real token, 0 = padding) and the per-token text
    loss ℓ is the MSE averaged over E of (v̂_t − u_t) for the embedding flow, or the cross-entropy of the logits
    `text_pred` against the clean ids `text_target` for the discrete flow.

    Why this is the paper's λ form: write ℓ_v(tok) for a video token's squared error averaged over C, |z_v| and
    |z_t| for the numbers of (weighted) video and valid text tokens. Then
        L = (1/|z_v|)·[ λ_v·Σ_video ℓ_v + λ_t·Σ_text ℓ ]   with λ_v = 1, λ_t = |z_v| / |z_t|,
    i.e. the sum-over-tokens loss with the paper's weights, divided by the constant |z_v| (which only rescales the
    learning rate). Each modality therefore gets the same weight per token however long the caption is, and padding
    never enters (neither numerator nor count).

    `video_weight` / `text_weight` (per example, default 1) drop an example from one modality's loss, e.g. an
    understanding-only example whose video is given clean (τ_v = 1) has nothing to learn on the video side.
    Returns (L, {"video": L_v, "text": L_t}).
    """
    batch = video_pred.shape[0]
    w_v = jnp.ones((batch,), jnp.float32) if video_weight is None else video_weight.astype(jnp.float32)
    w_t = jnp.ones((batch,), jnp.float32) if text_weight is None else text_weight.astype(jnp.float32)

    sq_v = jnp.square(video_pred.astype(jnp.float32) - video_target.astype(jnp.float32))
    per_example_v = jnp.mean(sq_v.reshape(batch, -1), axis=-1)  # [B]: mean over T·H·W·C
    loss_v = jnp.sum(w_v * per_example_v) / jnp.maximum(jnp.sum(w_v), 1e-12)

    per_token_t = text_flow.token_loss(text_pred, text_target)
    token_w = w_t[:, None] * text_mask.astype(jnp.float32)  # [B, S]
    loss_t = jnp.sum(token_w * per_token_t) / jnp.maximum(jnp.sum(token_w), 1e-12)

    return loss_v + loss_t, {"video": loss_v, "text": loss_t}


# ----------------------------------------------------------------------------------------------------------------------
# Condition dropout.
# ----------------------------------------------------------------------------------------------------------------------


def drop_condition(
    key: PRNGKeyArray,
    context: Float[Array, "B S_c D_c"],
    p: float | Float[Array, ""],
    null_context: Float[Array, "S_c D_c"] | Float[Array, "B S_c D_c"] | None = None,
) -> Float[Array, "B S_c D_c"]:
    """Replaces each example's prompt context by the null context (zeros unless given, e.g. umT5 of "") with
    probability p. Training with it is what makes classifier-free guidance possible, and in stage 1 (knowledge
    recall) it forces the caption to be recovered from the video rather than copied from the prompt."""
    drop = jax.random.uniform(key, (context.shape[0],), jnp.float32) < p
    null = jnp.zeros_like(context) if null_context is None else jnp.broadcast_to(null_context, context.shape)
    return jnp.where(drop[:, None, None], null.astype(context.dtype), context)
