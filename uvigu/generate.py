"""`python -m uvigu.generate`: text -> video (and, with `--mode joint`, video + caption) from a model folder.

    python -m uvigu.generate --model DST --prompt "a red fox runs through snow" --out fox.mp4
    python -m uvigu.generate --model DST --prompts prompts.txt --out clips/clip.mp4   # clip_000.mp4, clip_001.mp4 ...
    python -m uvigu.generate --model DST --prompt "..." --mode joint --out clip.gif   # + clip.txt, caption printed
    python -m uvigu.generate --model DST --prompt "..." --out fox.mp4 --lora style.safetensors --lora_scale 0.8

Every argument is checked before the model loads (frames 4n+1, height/width multiples of 16, the output extension,
the prompt file, the model folder, the LoRA file), so a bad command fails in a second with one line on stderr and
exit code 2, and leaves no output file. Sizes, steps, guidance, shift and solver default to the model folder's
(`pipe.defaults`). The output format follows --out's extension: `.mp4` (H.264) or `.gif`, at the folder's fps (16
for Wan2.1).

`--lora FILE` (a `.safetensors` file in the diffusers/PEFT, original or musubi-tuner layout, or a folder holding PEFT's
`adapter_model.safetensors` / diffusers' `pytorch_lora_weights.safetensors`) is read before the model loads, then
merged into the loaded denoiser (`pipe.model`, a WanDiT or a UniViGU) as W + s·(α/r)·A·B with s = `--lora_scale`
(default 1.0): sampling then costs what it costs without a LoRA. An adapter that names no Linear of the model, or
has the wrong shape, is an error (exit 2), never a silently skipped module.

This module imports neither JAX models nor the pipeline at import time: `--help` and argument errors stay fast.
`ProgressBar`, `parse_mesh`, `CliError` and `run_main` are shared with `uvigu.caption`.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from uvigu.data import video as video_io

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
# Exceptions that mean "bad input" (a message for the user, not a traceback), looked up only if already imported.
_INPUT_ERRORS = (("uvigu.pipeline", "PipelineError"), ("uvigu.checkpoint", "CheckpointError"))


class CliError(Exception):
    """A bad command line or input: reported as one line on stderr, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so `main(argv)` returns 2 in tests as on the command line."""

    def error(self, message):
        raise CliError(f"{self.prog}: {message}")


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers (also used by uvigu.caption).
# ----------------------------------------------------------------------------------------------------------------------


class ProgressBar:
    """A `progress(done, total)` callback: a tqdm bar with ETA when tqdm is installed, else one rewritten stderr
    line."""

    def __init__(self, desc: str = "", stream=None):
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._start = None
        self._done = 0

    def __call__(self, done: int, total: int) -> None:
        done, total = int(done), int(total)
        if self._start is None:
            self._start = time.monotonic()
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=self.desc, unit="step", file=self.stream, leave=True)
            except ImportError:
                self._bar = None
        if self._bar is not None:
            if self._bar.total != total:
                self._bar.total = total
            self._bar.update(done - self._done)
        else:
            elapsed = time.monotonic() - self._start
            eta = elapsed / done * (total - done) if done else float("nan")
            eta_text = "?" if math.isnan(eta) else f"{eta:.0f}s"
            self.stream.write(f"\r{self.desc} {done}/{total} steps, {elapsed:.0f}s elapsed, ETA {eta_text}")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._start is not None and self._done == 0:
            self.stream.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_mesh(text: str | None) -> dict[str, int] | None:
    """'data=1,fsdp=-1,tensor=1' -> {'data': 1, 'fsdp': -1, 'tensor': 1} (the axes are checked by make_mesh)."""
    if not text:
        return None
    shape = {}
    for part in text.split(","):
        name, sep, size = part.strip().partition("=")
        name = name.strip()
        try:
            value = int(size)
        except ValueError:
            value = None
        if not sep or not name or value is None or (value < 1 and value != -1):
            raise CliError(f"--mesh {text!r}: expected comma-separated axis=size with size >= 1 or -1, "
                           f"e.g. data=1,fsdp=-1,tensor=1 (bad part {part!r})")
        if name in shape:
            raise CliError(f"--mesh {text!r}: axis {name!r} given twice")
        shape[name] = value
    return shape


def check_model_folder(path: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CliError(f"--model {path!r}: no such folder")
    if not folder.is_dir():
        raise CliError(f"--model {path!r}: not a folder (give a converted model folder)")
    return folder


def pipeline_module():
    """`uvigu.pipeline`, imported on first use (it pulls in JAX and the models)."""
    return importlib.import_module("uvigu.pipeline")


def load_pipeline(model: Path, dtype: str, mesh_shape: dict[str, int] | None):
    mesh = None
    if mesh_shape is not None:
        from uvigu import sharding

        try:
            mesh = sharding.make_mesh(mesh_shape)
        except ValueError as e:
            raise CliError(f"--mesh: {e}") from e
    return pipeline_module().load(str(model), dtype=None if dtype == "auto" else dtype, mesh=mesh)


def run_main(body: Callable[[], int | None]) -> int:
    """Runs `body`; bad input -> one stderr line, exit 2. Bad input is a CliError, a VideoError, or, when those
    modules were loaded, the pipeline's PipelineError and a model folder's CheckpointError."""
    try:
        return body() or 0
    except BaseException as e:  # noqa: BLE001 - classified below, re-raised unless it is bad input
        expected = [CliError, video_io.VideoError]
        for module, name in _INPUT_ERRORS:
            cls = getattr(sys.modules.get(module), name, None)
            if isinstance(cls, type):
                expected.append(cls)
        if not isinstance(e, tuple(expected)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="A converted model folder (Wan2.1 or Uni-ViGU).")
    p.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the folder's).")
    p.add_argument("--seed", type=int, default=0,
                   help="Random seed (with --prompts, the i-th pipeline call uses seed + i * batch).")
    p.add_argument("--mesh", default=None,
                   help="Device mesh as axis=size pairs, e.g. data=1,fsdp=-1,tensor=1 (one axis may be -1; "
                        "default: all devices on fsdp).")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="Compute dtype (default auto: bfloat16 on GPU/TPU, float32 on CPU).")


# ----------------------------------------------------------------------------------------------------------------------
# generate.
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m uvigu.generate", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="The text prompt.")
    prompt.add_argument("--prompts", help="A text file: one video per non-empty line, written as OUT's stem + "
                                          "_000, _001, ... + OUT's suffix.")
    p.add_argument("--out", required=True, help="Output video: .mp4 (H.264) or .gif.")
    p.add_argument("--negative_prompt", default="", help="CFG negative prompt (t2v only; default empty).")
    p.add_argument("--frames", type=int, default=None, help="Frames, 4n+1 (default: the folder's, 81 for Wan2.1).")
    p.add_argument("--height", type=int, default=None, help="Height, a multiple of 16 (default: the folder's).")
    p.add_argument("--width", type=int, default=None, help="Width, a multiple of 16 (default: the folder's).")
    p.add_argument("--guide", type=float, default=None, help="Classifier-free guidance scale (default: the folder's).")
    p.add_argument("--shift", type=float, default=None,
                   help="Flow shift of the sigma schedule (default: the folder's).")
    p.add_argument("--solver", choices=("unipc", "euler"), default=None, help="Sampler (default: the folder's).")
    p.add_argument("--mode", choices=("t2v", "joint"), default="t2v",
                   help="t2v: video only; joint: video and caption together (Uni-ViGU folders), the caption written "
                        "next to the video as OUT with suffix .txt and printed.")
    p.add_argument("--temperature", type=float, default=None,
                   help="--mode joint: of the caption's token draws, 0 = greedy (default: the folder's "
                        "caption_temperature).")
    p.add_argument("--batch", type=int, default=1, help="Prompts per pipeline call with --prompts (default 1).")
    p.add_argument("--lora", default=None,
                   help="A LoRA .safetensors file (diffusers/PEFT, original or musubi-tuner layout; or a folder "
                        "with adapter_model.safetensors / pytorch_lora_weights.safetensors), merged into the model "
                        "at load.")
    p.add_argument("--lora_scale", type=float, default=None,
                   help="Strength of --lora: W + scale * (alpha / rank) * A B (default 1.0).")
    return p


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise CliError(f"--prompts {path!r}: no such file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"--prompts {path!r}: cannot read it as UTF-8 text: {e}") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise CliError(f"--prompts {path!r}: no non-empty line")
    return prompts


def output_paths(out: Path, count: int, numbered: bool) -> list[Path]:
    if not numbered:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(count)]


def read_lora(path: str, scale: float | None):
    """(adapters, layout, scale) of `--lora`, read and checked before any model loads (lora_formats pulls in JAX,
    so it is imported only when a LoRA is given)."""
    if scale is not None and not math.isfinite(scale):
        raise CliError(f"--lora_scale must be a finite number, got {scale}")
    file = Path(path)
    if not file.exists():
        raise CliError(f"--lora {path!r}: no such file")
    from uvigu.models import lora_formats

    try:
        adapters, fmt = lora_formats.load_lora(file)
    except (OSError, ValueError) as e:  # FileNotFoundError (a folder without weights) is an OSError
        raise CliError(f"--lora {path!r}: {e}") from e
    if not adapters:
        raise CliError(f"--lora {path!r}: holds no LoRA adapters")
    return adapters, fmt, 1.0 if scale is None else scale


def merge_into(pipe, lora_file: str, adapters, scale: float) -> None:
    """Folds the adapters into the pipeline's denoiser in place; a mismatch with the model is a CliError."""
    from uvigu.models import lora

    try:
        lora.merge_lora(pipe.model, adapters, scale)
    except ValueError as e:
        raise CliError(f"--lora {lora_file!r} does not fit the model: {e}") from e


def validate(args) -> tuple[Path, list[str], list[Path], dict[str, int] | None]:
    """Every check that needs no model; raises CliError naming the argument."""
    out = Path(args.out)
    if out.suffix.lower() not in video_io.WRITE_EXTENSIONS:
        raise CliError(f"--out {args.out!r}: unknown video extension {out.suffix!r}, "
                       f"use one of {video_io.WRITE_EXTENSIONS}")
    if out.exists() and out.is_dir():
        raise CliError(f"--out {args.out!r} is a folder; give a file name ending in .mp4 or .gif")
    prompts = read_prompts(args.prompts) if args.prompts is not None else [args.prompt]
    if args.prompt is not None and not args.prompt.strip():
        raise CliError("--prompt is empty")
    for name in ("frames", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CliError(f"--{name} must be positive, got {getattr(args, name)}")
    size = {k: getattr(args, k) for k in ("frames", "height", "width")}
    if any(v is not None for v in size.values()):
        # Check the given ones; stand-ins that always pass for the rest (the folder's defaults are checked later).
        try:
            video_io.check_video_size(size["frames"] or 1, size["height"] or 16, size["width"] or 16)
        except ValueError as e:
            raise CliError(f"bad video size: {e}") from e
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.shift is not None and not args.shift > 0:
        raise CliError(f"--shift must be positive, got {args.shift}")
    if args.guide is not None and not math.isfinite(args.guide):
        raise CliError(f"--guide must be a finite number, got {args.guide}")
    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    if args.mode == "joint" and args.negative_prompt:
        raise CliError("--negative_prompt applies to --mode t2v only")
    if args.temperature is not None and (args.mode != "joint" or not args.temperature >= 0):
        raise CliError(f"--temperature takes a number >= 0 and applies to --mode joint only, got {args.temperature} "
                       f"with --mode {args.mode}")
    if args.lora is None and args.lora_scale is not None:
        raise CliError("--lora_scale needs --lora")
    mesh_shape = parse_mesh(args.mesh)
    model = check_model_folder(args.model)
    return model, prompts, output_paths(out, len(prompts), args.prompts is not None), mesh_shape


def _default(value, defaults, name, fallback=None):
    return value if value is not None else getattr(defaults, name, fallback)


def _generate(args) -> int:
    model, prompts, outs, mesh_shape = validate(args)
    lora_adapters = read_lora(args.lora, args.lora_scale) if args.lora is not None else None
    pipe = load_pipeline(model, args.dtype, mesh_shape)
    d = pipe.defaults
    frames = _default(args.frames, d, "num_frames")
    height, width = _default(args.height, d, "height"), _default(args.width, d, "width")
    try:
        video_io.check_video_size(frames, height, width)
    except ValueError as e:
        raise CliError(f"bad video size (the model folder's defaults): {e}") from e
    fps = getattr(d, "fps", None) or 16
    settings = dict(height=height, width=width, num_frames=frames,
                    num_inference_steps=_default(args.steps, d, "num_inference_steps"),
                    guidance_scale=_default(args.guide, d, "guidance_scale"),
                    shift=_default(args.shift, d, "shift"), solver=_default(args.solver, d, "solver"), seed=args.seed)
    if args.mode == "joint" and getattr(pipe, "kind", None) == "wan":
        raise CliError(f"--mode joint needs a Uni-ViGU model; {str(model)!r} is a Wan2.1 (video-only) folder")
    if lora_adapters is not None:
        adapters, fmt, scale = lora_adapters
        merge_into(pipe, args.lora, adapters, scale)
        print(f"merged {len(adapters)} LoRA adapter(s) ({fmt} layout) from {args.lora} at scale {scale:g}",
              file=sys.stderr)
    for start in range(0, len(prompts), args.batch):
        chunk, chunk_outs = prompts[start:start + args.batch], outs[start:start + args.batch]
        what = f"video {start + 1}-{start + len(chunk)}/{len(prompts)}" if len(prompts) > 1 else "video"
        # Each chunk gets its own seed offset so repeated prompts in a file do not give identical clips.
        call = dict(settings, seed=args.seed + start)
        with ProgressBar(what) as bar:
            if args.mode == "t2v":
                videos = pipe.t2v(chunk, negative_prompt=args.negative_prompt, progress=bar, **call)
                captions = None
            else:
                videos, captions = pipe.joint(chunk, temperature=args.temperature, progress=bar, **call)
        if len(videos) != len(chunk):
            raise RuntimeError(f"the pipeline returned {len(videos)} videos for {len(chunk)} prompts")
        for i, path in enumerate(chunk_outs):
            video_io.write_video(path, videos[i], fps=fps)
            if captions is not None:
                text_path = path.with_suffix(".txt")
                _write_text(text_path, captions[i])
                print(f"{path}: {captions[i]}")
            else:
                print(f"wrote {path}")
    return 0


def _write_text(path: Path, text: str) -> None:
    """Temp file + rename, like the videos: a failure leaves no half-written caption."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda: _generate(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
