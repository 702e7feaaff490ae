"""Memory and throughput of the Wan VAE's encode and decode.

    python -m experiments.bench_vae --config wan2.1 --frames 81 --height 480 --width 832 --dtype bfloat16 --memory_only
    python -m experiments.bench_vae --config wan2.1 --frames 17 --height 64 --width 64 --iters 3

`--memory_only` builds nothing real: the model is `nnx.eval_shape`d, encode / decode are lowered with
`jax.ShapeDtypeStruct` inputs and compiled, and XLA's `memory_analysis()` of each executable is printed (arguments =
params + input, temp = XLA's scratch for activations and the scan carry, output). peak ≈ argument + output + temp −
alias, XLA's static bound, not a measured high-water mark. Works on a CPU for the full size.

Otherwise: random params (the numbers do not depend on them), each function compiled ahead of time (compile time
printed on its own), `--warmup` runs, then `--iters` timed runs with `block_until_ready`; frames/s = video frames
in (encode) or out (decode) per second, median run. One JSON line per function at the end.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvigu.models.wan_vae import TileOptions, WanVAE, WanVAEConfig


def build(cfg: WanVAEConfig, abstract: bool):
    """(graphdef, state): abstract (ShapeDtypeStruct leaves) or random params made under one jit."""
    create = lambda: WanVAE(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    if abstract:
        return graphdef, jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract_state)
    return graphdef, jax.jit(lambda: nnx.split(create())[1])()


def functions(graphdef, args) -> dict:
    kw = dict(chunked=not args.unchunked,
              tiled=TileOptions(*args.tile) if args.tile else False)
    return {
        "encode": jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x, **kw)),
        "decode": jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, **kw)),
    }


def inputs(model_cfg: WanVAEConfig, args) -> dict[str, jax.ShapeDtypeStruct]:
    graphdef_model = nnx.eval_shape(lambda: WanVAE(model_cfg, rngs=nnx.Rngs(0)))
    t, h, w, z = graphdef_model.latent_shape(args.frames, args.height, args.width)
    return {"encode": jax.ShapeDtypeStruct((args.batch, args.frames, args.height, args.width, 3), jnp.float32),
            "decode": jax.ShapeDtypeStruct((args.batch, t, h, w, z), jnp.float32)}


def memory_row(compiled) -> dict:
    m = compiled.memory_analysis()
    row = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                           "alias_size_in_bytes", "generated_code_size_in_bytes") if hasattr(m, k)}
    row["peak_bytes"] = (row.get("argument_size_in_bytes", 0) + row.get("output_size_in_bytes", 0)
                         + row.get("temp_size_in_bytes", 0) - row.get("alias_size_in_bytes", 0))
    if hasattr(m, "peak_memory_in_bytes"):
        row["xla_peak_memory_in_bytes"] = int(m.peak_memory_in_bytes)
    return row


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1", help=f"preset: {sorted(WanVAEConfig.PRESETS)}")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="compute dtype")
    p.add_argument("--param_dtype", default=None, help="storage dtype (default: --dtype)")
    p.add_argument("--only", default="encode,decode", help="comma list of encode, decode")
    p.add_argument("--memory_only", action="store_true", help="lower + compile with abstract inputs, no run")
    p.add_argument("--unchunked", action="store_true", help="whole clip at once instead of the chunk scan")
    p.add_argument("--tile", type=int, nargs=4, metavar=("MIN_H", "MIN_W", "STRIDE_H", "STRIDE_W"),
                   help="spatial tiling in pixels (diffusers default: 256 256 192 192)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args(argv)

    cfg = WanVAEConfig.preset(args.config, dtype=args.dtype, param_dtype=args.param_dtype or args.dtype)
    graphdef, state = build(cfg, abstract=args.memory_only)
    fns, ins = functions(graphdef, args), inputs(cfg, args)
    state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(state_spec))
    print(f"device {jax.devices()[0].device_kind} | {args.config} {cfg.dtype}/{cfg.param_dtype}, "
          f"{n_params:,} params | video {args.batch}x{args.frames}x{args.height}x{args.width} -> latents "
          f"{ins['decode'].shape} | chunked={not args.unchunked} tile={args.tile}")
    rows = []
    for name in args.only.split(","):
        t0 = time.perf_counter()
        lowered = fns[name].lower(state_spec, ins[name])
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        row = {"fn": name, "config": args.config, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
               "input_shape": list(ins[name].shape), "chunked": not args.unchunked, "tile": args.tile,
               "lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), **memory_row(compiled)}
        print(f"{name}: lower {row['lower_s']} s, compile {row['compile_s']} s | peak {gib(row['peak_bytes'])} "
              f"(args {gib(row.get('argument_size_in_bytes', 0))}, temp {gib(row.get('temp_size_in_bytes', 0))}, "
              f"out {gib(row.get('output_size_in_bytes', 0))})")
        if not args.memory_only:
            x = jax.random.uniform(jax.random.key(0), ins[name].shape, jnp.float32, -1, 1)
            for _ in range(args.warmup):
                jax.block_until_ready(compiled(state, x))
            times = []
            for _ in range(args.iters):
                t = time.perf_counter()
                out = jax.block_until_ready(compiled(state, x))
                times.append(time.perf_counter() - t)
            frames = args.batch * (args.frames if name == "encode" else out.shape[1])
            row.update(median_s=round(float(np.median(times)), 4), times_s=[round(t, 4) for t in times],
                       frames_per_s=round(frames / float(np.median(times)), 3))
            print(f"{name}: median {row['median_s']} s over {args.iters} runs -> {row['frames_per_s']} frames/s")
        rows.append(row)
    for row in rows:
        print(json.dumps(row))
    return rows


if __name__ == "__main__":
    main()
