"""`make demo`: the end-to-end toy-world run.

Until the training issue lands this says what the demo will run and checks what exists today: it builds the tiny
Wan DiT, runs one forward pass, and converts nothing (no weights can be downloaded here).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from uvigu.models.wan import WanConfig, WanDiT

PLAN = """\
make demo will, on a CPU in under 15 minutes (once training lands):
  1. build the procedural 'moving shapes' toy world (videos, prompts, detailed captions; ArrayRecord shards),
  2. pretrain the toy T2V generator (video-only flow matching, standing where Wan2.1 weights stand),
  3. run Uni-ViGU stage 1 (Knowledge Recall) and stage 2 (Capability Refinement),
  4. evaluate T2V and V2T per-attribute accuracy on held-out attribute combinations and print the table.
Available now: the Wan2.1 DiT (exact to diffusers), the weight converter, the uni-flow and the samplers."""


def main() -> None:
    print(PLAN)
    cfg = WanConfig.preset("tiny")
    t0 = time.perf_counter()
    model = WanDiT(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 3, 4, 4, cfg.in_channels))
    ctx = jax.random.normal(jax.random.key(2), (1, cfg.text_len, cfg.text_dim))
    out = nnx.jit(lambda m, x, t, c: m(x, t, c))(model, x, jnp.array([500.0]), ctx)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"\ntiny WanDiT: {n_params:,} params, output {tuple(out.shape)}, {time.perf_counter() - t0:.1f}s "
          f"on {jax.devices()[0].platform}")


if __name__ == "__main__":
    main()
