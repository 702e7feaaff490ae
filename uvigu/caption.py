"""`python -m uvigu.caption`: video -> text with a Uni-ViGU model folder (V2T: clean video, text integrated from noise).

    python -m uvigu.caption --model DST --video in.mp4 [--steps N --seed S --temperature T]

The clip is read at the model's fps, resized (aspect kept, short side covering) and centre-cropped to the model's
height x width, and cut to 4n+1 frames: the model's default num_frames, or the longest 4n+1 prefix when the clip is
shorter. The caption is printed to stdout. The video file and the model folder are checked before the model loads;
bad input (missing / corrupt video, a Wan-only folder, ...) gives one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from typing import Sequence

from uvigu.data import video as video_io
from uvigu.generate import CliError, ProgressBar, _Parser, add_common_args, check_model_folder, load_pipeline
from uvigu.generate import parse_mesh, run_main


def build_parser():
    p = _Parser(prog="python -m uvigu.caption", description=__doc__.split("\n\n")[0])
    add_common_args(p)
    p.add_argument("--video", required=True, help="The clip to caption (anything FFmpeg decodes: mp4, gif, webm...).")
    p.add_argument("--temperature", type=float, default=None,
                   help="Of the text flow's token draws: 0 takes the most likely token at every step (greedy); "
                        "default: the folder's caption_temperature (1 unless its pipeline.json says otherwise).")
    return p


def _caption(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    if args.temperature is not None and not args.temperature >= 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    mesh_shape = parse_mesh(args.mesh)
    model = check_model_folder(args.model)
    video_io.probe_video(args.video)  # missing / not a video / no stream / undecodable: before the model loads
    pipe = load_pipeline(model, args.dtype, mesh_shape)
    if getattr(pipe, "kind", None) == "wan":
        raise CliError(f"captioning needs a Uni-ViGU model; {str(model)!r} is a Wan2.1 (video-only) folder")
    d = pipe.defaults
    frames = video_io.read_video(args.video, fps=d.fps or 16, height=d.height, width=d.width,
                                 max_frames=d.num_frames)
    with ProgressBar("caption") as bar:
        captions = pipe.caption(frames[None], num_inference_steps=args.steps, temperature=args.temperature,
                                seed=args.seed, progress=bar)
    print(captions[0])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_main(lambda: _caption(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
