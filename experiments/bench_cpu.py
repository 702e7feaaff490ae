"""WanDiT (JAX, XLA:CPU) against diffusers' WanTransformer3DModel (PyTorch, CPU): forward and forward+backward time.

    python -m experiments.bench_cpu                                   # both configs, the table
    python -m experiments.bench_cpu --configs wide --iters 7 --json /tmp/wide.json
    python -m experiments.bench_cpu --config scan_layers=false,remat_policy=none

Both models hold the SAME weights (diffusers' random init, converted with `wan_keys.diffusers_to_params`, the converter
the parity tests use) and see the same float32 inputs; the forward outputs are compared first (relative error printed)
so a timing is never of a wrong model.

Configs (patch (1, 2, 2), in/out channels 16, text_dim 64, freq_dim 64, 16 context tokens):

    small  dim 128, 4 heads (head dim 32), ffn 512, 4 layers, latent T,H,W = 5,16,16 -> 5·8·8 = 320 tokens, batch 4
    wide   dim 512, 4 heads (head dim 128), ffn 2048, 2 layers, latent 6,32,32 -> 6·16·16 = 1,536 tokens, batch 1

What is timed: forward = the jitted call / diffusers under `torch.no_grad()`; forward+backward = loss = mean(out²),
gradients w.r.t. every param (JAX: `jax.value_and_grad` under `jax.jit`; torch: `loss.backward()` after
`zero_grad(set_to_none=True)`). JAX results are waited on with `block_until_ready`. Torch keeps its default intra-op
thread count. After `--warmup` untimed calls of each, the two sides ALTERNATE (jax, torch, jax, ...) `--iters` times
and the median of each is reported, so load from other processes on the machine hits both sides alike; the ratio
ours / diffusers is what counts (< 1 = we are faster).

`--modes gemm` times what the two sides build on instead of the models: each dense product of one DiT block (the
weight products of self- and cross-attention and of the FFN, in their forward layout and the two layouts of their
backward: dx = g·wᵀ and dw = xᵀ·g), as one `jnp.einsum` under `jax.jit` against one torch matmul, same float32
operands (results compared first), alternating, median of `--iters`. Per product it prints both times and XLA's /
torch's ratio, and the ratio of their sums over a block's products in all three layouts: what a fwd+bwd made only of
these products would show. Our model's ratio stays near it unless its other work (attention, norms, elementwise) is
cheaper than torch's.

`--config k=v,...` overrides our side's execution options (WanConfig fields: scan_layers, remat_policy,
attention_backend, dtype) so variants can be compared against the same diffusers run; XLA flags go through the
`XLA_FLAGS` environment variable as usual.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig

# name -> (architecture overrides, latent (T, H, W), batch)
CONFIGS: dict[str, tuple[dict[str, Any], tuple[int, int, int], int]] = {
    "small": (dict(dim=128, num_heads=4, ffn_dim=512, num_layers=4), (5, 16, 16), 4),
    "wide": (dict(dim=512, num_heads=4, ffn_dim=2048, num_layers=2), (6, 32, 32), 1),
}
COMMON = dict(in_channels=16, out_channels=16, text_dim=64, freq_dim=64, text_len=16, patch_size=(1, 2, 2))
CONTEXT_LEN = 16

# WanConfig fields `--config` may set, with how to parse their values.
EXEC_FIELDS: dict[str, Callable[[str], Any]] = {
    "scan_layers": lambda s: {"true": True, "false": False, "1": True, "0": False}[s.lower()],
    "remat_policy": str,
    "attention_backend": str,
    "dtype": str,
}


def parse_exec_overrides(text: str) -> dict[str, Any]:
    """'scan_layers=false,remat_policy=none' -> {'scan_layers': False, 'remat_policy': 'none'}."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in EXEC_FIELDS:
            raise ValueError(f"--config item {item!r}: expected KEY=VALUE with KEY one of {sorted(EXEC_FIELDS)}")
        try:
            out[key] = EXEC_FIELDS[key](value)
        except KeyError:
            raise ValueError(f"--config {key}={value!r}: not a boolean (true/false)") from None
    return out


def wan_config(name: str, exec_overrides: dict[str, Any]) -> WanConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown bench config {name!r}; known: {sorted(CONFIGS)}")
    arch, _, _ = CONFIGS[name]
    return WanConfig(**COMMON, **arch, **{"scan_layers": True, "remat_policy": "none", **exec_overrides})


def token_count(name: str) -> int:
    _, (t, h, w), batch = CONFIGS[name]
    return t * (h // 2) * (w // 2)


# ----------------------------------------------------------------------------------------------------------------------
# The two sides.
# ----------------------------------------------------------------------------------------------------------------------


def build_diffusers(cfg: WanConfig, seed: int):
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**wan_keys.diffusers_config(cfg))
    return model.float().train()  # no dropout in Wan: train() only matters for autograd bookkeeping


def make_inputs(cfg: WanConfig, latent, batch: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *latent, cfg.in_channels)).astype(np.float32)
    t = np.linspace(50.0, 950.0, batch).astype(np.float32)
    ctx = rng.standard_normal((batch, CONTEXT_LEN, cfg.text_dim)).astype(np.float32)
    return x, t, ctx


def jax_fns(model, x, t, ctx):
    """(forward(), forward_backward()) closures that run the jitted JAX computations and wait for them."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(p, x, t, ctx):
        return nnx.merge(graphdef, p, rest)(x, t, ctx)

    def loss(p, x, t, ctx):
        return jnp.mean(jnp.square(apply(p, x, t, ctx)))

    fwd = jax.jit(apply)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    x, t, ctx = map(jnp.asarray, (x, t, ctx))
    return (lambda: jax.block_until_ready(fwd(params, x, t, ctx)),
            lambda: jax.block_until_ready(fwd_bwd(params, x, t, ctx)))


def torch_fns(model, x, t, ctx):
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))  # channels first for diffusers
    t, ctx = torch.from_numpy(t), torch.from_numpy(ctx)

    def fwd():
        with torch.no_grad():
            return model(x, t, ctx, return_dict=False)[0]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = model(x, t, ctx, return_dict=False)[0].square().mean()
        loss.backward()
        return loss

    return fwd, fwd_bwd


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(ours: Callable, theirs: Callable, iters: int, warmup: int) -> tuple[list[float], list[float]]:
    """Warm both up, then time them in turn; lists of seconds."""
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for _ in range(iters):
        a.append(_timed(ours))
        b.append(_timed(theirs))
    return a, b


# ----------------------------------------------------------------------------------------------------------------------
# One config.
# ----------------------------------------------------------------------------------------------------------------------


def bench_config(name: str, exec_overrides: dict[str, Any], *, iters: int, warmup: int, modes=("fwd", "fwd_bwd"),
                 seed: int = 0) -> dict[str, Any]:
    cfg = wan_config(name, exec_overrides)
    _, latent, batch = CONFIGS[name]
    ref = build_diffusers(cfg, seed)
    ours = wan_keys.model_from_params(cfg, wan_keys.diffusers_to_params(ref.state_dict(), cfg))
    x, t, ctx = make_inputs(cfg, latent, batch, seed)
    j_fwd, j_fwd_bwd = jax_fns(ours, x, t, ctx)
    t_fwd, t_fwd_bwd = torch_fns(ref, x, t, ctx)

    want = np.moveaxis(t_fwd().numpy(), 1, -1)
    got = np.asarray(j_fwd())
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))

    row: dict[str, Any] = {"config": name, "tokens": token_count(name), "batch": batch, "dim": cfg.dim,
                           "layers": cfg.num_layers, "head_dim": cfg.head_dim, "rel_err": err,
                           "exec": {k: getattr(cfg, k) for k in EXEC_FIELDS}}
    start = time.perf_counter()
    j_fwd_bwd()
    row["compile_fwd_bwd_s"] = time.perf_counter() - start
    fns = {"fwd": (j_fwd, t_fwd), "fwd_bwd": (j_fwd_bwd, t_fwd_bwd)}
    for mode in modes:
        a, b = alternate(*fns[mode], iters=iters, warmup=warmup)
        ours_ms, theirs_ms = 1e3 * statistics.median(a), 1e3 * statistics.median(b)
        row[mode] = {"ours_ms": ours_ms, "diffusers_ms": theirs_ms, "ratio": ours_ms / theirs_ms,
                     "ours_all_ms": [1e3 * s for s in a], "diffusers_all_ms": [1e3 * s for s in b]}
    return row


# ----------------------------------------------------------------------------------------------------------------------
# The dense products alone.
# ----------------------------------------------------------------------------------------------------------------------


def block_products(cfg: WanConfig, rows: int, context_rows: int) -> list[tuple[str, int, int, int]]:
    """One DiT block's weight products as (name, M, K, N) for x[M, K] · w[K, N]: M = `rows` video tokens (B·L) or
    `context_rows` text tokens (B·S). Their forward FLOPs, 2·M·K·N each, are §8's projections + ffn + cross_kv."""
    d, f = cfg.dim, cfg.ffn_dim
    return [("self q/k/v/o", rows, d, d)] * 4 + [("cross q/o", rows, d, d)] * 2 + \
        [("cross k/v (context)", context_rows, d, d)] * 2 + [("ffn up", rows, d, f), ("ffn down", rows, f, d)]


# Each layout on x [M, K], w [K, N], g [M, N]: its einsum over the two operands it takes (picked from x, w, g),
# and the same product written for torch.
GEMM_LAYOUTS: dict[str, tuple[str, Callable, Callable]] = {
    "fwd x·w": ("mk,kn->mn", lambda x, w, g: (x, w), lambda x, w, g: x @ w),
    "bwd g·wᵀ": ("mn,kn->mk", lambda x, w, g: (g, w), lambda x, w, g: g @ w.T),
    "bwd xᵀ·g": ("mk,mn->kn", lambda x, w, g: (x, g), lambda x, w, g: x.T @ g),
}


def bench_gemms(name: str, *, iters: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Every distinct (M, K, N) of `block_products` in the three layouts, XLA against torch."""
    import torch

    cfg = wan_config(name, {})
    _, _, batch = CONFIGS[name]
    products = block_products(cfg, batch * token_count(name), batch * CONTEXT_LEN)
    rng = np.random.default_rng(seed)
    timings: dict[tuple[int, int, int, str], dict[str, float]] = {}
    for m, k, n in dict.fromkeys((m, k, n) for _, m, k, n in products):  # distinct shapes, in order
        x, w, g = (rng.standard_normal(shape).astype(np.float32) for shape in ((m, k), (k, n), (m, n)))
        jax_operands, torch_operands = tuple(map(jnp.asarray, (x, w, g))), tuple(map(torch.from_numpy, (x, w, g)))
        for layout, (spec, pick, torch_product) in GEMM_LAYOUTS.items():
            product = jax.jit(functools.partial(jnp.einsum, spec))
            operands = pick(*jax_operands)
            got, want = np.asarray(product(*operands)), torch_product(*torch_operands).numpy()
            err = float(np.linalg.norm(got - want) / np.linalg.norm(want))  # never time two different products
            ours_s, theirs_s = alternate(lambda: product(*operands).block_until_ready(),
                                         lambda: torch_product(*torch_operands), iters=iters, warmup=warmup)
            timings[(m, k, n, layout)] = {"ours_ms": 1e3 * statistics.median(ours_s),
                                          "torch_ms": 1e3 * statistics.median(theirs_s), "rel_err": err}
    table = []
    for m, k, n, layout in timings:
        t = timings[(m, k, n, layout)]
        names = sorted({p for p, *shape in products if tuple(shape) == (m, k, n)})
        table.append({"products": ", ".join(names), "m": m, "k": k, "n": n, "layout": layout, **t,
                      "ours_gflops": 2e-6 * m * k * n / t["ours_ms"], "torch_gflops": 2e-6 * m * k * n / t["torch_ms"],
                      "ratio": t["ours_ms"] / t["torch_ms"]})
    # A block's weight products, each in all three layouts, at each side's measured speed.
    ours = sum(timings[(m, k, n, layout)]["ours_ms"] for _, m, k, n in products for layout in GEMM_LAYOUTS)
    theirs = sum(timings[(m, k, n, layout)]["torch_ms"] for _, m, k, n in products for layout in GEMM_LAYOUTS)
    return {"config": name, "table": table, "block_ours_ms": ours, "block_torch_ms": theirs, "ratio": ours / theirs}


def format_gemm_table(result: dict[str, Any]) -> str:
    lines = [f"{result['config']}: one block's weight products, XLA:CPU (jnp.einsum) against torch",
             f"{'products':<22} {'M x K x N':>17} {'layout':<10} {'ours ms':>8} {'torch ms':>9} {'GFLOP/s ours':>13} "
             f"{'torch':>6} {'ratio':>6}"]
    for r in result["table"]:
        lines.append(f"{r['products']:<22} {r['m']:>5}x{r['k']:>5}x{r['n']:>5} {r['layout']:<10} {r['ours_ms']:>8.2f} "
                     f"{r['torch_ms']:>9.2f} {r['ours_gflops']:>13.1f} {r['torch_gflops']:>6.1f} {r['ratio']:>5.2f}x")
    lines.append(f"all of a block's weight products, fwd + bwd: ours {result['block_ours_ms']:.1f} ms, torch "
                 f"{result['block_torch_ms']:.1f} ms: {result['ratio']:.2f}x")
    return "\n".join(lines)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'config':<8} {'mode':<8} {'tokens':>7} {'ours ms':>10} {'diffusers ms':>13} {'ratio':>7}   rel err"]
    for r in rows:
        for mode in ("fwd", "fwd_bwd"):
            if mode in r:
                m = r[mode]
                lines.append(f"{r['config']:<8} {mode:<8} {r['tokens'] * r['batch']:>7} {m['ours_ms']:>10.1f} "
                             f"{m['diffusers_ms']:>13.1f} {m['ratio']:>6.2f}x   {r['rel_err']:.1e}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_cpu", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default="small,wide", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--config", default="", help=f"our execution options KEY=VALUE,...; keys {sorted(EXEC_FIELDS)}")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="comma-separated, of fwd, fwd_bwd, gemm")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if jax.default_backend() != "cpu":
        print(f"note: JAX runs on {jax.default_backend()}, torch on the CPU; this is meant for XLA:CPU",
              file=sys.stderr)
    overrides = parse_exec_overrides(args.config)
    modes = tuple(filter(None, args.modes.split(",")))
    if bad := set(modes) - {"fwd", "fwd_bwd", "gemm"}:
        raise SystemExit(f"--modes: unknown {sorted(bad)}")
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("--iters must be >= 1 and --warmup >= 0")
    names = list(filter(None, args.configs.split(",")))
    gemms = []
    if "gemm" in modes:
        for name in names:
            gemms.append(bench_gemms(name, iters=args.iters, warmup=args.warmup, seed=args.seed))
            print(format_gemm_table(gemms[-1]), flush=True)
    rows = []
    model_modes = tuple(m for m in modes if m != "gemm")
    if model_modes:
        for name in names:
            rows.append(bench_config(name, overrides, iters=args.iters, warmup=args.warmup, modes=model_modes,
                                     seed=args.seed))
            print(format_table(rows[-1:]).split("\n", 1)[1] if len(rows) > 1 else format_table(rows), flush=True)
        print()
        print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} exec={rows[0]['exec']}")
        print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "gemm": gemms, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "argv": sys.argv[1:]}, f, indent=1)
    return rows + gemms

if __name__ == "__main__":
    main()
