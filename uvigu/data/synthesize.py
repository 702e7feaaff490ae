"""`python -m uvigu.data.synthesize`: prompts -> videos made by the generator, plus a manifest ready for preprocessing.

    python -m uvigu.data.synthesize --prompts prompts.txt --model DST --out DIR \
        [--frames 81 --height 480 --width 832 --steps 50 --guide 5.0 --seed 0]
    python -m uvigu.data.preprocess --manifest DIR/manifest.jsonl --model DST --out SHARDS

The paper's stage-1 recipe (Knowledge Recall): its 10K video-prompt pairs are videos synthesised from the prompts by
a video generator, so the model learns to recover the prompt from what the generator makes of it. Here the generator
is the pipeline of DST (`Pipeline.t2v`, the folder's sampler and defaults for anything not given).

prompts.txt: one prompt per non-empty line (surrounding whitespace stripped). Prompt i (0-based among non-empty lines)
is generated with seed `--seed + i` and written to `DIR/videos/{i:05d}.mp4` (H.264, at the folder's fps); the write is
atomic, so a rerun skips every video already there and only makes the missing ones. `DIR/manifest.jsonl` (written
last, atomically) holds one `{"video": "videos/00000.mp4", "prompt": ..., "caption": ""}` per prompt, paths relative
to DIR, as `uvigu.data.preprocess` reads them (stage 2's detailed captions are added by whoever writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from uvigu.data import video as video_io
from uvigu.generate import DTYPE_CHOICES, CliError, _Parser, check_model_folder, run_main

MANIFEST_FILE = "manifest.jsonl"
VIDEO_DIR = "videos"


def read_prompts(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CliError(f"--prompts {str(path)!r}: no such file")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise CliError(f"--prompts {str(path)!r}: not UTF-8 text ({e})") from None
    if not prompts:
        raise CliError(f"--prompts {str(path)!r}: no prompt (one per non-empty line)")
    return prompts


def synthesize(prompts: Sequence[str], model: str | os.PathLike, out: str | os.PathLike, *, frames: int | None = None,
               height: int | None = None, width: int | None = None, steps: int | None = None,
               guidance_scale: float | None = None, seed: int = 0, pipe=None, dtype: str | None = None,
               progress: bool = True) -> dict[str, int | float]:
    """Generates the missing videos of `prompts` into `out` and writes `out/manifest.jsonl`. `pipe`: an already
    loaded pipeline of `model`. Returns {"generated", "skipped", "seconds"}."""
    start = time.perf_counter()
    out = Path(out)
    if pipe is None:
        from uvigu import pipeline as uvigu_pipeline

        pipe = uvigu_pipeline.load(check_model_folder(str(model)), dtype=dtype)
    d = pipe.defaults
    frames, height, width = frames or d.num_frames, height or d.height, width or d.width
    pipe.check_video_size(frames, height, width)  # before anything is generated
    (out / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
    rows, generated, skipped = [], 0, 0
    bar = _bar(len(prompts), progress)
    try:
        for i, prompt in enumerate(prompts):
            rel = f"{VIDEO_DIR}/{i:05d}.mp4"
            if (out / rel).is_file():
                skipped += 1
            else:
                video = pipe.t2v(prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                                 guidance_scale=guidance_scale, seed=seed + i)
                video_io.write_video(out / rel, video[0], fps=d.fps)
                generated += 1
            rows.append({"video": rel, "prompt": prompt, "caption": ""})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    tmp = out / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, out / MANIFEST_FILE)
    return {"generated": generated, "skipped": skipped, "seconds": time.perf_counter() - start}


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="synthesize", unit="video", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m uvigu.data.synthesize", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="Text file, one prompt per non-empty line.")
    p.add_argument("--model", required=True, help="A converted model folder (the generator).")
    p.add_argument("--out", required=True, help="Output folder: videos/*.mp4 and manifest.jsonl.")
    p.add_argument("--frames", type=int, default=None, help="Frames, 4n+1 (default: the folder's).")
    p.add_argument("--height", type=int, default=None, help="Height, a multiple of 16 (default: the folder's).")
    p.add_argument("--width", type=int, default=None, help="Width, a multiple of 16 (default: the folder's).")
    p.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the folder's).")
    p.add_argument("--guide", type=float, default=None, help="CFG scale (default: the folder's).")
    p.add_argument("--seed", type=int, default=0, help="Prompt i uses seed + i.")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="Compute dtype (default auto).")
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    def body():
        args = build_parser().parse_args(argv)
        if args.frames is not None or args.height is not None or args.width is not None:
            try:
                video_io.check_video_size(args.frames or 1, args.height or 16, args.width or 16)
            except ValueError as e:
                raise CliError(str(e)) from None
        if args.steps is not None and args.steps < 1:
            raise CliError(f"--steps must be >= 1, got {args.steps}")
        prompts = read_prompts(args.prompts)
        check_model_folder(args.model)
        r = synthesize(prompts, args.model, args.out, frames=args.frames, height=args.height, width=args.width,
                       steps=args.steps, guidance_scale=args.guide, seed=args.seed,
                       dtype=None if args.dtype == "auto" else args.dtype, progress=not args.no_progress)
        print(f"synthesize: {r['generated']} videos generated, {r['skipped']} already there, "
              f"{r['seconds']:.1f}s; manifest {Path(args.out) / MANIFEST_FILE}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
