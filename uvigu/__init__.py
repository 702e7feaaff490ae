"""uvigu: Uni-ViGU (unified video generation and understanding) on a Wan2.1 DiT, in JAX / Flax NNX."""

import flax

# Params carry *logical* axis names (nnx.with_partitioning); `uvigu.sharding` resolves them against the mesh with one
# rules table and shards at init through jit out_shardings. Flax's eager sharding would instead read the logical
# names as mesh axes at construction time, so it is off for the whole package.
flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
