"""Hand-written backwards in uvigu.models.layers against autodiff of the plain formula and against PyTorch autograd,
fp32, relative error ≤ 1e-5: the xla attention backend (without a mask, with a partial mask and with a fully masked
query row: uniform weights, no gradient through the masked logits), the float32 LayerNorm and GELU(tanh)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from reference import rel_err
from uvigu.models import layers

TOL = 1e-5
B, L, M, N, K = 2, 7, 5, 3, 8
MASKS = {
    "none": None,
    "partial": np.array([[1, 1, 0, 1, 0], [1, 0, 1, 1, 1]], bool),
    "row_fully_masked": np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], bool),
}


def _plain(q, k, v, mask):
    """softmax(q kᵀ / sqrt(K)) v as one would write it, differentiated by JAX."""
    s = jnp.einsum("BLNK,BMNK->BNLM", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("BNLM,BMNK->BLNK", jax.nn.softmax(s, axis=-1), v)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, L, N, K), (B, M, N, K), (B, M, N, K)))
    w = rng.standard_normal((B, L, N, K)).astype(np.float32)  # a loss weight so every output entry matters
    return q, k, v, w


def _ours(q, k, v, w, mask, query_chunk=None):
    mask = None if mask is None else jnp.asarray(mask)
    attend = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, query_chunk=query_chunk)
    loss = lambda q, k, v: jnp.sum(attend(q, k, v) * w)
    out = jax.jit(attend)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


# query_chunk: None = one block (these shapes are far below ATTENTION_BLOCK_BYTES); 3 = blocks of 3, 3 and a
# zero-padded 1 (L = 7); 7 = one block through the explicit path.
@pytest.mark.parametrize("query_chunk", [None, 3, 7])
@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_grads_match_autodiff_of_the_formula(mask_name, query_chunk):
    q, k, v, w = _inputs()
    mask = MASKS[mask_name]
    jmask = None if mask is None else jnp.asarray(mask)
    out, grads = _ours(q, k, v, w, mask, query_chunk)
    want_out = _plain(q, k, v, jmask)
    want = jax.grad(lambda q, k, v: jnp.sum(_plain(q, k, v, jmask) * w), argnums=(0, 1, 2))(q, k, v)
    assert rel_err(out, want_out) <= TOL
    for name, g, gw in zip("qkv", grads, want):
        assert rel_err(g, gw) <= TOL, (mask_name, name, rel_err(g, gw))


@pytest.mark.parametrize("mask_name", ["none", "partial"])
def test_grads_match_torch_sdpa(mask_name):
    q, k, v, w = _inputs(1)
    mask = MASKS[mask_name]
    _, grads = _ours(q, k, v, w, mask)
    tq, tk, tv = (torch.from_numpy(np.moveaxis(a, 2, 1).copy()).requires_grad_() for a in (q, k, v))  # B N L K
    tmask = None if mask is None else torch.from_numpy(mask)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask)
    (out * torch.from_numpy(np.moveaxis(w, 2, 1).copy())).sum().backward()
    for name, g, t in zip("qkv", grads, (tq, tk, tv)):
        assert rel_err(g, np.moveaxis(t.grad.numpy(), 1, 2)) <= TOL, (mask_name, name)


def test_query_blocks_follow_the_byte_budget():
    # Whole when the [B, N, L, M] float32 logits fit the budget (the toy DiT's 80-96 tokens, the small bench).
    assert layers.query_chunk_size(16, 2, 96, 96) is None
    assert layers.query_chunk_size(4, 4, 320, 320) is None
    # Above it: rows for half the budget (4 MiB / (4 heads x 1536 keys x 4 B) = 170), rounded to an even split of L
    # (12 blocks of 128, no padding).
    assert layers.query_chunk_size(1, 4, 1536, 1536) == 128
    # No even split near: blocks of the budget's rows, the last one padded.
    rows = layers.query_chunk_size(1, 4, 1549, 1549)  # 1549 is prime
    assert rows == (4 << 20) // (4 * 1549 * 4)
    # Never thinner than MIN_QUERY_CHUNK rows, however many keys.
    assert layers.query_chunk_size(1, 40, 32760, 32760) == layers.MIN_QUERY_CHUNK
    assert layers.query_chunk_size(1, 1, 64, 64, block_bytes=1024) == layers.MIN_QUERY_CHUNK


def test_query_blocks_on_a_mesh_use_the_per_device_shape():
    """Blocks are sized by each device's share of B and N; a token axis split over `context` stays one block (a loop
    over blocks of a sharded axis would gather it)."""
    AbstractMesh = jax.sharding.AbstractMesh
    q_shape = (8, 1536, 8, 128)  # B L N K
    with jax.sharding.use_abstract_mesh(AbstractMesh((4, 2), ("fsdp", "tensor"))):  # B / 4, N / 2 per device
        assert layers._auto_query_chunk(q_shape, 1536) == layers.query_chunk_size(2, 4, 1536, 1536) == 64
    with jax.sharding.use_abstract_mesh(AbstractMesh((2, 4), ("fsdp", "context"))):
        assert layers._auto_query_chunk(q_shape, 1536) is None
    assert layers._auto_query_chunk(q_shape, 1536) == layers.query_chunk_size(8, 8, 1536, 1536)


def test_blocked_attention_is_the_default_above_the_budget(monkeypatch):
    """With a budget this small, the automatic choice blocks the queries (a lax.map in the forward, a lax.scan in the
    backward) and still matches the formula."""
    monkeypatch.setattr(layers, "ATTENTION_BLOCK_BYTES", 64)
    monkeypatch.setattr(layers, "MIN_QUERY_CHUNK", 2)
    q, k, v, w = _inputs(4)
    mask = MASKS["partial"]
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(layers.dot_product_attention(q, k, v, jnp.asarray(mask))
                                                         * w)))(q))
    assert "scan" in jaxpr
    out, grads = _ours(q, k, v, w, mask)
    jmask = jnp.asarray(mask)
    want = jax.grad(lambda q, k, v: jnp.sum(_plain(q, k, v, jmask) * w), argnums=(0, 1, 2))(q, k, v)
    assert rel_err(out, _plain(q, k, v, jmask)) <= TOL
    for g, gw in zip(grads, want):
        assert rel_err(g, gw) <= TOL


def test_bfloat16_inputs_keep_dtype_and_stay_close():
    q, k, v, w = _inputs(2)
    to_bf16 = lambda a: jnp.asarray(a, jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v).astype(jnp.float32) * w)
    grads = jax.grad(loss, argnums=(0, 1, 2))(to_bf16(q), to_bf16(k), to_bf16(v))
    want = jax.grad(lambda q, k, v: jnp.sum(_plain(q, k, v, None) * w), argnums=(0, 1, 2))(q, k, v)
    for g, gw in zip(grads, want):
        assert g.dtype == jnp.bfloat16
        assert rel_err(np.asarray(g, np.float32), gw) <= 3e-2


# ----------------------------------------------------------------------------------------------------------------------
# LayerNorm.
# ----------------------------------------------------------------------------------------------------------------------


def _plain_layer_norm(x, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)


def test_layer_norm_grads_match_autodiff_and_torch():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 5, 24)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    eps = 1e-6
    y = layers.layer_norm_fp32(jnp.asarray(x), eps)
    g = jax.jit(jax.grad(lambda x: jnp.sum(layers.layer_norm_fp32(x, eps) * w)))(x)
    assert rel_err(y, _plain_layer_norm(x, eps)) <= TOL
    assert rel_err(g, jax.grad(lambda x: jnp.sum(_plain_layer_norm(x, eps) * w))(x)) <= TOL
    tx = torch.from_numpy(x).requires_grad_()
    (torch.nn.functional.layer_norm(tx, (24,), eps=eps) * torch.from_numpy(w)).sum().backward()
    assert rel_err(g, tx.grad.numpy()) <= TOL


def test_layer_norm_grad_keeps_the_input_dtype():
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 16)), jnp.bfloat16)
    g = jax.grad(lambda x: jnp.sum(layers.layer_norm_fp32(x, 1e-6) ** 3))(x)
    assert layers.layer_norm_fp32(x, 1e-6).dtype == jnp.float32 and g.dtype == jnp.bfloat16


def test_gelu_tanh_grads_match_autodiff_and_torch():
    x = np.linspace(-6.0, 6.0, 97, dtype=np.float32)
    w = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    assert rel_err(layers.gelu_tanh(jnp.asarray(x)), jax.nn.gelu(x, approximate=True)) == 0.0
    g = jax.jit(jax.grad(lambda x: jnp.sum(layers.gelu_tanh(x) * w)))(x)
    assert rel_err(g, jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) * w))(x)) <= TOL
    tx = torch.from_numpy(x).requires_grad_()
    (torch.nn.functional.gelu(tx, approximate="tanh") * torch.from_numpy(w)).sum().backward()
    assert rel_err(g, tx.grad.numpy()) <= TOL
    gb = jax.grad(lambda x: jnp.sum(layers.gelu_tanh(x).astype(jnp.float32)))(jnp.asarray(x, jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16
