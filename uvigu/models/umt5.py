"""The umT5 encoder (Wan2.1's prompt encoder) in Flax NNX, exact to transformers' `UMT5EncoderModel` in float32.

Architecture (T5 v1.1 family; "um" = the multilingual, uniformly sampled variant):
  token embedding -> num_layers x [RMS-norm -> self-attention with relative position bias -> residual,
  RMS-norm -> gated-GELU FFN -> residual] -> final RMS-norm.
Things that differ from a textbook transformer, each checked against transformers' UMT5 code:
  * No 1/sqrt(K) scaling of the attention logits: T5 folds it into the init of the q projection instead.
  * Every layer has its own relative position bias table [num_buckets, N]. (T5 shares layer 0's table across the
    stack; umT5 does not - that is the "u" of its config's `scalable_attention`.)
  * The norms are T5's LayerNorm: no mean subtraction and no bias, i.e. RMSNorm, in float32.
  * No biases anywhere; no dropout at inference; no positional embedding other than the bias.
  * "gated-gelu" means GELU with the tanh approximation (transformers maps it to `gelu_new`).
Padding: the mask hides padded *keys* only. Padded query positions still get well-defined (non-zero) outputs, as in
transformers; Wan trims them afterwards (`wan_context`).

Param paths (stacked layout, the canonical one on disk; `blocks.{i}.` per layer when `scan_layers=False`):
  embed_tokens.embedding [V, D], blocks.attention_norm.scale [L, D], blocks.attention.{q,k,v}.kernel [L, D, N*K],
  blocks.attention.o.kernel [L, N*K, D], blocks.attention.relative_attention_bias [L, num_buckets, N],
  blocks.ffn_norm.scale [L, D], blocks.ffn.{wi_0,wi_1}.kernel [L, D, F] (or blocks.ffn.wi.kernel when not gated),
  blocks.ffn.wo.kernel [L, F, D], final_norm.scale [D].
`uvigu.models.umt5_keys` maps these to and from transformers' state dict.

Shape letters: B batch, L query tokens, M key tokens, S tokens (L = M = S in self-attention), D model dim,
N heads, K head dim (d_kv; N*K need not equal D), F ffn dim, V vocabulary, R relative-position buckets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from uvigu import sharding
from uvigu.models import layers
from uvigu.models.model_config import ModelConfig
from uvigu.models.wan import layer_stack

# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


# transformers' activation names (ACT2FN keys) that a T5-family `feed_forward_proj` can resolve to.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu_new": _gelu_tanh,  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    "gelu": _gelu_erf,  # exact, erf-based
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class UMT5Config(ModelConfig):
    """Architecture of a umT5 encoder plus how to execute it (dtypes, layer stacking).

    Field names follow transformers' `UMT5Config` where one exists, so a `text_encoder/config.json` maps over by name
    (`umt5_keys.config_from_hf`). The execution fields do not change the weights.
    """

    # --- architecture ---
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64  # head dim K; num_heads * d_kv is the attention width, which need not equal d_model
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-<act>" or "<act>", act in ACTIVATIONS ("gated-gelu" = gelu_new)
    # --- execution ---
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax, position bias and the residual stay float32
    param_dtype: str = "float32"  # storage dtype of params
    scan_layers: bool = True  # stack layers and run them with nnx.scan (fast compile); False = a Python loop

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"UMT5Config.{name} must be positive, got {getattr(self, name)}")
        # Bidirectional buckets: half per direction, half of those exact; both halves must be non-empty, and the
        # log-spaced range must grow (max_distance beyond the exact part) or the bucket formula divides by log(<=1).
        if self.relative_attention_num_buckets < 4:
            raise ValueError("UMT5Config.relative_attention_num_buckets must be >= 4 (bidirectional buckets), got "
                             f"{self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"UMT5Config.relative_attention_max_distance={self.relative_attention_max_distance} must "
                             f"exceed the exact-bucket range {self.relative_attention_num_buckets // 4}")
        self.activation_name  # validates feed_forward_proj
        self.check_dtypes()

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation_name(self) -> str:
        """transformers' name of the FFN activation: "gated-gelu" is special-cased to the tanh GELU, as there."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        act = self.feed_forward_proj.removeprefix("gated-")
        if act not in ACTIVATIONS or act.startswith("gated"):
            raise ValueError(f"UMT5Config.feed_forward_proj={self.feed_forward_proj!r}: expected 'gated-<act>' or "
                             f"'<act>' with act one of {tuple(ACTIVATIONS)}")
        return act

    @property
    def inner_dim(self) -> int:
        """The attention width N * K."""
        return self.num_heads * self.d_kv


PRESETS: dict[str, UMT5Config] = {
    # The toy world's frozen prompt encoder: umT5's architecture at a size a CPU runs in milliseconds.
    "tiny": UMT5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                       relative_attention_num_buckets=32, relative_attention_max_distance=128),
    # google/umt5-xxl's encoder, Wan2.1's text encoder (diffusers' Wan pipelines ship it as `text_encoder/`:
    # UMT5EncoderModel, d_model 4096, d_kv 64, 64 heads, d_ff 10240, 24 layers, 32 buckets, max distance 128,
    # eps 1e-6, gated-gelu, vocab 256384).
    "umt5-xxl": UMT5Config(),
}
UMT5Config.PRESETS = PRESETS


# ----------------------------------------------------------------------------------------------------------------------
# Relative positions.
# ----------------------------------------------------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: np.ndarray, *, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """T5's bucketing of relative positions (key position − query position) -> int32 bucket ids in [0, num_buckets).

    Bidirectional: half the buckets for keys after the query, half for the rest. Within a half, the first
    `max_exact` = half // 2 buckets are exact distances 0 .. max_exact − 1, the rest are log-spaced up to
    `max_distance`; anything farther shares the last bucket. Unidirectional (decoder) keeps only non-positive
    distances and uses all buckets for them.

    Host-side numpy on purpose: sequence lengths are static under jit, so the bucket table is a constant, and numpy
    lets us reproduce transformers' float32 arithmetic step by step (float32 log of distance / max_exact, divided by
    log(max_distance / max_exact) rounded to float32, times the bucket count, truncated). At distances that sit on a
    bucket boundary (16, 32, 64 for the default 32 / 128) a float64 evaluation could land on the other side.
    """
    rel = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros(rel.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        distance = np.abs(rel)
    else:
        distance = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    f32 = np.float32
    # Distances below max_exact (including 0, whose log is -inf) take the exact branch; clip them out of the log.
    scaled = np.maximum(distance, max_exact).astype(f32) / f32(max_exact)
    log_ratio = np.log(scaled) / f32(math.log(max_distance / max_exact)) * f32(num_buckets - max_exact)
    large = np.minimum(max_exact + log_ratio.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(is_small, distance, large)).astype(np.int32)


def relative_position_buckets(
    query_len: int, key_len: int, *, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """The bucket id of every (query i, key j) pair: [query_len, key_len] int32, for relative position j − i."""
    rel = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    return relative_position_bucket(rel, num_buckets=num_buckets, max_distance=max_distance,
                                    bidirectional=bidirectional)


# ----------------------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------------------


def _normal(stddev: float):
    return nnx.initializers.normal(stddev=stddev)


def _dense(in_features: int, out_features: int, logical_axes, *, stddev: float, dtype, param_dtype,
           rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free `nnx.Linear` (kernel [in, out]) tagged with logical axis names. T5 uses no biases anywhere."""
    return nnx.Linear(in_features, out_features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=nnx.with_partitioning(_normal(stddev), logical_axes), rngs=rngs)


class UMT5Attention(nnx.Module):
    """Self-attention with a learned relative position bias per head and no logit scaling.

    The init follows Mesh TensorFlow (as transformers does): q ~ N(0, 1/(D·K)) carries the 1/sqrt(K) that the
    logits do not get; k, v ~ N(0, 1/D); o ~ N(0, 1/(N·K)); the bias table ~ N(0, 1/D). Matters only for the
    random-init toy encoder, which then behaves like a freshly initialised T5 rather than a saturated softmax.
    """

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        c = config
        self.num_heads = c.num_heads
        self.dtype = c.compute_dtype
        proj = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype, rngs=rngs)
        self.q = _dense(c.d_model, c.inner_dim, ("embed", "heads"), stddev=(c.d_model * c.d_kv) ** -0.5, **proj)
        self.k = _dense(c.d_model, c.inner_dim, ("embed", "heads"), stddev=c.d_model ** -0.5, **proj)
        self.v = _dense(c.d_model, c.inner_dim, ("embed", "heads"), stddev=c.d_model ** -0.5, **proj)
        self.o = _dense(c.inner_dim, c.d_model, ("heads", "embed"), stddev=c.inner_dim ** -0.5, **proj)
        # [R, N]: tiny (32 x 64 at XXL), replicated.
        table = _normal(c.d_model ** -0.5)(rngs.params(), (c.relative_attention_num_buckets, c.num_heads),
                                           c.storage_dtype)
        self.relative_attention_bias = nnx.Param(table, out_sharding=(None, None))

    def position_bias(self, buckets: Int[Array, "L M"]) -> Float[Array, "N L M"]:
        """This layer's bias for every (query, key) pair, float32."""
        table = self.relative_attention_bias[...].astype(jnp.float32)
        return rearrange(jnp.take(table, buckets, axis=0), "L M N -> N L M")

    def __call__(
        self,
        x: Float[Array, "B S D"],
        buckets: Int[Array, "S S"],
        kv_mask: Bool[Array, "B S"] | None = None,
    ) -> Float[Array, "B S D"]:
        split = lambda t: rearrange(t, "B S (N K) -> B S N K", N=self.num_heads)
        x = x.astype(self.dtype)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        q = sharding.constrain(q, ("act_batch", "act_length", "act_heads", None))
        # Logits, bias, mask and softmax in float32; unscaled (T5). Masked keys get float32's most negative value,
        # as transformers' additive mask does, so their weight underflows to exactly 0.
        logits = jnp.einsum("BLNK,BMNK->BNLM", q, k, preferred_element_type=jnp.float32)
        logits = logits + self.position_bias(buckets)[None]
        if kv_mask is not None:
            logits = jnp.where(kv_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BNLM,BMNK->BLNK", weights, v)
        return self.o(rearrange(out, "B L N K -> B L (N K)"))


class UMT5FeedForward(nnx.Module):
    """Gated: wo(act(wi_0 x) * wi_1 x). Not gated: wo(act(wi x)). Mesh TensorFlow init: wi ~ N(0, 1/D), wo ~
    N(0, 1/F)."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        c = config
        self.dtype = c.compute_dtype
        self.activation_name = c.activation_name
        self.gated = c.is_gated
        proj = dict(dtype=c.compute_dtype, param_dtype=c.storage_dtype, rngs=rngs)
        if c.is_gated:
            self.wi_0 = _dense(c.d_model, c.d_ff, ("embed", "mlp"), stddev=c.d_model ** -0.5, **proj)
            self.wi_1 = _dense(c.d_model, c.d_ff, ("embed", "mlp"), stddev=c.d_model ** -0.5, **proj)
        else:
            self.wi = _dense(c.d_model, c.d_ff, ("embed", "mlp"), stddev=c.d_model ** -0.5, **proj)
        self.wo = _dense(c.d_ff, c.d_model, ("mlp", "embed"), stddev=c.d_ff ** -0.5, **proj)

    def __call__(self, x: Float[Array, "B S D"]) -> Float[Array, "B S D"]:
        x = x.astype(self.dtype)
        act = ACTIVATIONS[self.activation_name]
        h = act(self.wi_0(x)) * self.wi_1(x) if self.gated else act(self.wi(x))
        h = sharding.constrain(h, ("act_batch", "act_length", "act_mlp"))
        return self.wo(h)


class UMT5Layer(nnx.Module):
    """One encoder layer: pre-norm self-attention and pre-norm FFN, each added to a float32 residual stream."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        c = config
        norm = dict(eps=c.layer_norm_epsilon, param_dtype=c.storage_dtype)
        self.attention_norm = layers.RMSNorm(c.d_model, **norm)
        self.attention = UMT5Attention(c, rngs=rngs)
        self.ffn_norm = layers.RMSNorm(c.d_model, **norm)
        self.ffn = UMT5FeedForward(c, rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "B S D"],
        buckets: Int[Array, "S S"],
        kv_mask: Bool[Array, "B S"] | None = None,
    ) -> Float[Array, "B S D"]:
        # x is float32, so the norms (float32 inside, cast back to x's dtype) hand float32 to the projections,
        # which cast to the compute dtype themselves.
        x = x + self.attention(self.attention_norm(x), buckets, kv_mask).astype(jnp.float32)
        x = x + self.ffn(self.ffn_norm(x)).astype(jnp.float32)
        return sharding.constrain(x, ("act_batch", "act_length", "act_embed"))


class UMT5Encoder(nnx.Module):
    """umT5's encoder stack. `__call__(ids [B, S] int, mask [B, S] (1/True = token, 0/False = padding) or None)`
    -> [B, S, d_model] float32, the final-normed hidden states at every position, padded ones included (they are
    not zeroed: see `wan_context` for what Wan does with them)."""

    def __init__(self, config: UMT5Config, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        # Mesh TensorFlow's embedding init N(0, 1). The DiT's text width is `text_embed`; inside the encoder that
        # same width is the model dim, so it is sharded like every other model dim ('embed').
        self.embed_tokens = nnx.Embed(
            c.vocab_size, c.d_model, dtype=c.storage_dtype, param_dtype=c.storage_dtype,
            embedding_init=nnx.with_partitioning(_normal(1.0), ("vocab", "embed")), rngs=rngs,
        )
        self.blocks = layer_stack(lambda r: UMT5Layer(c, rngs=r), c.num_layers, c.scan_layers, rngs)
        self.final_norm = layers.RMSNorm(c.d_model, eps=c.layer_norm_epsilon, param_dtype=c.storage_dtype)

    def buckets(self, seq_len: int) -> Int[Array, "S S"]:
        """The (static) relative-position bucket of every token pair, shared by all layers (each has its own table)."""
        c = self.config
        return jnp.asarray(relative_position_buckets(seq_len, seq_len, num_buckets=c.relative_attention_num_buckets,
                                                     max_distance=c.relative_attention_max_distance))

    def embed(self, ids: Int[Array, "B S"]) -> Float[Array, "B S D"]:
        """Token embeddings as the float32 residual stream (no scaling: T5 does not multiply by sqrt(D))."""
        x = self.embed_tokens(ids).astype(jnp.float32)
        return sharding.constrain(x, ("act_batch", "act_length", "act_embed"))

    def run_layers(self, x: Float[Array, "B S D"], kv_mask: Bool[Array, "B S"] | None) -> Float[Array, "B S D"]:
        """Every layer, stacked under nnx.scan or in a Python loop."""
        buckets = self.buckets(x.shape[1])
        if self.config.scan_layers:
            def body(x, layer):
                return layer(x, buckets, kv_mask)

            scan = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                            transform_metadata={nnx.PARTITION_NAME: "layers"})
            return scan(x, self.blocks)
        for layer in self.blocks:
            x = layer(x, buckets, kv_mask)
        return x

    def __call__(self, ids: Int[Array, "B S"], mask: Array | None = None) -> Float[Array, "B S D"]:
        if ids.ndim != 2:
            raise ValueError(f"ids must be [B, S] token ids, got shape {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"mask {mask.shape} must match ids {ids.shape}")
        kv_mask = None if mask is None else mask.astype(bool)
        x = self.run_layers(self.embed(ids), kv_mask)
        return self.final_norm(x)


# ----------------------------------------------------------------------------------------------------------------------
# What Wan does with the encoder output.
# ----------------------------------------------------------------------------------------------------------------------


def wan_context(
    embeddings: Float[Array, "B S D"], mask: Array, text_len: int
) -> Float[Array, "B T D"]:
    """The DiT's `context` from umT5 output, as Wan prepares it: T = `text_len` rows, float32.

    Wan (the original release and diffusers' pipelines alike) counts each prompt's tokens, seq_len = sum(mask),
    keeps the first seq_len rows of the encoder output, and zero-pads to `text_len` (512 for Wan2.1). So every row
    at or past an example's length is exactly 0, whatever the encoder put there. That is a *prefix* cut: it assumes
    right padding, which is what umT5's tokenizer produces (padding="max_length"); a mask with holes is counted,
    not followed, exactly as Wan does.

    With S > text_len the rows past text_len are dropped. Note this is not the same as tokenizing with
    max_length=text_len: attention is bidirectional, so the kept rows saw the dropped tokens. To reproduce Wan,
    truncate at the tokenizer (Wan tokenizes to text_len) and use this only to zero and pad.
    """
    if embeddings.ndim != 3 or mask.shape != embeddings.shape[:2]:
        raise ValueError(f"embeddings must be [B, S, D] and mask [B, S]; got {embeddings.shape} and {mask.shape}")
    batch, seq, _ = embeddings.shape
    lengths = jnp.sum(mask.astype(jnp.int32), axis=1)  # [B]
    keep = min(seq, text_len)
    x = embeddings[:, :keep].astype(jnp.float32)
    valid = jnp.arange(keep)[None, :] < lengths[:, None]  # [B, keep]
    x = jnp.where(valid[..., None], x, 0.0)
    return jnp.pad(x, ((0, 0), (0, text_len - keep), (0, 0)))


__all__ = [
    "ACTIVATIONS",
    "PRESETS",
    "UMT5Attention",
    "UMT5Config",
    "UMT5Encoder",
    "UMT5FeedForward",
    "UMT5Layer",
    "relative_position_bucket",
    "relative_position_buckets",
    "wan_context",
]
