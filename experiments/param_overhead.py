"""What the text side of Uni-ViGU costs in parameters, next to the Wan DiT it wraps.

    python -m experiments.param_overhead --presets wan2.1-1.3b,wan2.1-14b --out overhead.json

Why: the two text flows put the ~256K-token vocabulary in very different places — the embedding flow in a narrow
table [V, E] (E = 128) plus two small D×E projections, the discrete flow in an input table [V, D] and a logits head
[D, V] — and FFN_t adds a second FFN to every block. Which of these dominates decides what a "cheap" text side is,
so the numbers are computed, not estimated: each model is built with `nnx.eval_shape` (shapes only, no memory, no
random init), so even the 14B preset costs nothing to count.

Text-side categories (every non-DiT param lands in exactly one; an unknown one is an error, not a silent gap):
  FFN_t      the per-block text FFNs
  text time  the text tokens' own time embedding + projection
  text in    the projection from the text latent (E) to the model width (embedding flow only)
  text head  the text output head (norm modulation + projection to E, or to V logits)
  table      the vocabulary table: E [V, E] (embedding flow) or the input embedding [V, D] (discrete flow)
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from flax import nnx

from uvigu.models.univigu import UniViGU, UniViGUConfig
from uvigu.models.wan import PRESETS, WanConfig, WanDiT

# Top-level attribute of UniViGU -> the category it is reported under.
CATEGORIES: dict[str, str] = {
    "ffn_t": "FFN_t",
    "text_time": "text time",
    "text_proj_in": "text in",
    "text_head": "text head",
    "text_table": "table",
    "vocab_embed": "table",
}
CATEGORY_ORDER = ("FFN_t", "text time", "text in", "text head", "table")


def _param_sizes(module: nnx.Module) -> dict[tuple, int]:
    """{param path: element count} of an (abstract) module."""
    return {tuple(path): math.prod(var.shape) for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def dit_param_count(preset: str) -> int:
    """Parameters of the DiT alone (1,418,996,800 for wan2.1-1.3b, as diffusers counts them)."""
    cfg = WanConfig.preset(preset)
    return sum(_param_sizes(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))).values())


def univigu_param_counts(preset: str, text_flow: str, ffn_t_dim: int | None = None, vocab_size: int = 256_384,
                         text_latent_dim: int = 128) -> dict[str, Any]:
    """Parameter counts of a Uni-ViGU around the `preset` DiT: total, the DiT's share, and the text side by category.

    Built through `UniViGU.from_wan` (the constructor a real run uses), abstractly.
    """
    wan = WanConfig.preset(preset)
    cfg = UniViGUConfig(text_flow=text_flow, vocab_size=vocab_size, text_latent_dim=text_latent_dim,
                        ffn_t_dim=ffn_t_dim)
    model = nnx.eval_shape(lambda: UniViGU.from_wan(WanDiT(wan, rngs=nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1)))
    dit, text = 0, dict.fromkeys(CATEGORY_ORDER, 0)
    for path, size in _param_sizes(model).items():
        if path[0] == "dit":
            dit += size
        elif path[0] in CATEGORIES:
            text[CATEGORIES[path[0]]] += size
        else:
            raise ValueError(f"param {'.'.join(map(str, path))} belongs to no known text-side category: add its "
                             f"module {path[0]!r} to experiments.param_overhead.CATEGORIES")
    text_total = sum(text.values())
    return {
        "preset": preset, "text_flow": text_flow, "ffn_t_dim": ffn_t_dim or wan.ffn_dim, "vocab_size": vocab_size,
        "text_latent_dim": text_latent_dim if text_flow == "embedding" else None,
        "dit": dit, "text": text, "text_total": text_total, "total": dit + text_total,
        "overhead": text_total / dit,
    }


def overhead_table(presets: tuple[str, ...], flows: tuple[str, ...] = ("embedding", "discrete"),
                   ffn_t_fractions: tuple[float, ...] = (1.0, 0.5), vocab_size: int = 256_384,
                   text_latent_dim: int = 128) -> list[dict[str, Any]]:
    """One row per (preset, flow, FFN_t width), FFN_t width = fraction · the DiT's ffn_dim (rounded)."""
    rows = []
    for preset in presets:
        ffn_dim = PRESETS[preset].ffn_dim
        for flow in flows:
            for fraction in ffn_t_fractions:
                rows.append(univigu_param_counts(preset, flow, max(1, round(fraction * ffn_dim)), vocab_size,
                                                 text_latent_dim))
    return rows


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n else "-"


def print_table(rows: list[dict[str, Any]]) -> None:
    dits = {}
    for r in rows:
        dits.setdefault(r["preset"], r["dit"])
    for preset, n in dits.items():
        print(f"DiT alone, {preset}: {n:,} params")
    head = (f"{'preset':<13}{'flow':<11}{'FFN_t':>8}{'total':>16}"
            + "".join(f"{c:>11}" for c in CATEGORY_ORDER) + f"{'text side':>12}{'overhead':>10}")
    print(head)
    for r in rows:
        print(f"{r['preset']:<13}{r['text_flow']:<11}{r['ffn_t_dim']:>8}{r['total']:>16,}"
              + "".join(f"{_m(r['text'][c]):>11}" for c in CATEGORY_ORDER)
              + f"{_m(r['text_total']):>12}{r['overhead']:>10.1%}")
    print(f"(vocab {rows[0]['vocab_size']:,}; embedding flow text latent E = "
          f"{next((r['text_latent_dim'] for r in rows if r['text_latent_dim']), 'n/a')}; overhead = text side / DiT)")


def _csv(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.param_overhead", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", type=_csv(str), default=("wan2.1-1.3b", "wan2.1-14b"),
                   help=f"comma-separated, from {sorted(PRESETS)}")
    p.add_argument("--flows", type=_csv(str), default=("embedding", "discrete"))
    p.add_argument("--ffn_t_fractions", type=_csv(float), default=(1.0, 0.5),
                   help="FFN_t widths as fractions of the DiT's ffn_dim (1 = the same width, 0.5 = half)")
    p.add_argument("--vocab_size", type=int, default=256_384)
    p.add_argument("--text_latent_dim", type=int, default=128, help="E of the embedding flow")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    unknown = set(args.presets) - set(PRESETS)
    if unknown:
        raise SystemExit(f"unknown preset(s) {sorted(unknown)}; known: {sorted(PRESETS)}")
    rows = overhead_table(args.presets, args.flows, args.ffn_t_fractions, args.vocab_size, args.text_latent_dim)
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
