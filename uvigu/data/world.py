"""The 'moving shapes' toy world: scenes, their videos, short prompts and detailed captions (DESIGN §7).

A scene is one shape of one colour gliding in a straight line across a plain background. The short prompt names only
shape, colour and motion ("a red circle moves left"); the detailed caption adds what only the video shows: size,
speed, the lane the shape travels along, and the background ("a large red circle moves left slowly along the top on
a gray background"). Stage 2 can therefore only get the caption right by looking at the video.

Size: 5 frames of 16 x 16 pixels by default, shapes 5 or 7 pixels wide moving 1 or 2 pixels per frame. The world is
this small because of what a DiT token must carry: the toy codec is lossless (space-to-depth 2: 8 x 8 x 12 latents),
so a (1, 2, 2) patch is 48 values, and a DiT can only denoise a token whose values fit in its width (the head maps
D features to the patch's values: with D below that, part of the noise is out of its reach and is never removed).
The earlier 9 x 32 x 32 world, with (3, 2, 2) patches of 576 values into a 64-wide DiT, left 89 % of the noise in
every sample. 16 x 16 x 5 is the smallest world whose shapes the detector still tells apart (a 5-pixel square,
circle and triangle fill 1.0, 0.84 and 0.52 of their box), in 80 tokens.

Geometry (pixel centres at integer coordinates, hard edges, values exactly in {−1, 0, 1} so the codec round trip is
exact): a shape of half-extent h covers the pixels within h of its centre, so it spans 2h + 1 pixels and stays in
frame while its centre is in [h, L − 1 − h]. It moves v pixels per frame along the motion axis; its start along that
axis is drawn uniformly from the positions that keep the whole path in frame (a nuisance variable, not an attribute).
Across the motion axis it travels in one of three lanes: the lowest in-frame centre, the middle one, or the highest,
each jittered by up to one pixel inwards (the middle lane either way), so many distinct videos share one caption.

Splits: train and validation draw (shape, colour, motion) from every combination except the held-out ones; the test
split draws only held-out combinations (the compositional test: every pair inside a held-out triple does occur in
training, the triple never). Validation never repeats a training scene (the exact video), by rejection.

Everything is a pure function of the frozen `WorldSpec` (seeded per split and per example), so any example can be
regenerated alone, in any order, in any process.

Shape letters: F frames, H/W pixels.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
from typing import Mapping

import numpy as np

# Bumped whenever the generator's output changes for an unchanged spec; part of every cache key.
GENERATOR_VERSION = 1

ATTRIBUTES = ("shape", "colour", "motion", "size", "speed", "position", "background")
PROMPT_ATTRIBUTES = ATTRIBUTES[:3]
CAPTION_ONLY_ATTRIBUTES = ATTRIBUTES[3:]
SPLITS = ("train", "validation", "test")

# RGB in [−1, 1]. Every shape colour has one channel at −1 and one at +1 and every background is a neutral level, so
# a shape differs from a gray background by 1 in every channel and from black or white by 2 in some channel.
COLOUR_RGB: Mapping[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
BACKGROUND_RGB: Mapping[str, tuple[float, float, float]] = {
    "black": (-1.0, -1.0, -1.0),
    "gray": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
# (dy, dx) per frame, image convention: y grows downwards.
MOTION_VECTORS: Mapping[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SHAPES = ("circle", "square", "triangle")
SPEED_ADVERBS: Mapping[str, str] = {"slow": "slowly", "fast": "quickly"}
# The lane is named across the motion axis: a horizontal mover is at the top / middle / bottom, a vertical one at the
# left / middle / right. Index 0 is the lowest coordinate.
LANES: Mapping[str, tuple[str, str, str]] = {"horizontal": ("top", "middle", "bottom"),
                                              "vertical": ("left", "middle", "right")}
POSITIONS = ("top", "middle", "bottom", "left", "right")


def motion_axis(motion: str) -> str:
    """'horizontal' for left/right, 'vertical' for up/down."""
    return "horizontal" if MOTION_VECTORS[motion][0] == 0 else "vertical"


@dataclasses.dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the toy world's bytes on disk; hashed into the cache key (`fingerprint`).

    `half_extents[i]` is the half-size in pixels of `sizes[i]`, `pixel_speeds[i]` the pixels per frame of
    `speeds[i]`. `codec_mean` / `codec_std` are the per-RGB-channel pixel statistics of the training split, measured
    once (`pixel_statistics`) and frozen here so the codec is a fixed affine map (changing the world does not silently
    change the latent scale; a test checks they still match the default world).
    """

    seed: int = 0
    frames: int = 5
    height: int = 16
    width: int = 16
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    motions: tuple[str, ...] = ("left", "right", "up", "down")
    sizes: tuple[str, ...] = ("small", "large")
    speeds: tuple[str, ...] = ("slow", "fast")
    backgrounds: tuple[str, ...] = ("black", "gray", "white")
    half_extents: tuple[int, ...] = (2, 3)
    pixel_speeds: tuple[int, ...] = (1, 2)
    # (shape, colour, motion) triples seen only in the test split. No two share two attributes, so every pair inside
    # a held-out triple is still seen in training.
    held_out: tuple[tuple[str, str, str], ...] = (
        ("circle", "red", "left"),
        ("square", "green", "up"),
        ("triangle", "blue", "right"),
        ("circle", "yellow", "down"),
        ("square", "blue", "left"),
        ("triangle", "yellow", "up"),
    )
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    examples_per_shard: int = 500
    prompt_len: int = 16
    caption_len: int = 16
    tokenizer_max_vocab: int = 128
    codec_factor: int = 2
    codec_mean: tuple[float, float, float] = (0.012, 0.008, -0.055)
    codec_std: tuple[float, float, float] = (0.840, 0.840, 0.837)

    def __post_init__(self):
        for name, values, known in (("shapes", self.shapes, SHAPES), ("colours", self.colours, COLOUR_RGB),
                                    ("motions", self.motions, MOTION_VECTORS), ("speeds", self.speeds, SPEED_ADVERBS),
                                    ("backgrounds", self.backgrounds, BACKGROUND_RGB)):
            unknown = [v for v in values if v not in known]
            if unknown or not values or len(set(values)) != len(values):
                raise ValueError(f"WorldSpec.{name} = {values}: values must be distinct and among {tuple(known)}")
        if len(self.half_extents) != len(self.sizes) or len(self.pixel_speeds) != len(self.speeds):
            raise ValueError("WorldSpec: one half-extent per size and one pixel speed per speed")
        if self.frames < 2:
            raise ValueError(f"WorldSpec.frames = {self.frames}: motion needs at least 2 frames")
        for h in self.half_extents:
            for v in self.pixel_speeds:
                path = v * (self.frames - 1)
                for length in (self.height, self.width):
                    if (length - 1 - h) - h < path or (length - 1 - h) - h < 4:
                        raise ValueError(f"WorldSpec: a shape of half-extent {h} moving {v} px/frame for "
                                         f"{self.frames} frames does not fit {length} px with three lanes")
        if self.height % self.codec_factor or self.width % self.codec_factor:
            raise ValueError(f"WorldSpec: {self.height}x{self.width} is not divisible by codec_factor "
                             f"{self.codec_factor}")
        combos = set(itertools.product(self.shapes, self.colours, self.motions))
        held = set(self.held_out)
        if not held <= combos or len(held) != len(self.held_out) or held == combos:
            raise ValueError("WorldSpec.held_out must be distinct (shape, colour, motion) triples of this world, "
                             "and not all of them")
        train = combos - held
        for triple in held:
            for keep in itertools.combinations(range(3), 2):
                if not any(all(t[k] == triple[k] for k in keep) for t in train):
                    raise ValueError(f"WorldSpec.held_out: the pair {tuple(triple[k] for k in keep)} of {triple} "
                                     "never occurs in training, so the test split would not be compositional")
        if min(self.num_train, self.num_validation, self.num_test, self.examples_per_shard) < 1:
            raise ValueError("WorldSpec: split sizes and examples_per_shard must be positive")

    def fingerprint(self) -> str:
        """sha256 of the spec and the generator version: equal fingerprints mean byte-identical worlds."""
        blob = json.dumps({"generator_version": GENERATOR_VERSION, "spec": dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def split_size(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[_check(split)]

    def values(self, attribute: str) -> tuple[str, ...]:
        """The values an attribute takes in this world (position: the lane names of both axes)."""
        if attribute == "position":
            return POSITIONS
        return {"shape": self.shapes, "colour": self.colours, "motion": self.motions, "size": self.sizes,
                "speed": self.speeds, "background": self.backgrounds}[attribute]

    def chance_level(self, attribute: str) -> float:
        """Accuracy of a uniform guess among the values possible for one example (position: 3 lanes per axis)."""
        return 1.0 / (3 if attribute == "position" else len(self.values(attribute)))

    def combinations(self, split: str) -> tuple[tuple[str, str, str], ...]:
        """The (shape, colour, motion) triples a split draws from, in a fixed order."""
        held = set(self.held_out)
        every = itertools.product(self.shapes, self.colours, self.motions)
        if _check(split) == "test":
            return tuple(t for t in every if t in held)
        return tuple(t for t in every if t not in held)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One example's attributes plus its two nuisance offsets (which make distinct videos share a caption)."""

    shape: str
    colour: str
    motion: str
    size: str
    speed: str
    position: str
    background: str
    lane_offset: int  # pixels across the motion axis, relative to the lane's nominal centre
    start: int  # the centre's coordinate along the motion axis at frame 0

    @property
    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ATTRIBUTES}


def attribute_ids(spec: WorldSpec, attributes: Mapping[str, str]) -> np.ndarray:
    """int32 [len(ATTRIBUTES)]: each attribute's index among its values (position: the lane index 0..2)."""
    out = []
    for name in ATTRIBUTES:
        if name == "position":
            out.append(LANES[motion_axis(attributes["motion"])].index(attributes["position"]))
        else:
            out.append(spec.values(name).index(attributes[name]))
    return np.asarray(out, np.int32)


def _check(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
    return split


def _bounds(half: int, length: int) -> tuple[int, int]:
    """The centre positions that keep a shape of half-extent `half` inside `length` pixels."""
    return half, length - 1 - half


def _lane_centres(half: int, length: int) -> tuple[int, int, int]:
    lo, hi = _bounds(half, length)
    return lo, (lo + hi) // 2, hi


def _axis_lengths(spec: WorldSpec, motion: str) -> tuple[int, int]:
    """(along, across) lengths in pixels for a motion."""
    return (spec.width, spec.height) if motion_axis(motion) == "horizontal" else (spec.height, spec.width)


def _sample(spec: WorldSpec, combos: tuple[tuple[str, str, str], ...], rng: np.random.Generator) -> Scene:
    """Draws one scene. The order of the draws is part of the generator (GENERATOR_VERSION)."""
    shape, colour, motion = combos[rng.integers(len(combos))]
    size_i = int(rng.integers(len(spec.sizes)))
    speed_i = int(rng.integers(len(spec.speeds)))
    background = spec.backgrounds[rng.integers(len(spec.backgrounds))]
    lane = int(rng.integers(3))
    if lane == 1:
        lane_offset = int(rng.integers(-1, 2))
    else:  # the outer lanes only move inwards: lane 0 by 0 or +1, lane 2 by 0 or −1
        lane_offset = int((1 - lane) * rng.integers(0, 2))
    half, speed = spec.half_extents[size_i], spec.pixel_speeds[speed_i]
    along_len, _ = _axis_lengths(spec, motion)
    lo, hi = _bounds(half, along_len)
    path = speed * (spec.frames - 1)
    direction = sum(MOTION_VECTORS[motion])
    start = int(rng.integers(lo, hi - path + 1) if direction > 0 else rng.integers(lo + path, hi + 1))
    return Scene(shape=shape, colour=colour, motion=motion, size=spec.sizes[size_i], speed=spec.speeds[speed_i],
                 position=LANES[motion_axis(motion)][lane], background=background, lane_offset=lane_offset,
                 start=start)


def prompt_scenes(spec: WorldSpec, shape: str, colour: str, motion: str) -> tuple[Scene, ...]:
    """Every scene `_sample` can draw for one (shape, colour, motion) prompt, in a fixed order: each size, speed,
    background, lane with its jitter, and start that keeps the path in frame. (The draws are not uniform over this
    set: a lane's jitter and the start are drawn after the lane.) What a Bayes-optimal denoiser of the world averages
    over (`experiments.t2v_probe`)."""
    out = []
    axis = motion_axis(motion)
    along_len, _ = _axis_lengths(spec, motion)
    direction = sum(MOTION_VECTORS[motion])
    for size, half in zip(spec.sizes, spec.half_extents):
        lo, hi = _bounds(half, along_len)
        for speed, pixels in zip(spec.speeds, spec.pixel_speeds):
            path = pixels * (spec.frames - 1)
            starts = range(lo, hi - path + 1) if direction > 0 else range(lo + path, hi + 1)
            for background in spec.backgrounds:
                for lane, offsets in ((0, (0, 1)), (1, (-1, 0, 1)), (2, (0, -1))):
                    for lane_offset in offsets:
                        out += [Scene(shape=shape, colour=colour, motion=motion, size=size, speed=speed,
                                      position=LANES[axis][lane], background=background, lane_offset=lane_offset,
                                      start=start) for start in starts]
    return tuple(out)


def _rng(spec: WorldSpec, split: str, index: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, SPLITS.index(split), index, attempt])


@functools.lru_cache(maxsize=16)
def split_scenes(spec: WorldSpec, split: str) -> tuple[Scene, ...]:
    """Every scene of a split, in index order. Validation re-draws (attempt 1, 2, ...) any scene that is also a
    training scene, so the two splits never share a video."""
    combos = spec.combinations(split)
    n = spec.split_size(split)
    if split != "validation":
        return tuple(_sample(spec, combos, _rng(spec, split, i, 0)) for i in range(n))
    train = set(split_scenes(spec, "train"))
    scenes = []
    for i in range(n):
        for attempt in range(1000):
            scene = _sample(spec, combos, _rng(spec, split, i, attempt))
            if scene not in train:
                break
        else:
            raise ValueError("WorldSpec: the world has too few distinct scenes to keep validation out of training")
        scenes.append(scene)
    return tuple(scenes)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, half: int) -> np.ndarray:
    """Which pixels (offsets dy, dx from the centre) a shape covers. Square: the (2h+1)² box. Circle: the disc of
    radius h + 0.5 (so it spans the same 2h+1 pixels). Triangle: apex up, base the bottom row of the box; row r
    (0 = apex) is 2·⌊r/2⌋ + 1 pixels wide, so it fills about half its box."""
    inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    if shape == "square":
        return inside
    if shape == "circle":
        return dy**2 + dx**2 <= (half + 0.5) ** 2
    if shape == "triangle":
        return inside & (np.abs(dx) <= (dy + half) // 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: WorldSpec, scene: Scene) -> np.ndarray:
    """The scene's video: float32 [F, H, W, 3] with values in {−1, 0, 1}."""
    half = spec.half_extents[spec.sizes.index(scene.size)]
    speed = spec.pixel_speeds[spec.speeds.index(scene.speed)]
    dy, dx = MOTION_VECTORS[scene.motion]
    _, across_len = _axis_lengths(spec, scene.motion)
    axis = motion_axis(scene.motion)
    cross = _lane_centres(half, across_len)[LANES[axis].index(scene.position)] + scene.lane_offset
    along = scene.start + speed * (dy + dx) * np.arange(spec.frames)
    cy, cx = (np.full_like(along, cross), along) if axis == "horizontal" else (along, np.full_like(along, cross))
    rows = np.arange(spec.height)[None, :, None] - cy[:, None, None]
    cols = np.arange(spec.width)[None, None, :] - cx[:, None, None]
    mask = _shape_mask(scene.shape, rows, cols, half)
    colour = np.asarray(COLOUR_RGB[scene.colour], np.float32)
    background = np.asarray(BACKGROUND_RGB[scene.background], np.float32)
    return np.where(mask[..., None], colour, background).astype(np.float32)


def prompt_text(scene: Scene) -> str:
    """The short prompt: shape, colour, motion only."""
    return f"a {scene.colour} {scene.shape} moves {scene.motion}"


def caption_text(scene: Scene) -> str:
    """The detailed caption: the prompt's facts plus size, speed, lane and background."""
    lane = "through the middle" if scene.position == "middle" else f"along the {scene.position}"
    return (f"a {scene.size} {scene.colour} {scene.shape} moves {scene.motion} {SPEED_ADVERBS[scene.speed]} {lane} "
            f"on a {scene.background} background")


def training_corpus(spec: WorldSpec) -> list[str]:
    """Every training prompt and caption, in index order: what the tokenizer is trained on."""
    scenes = split_scenes(spec, "train")
    return [text for s in scenes for text in (prompt_text(s), caption_text(s))]


def pixel_statistics(spec: WorldSpec, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-RGB-channel mean and std over the first `limit` training videos (all by default): how the default
    `codec_mean` / `codec_std` were obtained (and how a test checks they still describe the world)."""
    videos = np.stack([render(spec, s) for s in split_scenes(spec, "train")[:limit]])
    return videos.reshape(-1, 3).mean(0), videos.reshape(-1, 3).std(0)
