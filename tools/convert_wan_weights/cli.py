"""Command line of the converter: arguments, the summaries, and exit codes (0 converted, 2 bad input).

Bad input is anything about the source or destination the user can fix (an unrecognised folder, a missing part, a
key mismatch, a truncated shard, a corrupt or absurdly nested JSON file, NaN / Inf tensors, an existing DST part, a
DST another conversion is writing): a one-paragraph message on stderr naming the file, no traceback. Anything else is
a bug and keeps its traceback (exit 1). Either way no DST part that looks valid is left half-written: parts are
staged in hidden folders and published only when every part converted (`staging`).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.convert_wan_weights",
        description="Convert a Wan2.1 T2V release (original release folder, diffusers pipeline folder, or a lone "
                    "diffusers transformer folder) into DST/{dit,vae,umt5,tokenizer}/ + DST/pipeline.json for "
                    "uvigu.pipeline.load and uvigu.checkpoint.load_pretrained.",
    )
    p.add_argument("--src", required=True, help="checkpoint folder to convert")
    p.add_argument("--dst", required=True, help="output folder; the DiT goes to DST/dit/")
    p.add_argument("--dtype", default="keep", choices=("float32", "bfloat16", "keep"),
                   help="storage dtype of the converted params (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing DST parts (each only once the new one "
                                                             "is complete)")
    p.add_argument("--parts", default=None,
                   help="comma-separated subset of dit,vae,umt5,tokenizer,scheduler (default: every part of a release; "
                        "a lone transformer folder: dit)")
    p.add_argument("--allow_nonfinite", "--allow-nonfinite", action="store_true",
                   help="convert tensors holding NaN / Inf as they are (default: refuse them, naming each)")
    p.add_argument("--univigu", default=None, metavar="CKPT.pth",
                   help="the released Uni-ViGU checkpoint (torch .pth, weights under 'model'); SRC is then its diffusers "
                        "Wan2.1 folder and DST gets univigu/ (instead of dit/) and the release's conventions in "
                        "pipeline.json")
    p.add_argument("--max_text_len", "--max-text-len", type=int, default=256,
                   help="with --univigu: the text length the model is built for (the release's --max_length)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported here so that --help answers without loading JAX.
    from tools.convert_wan_weights.release import convert_release

    parts = None if args.parts is None else tuple(p.strip() for p in args.parts.split(",") if p.strip())
    try:
        convert_release(args.src, args.dst, parts=parts, dtype=args.dtype, overwrite=args.overwrite,
                        allow_nonfinite=args.allow_nonfinite, univigu=args.univigu,
                        max_text_len=args.max_text_len)
    except (ValueError, OSError) as e:  # SourceError, ConversionError, SafetensorsError, CheckpointError, IO
        print(f"convert_wan_weights: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK
