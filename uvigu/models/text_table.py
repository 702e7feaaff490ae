"""The learnable token embedding table of the paper's continuous ("embedding") text flow: params, so it lives with
the models; `uvigu.flow.EmbeddingTextFlow` is what uses it.

Shape letters: B batch, S text tokens, E text latent dim, V vocab.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int


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
