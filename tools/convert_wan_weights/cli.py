"""Command line of the converter: arguments, the summary, and exit codes (0 converted, 2 bad input).

Bad input is anything about the source or destination the user can fix (an unrecognised folder, a key mismatch, a
truncated shard, an existing DST/dit): a one-paragraph message on stderr, no traceback. Anything else is a bug and
keeps its traceback (exit 1). Either way no `DST/dit` is left behind (see `conversion.convert`).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.convert_wan_weights",
        description="Convert a Wan2.1 T2V DiT checkpoint (original release folder, diffusers pipeline folder or "
                    "diffusers transformer folder) into DST/dit/ (Orbax params + config.json) for "
                    "uvigu.checkpoint.load_pretrained.",
    )
    p.add_argument("--src", required=True, help="checkpoint folder to convert")
    p.add_argument("--dst", required=True, help="output folder; the DiT goes to DST/dit/")
    p.add_argument("--dtype", default="keep", choices=("float32", "bfloat16", "keep"),
                   help="storage dtype of the converted params (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST/dit (only once the new one is "
                                                             "complete)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that --help answers without loading JAX.
    from tools.convert_wan_weights.conversion import convert, summary

    try:
        result = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # SourceError, ConversionError, SafetensorsError, CheckpointError, IO
        print(f"convert_wan_weights: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(summary(result))
    return EXIT_OK
