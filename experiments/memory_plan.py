"""Memory per device of a Uni-ViGU training step on a mesh, from the code's own shapes.

    python -m experiments.memory_plan                                   # 14B, stage 1, 720p, v5p-128 meshes
    python -m experiments.memory_plan --mesh fsdp=16,context=4 --frames 81 --height 480 --width 832

What is counted, per device (one example per `data` x `fsdp` group, its sequence split over `context`):
  * params, grads, Adam mu and nu: every param of `UniViGU(WanDiT(preset), UniViGUConfig())` built with
    `nnx.eval_shape` (no memory), sharded by `uvigu.sharding.resolve_spec` on an abstract mesh: exact shard bytes.
    Params, grads and both moments are float32 (param_dtype) and share the params' layout.
  * saved activations: what the backward pass keeps, as `jax.ad_checkpoint.saved_residuals` reports it for the
    training loss under the chosen remat policy (bf16 compute), traced abstractly at two small token counts; the
    part that grows with the number of tokens is extrapolated linearly (the "full" and "names" policies save
    nothing quadratic: checked) and divided by `context`. The rest (time embeddings, the 512-token prompt path, bf16
    copies of small weights) is counted whole.
  * transients of the one block being run / recomputed: its activations with nothing saved (the "none" residuals of
    one layer, quadratic attention terms left out), K/V gathered over `context` (and their gradients), and the
    block's weights all-gathered over `fsdp` in float32, twice (the next layer's gather overlaps).
  * attention scores: the `xla` backend materialises fp32 logits [N, L/context, L] per example; a flash kernel
    (splash on TPU, cudnn on GPU) keeps O(L/context x D). Both rows are printed.

Hardware: v5p-128 is 64 chips (the suffix counts TensorCores; a v5p chip is one megacore JAX device) with 95 GiB
of HBM each, so its meshes have 64 devices (fsdp 16 x context 4, ...). A 128-device mesh is shown for comparison.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals
from flax import nnx

from uvigu import sharding
from uvigu.models.univigu import UniViGU, UniViGUConfig
from uvigu.models.wan import WanConfig, WanDiT

GIB = 1024**3
DEFAULT_MESHES = ("fsdp=16,context=4", "fsdp=8,context=8", "fsdp=64", "fsdp=32,context=4")


def parse_mesh(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if name not in sharding.MESH_AXES or not size.isdigit():
            raise ValueError(f"mesh entry {part!r} is not AXIS=SIZE with AXIS in {sharding.MESH_AXES}")
        out[name] = int(size)
    return out


def abstract_mesh(shape: dict[str, int]) -> jax.sharding.AbstractMesh:
    sizes = {a: shape.get(a, 1) for a in sharding.MESH_AXES}
    return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))


def build_abstract(wan: WanConfig, uni: UniViGUConfig):
    return nnx.eval_shape(lambda: UniViGU(WanDiT(wan, rngs=nnx.Rngs(0)), uni, rngs=nnx.Rngs(1)))


def param_bytes_per_device(model, mesh) -> tuple[int, int]:
    """(number of params, bytes of one copy of the params on one device) under the rules table."""
    count, per_device = 0, 0
    for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        spec = sharding.resolve_spec(v.get_metadata().get("out_sharding"), v.shape, mesh)
        parts = 1
        for axes in spec:
            for a in (() if axes is None else (axes,) if isinstance(axes, str) else axes):
                parts *= mesh.shape[a]
        count += math.prod(v.shape)
        per_device += math.prod(v.shape) // parts * jnp.dtype(v.dtype).itemsize
    return count, per_device


def _residuals(wan: WanConfig, uni: UniViGUConfig, grid: tuple[int, int, int], n_text: int, context_len: int):
    """[(shape, dtype, description)] the backward pass saves, for one example (batch 1)."""
    graphdef, params = nnx.split(build_abstract(wan, uni))
    params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    pt, ph, pw = wan.patch_size
    t, h, w = grid
    args = (jax.ShapeDtypeStruct((1, t * pt, h * ph, w * pw, wan.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1, n_text, uni.text_latent_dim), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, context_len, wan.text_dim), jnp.float32),
            jax.ShapeDtypeStruct((1, n_text), jnp.float32))

    def loss(p, video, text, tau, context, mask):
        v, o = nnx.merge(graphdef, p)(video, text, tau, tau, context, mask)
        return jnp.sum(jnp.square(v)) + jnp.sum(jnp.square(o))

    out = []
    for aval, desc in saved_residuals(loss, params, *args):
        if desc.startswith("from the argument"):
            continue  # params and inputs: counted on their own
        out.append((tuple(aval.shape), aval.dtype, desc))
    return out


def activation_model(wan: WanConfig, uni: UniViGUConfig, n_text: int, context_len: int):
    """Saved bytes = per_token x tokens + constant, from two abstract traces (the first has more text than video
    tokens would at scale; both scale video and text together so the per-token cost mixes them as L : S does)."""
    small = [((1, 2, 3), 4), ((1, 4, 3), 8)]  # 6 + 4 and 12 + 8 tokens
    totals, quadratic = [], False
    for grid, s in small:
        n = math.prod(grid) + s
        res = _residuals(wan, uni, grid, s, context_len)
        totals.append((n, sum(math.prod(sh) * jnp.dtype(dt).itemsize for sh, dt, _ in res)))
        quadratic |= any(sum(d == n for d in sh) >= 2 for sh, _, _ in res)
    (n1, b1), (n2, b2) = totals
    per_token = (b2 - b1) / (n2 - n1)
    return per_token, b1 - per_token * n1, quadratic


def plan(preset: str, frames: int, height: int, width: int, n_text: int, meshes, hbm_gib: float,
         context_len: int = 512) -> list[dict]:
    wan = WanConfig.preset(preset, dtype="bfloat16", param_dtype="float32")
    uni = UniViGUConfig(max_text_len=max(n_text, 1))
    t_lat, h_lat, w_lat = (frames - 1) // 4 + 1, height // 8, width // 8
    pt, ph, pw = wan.patch_size
    video_tokens = (t_lat // pt) * (h_lat // ph) * (w_lat // pw)
    tokens = video_tokens + n_text
    d, f, n_heads = wan.dim, wan.ffn_dim, wan.num_heads

    saved = {}
    for policy in ("names", "full"):
        per_token, const, quadratic = activation_model(dataclass_replace(wan, remat_policy=policy), uni, n_text,
                                                       context_len)
        if quadratic:
            raise AssertionError(f"remat policy {policy!r} saves a quadratic attention term; extrapolation invalid")
        saved[policy] = (per_token, const)
    one_layer = dataclass_replace(wan, remat_policy="none", num_layers=1)
    block_per_token, _, _ = _activation_linear_only(one_layer, uni, n_text, context_len)

    print(f"{preset} Uni-ViGU (stage 1: embedding text flow, FFN_t {f}), bf16 compute, fp32 params + Adam")
    print(f"video {frames}x{height}x{width} -> latents {t_lat}x{h_lat}x{w_lat} -> {video_tokens:,} video + "
          f"{n_text} text = {tokens:,} tokens per example; prompt context {context_len} tokens; "
          f"HBM {hbm_gib:g} GiB per device")
    print(f"saved activations per token (all {wan.num_layers} layers): names {saved['names'][0] / 1024:,.1f} KiB, "
          f"full {saved['full'][0] / 1024:,.1f} KiB; one block with nothing saved {block_per_token / 1024:,.1f} KiB")
    rows = []
    for mesh_text in meshes:
        shape = parse_mesh(mesh_text)
        mesh = abstract_mesh(shape)
        ctx = mesh.shape["context"]
        if tokens % ctx:
            print(f"  {mesh_text}: {tokens} tokens do not divide context {ctx}: the sequence would be replicated")
        tok_dev = tokens / ctx if tokens % ctx == 0 else tokens
        n_params, p_bytes = param_bytes_per_device(build_abstract(wan, uni), mesh)
        layer_params = 8 * d * d + 4 * d * f  # attn1 + attn2 (q, k, v, o) + FFN_v + FFN_t kernels
        heads_dev = n_heads / mesh.shape["tensor"] if n_heads % mesh.shape["tensor"] == 0 else n_heads
        transient = (block_per_token * tok_dev  # the block being run / recomputed, nothing saved
                     + 2 * 2 * tokens * d * 2  # K and V gathered over context (bf16) + their full-length grads
                     + 2 * layer_params * 4 / mesh.shape["tensor"])  # 2 layers of weights, gathered, fp32
        scores_xla = heads_dev * tok_dev * tokens * (4 + 4 + 2)  # fp32 logits, fp32 softmax, bf16 weights
        state = 4 * p_bytes  # params, grads, mu, nu (all float32)
        for policy in ("names", "full"):
            per_token, const = saved[policy]
            acts = per_token * tok_dev + const
            for backend, scores in (("flash", 0.0), ("xla", scores_xla)):
                total = state + acts + transient + scores
                rows.append(dict(mesh=mesh_text, devices=mesh.size, policy=policy, attention=backend,
                                 params=p_bytes, state=state, activations=acts, transient=transient, scores=scores,
                                 total=total, fits=total <= hbm_gib * GIB, n_params=n_params, tokens_dev=tok_dev))
    header = (f"{'mesh':<20}{'dev':>5}{'remat':>7}{'attn':>7}{'tok/dev':>9}{'params':>9}{'p+g+adam':>10}"
              f"{'saved act':>11}{'transient':>11}{'scores':>10}{'total':>10}  fits")
    print(f"params: {rows[0]['n_params']:,}")
    print(header)
    print("-" * len(header))
    for r in rows:
        g = lambda b: f"{b / GIB:,.1f}"
        print(f"{r['mesh']:<20}{r['devices']:>5}{r['policy']:>7}{r['attention']:>7}{r['tokens_dev']:>9,.0f}"
              f"{g(r['params']):>9}{g(r['state']):>10}{g(r['activations']):>11}{g(r['transient']):>11}"
              f"{g(r['scores']):>10}{g(r['total']):>10}  {'yes' if r['fits'] else 'NO'}")
    print("(GiB per device. params = one fp32 copy; p+g+adam = params, grads, mu, nu. transient = one block's "
          "activations with nothing saved + gathered K/V and their grads + 2 layers of gathered fp32 weights.)")
    return rows


def _activation_linear_only(wan, uni, n_text, context_len):
    """Like `activation_model` but drops quadratic (attention score) residuals: one block's working set."""
    small = [((1, 2, 3), 4), ((1, 4, 3), 8)]
    totals = []
    for grid, s in small:
        n = math.prod(grid) + s
        res = _residuals(wan, uni, grid, s, context_len)
        totals.append((n, sum(math.prod(sh) * jnp.dtype(dt).itemsize for sh, dt, _ in res
                              if sum(dim == n for dim in sh) < 2)))
    (n1, b1), (n2, b2) = totals
    per_token = (b2 - b1) / (n2 - n1)
    return per_token, b1 - per_token * n1, False


dataclass_replace = dataclasses.replace


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-14b")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--text_len", type=int, default=256)
    p.add_argument("--mesh", action="append", help="AXIS=SIZE,... (repeatable); default: v5p-128 meshes")
    p.add_argument("--hbm_gib", type=float, default=95.0, help="HBM per device (v5p: 95 GiB)")
    a = p.parse_args(argv)
    if (a.frames - 1) % 4 or a.height % 16 or a.width % 16:
        p.error("frames must be 4n+1 and height/width multiples of 16 (VAE stride 8 x patch 2)")
    plan(a.preset, a.frames, a.height, a.width, a.text_len, a.mesh or DEFAULT_MESHES, a.hbm_gib)


if __name__ == "__main__":
    main()
