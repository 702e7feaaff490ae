"""uvigu.data.video: write/read round trips (MP4, GIF), timestamp resampling, resize + centre-crop geometry, the 4n+1
and /16 rules, and the errors (missing, corrupt, truncated, no video stream, too short, failed writes)."""

import math
import os

import av
import numpy as np
import pytest
from PIL import Image

from uvigu.data import video as V

STEP = 8  # grey level per frame index: frame i is uniformly i * STEP, so a decoded frame names its source index


def grey_clip(n, h=32, w=48):
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = i * STEP
    return frames


def frame_ids(frames):
    """Source index of every decoded grey frame (H.264 / palette rounding is far below STEP / 2)."""
    levels = frames.reshape(len(frames), -1).mean(-1)
    ids = np.round(levels / STEP).astype(int)
    assert np.all(np.abs(levels - ids * STEP) < STEP / 4), levels
    return ids.tolist()


def nearest_earlier_on_tie(k, out_fps, src_fps):
    return math.ceil(k * src_fps / out_fps - 0.5)


def no_leftovers(folder):
    return [p for p in os.listdir(folder) if p.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------------
# Round trips.
# ---------------------------------------------------------------------------------------------------------------------


def test_mp4_round_trip(tmp_path):
    clip = grey_clip(17)
    path = V.write_video(tmp_path / "a.mp4", clip, fps=16)
    assert path == tmp_path / "a.mp4" and no_leftovers(tmp_path) == []
    out = V.read_video(path, fps=16)
    assert out.shape == (17, 32, 48, 3) and out.dtype == np.uint8
    assert frame_ids(out) == list(range(17))
    assert np.abs(out.astype(int) - clip).max() <= 3
    info = V.probe_video(path)
    assert (info.height, info.width, info.fps, info.num_frames) == (32, 48, 16.0, 17)


def test_float_frames_are_scaled_and_clipped(tmp_path):
    clip = grey_clip(5).astype(np.float32) / 255.0
    clip[0] = -1.0  # clipped to 0
    clip[1] = 2.0  # clipped to 1 (255)
    out = V.read_video(V.write_video(tmp_path / "f.mp4", clip, fps=16), fps=16)
    means = out.reshape(5, -1).mean(-1)
    assert means[0] < 3 and means[1] > 250 and abs(means[4] - 4 * STEP) < 2


def test_gif_round_trip_with_merged_frames(tmp_path):
    # Identical consecutive frames are merged into one longer GIF frame by Pillow; timestamps must restore them.
    ids = [0, 0, 0, 1, 2, 2, 3, 4, 5]
    clip = grey_clip(6)[ids]
    path = V.write_video(tmp_path / "a.gif", clip, fps=10)  # 100 ms frames: exact in GIF's 1/100 s units
    with av.open(str(path)) as c:
        stored = sum(1 for _ in c.decode(video=0))
    assert stored < len(ids)  # the merge did happen, so the check below tests the timestamp path
    out = V.read_video(path, fps=10)
    assert out.shape == (9, 32, 48, 3)
    assert frame_ids(out) == ids


# ---------------------------------------------------------------------------------------------------------------------
# Resampling by timestamps and the 4n+1 prefix.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip30(tmp_path_factory):
    """1 s at 30 fps: 30 frames."""
    return V.write_video(tmp_path_factory.mktemp("c30") / "c30.mp4", grey_clip(30), fps=30)


def test_downsample_30_to_16_fps(clip30):
    out = V.read_video(clip30, fps=16, num_frames=16)  # 1 s at 16 fps = 16 frames
    assert frame_ids(out) == [nearest_earlier_on_tie(k, 16, 30) for k in range(16)]
    assert frame_ids(out)[:5] == [0, 2, 4, 6, 7]  # 4 * 30 / 16 = 7.5: a tie keeps the earlier frame
    with pytest.raises(V.VideoError, match=r"16 frames at 16 fps, 17 needed"):
        V.read_video(clip30, fps=16, num_frames=17)


def test_default_takes_longest_4n_plus_1_prefix(clip30):
    out = V.read_video(clip30, fps=16)  # 16 available -> 13
    assert len(out) == 13 and frame_ids(out) == [nearest_earlier_on_tie(k, 16, 30) for k in range(13)]
    assert len(V.read_video(clip30, fps=30)) == 29
    assert len(V.read_video(clip30, fps=16, max_frames=12)) == 9  # the longest 4n+1 prefix up to 12


def test_upsample_repeats_nearest(clip30):
    out = V.read_video(clip30, fps=60, num_frames=9)
    assert frame_ids(out) == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_nearest_valid_frames_and_size_rules():
    table = {-3: 1, 0: 1, 1: 1, 2: 1, 3: 5, 4: 5, 5: 5, 6: 5, 78: 77, 79: 81, 80: 81, 81: 81}
    assert {n: V.nearest_valid_frames(n) for n in table} == table
    assert [V.longest_valid_prefix(n) for n in (0, 1, 4, 5, 8, 9, 16)] == [0, 1, 1, 5, 5, 9, 13]
    V.check_video_size(81, 480, 832)
    with pytest.raises(ValueError, match=r"frames=80 is not 4n\+1 \(nearest valid: 81\)"):
        V.check_video_size(80, 480, 832)
    with pytest.raises(ValueError, match=r"height=481 .*multiple of 16 \(nearest valid: 480\).*width=830 .*832"):
        V.check_video_size(81, 481, 830)


# ---------------------------------------------------------------------------------------------------------------------
# Resize + centre crop.
# ---------------------------------------------------------------------------------------------------------------------


def banded(h, w):
    """Red first quarter, blue last quarter along the long side, green middle with a white 8x8 marker at the centre."""
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (0, 200, 0)
    if w >= h:
        img[:, : w // 4] = (200, 0, 0)
        img[:, 3 * w // 4:] = (0, 0, 200)
    else:
        img[: h // 4] = (200, 0, 0)
        img[3 * h // 4:] = (0, 0, 200)
    img[h // 2 - 4: h // 2 + 4, w // 2 - 4: w // 2 + 4] = 255
    return img


@pytest.mark.parametrize("src,dst", [((64, 128), (32, 32)), ((128, 64), (32, 32)), ((64, 128), (32, 64)),
                                     ((48, 64), (96, 128))])
def test_resize_crop_geometry(src, dst):
    img = banded(*src)
    out = V._resize_crop(Image.fromarray(img), *dst)
    assert out.shape == (*dst, 3)
    h, w = dst
    sh, sw = src
    # Reference: the covering scale, then the kept box's content, sampled at the output pixel centres.
    scale = max(h / sh, w / sw)
    ys = ((np.arange(h) + 0.5) / scale + (sh - h / scale) / 2).astype(int)
    xs = ((np.arange(w) + 0.5) / scale + (sw - w / scale) / 2).astype(int)
    expect = img[ys][:, xs]
    # Pixels away from colour edges match exactly up to interpolation rounding; edges differ by the filter only.
    close = np.abs(out.astype(int) - expect).max(-1) <= 2
    assert close.mean() > 0.8, close.mean()
    centre = out[h // 2 - 1: h // 2 + 1, w // 2 - 1: w // 2 + 1]
    assert centre.min() > 240  # the marker stays centred


def test_read_resizes_and_crops_file(tmp_path):
    clip = np.stack([banded(64, 128)] * 5)
    path = V.write_video(tmp_path / "wide.mp4", clip, fps=16)
    out = V.read_video(path, fps=16, height=32, width=32)
    assert out.shape == (5, 32, 32, 3)
    # A square crop of a 1:2 frame keeps only the green middle: no red or blue band at the sides.
    sides = out[:, :, [0, 1, -2, -1]].astype(int)
    assert (sides[..., 1] > 150).all() and (sides[..., 0] < 60).all() and (sides[..., 2] < 60).all()
    assert out[:, 15:17, 15:17].min() > 200
    with pytest.raises(ValueError, match="both height and width"):
        V.read_video(path, height=32)


# ---------------------------------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------------------------------


def test_read_errors(tmp_path, clip30):
    with pytest.raises(V.VideoError, match="missing.mp4.*does not exist"):
        V.read_video(tmp_path / "missing.mp4")
    with pytest.raises(V.VideoError, match="not a file"):
        V.read_video(tmp_path)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(V.VideoError, match="junk.mp4.*not a readable video"):
        V.read_video(junk)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(V.VideoError, match="empty.mp4"):
        V.read_video(empty)
    data = clip30.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(V.VideoError, match="truncated.mp4"):
        V.read_video(truncated)
    with pytest.raises(V.VideoError, match="truncated.mp4"):
        V.probe_video(truncated)
    with pytest.raises(V.VideoError, match="too short"):
        V.read_video(clip30, fps=16, num_frames=81)
    assert issubclass(V.VideoError, ValueError)


def test_no_video_stream(tmp_path):
    wav = tmp_path / "tone.wav"
    with av.open(str(wav), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(V.VideoError, match="tone.wav.*no video stream"):
        V.read_video(wav)
    with pytest.raises(V.VideoError, match="no video stream"):
        V.probe_video(wav)


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    clip = grey_clip(5)
    with pytest.raises(V.VideoError, match=r"unknown video extension '.avi'"):
        V.write_video(tmp_path / "a.avi", clip)
    with pytest.raises(ValueError, match="even height and width"):
        V.write_video(tmp_path / "odd.mp4", grey_clip(5, 31, 48))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        V.write_video(tmp_path / "bad.mp4", clip[..., :2])
    with pytest.raises(ValueError, match="NaN"):
        V.write_video(tmp_path / "nan.gif", np.full((2, 16, 16, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="dtype int64"):
        V.write_video(tmp_path / "int.gif", clip.astype(np.int64))
    assert os.listdir(tmp_path) == []

    # An encoder that dies half way: its partial output must vanish, and an older file at the path must survive.
    good = V.write_video(tmp_path / "keep.mp4", clip, fps=16)
    before = good.read_bytes()
    real = V._write_mp4

    def dies(tmp, frames, fps):
        real(tmp, frames[:2], fps)
        raise RuntimeError("encoder died")

    monkeypatch.setattr(V, "_write_mp4", dies)
    with pytest.raises(RuntimeError, match="encoder died"):
        V.write_video(tmp_path / "keep.mp4", clip, fps=16)
    with pytest.raises(RuntimeError, match="encoder died"):
        V.write_video(tmp_path / "new.mp4", clip, fps=16)
    assert sorted(os.listdir(tmp_path)) == ["keep.mp4"]
    assert good.read_bytes() == before
