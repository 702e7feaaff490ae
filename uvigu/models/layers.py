"""Layers shared by the Wan2.1 DiT and the unified model.

Norms that compute in float32 whatever the compute dtype (the reference keeps them in fp32), a dense layer that tags
its params with logical axis names, one attention function with switchable backends, rotary position embeddings
(Wan's 3-D interleaved form and a 1-D form for text), sinusoidal time features and named remat policies.

Shape letters: B batch, L query tokens, M key tokens, N heads, K head dim, D model dim, P rotary pairs (K / 2).

Context parallelism lives in `dot_product_attention`: queries (and the output) are constrained to the token axis
`act_length` (split over the `context` mesh axis), keys, values and the key mask to `act_kv_length` (replicated), so
XLA all-gathers K/V over `context` and every query row attends to all keys on its own device (see uvigu.sharding).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from uvigu import sharding

AttentionBackend = Literal["xla", "cudnn"]
ATTENTION_BACKENDS = ("xla", "cudnn")


# ----------------------------------------------------------------------------------------------------------------------
# Dense layers and norms.
# ----------------------------------------------------------------------------------------------------------------------


def dense(
    in_features: int,
    out_features: int,
    logical_axes: tuple[str | None, str | None],
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    kernel_init=nnx.initializers.xavier_uniform(),
    bias_init=nnx.initializers.zeros_init(),
) -> nnx.Linear:
    """An `nnx.Linear` (kernel [in, out], bias [out]) whose params carry logical axis names for `uvigu.sharding`."""
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(kernel_init, logical_axes),
        bias_init=nnx.with_partitioning(bias_init, (logical_axes[1],)),
        rngs=rngs,
    )


def layer_norm_fp32(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    """LayerNorm without affine params, computed in float32 (returns float32).

    The backward is written by hand (`_layer_norm_bwd`): autodiff keeps several [.., D] intermediates per norm, and
    under nnx.scan every one becomes a stacked per-layer buffer that is zero-filled, written and read back; this one
    keeps the output and the [.., 1] reciprocal std only (~12% of a small DiT's forward+backward on XLA:CPU).
    """
    return _layer_norm(x.astype(jnp.float32), eps)


def _layer_norm_fwd(x, eps):
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centered), axis=-1, keepdims=True) + eps)
    y = centered * rstd
    return y, (y, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _layer_norm(x, eps):
    return _layer_norm_fwd(x, eps)[0]


def _layer_norm_bwd(eps, res, g):
    # y = (x − mean) · rstd  =>  dx = rstd · (g − mean(g) − y · mean(g · y))
    del eps
    y, rstd = res
    return (rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - y * jnp.mean(g * y, axis=-1, keepdims=True)),)


_layer_norm.defvjp(lambda x, eps: _layer_norm_fwd(x, eps), _layer_norm_bwd)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with a learned scale and bias, computed in float32 (returns float32)."""

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; the argument keeps the constructor uniform with other layers
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        y = layer_norm_fp32(x, self.eps)
        return y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale over the last dim, computed in float32, cast back to the input dtype.

    Wan applies it to q and k over the whole model dim (all heads together), before the split into heads.
    """

    def __init__(self, dim: int, *, eps: float, param_dtype, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        y = x.astype(jnp.float32)
        y = y * jax.lax.rsqrt(jnp.mean(jnp.square(y), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu_tanh(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """GELU, tanh approximation (`jax.nn.gelu(x, approximate=True)`), with a backward that keeps only x.

    Autodiff keeps the tanh and other [.., F] intermediates of the FFN's widest activation; under nnx.scan each is a
    stacked per-layer buffer (zero-filled, written, read back). Recomputing the tanh in the backward is cheaper on
    XLA:CPU (~7% of a small DiT's forward+backward).
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_bwd(x, g):
    xf = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf**3))
    # d/dx 0.5·x·(1 + t) = 0.5·(1 + t) + 0.5·x·(1 − t²)·c·(1 + 3·0.044715·x²)
    d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * xf * xf)
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu_tanh.defvjp(lambda x: (gelu_tanh(x), x), _gelu_tanh_bwd)


def modulate(x_normed: Float[Array, "B L D"], shift: Float[Array, "B #L D"], scale: Float[Array, "B #L D"]):
    """adaLN modulation in float32: norm(x) * (1 + scale) + shift."""
    return x_normed * (1.0 + scale) + shift


# ----------------------------------------------------------------------------------------------------------------------
# Attention.
# ----------------------------------------------------------------------------------------------------------------------


def dot_product_attention(
    q: Float[Array, "B L N K"],
    k: Float[Array, "B M N K"],
    v: Float[Array, "B M N K"],
    kv_mask: Bool[Array, "B M"] | None = None,
    *,
    backend: AttentionBackend = "xla",
    query_chunk: int | None = None,
) -> Float[Array, "B L N K"]:
    """Softmax attention over the key axis, scaled by 1/sqrt(K). `kv_mask` marks the keys that may be attended.

    `xla` is the portable path: logits and softmax in float32 whatever the input dtype, run over blocks of
    `query_chunk` query rows at a time (None: chosen by `query_chunk_size`). `cudnn` is the fused flash-attention
    kernel (GPU only, bf16/fp16 inputs).

    On a mesh the queries stay split over `context` and K/V are gathered (the constraints below); outside a mesh
    the constraints are no-ops.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    q = sharding.constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = sharding.constrain(k, ("act_batch", "act_kv_length", "act_heads", None))
    v = sharding.constrain(v, ("act_batch", "act_kv_length", "act_heads", None))
    if kv_mask is not None:
        kv_mask = sharding.constrain(kv_mask, ("act_batch", "act_kv_length"))
    out = _attend(q, k, v, kv_mask, backend, query_chunk)
    return sharding.constrain(out, ("act_batch", "act_length", "act_heads", None))


# Bytes of float32 logits one block of query rows may hold (all heads, all keys). XLA materialises the [B, N, L, M]
# logits and walks them several times (max, exp, sum; in the backward the probabilities, dP and dS); a block that
# stays in cache makes those walks cheap. On a 2-core EPYC (2 MiB L2 per core, 32 MiB L3), at B=1, N=4, L=M=1536,
# K=128, fwd+bwd took 233 ms whole, 152 ms in 128-row (3 MiB) blocks, 201 ms in 64-row blocks; at B=4, N=4, L=M=320
# (6.5 MiB whole) blocks were slower (10.0 ms whole, 11.9 ms in 80-row blocks): below this size, one block.
ATTENTION_BLOCK_BYTES = 8 << 20
MIN_QUERY_CHUNK = 32  # fewer rows make the products too thin to run at speed


def query_chunk_size(batch: int, heads: int, length: int, kv_length: int,
                     block_bytes: int | None = None) -> int | None:
    """Rows per query block for the `xla` backend: None (one block) when the whole [B, N, L, M] float32 logits fit
    `block_bytes`; else the rows of a block of about half of `block_bytes`, preferring an even split of L (no
    padding). B and N are per device: on a mesh, the caller divides by their shards."""
    block_bytes = ATTENTION_BLOCK_BYTES if block_bytes is None else block_bytes
    row_bytes = batch * heads * kv_length * 4
    if length * row_bytes <= block_bytes:
        return None
    rows = max(MIN_QUERY_CHUNK, block_bytes // 2 // row_bytes)
    blocks = -(-length // rows)
    for even in range(blocks, 2 * blocks + 1):  # the fewest blocks that split L evenly, if near
        if length % even == 0 and length // even >= MIN_QUERY_CHUNK:
            return length // even
    return rows


def _attend(q, k, v, kv_mask, backend: AttentionBackend, query_chunk: int | None):
    if backend == "xla":
        if query_chunk is None:
            query_chunk = _auto_query_chunk(q.shape, k.shape[1])
        # Heads-major (B N L K) operands: both products are then plain batched matmuls, with no transposes of the
        # [B, N, L, M] matrix (on XLA:CPU the token-major form ran ~1.5-2x slower, forward and backward).
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
        return jnp.swapaxes(_softmax_attention(q, k, v, kv_mask, query_chunk), 1, 2)
    if backend == "cudnn":
        mask = None if kv_mask is None else kv_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    raise AssertionError(backend)


def _auto_query_chunk(q_shape, kv_length: int) -> int | None:
    """`query_chunk_size` for this device's share of q [B L N K]. Queries split over a mesh axis (context
    parallelism) stay in one block: a loop over blocks of a sharded axis would gather it."""
    B, L, N, _ = q_shape
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        spec = sharding.resolve_spec(("act_batch", "act_length", "act_heads", None), q_shape, mesh)
        if spec[1] is not None:
            return None
        shards = lambda axes: 1 if axes is None else math.prod(
            mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
        B, N = B // shards(spec[0]), N // shards(spec[2])
    return query_chunk_size(B, N, L, kv_length)


def _masked_logits(s: Float[Array, "B N L M"], kv_mask, key_axis: int) -> Float[Array, "B N L M"]:
    if kv_mask is None:
        return s
    mask = kv_mask[:, None, None, :] if key_axis == 3 else kv_mask[:, None, :, None]
    return jnp.where(mask, s, jnp.finfo(jnp.float32).min)


def _block_fwd(q, k, v, kv_mask):
    """softmax(q kᵀ / sqrt(K)) v for one block of query rows (B N L K operands), float32 logits; also the row max and
    sum [B N L 1] for the backward (kept apart, not as a log-sum-exp, so that a fully masked row keeps its uniform
    weights there too).

    The normalisation comes after the value product: dividing [B, N, L, K] instead of [B, N, L, M] saves a pass over
    the big matrix.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = _masked_logits(jnp.einsum("BNLK,BNMK->BNLM", q, k, preferred_element_type=jnp.float32) * scale, kv_mask, 3)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("BNLM,BNMK->BNLK", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / total
    return o.astype(v.dtype), (m, total)


def _block_bwd(q, k, v, kv_mask, o, m, total, do):
    """One query block's share of the gradients: (dq of the block, float32 dk and dv contributions)."""
    f32 = jnp.float32
    scale = 1.0 / math.sqrt(q.shape[-1])
    q_t, do_t = jnp.swapaxes(q, 2, 3), jnp.swapaxes(do, 2, 3)  # [B N K L]
    s_t = _masked_logits(jnp.einsum("BNMK,BNKL->BNML", k, q_t, preferred_element_type=f32) * scale, kv_mask, 2)
    p_t = jnp.exp(s_t - jnp.swapaxes(m, 2, 3)) / jnp.swapaxes(total, 2, 3)  # Pᵀ [B N M L]
    dv = jnp.einsum("BNML,BNLK->BNMK", p_t.astype(do.dtype), do, preferred_element_type=f32)
    dp_t = jnp.einsum("BNMK,BNKL->BNML", v, do_t, preferred_element_type=f32)
    delta = jnp.sum(do.astype(f32) * o.astype(f32), axis=-1)  # rowsum(dO·O) = rowsum(P·dP), [B N L]
    ds_t = p_t * (dp_t - delta[:, :, None, :]) * scale
    if kv_mask is not None:  # masked logits are constants (a fully masked row still has weights 1/M)
        ds_t = jnp.where(kv_mask[:, None, :, None], ds_t, 0.0)
    dk = jnp.einsum("BNML,BNLK->BNMK", ds_t.astype(q.dtype), q, preferred_element_type=f32)
    dq_t = jnp.einsum("BNKM,BNML->BNKL", jnp.swapaxes(k, 2, 3), ds_t.astype(k.dtype), preferred_element_type=f32)
    return jnp.swapaxes(dq_t, 2, 3).astype(q.dtype), dk, dv


def _to_blocks(x: Float[Array, "B N L X"], rows: int) -> Float[Array, "C B N R X"]:
    """Query rows in blocks of `rows` (the last one zero-padded), block axis first for lax.map / lax.scan."""
    B, N, L, X = x.shape
    blocks = -(-L // rows)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, blocks * rows - L), (0, 0)))
    return jnp.moveaxis(x.reshape(B, N, blocks, rows, X), 2, 0)


def _from_blocks(x: Float[Array, "C B N R X"], length: int) -> Float[Array, "B N L X"]:
    C, B, N, R, X = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(B, N, C * R, X)[:, :, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q: Float[Array, "B N L K"], k: Float[Array, "B N M K"], v: Float[Array, "B N M K"],
                       kv_mask: Bool[Array, "B M"] | None, query_chunk: int | None) -> Float[Array, "B N L K"]:
    """Softmax attention with a hand-written backward, over blocks of `query_chunk` query rows (None: one block).

    Why by hand: autodiff saves the [B, N, L, M] probabilities (under nn.scan: a stacked buffer per layer, zero-filled,
    written and read back) and differentiates into products that contract the row axis of a matrix (P^T dO, dS^T Q),
    which XLA:CPU runs ~2-5x slower than plain row-major products. This backward keeps only o and the row statistics,
    recomputes the probabilities *transposed* (k qᵀ, a plain product) and writes every product as [.., X, Y] @ [.., Y,
    Z] on materialised operands: dv = Pᵀ do, dk = dSᵀ q, dqᵀ = kᵀ dSᵀ, with dS = P (dP − rowsum(do·o)) / sqrt(K).
    Blocks run one after another (lax.map / lax.scan, dk and dv summed over them), so the block's logits stay in
    cache. Zero-padded query rows get finite weights and, with zero output gradient, add nothing.
    """
    return _softmax_attention_vjp_fwd(q, k, v, kv_mask, query_chunk)[0]


def _softmax_attention_vjp_fwd(q, k, v, kv_mask, query_chunk):
    if query_chunk is None or query_chunk >= q.shape[2]:
        o, (m, total) = _block_fwd(q, k, v, kv_mask)
    else:
        o, (m, total) = jax.lax.map(lambda qb: _block_fwd(qb, k, v, kv_mask), _to_blocks(q, query_chunk))
        o = _from_blocks(o, q.shape[2])
    return o, (q, k, v, kv_mask, o, m, total)  # m, total: per block when blocked


def _softmax_attention_vjp_bwd(query_chunk, res, do):
    q, k, v, kv_mask, o, m, total = res
    if query_chunk is None or query_chunk >= q.shape[2]:
        dq, dk, dv = _block_bwd(q, k, v, kv_mask, o, m, total, do)
    else:
        def block(carry, xs):
            q_b, o_b, m_b, total_b, do_b = xs
            dq_b, dk_b, dv_b = _block_bwd(q_b, k, v, kv_mask, o_b, m_b, total_b, do_b)
            return (carry[0] + dk_b, carry[1] + dv_b), dq_b

        zeros = jnp.zeros(k.shape, jnp.float32)
        rows = lambda x: _to_blocks(x, query_chunk)
        (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), (rows(q), rows(o), m, total, rows(do)))
        dq = _from_blocks(dq, q.shape[2])
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_softmax_attention.defvjp(_softmax_attention_vjp_fwd, _softmax_attention_vjp_bwd)


# ----------------------------------------------------------------------------------------------------------------------
# Rotary position embeddings.
# ----------------------------------------------------------------------------------------------------------------------


def rope_angles(dim: int, positions: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """Rotation angles [len(positions), dim // 2] for frequencies theta^(-2i/dim), computed in float64."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim))
    return np.outer(positions.astype(np.float64), inv_freq)


def wan_rope_3d(
    head_dim: int, grid: tuple[int, int, int], *, max_positions: int = 1024, theta: float = 10000.0
) -> tuple[Float[Array, "L P"], Float[Array, "L P"]]:
    """Wan's 3-D RoPE for a (T, H, W) token grid: cos and sin [T*H*W, head_dim // 2], token order (t, h, w).

    The head dim is split into frame / height / width bands: h = w = 2 * (head_dim // 6), t = the rest (44/42/42 for
    128). Each band rotates with its own frequencies over its own coordinate. Built on the host in float64 and cast
    to float32, as the reference does; the grid is static so this folds into a constant.
    """
    t, h, w = grid
    if max(grid) > max_positions:
        raise ValueError(f"token grid {grid} exceeds the {max_positions} RoPE positions")
    hw_dim = 2 * (head_dim // 6)
    t_dim = head_dim - 2 * hw_dim
    ang_t = rope_angles(t_dim, np.arange(t), theta)  # [T, t_dim/2]
    ang_h = rope_angles(hw_dim, np.arange(h), theta)  # [H, hw_dim/2]
    ang_w = rope_angles(hw_dim, np.arange(w), theta)  # [W, hw_dim/2]
    angles = np.concatenate(
        [
            np.broadcast_to(ang_t[:, None, None, :], (t, h, w, ang_t.shape[-1])),
            np.broadcast_to(ang_h[None, :, None, :], (t, h, w, ang_h.shape[-1])),
            np.broadcast_to(ang_w[None, None, :, :], (t, h, w, ang_w.shape[-1])),
        ],
        axis=-1,
    ).reshape(t * h * w, head_dim // 2)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rope(
    x: Float[Array, "B L N K"], cos: Float[Array, "L P"], sin: Float[Array, "L P"], *, interleaved: bool = True
) -> Float[Array, "B L N K"]:
    """Rotates pairs of channels of q or k by position-dependent angles, in float32.

    interleaved=True pairs channels (2i, 2i+1) (Wan's complex form); False pairs (i, i + K/2) (rotate-half form).
    """
    xf = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    r1, r2 = x1 * c - x2 * s, x1 * s + x2 * c
    out = jnp.stack([r1, r2], axis=-1).reshape(xf.shape) if interleaved else jnp.concatenate([r1, r2], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# Time features.
# ----------------------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: Float[Array, "*B"], dim: int, max_period: float = 10000.0) -> Float[Array, "*B F"]:
    """Sinusoidal features of a (possibly fractional) timestep in [0, 1000]: cos ‖ sin, float32.

    Frequencies max_period^(-i / (dim/2)), i < dim/2. Computed in float32 as diffusers' `Timesteps` does, so that
    timesteps near 1000 agree to the last bits (the angle t·f is large there).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half
    args = t.astype(jnp.float32)[..., None] * jnp.exp(exponent)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Rematerialisation.
# ----------------------------------------------------------------------------------------------------------------------

# Activations tagged with `jax.ad_checkpoint.checkpoint_name` in the blocks; the names-based policy keeps these.
SAVED_ACTIVATION_NAMES = ("attention_out", "ffn_hidden")

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing inside a block: recompute everything on the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATION_NAMES),
}


def remat_block_fn(fn: Callable, policy_name: str, *, prevent_cse: bool = True) -> Callable:
    """Wraps a block's call in `nnx.remat` with the named policy; 'none' returns fn unchanged.

    Names: none | full | dots (keep matmul outputs) | names (keep attention outputs and FFN hidden).
    """
    if policy_name == "none":
        return fn
    if policy_name not in REMAT_POLICIES:
        raise ValueError(f"remat policy {policy_name!r} is not one of {('none', *REMAT_POLICIES)}")
    return nnx.remat(fn, policy=REMAT_POLICIES[policy_name], prevent_cse=prevent_cse)


def tag(x: Array, name: str) -> Array:
    """Names an activation for the names-based remat policy."""
    return checkpoint_name(x, name)


__all__ = [
    "ATTENTION_BACKENDS",
    "AffineLayerNorm",
    "RMSNorm",
    "apply_rope",
    "dense",
    "dot_product_attention",
    "gelu_tanh",
    "layer_norm_fp32",
    "modulate",
    "remat_block_fn",
    "rope_angles",
    "sinusoidal_embedding",
    "tag",
    "wan_rope_3d",
]
