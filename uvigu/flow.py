"""The uni-flow: noise levels, interpolation paths, targets and the combined loss (pure, jittable functions).

Time convention (the paper's, used everywhere in this package outside the Wan network itself): τ ∈ [0, 1] with
τ = 1 CLEAN data and τ = 0 pure noise. The Gaussian path is z_τ = (1 − τ)·z0 + τ·z1 with z0 ~ N(0, I) noise and z1
data, so the target velocity is u = dz/dτ = z1 − z0.

Wan's network runs the other way: σ = 1 − τ (σ = 1 noise), timestep = σ·1000, and it predicts (noise − data) = −u.
The three conversions below (`tau_to_wan_timestep`, `wan_velocity_to_paper`, `shift_sigma`) are the only places that
know this; getting any of them backwards silently throws away the pretrained prior, so they are tested on their own.

Text has two flows (DESIGN §4), switched by `text_flow`:
  * "embedding" (the paper): a Gaussian flow in the space of a learnable embedding table (`TextEmbeddingTable`),
    decoded by nearest row;
  * "discrete" (the released code): a mixture path over token ids (`discrete_corrupt`) trained with cross-entropy.

Shape letters: B batch, T/H/W latent frames/height/width, C channels, S text tokens, E text latent dim, V vocab,
S_c/D_c prompt-context tokens/width.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

TauKind = Literal["uniform", "logit_normal", "shifted"]
TextFlow = Literal["embedding", "discrete"]
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


# ----------------------------------------------------------------------------------------------------------------------
# Text flow "embedding": a learnable table whose rows live on a sphere.
# ----------------------------------------------------------------------------------------------------------------------


class TextEmbeddingTable(nnx.Module):
    """Learnable token embedding E [V, E] for the paper's continuous text flow.

    Why fixed-norm rows: the flow target z1 = E[y] depends on E, so a pure MSE on the velocity can be minimised by
    shrinking E (at E = 0 every caption is the same point and the target is trivial). Every use of the table goes
    through `table()`, which rescales each row to norm `row_norm` (default sqrt(E), i.e. unit variance per element,
    the scale of the N(0, I) noise the flow starts from); the gradient of the loss w.r.t. a row's norm is then zero,
    so only the directions learn. Decoding is argmax of similarity z·Êᵀ; with equal row norms that is the nearest row.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        rngs: nnx.Rngs,
        row_norm: float | None = None,
        param_dtype=jnp.float32,
    ):
        self.vocab_size = vocab_size
        self.dim = dim
        self.row_norm = math.sqrt(dim) if row_norm is None else float(row_norm)
        init = nnx.initializers.normal(stddev=1.0)
        self.embedding = nnx.Param(init(rngs.params(), (vocab_size, dim), param_dtype), out_sharding=("vocab", "embed"))

    def table(self) -> Float[Array, "V E"]:
        """The normalised table Ê: each row of the raw parameter rescaled to norm `row_norm` (fp32)."""
        raw = self.embedding[...].astype(jnp.float32)
        norms = jnp.sqrt(jnp.sum(raw * raw, axis=-1, keepdims=True))
        return raw * (self.row_norm / jnp.maximum(norms, 1e-12))

    def embed(self, ids: Int[Array, "B S"]) -> Float[Array, "B S E"]:
        """Clean text latents z_t,1 = Ê[ids]."""
        return jnp.take(self.table(), ids, axis=0)

    def rounding_logits(self, z: Float[Array, "B S E"]) -> Float[Array, "B S V"]:
        """Similarity logits z·Êᵀ of a (predicted clean) embedding against every row: a cross-entropy on them
        ("rounding" loss) pulls ẑ1 towards its own row and away from the others, which MSE alone does not."""
        return jnp.einsum("bse,ve->bsv", z.astype(jnp.float32), self.table())

    def decode(self, z: Float[Array, "B S E"]) -> Int[Array, "B S"]:
        """Token ids of the most similar rows: argmax_v z·Ê_v."""
        return jnp.argmax(self.rounding_logits(z), axis=-1).astype(jnp.int32)


def token_cross_entropy(logits: Float[Array, "B S V"], ids: Int[Array, "B S"]) -> Float[Array, "B S"]:
    """Per-token −log softmax(logits)[id], in fp32. The discrete flow's loss and the embedding flow's rounding loss."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def rounding_loss(
    table: TextEmbeddingTable,
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
    text_flow: TextFlow = "embedding",
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

    if text_flow == "embedding":
        per_token_t = jnp.mean(jnp.square(text_pred.astype(jnp.float32) - text_target.astype(jnp.float32)), axis=-1)
    elif text_flow == "discrete":
        per_token_t = token_cross_entropy(text_pred, text_target)
    else:
        raise ValueError(f"unknown text_flow {text_flow!r}; expected 'embedding' or 'discrete'")
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
