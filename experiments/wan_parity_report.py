"""How close WanDiT is to diffusers' WanTransformer3DModel, as a table: per tiny random config, the fp32 relative error
of both layer layouts (scanned, looped) and what bf16 compute costs against fp32.

    python -m experiments.wan_parity_report [--configs base,patch2x2x1] [--out parity.json]

Why a report next to the tests: the parity tests only say pass / fail at 1e-5; the numbers themselves show how much
headroom there is, and the bf16 column shows the error a bf16 run starts from. The torch bf16 column is the same
measurement for diffusers' model loaded as `from_pretrained(torch_dtype=torch.bfloat16)` loads it (bf16 except its
`_keep_in_fp32_modules`: time embedder, modulation tables, norms), a yardstick for what "normal" bf16 error is.

The configs and latent shapes are the parity tests' own (`tests/test_wan_parity.py`: CONFIGS, LATENTS), so the report
and the tests cannot drift apart. fp32 runs use XLA's highest matmul precision, so the fp32 columns mean the same on a
GPU (whose default fp32 matmuls are TF32) as on a CPU. Exits 1 when an fp32 error is above the tests' tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig

TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
TOL = 1e-5  # the parity tests' fp32 tolerance
CONTEXT_LEN = 7


def _test_cases() -> tuple[dict[str, WanConfig], dict[str, tuple[int, ...]]]:
    """The parity tests' CONFIGS and LATENTS (importing the test module needs `tests/` on the path)."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    from test_wan_parity import CONFIGS, LATENTS

    return CONFIGS, LATENTS


def make_inputs(cfg: WanConfig, latent_shape: tuple[int, ...], seed: int = 0):
    """Channels-last latents [B, T, H, W, C], timesteps spread over (0, 1000) (large ones stress the sinusoid's
    angles), and a short random context; numpy float32, fed identically to both implementations."""
    rng = np.random.default_rng(seed)
    batch = latent_shape[0]
    x = rng.standard_normal((*latent_shape, cfg.in_channels)).astype(np.float32)
    t = np.linspace(3.0, 997.0, batch).astype(np.float32)
    ctx = rng.standard_normal((batch, CONTEXT_LEN, cfg.text_dim)).astype(np.float32)
    return x, t, ctx


@nnx.jit
def _forward(model, x, t, ctx):
    return model(x, t, ctx)


def _ours(cfg: WanConfig, flat: dict[str, np.ndarray], x, t, ctx) -> np.ndarray:
    model = wan_keys.model_from_params(cfg, flat)
    return np.asarray(_forward(model, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))


def diffusers_bf16_forward(cfg: WanConfig, seed: int, x: np.ndarray, t: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """diffusers' model in bf16 the way `from_pretrained(torch_dtype=torch.bfloat16)` makes it — every param bf16 but
    those under `_keep_in_fp32_modules` — run on bf16 inputs; channels-last float32 numpy out.

    (A plain `.to(torch.bfloat16)` would also cast the modules diffusers keeps in fp32, which is not what a diffusers
    bf16 run does.)"""
    import torch
    from reference import diffusers_wan

    model = diffusers_wan(cfg, seed=seed)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not keep.intersection(name.split(".")):
                param.data = param.data.to(torch.bfloat16)
        video = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).to(torch.bfloat16)
        out = model(video, torch.from_numpy(t), torch.from_numpy(ctx).to(torch.bfloat16), return_dict=False)[0]
    return np.moveaxis(out.float().numpy(), 1, -1)


def parity_row(name: str, cfg: WanConfig, latent_shape: tuple[int, ...]) -> dict[str, Any]:
    """One config: diffusers at fp32 and bf16, ours converted from the same weights at fp32 (both layouts) and with
    bf16 compute (fp32 params, scanned). Errors are ‖a − b‖ / ‖b‖ over the whole output."""
    from reference import diffusers_forward, diffusers_wan, rel_err  # tests/reference.py, on the path via _test_cases

    seed = sum(map(ord, name))  # the parity tests' seed for this config
    ref = diffusers_wan(cfg, seed=seed)
    flat = wan_keys.diffusers_to_params(ref.state_dict(), cfg)
    x, t, ctx = make_inputs(cfg, latent_shape)
    want = diffusers_forward(ref, x, t, ctx)
    with jax.default_matmul_precision("highest"):
        fp32 = {layout: _ours(dataclasses.replace(cfg, scan_layers=layout == "scanned"), flat, x, t, ctx)
                for layout in ("scanned", "looped")}
    bf16 = _ours(dataclasses.replace(cfg, dtype="bfloat16", scan_layers=True), flat, x, t, ctx)
    ref_bf16 = diffusers_bf16_forward(cfg, seed, x, t, ctx)
    pt, ph, pw = cfg.patch_size
    _, frames, height, width = latent_shape
    return {
        "config": name,
        "arch": {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "heads": cfg.num_heads, "layers": cfg.num_layers,
                 "patch": cfg.patch_size, "in": cfg.in_channels, "out": cfg.out_channels,
                 "cross_attn_norm": cfg.cross_attn_norm},
        "latent": tuple(latent_shape),
        "tokens": (frames // pt) * (height // ph) * (width // pw),
        "fp32_scanned": rel_err(fp32["scanned"], want),
        "fp32_looped": rel_err(fp32["looped"], want),
        "bf16_vs_fp32": rel_err(bf16, fp32["scanned"]),
        "bf16_vs_diffusers_fp32": rel_err(bf16, want),
        "diffusers_bf16_vs_fp32": rel_err(ref_bf16, want),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'config':<15}{'d/f/heads/layers':>18}{'patch':>10}{'tokens':>8}{'fp32 scan':>11}{'fp32 loop':>11}"
          f"{'bf16 v fp32':>13}{'torch bf16':>12}{'':>6}")
    for r in rows:
        a = r["arch"]
        arch = f"{a['dim']}/{a['ffn_dim']}/{a['heads']}/{a['layers']}"
        patch = "x".join(map(str, a["patch"]))
        ok = "ok" if max(r["fp32_scanned"], r["fp32_looped"]) <= TOL else "FAIL"
        print(f"{r['config']:<15}{arch:>18}{patch:>10}{r['tokens']:>8}{r['fp32_scanned']:>11.2e}"
              f"{r['fp32_looped']:>11.2e}{r['bf16_vs_fp32']:>13.2e}{r['diffusers_bf16_vs_fp32']:>12.2e}{ok:>6}")
    print(f"(relative errors ‖a − b‖/‖b‖; fp32 columns vs diffusers fp32, tolerance {TOL:g}; 'bf16 v fp32' = ours with "
          f"bf16 compute vs ours fp32; 'torch bf16' = diffusers bf16 vs diffusers fp32)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.wan_parity_report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--configs", default=None, help="comma-separated subset of the parity tests' CONFIGS (default all)")
    p.add_argument("--platform", default=None, help="JAX platform to run ours on (e.g. cpu, cuda); default JAX's "
                   "choice")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.platform:
        jax.config.update("jax_platforms", args.platform)
    configs, latents = _test_cases()
    names = sorted(configs) if args.configs is None else [n for n in args.configs.split(",") if n]
    unknown = set(names) - set(configs)
    if unknown:
        raise SystemExit(f"unknown config(s) {sorted(unknown)}; known: {sorted(configs)}")
    rows = [parity_row(name, configs[name], latents[name]) for name in names]
    print(f"WanDiT vs diffusers WanTransformer3DModel, ours on {jax.devices()[0].device_kind}")
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    if any(max(r["fp32_scanned"], r["fp32_looped"]) > TOL for r in rows):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main()
