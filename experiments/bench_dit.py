"""Throughput of a WanDiT (or a Uni-ViGU around one) forward pass and training step, with MFU by DESIGN.md §8.

    python -m experiments.bench_dit --preset wan2.1-1.3b --video 81,480,832 --remat full
    python -m experiments.bench_dit --preset wan2.1-1.3b --model univigu --text_len 256
    python -m experiments.bench_dit --check_formula

Why MFU comes from a formula and not from XLA: the yardstick must be the same for every implementation we compare
(ours across backends, remat policies and layouts, and diffusers + PyTorch), so it counts the *model's* FLOPs, not
what a given executable happens to run (remat recomputation, a fused attention kernel's extra work). The formula
(§8) per layer, forward:

    12·N·d² + 4·N·d·f + 4·C·d² + 4·N²·d + 4·N·C·d

N = tokens in self-attention (video + text), C = context tokens, d = model dim, f = the DiT's ffn_dim; times the
layers; a training step counts 3× forward. It leaves out the patch embedding, time and text embedders and heads
(small next to the blocks at full scale) and, for Uni-ViGU, counts FFN_t at the DiT's ffn_dim whatever its real
width. XLA's own FLOP count of each executable is printed next to it as a cross-check (looped layout only; XLA
counts a scan's body once), never used for MFU.

Timing: the step is compiled ahead of time (so compile time is measured on its own), run `--warmup` times, then
`--iters` times with `block_until_ready` after each step so every step's wall time is its own; the spread is
reported as median and p10 / p90. Tokens/s and TFLOP/s divide the work of all timed steps by their total time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvigu.models.univigu import UniViGU, UniViGUConfig
from uvigu.models.wan import PRESETS, WanConfig, WanDiT

# Dense peak TFLOP/s by device kind and compute dtype (vendor data sheets, no sparsity). H200 has H100 SXM's
# compute; fp32 matmuls on these GPUs run on TF32 tensor cores under XLA's default precision, hence half the bf16
# peak. A device not listed gets no MFU unless --peak_tflops is given; CPUs never get one.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 494.0},
}

# Wan2.1's VAE: 4× in time (first frame kept), 8× in space.
VAE_STRIDE = (4, 8, 8)


# ----------------------------------------------------------------------------------------------------------------------
# The §8 formula.
# ----------------------------------------------------------------------------------------------------------------------


def latent_shape_for_video(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel video (F, H, W) -> Wan latent (T, H, W): 81×480×832 -> 21×60×104."""
    st, sh, sw = VAE_STRIDE
    if (frames - 1) % st or height % sh or width % sw:
        raise ValueError(f"video {frames}x{height}x{width} does not fit Wan's VAE: frames must be 4n+1, height and "
                         f"width multiples of 8")
    return (frames - 1) // st + 1, height // sh, width // sw


def video_token_count(cfg: WanConfig, latent: tuple[int, int, int]) -> int:
    """Tokens after patching a latent (T, H, W): 21×60×104 with (1, 2, 2) patches -> 32,760."""
    if any(n % p for n, p in zip(latent, cfg.patch_size)):
        raise ValueError(f"latent {latent} is not divisible by patch size {cfg.patch_size}")
    return int(np.prod([n // p for n, p in zip(latent, cfg.patch_size)]))


def layer_flop_terms(n_tokens: int, context_len: int, dim: int, ffn_dim: int) -> dict[str, float]:
    """The five terms of §8's per-layer forward FLOPs, named by what they count (a multiply-add = 2 FLOPs):

    projections      12·N·d²  self-attention q, k, v, o and cross-attention q, o on the N tokens
    ffn              4·N·d·f  the two FFN matmuls
    cross_kv         4·C·d²   cross-attention k, v on the C context tokens
    self_attention   4·N²·d   q·kᵀ and softmax·v over N tokens
    cross_attention  4·N·C·d  the same against C context tokens
    """
    n, c, d, f = float(n_tokens), float(context_len), float(dim), float(ffn_dim)
    return {
        "projections": 12 * n * d * d,
        "ffn": 4 * n * d * f,
        "cross_kv": 4 * c * d * d,
        "self_attention": 4 * n * n * d,
        "cross_attention": 4 * n * c * d,
    }


def forward_flops(cfg: WanConfig, n_tokens: int, context_len: int) -> float:
    """§8 FLOPs of one forward pass of one example: the per-layer terms times the layers."""
    return cfg.num_layers * sum(layer_flop_terms(n_tokens, context_len, cfg.dim, cfg.ffn_dim).values())


def check_formula(frames: int = 81, height: int = 480, width: int = 832, text_len: int = 256,
                  context_len: int = 512) -> dict[str, Any]:
    """§8's yardstick: Uni-ViGU-1.3B at 81×480×832 + 256 text tokens, 512 context -> ≈ 287 TFLOP per forward, ≈ 70 %
    of it the self-attention term. Returned so the test can hold the formula to the number DESIGN.md quotes."""
    cfg = PRESETS["wan2.1-1.3b"]
    latent = latent_shape_for_video(frames, height, width)
    n_video = video_token_count(cfg, latent)
    n_tokens = n_video + text_len
    terms = {k: cfg.num_layers * v for k, v in layer_flop_terms(n_tokens, context_len, cfg.dim, cfg.ffn_dim).items()}
    total = sum(terms.values())
    return {
        "preset": "wan2.1-1.3b", "latent": latent, "video_tokens": n_video, "text_tokens": text_len,
        "tokens": n_tokens, "context_len": context_len,
        "forward_tflop": total / 1e12, "train_step_tflop": 3 * total / 1e12,
        "terms_tflop": {k: v / 1e12 for k, v in terms.items()},
        "share": {k: v / total for k, v in terms.items()},
    }


def default_peak_tflops(device_kind: str, platform: str, dtype: str) -> float | None:
    """The dense peak for MFU: from `PEAK_TFLOPS` by a substring of the device kind ("NVIDIA H200" -> H200); None on
    a CPU or an unlisted device (no MFU is better than a wrong one)."""
    if platform == "cpu":
        return None
    for name, by_dtype in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower():
            return by_dtype.get(dtype)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# Timing and accounting.
# ----------------------------------------------------------------------------------------------------------------------


def time_steps(step: Callable[[], Any], iters: int, warmup: int = 0,
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Runs `step` `warmup` times untimed, then `iters` times, each timed by `clock` around the call and a
    `jax.block_until_ready` of its result (JAX dispatches asynchronously: without the block the clock would time the
    dispatch, not the work). Returns the `iters` step times in seconds."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        jax.block_until_ready(step())
    times = []
    for _ in range(iters):
        start = clock()
        jax.block_until_ready(step())
        times.append(clock() - start)
    return times


def summarize(times: list[float], tokens_per_step: int, flops_per_step: float,
              peak_tflops: float | None) -> dict[str, float | None]:
    """Rates over all timed steps (work of all steps / their total time) and the step-time spread.

    tokens/s = tokens_per_step · iters / Σtimes; TFLOP/s likewise from `flops_per_step`; MFU = TFLOP/s / peak, or
    None without a peak.
    """
    t = np.asarray(times, np.float64)
    total = float(t.sum())
    if total <= 0:
        raise ValueError(f"step times must add up to a positive time, got {times}")
    tflops = flops_per_step * len(t) / total / 1e12
    return {
        "iters": len(t),
        "total_s": total,
        "step_s_median": float(np.median(t)),
        "step_s_p10": float(np.percentile(t, 10)),
        "step_s_p90": float(np.percentile(t, 90)),
        "tokens_per_s": tokens_per_step * len(t) / total,
        "tflop_per_step": flops_per_step / 1e12,
        "tflops": tflops,
        "mfu": None if peak_tflops is None else tflops / peak_tflops,
    }


def peak_memory_bytes(device: jax.Device) -> tuple[int, str]:
    """The process's peak memory so far and where it comes from: the device allocator's `peak_bytes_in_use` on an
    accelerator; on a CPU (no allocator stats) the process's peak RSS. A peak never goes down: after the training
    phase it covers the forward phase too."""
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchSetup:
    """What is measured: the model and its execution options, the input shape, and the steps to time."""

    wan: WanConfig
    univigu: UniViGUConfig | None  # None = the DiT alone
    latent: tuple[int, int, int]
    batch: int
    text_len: int  # Uni-ViGU text tokens S (0 for the DiT alone)
    context_len: int  # prompt tokens C
    modes: tuple[str, ...]  # "forward", "train"
    iters: int
    warmup: int

    @property
    def video_tokens(self) -> int:
        return video_token_count(self.wan, self.latent)

    @property
    def tokens_per_example(self) -> int:
        return self.video_tokens + self.text_len


def _make_model(setup: BenchSetup):
    if setup.univigu is None:
        return WanDiT(setup.wan, rngs=nnx.Rngs(0))
    return UniViGU.from_wan(WanDiT(setup.wan, rngs=nnx.Rngs(0)), setup.univigu, rngs=nnx.Rngs(1))


def build_model(setup: BenchSetup):
    """The model, initialised inside one jit (eager init of a large model is thousands of small dispatches)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: _make_model(setup)))
    state = jax.jit(lambda: nnx.state(_make_model(setup)))()
    return nnx.merge(graphdef, state)


def make_inputs(setup: BenchSetup, seed: int = 0) -> tuple[jax.Array, ...]:
    """Random inputs in the model's call order: (x, timestep, context) for the DiT; (video, text, tau_v, tau_t,
    context) for Uni-ViGU, text as latents [B, S, E] or ids [B, S] by its flow."""
    w, b = setup.wan, setup.batch
    keys = jax.random.split(jax.random.key(seed), 5)
    video = jax.random.normal(keys[0], (b, *setup.latent, w.in_channels), jnp.float32)
    context = jax.random.normal(keys[1], (b, setup.context_len, w.text_dim), jnp.float32)
    if setup.univigu is None:
        return video, jax.random.uniform(keys[2], (b,), jnp.float32, 0.0, 1000.0), context
    u = setup.univigu
    if u.text_flow == "embedding":
        text = jax.random.normal(keys[3], (b, setup.text_len, u.text_latent_dim), jnp.float32)
    else:
        text = jax.random.randint(keys[3], (b, setup.text_len), 0, u.vocab_size, jnp.int32)
    tau = jax.random.uniform(keys[2], (2, b), jnp.float32)
    return video, text, tau[0], tau[1], context


def _mean_square(outputs) -> jax.Array:
    """The benchmark's loss: the mean square of every output (video velocity, and text velocity or logits), summed.
    Any loss with a full backward pass does; this one needs no targets."""
    return sum(jnp.mean(jnp.square(o.astype(jnp.float32))) for o in jax.tree.leaves(outputs))


def step_functions(model) -> tuple[Callable, Callable, tuple]:
    """(forward(params, rest, inputs), train(params, rest, inputs), (params, rest)), both pure and un-jitted.

    The module is split once and re-merged inside the traced function, so the compiled step takes the weights as
    arguments (a realistic step: weights are not baked in as constants). train returns (loss, grads w.r.t. every
    nnx.Param); returning the grads keeps XLA from pruning any of the backward pass.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, rest, inputs):
        return nnx.merge(graphdef, params, rest)(*inputs)

    def loss(params, rest, inputs):
        return _mean_square(forward(params, rest, inputs))

    return forward, jax.value_and_grad(loss), (params, rest)


def _compile(fn: Callable, args: tuple, count_flops: bool) -> tuple[Any, dict[str, Any]]:
    """AOT compile, timing lowering and compilation apart, and what XLA says about the executable.

    XLA's FLOP count is taken only when `count_flops`: its cost analysis counts a while loop's body once, so for
    scanned layers it reports about one layer's work, which would read as a wrong cross-check.
    """
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    info: dict[str, Any] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "xla_tflop": None, "temp_bytes": None}
    try:  # both analyses are best effort: not every backend / version fills them in
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if count_flops and cost and cost.get("flops", -1) > 0:
            info["xla_tflop"] = float(cost["flops"]) / 1e12
    except Exception:  # noqa: BLE001
        pass
    try:
        info["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001
        pass
    return compiled, info


def run_benchmark(setup: BenchSetup, peak_tflops: float | None) -> dict[str, Any]:
    """Builds the model, compiles and times each mode; one result dict per mode, in `setup.modes` order."""
    device = jax.devices()[0]
    model = build_model(setup)
    forward, train, (params, rest) = step_functions(model)
    inputs = make_inputs(setup)
    args = (params, rest, inputs)
    flops_forward = setup.batch * forward_flops(setup.wan, setup.tokens_per_example, setup.context_len)
    tokens = setup.batch * setup.tokens_per_example
    results = []
    for mode in setup.modes:
        fn, flops = {"forward": (forward, flops_forward), "train": (train, 3 * flops_forward)}[mode]
        compiled, info = _compile(fn, args, count_flops=not setup.wan.scan_layers)
        times = time_steps(lambda: compiled(*args), setup.iters, setup.warmup)
        peak, peak_source = peak_memory_bytes(device)
        results.append({"mode": mode, **summarize(times, tokens, flops, peak_tflops), **info,
                        "peak_bytes": peak, "peak_source": peak_source})
    return {"device": device.device_kind, "platform": device.platform, "peak_tflops": peak_tflops,
            "tokens_per_step": tokens, "results": results}


# ----------------------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.replace("x", ",").split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_dit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--check_formula", action="store_true",
                   help="print §8's FLOPs for Uni-ViGU-1.3B at 81x480x832 + 256 text and exit (no benchmark)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--num_layers", type=int, default=None, help="override the preset's layer count (fewer layers "
                   "to fit a device; MFU stays meaningful since FLOPs scale with layers)")
    p.add_argument("--model", default="dit", choices=("dit", "univigu"))
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--latent", type=_ints, default=None, help="latent T,H,W (default: 3,8,8 for tiny, "
                       "else the latent of 81x480x832)")
    shape.add_argument("--video", type=_ints, default=None, help="pixel video F,H,W, turned into a latent by "
                       "Wan's VAE strides (4, 8, 8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text_len", type=int, default=256, help="Uni-ViGU text tokens S (ignored for --model dit)")
    p.add_argument("--context_len", type=int, default=None, help="prompt tokens C (default: the preset's text_len)")
    p.add_argument("--text_flow", default="embedding", choices=("embedding", "discrete"))
    p.add_argument("--vocab_size", type=int, default=256_384)
    p.add_argument("--text_latent_dim", type=int, default=128)
    p.add_argument("--ffn_t_dim", type=int, default=None, help="FFN_t width (default: the DiT's ffn_dim)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: bfloat16 on an accelerator, float32 on a CPU)")
    p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--attention", default=None, choices=("xla", "cudnn"),
                   help="attention backend (default: cudnn on a GPU with a 16-bit dtype, else xla)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots", "names"))
    p.add_argument("--layout", default="scan", choices=("scan", "loop"),
                   help="blocks stacked under nnx.scan, or a Python loop")
    p.add_argument("--mode", default="both", choices=("forward", "train", "both"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="dense peak for MFU (default by device kind: H100/H200 989 in bf16; none on a CPU)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p


def setup_from_args(args: argparse.Namespace, platform: str) -> BenchSetup:
    """Resolves the defaults that depend on the device (dtype, attention backend) and the preset (latent, C)."""
    accelerator = platform != "cpu"
    dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    attention = args.attention or ("cudnn" if platform == "gpu" and dtype != "float32" else "xla")
    overrides = dict(dtype=dtype, param_dtype=args.param_dtype, attention_backend=attention,
                     remat_policy=args.remat, scan_layers=args.layout == "scan")
    if args.num_layers is not None:
        overrides["num_layers"] = args.num_layers
    wan = WanConfig.preset(args.preset, **overrides)
    if args.latent is not None:
        latent = args.latent
    elif args.video is not None:
        latent = latent_shape_for_video(*args.video)
    else:
        latent = (3, 8, 8) if args.preset == "tiny" else latent_shape_for_video(81, 480, 832)
    if len(latent) != 3:
        raise SystemExit(f"--latent / --video need three numbers, got {latent}")
    univigu = None
    if args.model == "univigu":
        univigu = UniViGUConfig(text_flow=args.text_flow, vocab_size=args.vocab_size,
                                text_latent_dim=args.text_latent_dim, ffn_t_dim=args.ffn_t_dim,
                                max_text_len=max(args.text_len, 1))
    modes = ("forward", "train") if args.mode == "both" else (args.mode,)
    return BenchSetup(wan=wan, univigu=univigu, latent=tuple(latent), batch=args.batch,
                      text_len=args.text_len if univigu is not None else 0,
                      context_len=args.context_len or wan.text_len, modes=modes, iters=args.iters,
                      warmup=args.warmup)


def _print_formula(report: dict[str, Any]) -> None:
    print(f"§8 formula, Uni-ViGU-1.3B: latent {report['latent']} -> {report['video_tokens']:,} video + "
          f"{report['text_tokens']} text = {report['tokens']:,} tokens, {report['context_len']} context")
    print(f"{'term':<18}{'TFLOP':>10}{'share':>9}")
    for name, tflop in report["terms_tflop"].items():
        print(f"{name:<18}{tflop:>10.2f}{report['share'][name]:>9.1%}")
    print(f"{'forward':<18}{report['forward_tflop']:>10.2f}")
    print(f"{'train step (3x)':<18}{report['train_step_tflop']:>10.2f}")


def _print_results(setup: BenchSetup, out: dict[str, Any]) -> None:
    w = setup.wan
    what = "WanDiT" if setup.univigu is None else f"UniViGU({setup.univigu.text_flow}, S={setup.text_len})"
    print(f"{what} d={w.dim} f={w.ffn_dim} layers={w.num_layers} | latent {setup.latent} batch {setup.batch} -> "
          f"{out['tokens_per_step']:,} tokens/step, C={setup.context_len} | dtype {w.dtype} params {w.param_dtype} "
          f"attention {w.attention_backend} remat {w.remat_policy} {'scan' if w.scan_layers else 'loop'}")
    print(f"device {out['device']} ({out['platform']}), peak "
          f"{'n/a' if out['peak_tflops'] is None else out['peak_tflops']} TFLOP/s")
    head = (f"{'mode':<8}{'step ms (p10-p90)':>26}{'tokens/s':>12}{'TFLOP/step':>12}{'XLA TFLOP':>11}"
            f"{'TFLOP/s':>10}{'MFU':>8}{'compile s':>11}{'peak GiB':>10}")
    print(head)
    for r in out["results"]:
        spread = f"{1e3 * r['step_s_median']:.2f} ({1e3 * r['step_s_p10']:.2f}-{1e3 * r['step_s_p90']:.2f})"
        xla = "n/a" if r["xla_tflop"] is None else f"{r['xla_tflop']:.4g}"
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{r['mode']:<8}{spread:>26}{r['tokens_per_s']:>12.4g}{r['tflop_per_step']:>12.4g}{xla:>11}"
              f"{r['tflops']:>10.4g}{mfu:>8}{r['lower_s'] + r['compile_s']:>11.2f}"
              f"{r['peak_bytes'] / 2**30:>10.2f}")
    print(f"(peak memory: {out['results'][-1]['peak_source']}, the process's peak so far; MFU and TFLOP/step by the "
          f"§8 formula, XLA TFLOP = XLA's own count of the executable, "
          f"looped layout only: it counts a scanned loop's body once)")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.check_formula:
        report = check_formula()
        _print_formula(report)
    else:
        device = jax.devices()[0]
        setup = setup_from_args(args, device.platform)
        peak = args.peak_tflops
        if peak is None:
            peak = default_peak_tflops(device.device_kind, device.platform, setup.wan.dtype)
        report = run_benchmark(setup, peak)
        report["setup"] = {"wan": setup.wan.to_dict(),
                           "univigu": None if setup.univigu is None else setup.univigu.to_dict(),
                           "latent": setup.latent, "batch": setup.batch, "text_len": setup.text_len,
                           "context_len": setup.context_len, "iters": setup.iters, "warmup": setup.warmup}
        _print_results(setup, report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
