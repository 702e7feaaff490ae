"""Measures the converter's peak RAM on a synthetic original-layout checkpoint of a few hundred MB.

    python -m tools.convert_wan_weights.measure_peak_ram [--dim 1024 --layers 8 --ffn-dim 4096 --shards 3]
                                                          [--dtype keep|bfloat16|float32] [--keep-files]

The claim to check: converting streams tensor by tensor, so the converter's peak RSS is its fixed floor (Python, JAX,
Orbax) plus about one output size, never two. The script synthesises a random bf16 checkpoint split into shards (in a
child process), converts it in another child, and reads that child's peak RSS from the kernel (`os.wait4`, the
per-child form of getrusage(RUSAGE_CHILDREN)). The floor is measured the same way on a tiny checkpoint.

This parent process imports nothing heavy on purpose: Linux carries the parent's RSS high-water mark into a child
started with vfork (which `subprocess` uses), so a fat parent would inflate the number being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1e6


def _run_measured(cmd: list[str]) -> tuple[int, int, float, str]:
    """(exit code, peak RSS in bytes, seconds, output) of `cmd` run as a child of this process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start, output


def synthesise(folder: Path, *, dim: int, layers: int, ffn_dim: int, text_dim: int, heads: int, shards: int,
               seed: int = 0) -> dict:
    """Writes a random original-layout bf16 Wan2.1 checkpoint (prefixed keys, `shards` files + index, an
    original-style config.json without text_dim / patch_size) into `folder`, one tensor in memory at a time."""
    import math

    import ml_dtypes
    import numpy as np

    from tools.convert_wan_weights.safetensors_io import write_safetensors_lazy
    from uvigu.models import wan_keys
    from uvigu.models.wan import WanConfig

    cfg = WanConfig(dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=layers, text_dim=text_dim)
    shapes = {wan_keys.ORIGINAL_PREFIX + wan_keys.diffusers_to_original_key(k): s
              for k, s in wan_keys.expected_diffusers_shapes(cfg).items()}
    bf16 = np.dtype(ml_dtypes.bfloat16)
    total = sum(math.prod(s) for s in shapes.values()) * bf16.itemsize
    rng = np.random.default_rng(seed)

    def produce(shape):
        return lambda: (rng.standard_normal(shape, np.float32) * 0.02).astype(bf16)

    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = [[] for _ in range(shards)]
    running = 0
    for name, shape in shapes.items():
        k = min(shards - 1, running * shards // total)
        groups[k].append(name)
        running += math.prod(shape) * bf16.itemsize
    weight_map = {}
    for k, names in enumerate(groups):
        file = f"diffusion_pytorch_model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors_lazy(folder / file, [(n, shapes[n], bf16, produce(shapes[n])) for n in names])
        weight_map.update({n: file for n in names})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": dim, "eps": 1e-6, "ffn_dim": ffn_dim, "freq_dim": 256, "in_dim": 16,
        "model_type": "t2v", "num_heads": heads, "num_layers": layers, "out_dim": 16, "text_len": 512}))
    return {"bytes": total, "params": total // bf16.itemsize, "tensors": len(shapes)}


def _measure_one(work: Path, name: str, shape_args: dict, dtype: str) -> dict:
    src, dst = work / f"{name}-src", work / f"{name}-dst"
    code, rss, secs, out = _run_measured([
        sys.executable, "-m", "tools.convert_wan_weights.measure_peak_ram", "--synthesise-into", str(src),
        *[f"--{k.replace('_', '-')}={v}" for k, v in shape_args.items()],
    ])
    if code:
        raise SystemExit(f"synthesising {name} failed:\n{out}")
    info = json.loads(out.strip().splitlines()[-1])
    code, rss, secs, out = _run_measured([sys.executable, "-m", "tools.convert_wan_weights", "--src", str(src),
                                          "--dst", str(dst), "--dtype", dtype])
    if code:
        raise SystemExit(f"converting {name} failed (exit {code}):\n{out}")
    out_bytes = sum(p.stat().st_size for p in (dst / "dit").rglob("*") if p.is_file())
    return {**info, "peak_rss": rss, "seconds": secs, "output_bytes": out_bytes, "log": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.convert_wan_weights.measure_peak_ram", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn-dim", type=int, default=4096)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--dtype", default="keep", choices=("keep", "bfloat16", "float32"))
    p.add_argument("--keep-files", action="store_true", help="leave the synthetic checkpoints in the temp folder")
    p.add_argument("--synthesise-into", type=Path, help=argparse.SUPPRESS)  # the child's job
    args = p.parse_args(argv)
    shape_args = dict(dim=args.dim, layers=args.layers, ffn_dim=args.ffn_dim, text_dim=args.text_dim,
                      heads=args.heads, shards=args.shards)
    if args.synthesise_into:
        print(json.dumps(synthesise(args.synthesise_into, **shape_args)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="wan-peak-ram-"))
    try:
        floor = _measure_one(work, "tiny", dict(dim=64, layers=1, ffn_dim=64, text_dim=64, heads=1, shards=1),
                             args.dtype)
        big = _measure_one(work, "big", shape_args, args.dtype)
    finally:
        if not args.keep_files:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    above = big["peak_rss"] - floor["peak_rss"]
    print(f"synthetic checkpoint: {big['bytes'] / MB:.1f} MB bf16 in {args.shards} shards, {big['params']:,} params, "
          f"{big['tensors']} tensors (dim {args.dim}, {args.layers} layers, ffn {args.ffn_dim}, text_dim "
          f"{args.text_dim})")
    print(f"converted with --dtype {args.dtype} in {big['seconds']:.1f} s; output {big['output_bytes'] / MB:.1f} MB")
    print(f"converter peak RSS: {big['peak_rss'] / MB:.1f} MB = {big['peak_rss'] / big['bytes']:.2f}x the checkpoint")
    print(f"floor (same converter on a {floor['bytes'] / 1e3:.0f} kB checkpoint): {floor['peak_rss'] / MB:.1f} MB")
    print(f"above the floor: {above / MB:.1f} MB = {above / big['bytes']:.2f}x the checkpoint, "
          f"{above / big['output_bytes']:.2f}x the output")
    return 0


if __name__ == "__main__":
    sys.exit(main())
