"""Video files in and out: decode with PyAV, resample by timestamps, resize + centre-crop; write MP4 (H.264) or GIF.

Layout: frames are numpy `uint8 [F, H, W, 3]` RGB, channels-last (what the VAE's preprocessing takes after scaling
to [-1, 1]). Float frames given to `write_video` are in [0, 1].

Facts this module relies on:
- Wan2.1's VAE maps 4n+1 frames to n+1 latent frames (the first frame alone, then groups of 4) and downsamples space
  by 8; the DiT's patch (1, 2, 2) makes that 16 pixels per token side. Hence `check_video_size`: frames 4n+1,
  height and width divisible by 16.
- Resampling to `fps` is by presentation time, not by frame index: output frame k is the decoded frame whose
  timestamp is nearest to k / fps after the first frame (ties go to the earlier frame). A clip lasts until its last
  frame's timestamp plus that frame's duration, so 1 s of 30 fps video gives 16 frames at 16 fps. GIF encoders
  merge identical consecutive frames into one longer frame; a frame held for k nominal periods (the shortest frame
  duration seen) stands for k samples, so such GIFs resample as if the repeats were still there.
- H.264 with yuv420p needs even width and height; GIF stores frame durations in 1/100 s, so 16 fps is written as
  60 ms frames (16.7 fps) and reads back with a small drift.
- Writes go to a hidden temp file in the destination folder, renamed into place (atomic on POSIX) only when the
  encoder has finished, so a failed write never leaves a file that looks valid.

Imports no model code (the data layer); `av` (PyAV) and Pillow are the only extra dependencies.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
import secrets
from pathlib import Path

import numpy as np
from jaxtyping import Float, UInt8
from PIL import Image

TEMPORAL_STRIDE = 4  # Wan VAE: 4n+1 frames -> n+1 latent frames
SPATIAL_STRIDE = 16  # VAE x8, then the DiT's 2x2 patch
WRITE_EXTENSIONS = (".mp4", ".gif")
_MP4_CRF = "18"  # x264 constant-quality factor: visually lossless-ish, small files


class VideoError(ValueError):
    """A video file that cannot be used: missing, not a video, corrupt, no video stream, too short, unwritable."""


# ----------------------------------------------------------------------------------------------------------------------
# Frame-count and size rules.
# ----------------------------------------------------------------------------------------------------------------------


def nearest_valid_frames(n: int, *, temporal: int = TEMPORAL_STRIDE) -> int:
    """The 4k+1 frame count nearest to `n` (at least 1; a tie goes to the larger one)."""
    n = int(n)
    if n <= 1:
        return 1
    k = (n - 1) // temporal
    lo, hi = k * temporal + 1, (k + 1) * temporal + 1
    return lo if n - lo < hi - n else hi


def longest_valid_prefix(n: int, *, temporal: int = TEMPORAL_STRIDE) -> int:
    """The largest 4k+1 count <= n (0 when n < 1)."""
    return 0 if n < 1 else (n - 1) // temporal * temporal + 1


def _nearest_multiple(n: int, m: int) -> int:
    return max(m, int(round(n / m)) * m)


def check_video_size(frames: int, height: int, width: int, *, spatial: int = SPATIAL_STRIDE,
                     temporal: int = TEMPORAL_STRIDE) -> None:
    """Raises ValueError naming every bad value and its nearest valid one: frames must be 4n+1, height and width
    positive multiples of 16."""
    problems = []
    if frames < 1 or (frames - 1) % temporal:
        problems.append(f"frames={frames} is not {temporal}n+1 (nearest valid: {nearest_valid_frames(frames)})")
    for name, value in (("height", height), ("width", width)):
        if value < spatial or value % spatial:
            problems.append(f"{name}={value} is not a positive multiple of {spatial} "
                            f"(nearest valid: {_nearest_multiple(value, spatial)})")
    if problems:
        raise ValueError("; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What the container says about its first video stream (`num_frames` and `fps` may be estimates)."""

    height: int
    width: int
    fps: float
    num_frames: int
    duration: float  # seconds


def _open(path: str | os.PathLike):
    import av

    p = Path(path)
    if not p.exists():
        raise VideoError(f"video file {str(p)!r} does not exist")
    if not p.is_file():
        raise VideoError(f"video path {str(p)!r} is not a file")
    try:
        container = av.open(str(p), "r")
    except av.FFmpegError as e:
        raise VideoError(f"{str(p)!r} is not a readable video (not a video file, or corrupt): "
                         f"{getattr(e, 'strerror', None) or e}") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{str(p)!r} has no video stream")
    return container


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Opens `path` and decodes its first frame: a cheap check that it is a usable video, before any model loads."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(f"{str(path)!r} is corrupt: {e}") from e
        if first is None:
            raise VideoError(f"{str(path)!r} has a video stream but no frame could be decoded (corrupt or truncated)")
        rate = float(stream.average_rate or stream.guessed_rate or 0.0)
        duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
        if not duration and container.duration:
            duration = container.duration / 1_000_000  # AV_TIME_BASE
        num_frames = stream.frames or (int(round(duration * rate)) if rate else 0)
        return VideoInfo(height=first.height, width=first.width, fps=rate, num_frames=int(num_frames),
                         duration=duration)


def _resize_crop(image: Image.Image, height: int | None, width: int | None) -> np.ndarray:
    """Scale so the short side covers height x width (aspect kept), centre-crop; one antialiased resample of just the
    source box that the crop keeps."""
    if height is None:
        return np.asarray(image, dtype=np.uint8)
    src_w, src_h = image.size
    if src_w * height >= src_h * width:  # source wider than target: full height, crop the sides
        box_h, box_w = float(src_h), src_h * width / height
    else:
        box_w, box_h = float(src_w), src_w * height / width
    left, top = (src_w - box_w) / 2, (src_h - box_h) / 2
    out = image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h),
                       reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def _span_end(prev, period: float) -> float:
    """The last sample time a decoded frame stands for: its start plus (duration / nominal period - 1) periods."""
    _, start, duration, _ = prev
    if not duration or not math.isfinite(period):
        return start
    return start + max(0.0, duration - period)


def read_video(path: str | os.PathLike, *, fps: float = 16, num_frames: int | None = None,
               height: int | None = None, width: int | None = None,
               max_frames: int | None = None) -> UInt8[np.ndarray, "F H W 3"]:
    """Decodes `path` to RGB frames resampled to `fps` (nearest frame by timestamp).

    num_frames: exactly this many frames from the start (VideoError naming the clip's length at `fps` when it is
    shorter). None: the longest 4n+1 prefix, of at most `max_frames` frames when that is given.
    height, width: both or neither; resize keeping the aspect ratio so the short side covers, then centre-crop.
    """
    import av

    if not fps or fps <= 0:
        raise ValueError(f"read_video: fps must be positive, got {fps}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"read_video: num_frames must be >= 1, got {num_frames}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"read_video: max_frames must be >= 1, got {max_frames}")
    if (height is None) != (width is None):
        raise ValueError(f"read_video: give both height and width or neither, got height={height} width={width}")
    if height is not None and (height < 1 or width < 1):
        raise ValueError(f"read_video: height and width must be positive, got {height}x{width}")
    limit = num_frames if num_frames is not None else max_frames

    out: list[np.ndarray] = []
    cache: tuple[int, np.ndarray] | None = None  # (decoded index, processed frame): a repeated pick costs nothing

    def emit(index: int, frame) -> None:
        nonlocal cache
        if cache is None or cache[0] != index:
            cache = (index, _resize_crop(frame.to_image(), height, width))
        out.append(cache[1])

    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 0.0)
        t0 = None
        prev = None  # (index, start time, duration or None, frame) of the last decoded frame
        period = math.inf  # the shortest frame duration seen: the clip's nominal frame period
        last_duration = None
        index = -1
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time
                if t is None:  # no timestamps: assume a constant rate
                    t = index / (rate or fps)
                if t0 is None:
                    t0 = t
                t -= t0
                duration = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else None
                if duration:
                    last_duration = duration
                    period = min(period, duration)
                # Emit every output time up to this frame's timestamp, from whichever of this frame and the previous
                # one is nearer. A frame held for k nominal periods (GIF encoders merge repeated frames) stands for
                # k samples, so it is at distance 0 from the span [start, start + (k - 1) * period].
                while limit is None or len(out) < limit:
                    target = len(out) / fps
                    if target > t + 1e-9:
                        break
                    if prev is not None and max(0.0, target - _span_end(prev, period)) <= t - target + 1e-9:
                        emit(prev[0], prev[3])  # nearer, or a tie: the earlier frame
                    else:
                        emit(index, frame)
                if limit is not None and len(out) >= limit:
                    break
                prev = (index, t, duration, frame)
        except av.FFmpegError as e:
            raise VideoError(f"{str(path)!r} is corrupt: decoding failed after {index + 1} frames: {e}") from e
        if prev is None and not out:
            raise VideoError(f"{str(path)!r} has a video stream but no frame could be decoded (corrupt or truncated)")
        if limit is None or len(out) < limit:
            # The last frame holds until its timestamp plus its duration.
            if last_duration is None:
                last_duration = 1.0 / rate if rate else 1.0 / fps
            end = prev[1] + last_duration
            while (limit is None or len(out) < limit) and len(out) / fps < end - 1e-9:
                emit(prev[0], prev[3])

    available = len(out)
    if num_frames is not None:
        if available < num_frames:
            raise VideoError(f"{str(path)!r} is too short: {available} frames at {fps:g} fps, "
                             f"{num_frames} needed")
        frames = out[:num_frames]
    else:
        keep = longest_valid_prefix(available)
        frames = out[:keep]
    return np.stack(frames)


# ----------------------------------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------------------------------


def _to_uint8(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: frames must be [F, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] < 1:
        raise ValueError("write_video: no frames to write")
    if frames.dtype == np.uint8:
        return frames
    if np.issubdtype(frames.dtype, np.floating) or frames.dtype.name == "bfloat16":
        frames = frames.astype(np.float32)
        if not np.isfinite(frames).all():
            raise ValueError("write_video: frames contain NaN or inf")
        return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"write_video: frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")


def _write_mp4(tmp: str, frames: np.ndarray, fps: float) -> None:
    import av

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"write_video: H.264 (yuv420p) needs even height and width, got {h}x{w}")
    with av.open(tmp, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": _MP4_CRF}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)


def _write_gif(tmp: str, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0)


def write_video(path: str | os.PathLike, frames: UInt8[np.ndarray, "F H W 3"] | Float[np.ndarray, "F H W 3"], *,
                fps: float = 16) -> Path:
    """Writes frames to `path`: `.mp4` -> H.264 (libx264, yuv420p), `.gif` -> Pillow. Atomic: a hidden temp file in
    the same folder renamed into place when complete; on any failure nothing is left at `path`. Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_EXTENSIONS:
        raise VideoError(f"cannot write {str(path)!r}: unknown video extension {path.suffix!r}, "
                         f"use one of {WRITE_EXTENSIONS}")
    if not fps or fps <= 0:
        raise ValueError(f"write_video: fps must be positive, got {fps}")
    frames = _to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL claims a fresh name; mode 0o666 under the umask gives the permissions a plain open() would.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        (_write_mp4 if suffix == ".mp4" else _write_gif)(tmp, frames, fps)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
