"""Toy-world evaluation: V2T by parsing generated captions, T2V by an independent detector on generated frames.

V2T: `parse_caption` reads each attribute from its cue in the sentence ("moves <motion>", "on a <background>
background", "along the / through the <position>", ...), independently of the others, so a half-right caption earns
partial credit; an attribute that is missing or stated twice differently parses as None (wrong).

T2V: `detect_attributes` looks only at pixels. It never sees the generator's parameters (half-extents, speeds, lane
centres, palette): the background is the median border colour, the shape is whatever differs from it, colours are
named by the nearest standard sRGB colour, and every threshold is a fraction of the frame (the shape is the largest
connected blob of pixels far from the background colour, so isolated specks of sampling noise do not count):
  colour      nearest of red / green / blue / yellow to the mean foreground colour
  background  nearest of black / gray / white to the median border colour's grey level
  motion      sign and axis of the centroid's least-squares velocity
  speed       centroid travel over the clip: more than 3/8 of the frame is fast
  size        bounding-box extent: more than 3/8 of the frame is large
  shape       fill of the bounding box: ≥ 0.93 square, ≤ 0.67 triangle (about 1/2 filled), otherwise circle (≈ π/4)
  position    bounding-box centre across the motion, in thirds of the frame
It is validated on ground-truth videos (tests: ≥ 99 % on every attribute), which is what makes its verdict on
generated videos meaningful.

Metrics are flat dicts {attribute: accuracy, "exact_match": fraction with every attribute right, "count": n},
written as JSON by `write_metrics`. Chance levels (`chance_levels`) put them in context.

Shape letters: N videos, F frames, H/W pixels.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.ndimage

from uvigu.data.world import ATTRIBUTES, LANES, POSITIONS, SPEED_ADVERBS, WorldSpec

# Standard sRGB colours in [−1, 1]: the detector's own table, not the generator's.
_NAMED_COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
                  "yellow": (1.0, 1.0, -1.0)}
_NAMED_GREYS = {"black": -1.0, "gray": 0.0, "white": 1.0}
# A pixel is the shape's if its colour is further than this (Euclidean, in [−1, 1] RGB) from the background: half the
# smallest distance between a named colour and a grey (√3, any colour vs gray), so blur and noise split evenly.
FOREGROUND_THRESHOLD = 0.85
MIN_AREA = 3  # pixels: frames where less is detected do not count
TRAVEL_FAST = 3 / 8  # of the frame, over the clip
EXTENT_LARGE = 3 / 8  # of the frame
FILL_SQUARE = 0.93
FILL_TRIANGLE = 0.67


# ----------------------------------------------------------------------------------------------------------------------
# V2T: captions.
# ----------------------------------------------------------------------------------------------------------------------


def parse_caption(text: str, spec: WorldSpec | None = None) -> dict[str, str | None]:
    """Attributes stated in a caption or prompt; None where an attribute is absent or stated inconsistently."""
    spec = spec or WorldSpec()
    speed_of = {SPEED_ADVERBS[s]: s for s in spec.speeds}
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, set[str]] = {name: set() for name in ATTRIBUTES}
    for i, word in enumerate(words):
        before = words[i - 1] if i >= 1 else ""
        after = words[i + 1] if i + 1 < len(words) else ""
        if word in spec.shapes:
            found["shape"].add(word)
        if word in spec.sizes:
            found["size"].add(word)
        if word in spec.colours and after != "background":
            found["colour"].add(word)
        if word in spec.backgrounds and after == "background":
            found["background"].add(word)
        if word in spec.motions and before == "moves":
            found["motion"].add(word)
        if word in speed_of:
            found["speed"].add(speed_of[word])
        if word in POSITIONS and before == "the" and i >= 2 and words[i - 2] in ("along", "through"):
            found["position"].add(word)
    return {name: next(iter(values)) if len(values) == 1 else None for name, values in found.items()}


def _accuracy(predicted: Sequence[Mapping[str, Any]], true: Sequence[Mapping[str, str]],
              attributes: Sequence[str]) -> dict[str, float | int]:
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} examples")
    if not true:
        raise ValueError("no examples to score")
    correct = np.array([[p.get(a) == t[a] for a in attributes] for p, t in zip(predicted, true)], bool)
    metrics: dict[str, float | int] = {a: float(correct[:, j].mean()) for j, a in enumerate(attributes)}
    metrics["exact_match"] = float(correct.all(axis=1).mean())
    metrics["count"] = len(true)
    return metrics


def caption_accuracy(predicted_texts: Sequence[str], true_attributes: Sequence[Mapping[str, str]],
                     attributes: Sequence[str] = ATTRIBUTES, spec: WorldSpec | None = None) -> dict[str, float | int]:
    """Per-attribute accuracy of parsed captions, and exact match (every scored attribute right). Score a stage-1
    prompt with `attributes=PROMPT_ATTRIBUTES`."""
    return _accuracy([parse_caption(t, spec) for t in predicted_texts], true_attributes, attributes)


# ----------------------------------------------------------------------------------------------------------------------
# T2V: frames.
# ----------------------------------------------------------------------------------------------------------------------


def _nearest(value: np.ndarray, table: Mapping[str, Any]) -> str:
    names = list(table)
    distances = [np.sum((np.asarray(table[n], np.float32) - value) ** 2) for n in names]
    return names[int(np.argmin(distances))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of a [H, W] mask: the shape, without specks of noise that would stretch its
    bounding box."""
    labels, count = scipy.ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def detect_attributes(video) -> dict[str, str | None]:
    """video [F, H, W, 3] in [−1, 1] -> the seven attributes read from its pixels (None: no shape found)."""
    v = np.clip(np.asarray(video, np.float32), -1.0, 1.0)
    if v.ndim != 4 or v.shape[-1] != 3:
        raise ValueError(f"expected a video [F, H, W, 3], got shape {v.shape}")
    frames, height, width, _ = v.shape
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)

    border = np.concatenate([v[:, 0], v[:, -1], v[:, :, 0], v[:, :, -1]], axis=1).reshape(-1, 3)
    background = np.median(border, axis=0)
    out["background"] = _nearest(np.float32(background.mean()), _NAMED_GREYS)

    differs = np.linalg.norm(v - background, axis=-1) > FOREGROUND_THRESHOLD  # [F, H, W]
    foreground = np.stack([_largest_component(m) for m in differs])
    areas = foreground.sum(axis=(1, 2))
    seen = np.flatnonzero(areas >= MIN_AREA)
    if len(seen) < 2:
        return out
    out["colour"] = _nearest(v[seen][foreground[seen]].mean(axis=0), _NAMED_COLOURS)

    rows, cols = np.mgrid[:height, :width]
    centroids, centres, extents, fills = [], [], [], []
    for f in seen:
        mask = foreground[f]
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        box_h, box_w = ys[-1] - ys[0] + 1, xs[-1] - xs[0] + 1
        centroids.append((rows[mask].mean(), cols[mask].mean()))
        centres.append(((ys[0] + ys[-1]) / 2, (xs[0] + xs[-1]) / 2))
        extents.append(max(box_h, box_w))
        fills.append(areas[f] / (box_h * box_w))
    centroids, centres = np.asarray(centroids), np.asarray(centres)
    vy, vx = np.polyfit(seen.astype(np.float64), centroids, 1)[0]  # pixels per frame

    horizontal = abs(vx) >= abs(vy)
    along, across, velocity = (width, height, vx) if horizontal else (height, width, vy)
    out["motion"] = ("right" if vx > 0 else "left") if horizontal else ("down" if vy > 0 else "up")
    out["speed"] = "fast" if abs(velocity) * (frames - 1) / along > TRAVEL_FAST else "slow"
    out["size"] = "large" if np.median(extents) / min(height, width) > EXTENT_LARGE else "small"
    fill = float(np.median(fills))
    out["shape"] = "square" if fill >= FILL_SQUARE else "triangle" if fill <= FILL_TRIANGLE else "circle"
    cross = np.median(centres[:, 0] if horizontal else centres[:, 1]) / (across - 1)
    lane = 0 if cross < 1 / 3 else 2 if cross > 2 / 3 else 1
    out["position"] = LANES["horizontal" if horizontal else "vertical"][lane]
    return out


def video_accuracy(videos, true_attributes: Sequence[Mapping[str, str]],
                   attributes: Sequence[str] = ATTRIBUTES) -> dict[str, float | int]:
    """videos [N, F, H, W, 3] in [−1, 1] -> per-attribute accuracy of `detect_attributes`, and exact match. Score
    T2V samples with `attributes=PROMPT_ATTRIBUTES` (the prompt fixes only those)."""
    return _accuracy([detect_attributes(v) for v in videos], true_attributes, attributes)


def joint_agreement(videos, captions: Sequence[str], attributes: Sequence[str] = ("shape", "colour", "motion"),
                    spec: WorldSpec | None = None) -> dict[str, float | int]:
    """Joint generation, scored without ground truth: how often the caption generated with a video says what the
    detector reads in that video. Per attribute, the fraction of pairs where both give the same value (an attribute
    the caption or the detector cannot give counts as a disagreement); `agreement` is their mean over `attributes`,
    `exact_match` the fraction of pairs agreeing on all of them."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(videos)} videos")
    if not len(captions):
        raise ValueError("no pairs to score")
    agree = np.array([[d[a] is not None and d[a] == p[a] for a in attributes]
                      for d, p in zip((detect_attributes(v) for v in videos),
                                      (parse_caption(t, spec) for t in captions))], bool)
    metrics: dict[str, float | int] = {a: float(agree[:, j].mean()) for j, a in enumerate(attributes)}
    metrics["agreement"] = float(agree.mean())
    metrics["exact_match"] = float(agree.all(axis=1).mean())
    metrics["count"] = len(captions)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# Context and output.
# ----------------------------------------------------------------------------------------------------------------------


def chance_levels(spec: WorldSpec | None = None, attributes: Sequence[str] = ATTRIBUTES) -> dict[str, float]:
    """Accuracy of a uniform guess per attribute (position: 1/3, one of three lanes for the motion's axis)."""
    spec = spec or WorldSpec()
    return {a: spec.chance_level(a) for a in attributes}


def write_metrics(path: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Writes metrics as indented, key-sorted JSON, atomically (a crashed run never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(metrics, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
