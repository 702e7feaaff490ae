"""Toy-world evaluation: the caption parser, the pixel-only attribute detector (validated on ground truth), the
accuracy functions on hand-made examples, and the JSON output."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from uvigu.data import world
from uvigu.eval import toy_metrics

SPEC = world.WorldSpec()


def _ground_truth(n_train: int = 300):
    """The first `n_train` training scenes plus the whole held-out test split, with their videos."""
    scenes = world.split_scenes(SPEC, "train")[:n_train] + world.split_scenes(SPEC, "test")
    return scenes, np.stack([world.render(SPEC, s) for s in scenes])


def test_detector_reads_ground_truth_videos():
    scenes, videos = _ground_truth()
    assert len(scenes) >= 300
    for name in world.ATTRIBUTES:  # the sample exercises every value
        assert {s.attributes[name] for s in scenes} == (
            set(world.POSITIONS) if name == "position" else set(SPEC.values(name)))
    metrics = toy_metrics.video_accuracy(videos, [s.attributes for s in scenes])
    assert metrics["count"] == len(scenes)
    for name in world.ATTRIBUTES:
        assert metrics[name] >= 0.99, (name, metrics)


def test_detector_tolerates_sampling_noise():
    scenes, videos = _ground_truth(100)
    noisy = videos + np.random.default_rng(0).normal(0.0, 0.15, videos.shape).astype(np.float32)
    metrics = toy_metrics.video_accuracy(noisy, [s.attributes for s in scenes])
    for name in world.ATTRIBUTES:
        assert metrics[name] >= 0.95, (name, metrics)


def test_detector_works_from_pixels_alone():
    # A scene the generator cannot make: a 6x6 square (no such size), 3 px/frame, 7 frames of 40x40.
    video = np.ones((7, 40, 40, 3), np.float32)  # white
    for f in range(7):
        video[f, 3:9, 2 + 3 * f : 8 + 3 * f] = (-1.0, 1.0, -1.0)  # green
    assert toy_metrics.detect_attributes(video) == {
        "shape": "square", "colour": "green", "motion": "right", "size": "small", "speed": "fast",
        "position": "top", "background": "white"}
    blank = np.zeros((9, 32, 32, 3), np.float32)
    assert toy_metrics.detect_attributes(blank) == {**dict.fromkeys(world.ATTRIBUTES), "background": "gray"}
    with pytest.raises(ValueError):
        toy_metrics.detect_attributes(blank[0])
    # Independence: the detector never reads the generator's geometry, palette or renderer.
    source = inspect.getsource(toy_metrics)
    for name in ("COLOUR_RGB", "BACKGROUND_RGB", "half_extents", "pixel_speeds", "render", "split_scenes"):
        assert name not in source, name


def test_parse_caption_round_trips_every_generated_text():
    for split in world.SPLITS:
        for scene in world.split_scenes(SPEC, split):
            assert toy_metrics.parse_caption(world.caption_text(scene)) == scene.attributes
            prompt = toy_metrics.parse_caption(world.prompt_text(scene))
            assert prompt == {name: scene.attributes[name] if name in world.PROMPT_ATTRIBUTES else None
                              for name in world.ATTRIBUTES}


def test_parse_caption_hand_made():
    parse = toy_metrics.parse_caption
    assert parse("A small red square moves up quickly, along the left, on a white background.") == {
        "shape": "square", "colour": "red", "motion": "up", "size": "small", "speed": "fast", "position": "left",
        "background": "white"}
    # 'left' after 'moves' is a motion, after 'along the' a position; conflicting colours parse as unknown.
    got = parse("a red blue circle moves left along the top on a black background background")
    assert got["colour"] is None and got["motion"] == "left" and got["position"] == "top"
    assert got["background"] == "black" and got["shape"] == "circle"
    assert parse("the moves moves a a") == dict.fromkeys(world.ATTRIBUTES)
    assert parse("")["shape"] is None


def test_caption_accuracy_hand_made():
    truth = [{"shape": "circle", "colour": "red", "motion": "left", "size": "large", "speed": "slow",
              "position": "top", "background": "gray"},
             {"shape": "square", "colour": "blue", "motion": "up", "size": "small", "speed": "fast",
              "position": "middle", "background": "white"}]
    predicted = ["a large red circle moves left slowly along the top on a gray background",  # all right
                 "a small green square moves up quickly along the right"]  # colour, position wrong; no background
    metrics = toy_metrics.caption_accuracy(predicted, truth)
    assert metrics == {"shape": 1.0, "colour": 0.5, "motion": 1.0, "size": 1.0, "speed": 1.0, "position": 0.5,
                       "background": 0.5, "exact_match": 0.5, "count": 2}
    prompts = toy_metrics.caption_accuracy(["a red circle moves left", "a blue square moves down"], truth,
                                           attributes=world.PROMPT_ATTRIBUTES)
    assert prompts == {"shape": 1.0, "colour": 1.0, "motion": 0.5, "exact_match": 0.5, "count": 2}
    with pytest.raises(ValueError):
        toy_metrics.caption_accuracy(predicted[:1], truth)
    with pytest.raises(ValueError):
        toy_metrics.caption_accuracy([], [])


def test_video_accuracy_hand_made():
    scenes, videos = _ground_truth(0)
    truth = [scenes[0].attributes, dict(scenes[1].attributes, shape="wrong", speed="wrong")]
    metrics = toy_metrics.video_accuracy(videos[:2], truth)
    assert metrics["shape"] == metrics["speed"] == metrics["exact_match"] == 0.5
    assert metrics["colour"] == metrics["background"] == 1.0 and metrics["count"] == 2


def test_chance_levels_and_json(tmp_path):
    assert toy_metrics.chance_levels() == {"shape": 1 / 3, "colour": 1 / 4, "motion": 1 / 4, "size": 1 / 2,
                                           "speed": 1 / 2, "position": 1 / 3, "background": 1 / 3}
    report = {"v2t": {"shape": 0.5, "count": 2}, "chance": toy_metrics.chance_levels()}
    path = toy_metrics.write_metrics(tmp_path / "eval" / "metrics.json", report)
    assert json.loads(path.read_text()) == report
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary left behind


def test_caption_scorer_gives_truth_one_and_shuffled_captions_chance():
    # A wrong scorer (one reading the wrong attribute, or scoring everything right) fails one of the two halves.
    scenes = world.split_scenes(SPEC, "train")[:2000]
    truth = [s.attributes for s in scenes]
    captions = [world.caption_text(s) for s in scenes]
    exact = toy_metrics.caption_accuracy(captions, truth)
    assert exact == {**dict.fromkeys(world.ATTRIBUTES, 1.0), "exact_match": 1.0, "count": len(scenes)}
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    got = toy_metrics.caption_accuracy(shuffled, truth)
    chance = toy_metrics.chance_levels()
    for name in world.ATTRIBUTES:
        # A shuffled caption matches with probability sum_v p_v^2 (= 1/k for uniform values): near chance.
        values = [t[name] for t in truth]
        expected = sum((values.count(v) / len(values)) ** 2 for v in set(values))
        assert abs(got[name] - expected) < 0.04, (name, got[name], expected)
        if name != "position":  # chance_levels' position (1/3) is per motion axis; unconditioned it is ~0.22
            assert abs(got[name] - chance[name]) < 0.1, (name, got[name], chance[name])
    assert got["exact_match"] < 0.02
    # Prompts score 1.0 on their own attributes only.
    prompts = toy_metrics.caption_accuracy([world.prompt_text(s) for s in scenes], truth,
                                           attributes=world.PROMPT_ATTRIBUTES)
    assert all(prompts[name] == 1.0 for name in world.PROMPT_ATTRIBUTES)


def test_joint_agreement_compares_caption_with_the_video_it_came_with():
    scenes, videos = _ground_truth(60)
    captions = [world.caption_text(s) for s in scenes]
    assert toy_metrics.joint_agreement(videos, captions) == {
        "shape": 1.0, "colour": 1.0, "motion": 1.0, "agreement": 1.0, "exact_match": 1.0, "count": len(scenes)}
    # Captions of other videos agree only by chance; one that names no shape never agrees on shape.
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    got = toy_metrics.joint_agreement(videos, shuffled)
    assert got["agreement"] < 0.5 and got["exact_match"] < 0.15
    blank = toy_metrics.joint_agreement(videos[:1], ["a red thing moves left"])
    assert blank["shape"] == 0.0 and blank["count"] == 1
    with pytest.raises(ValueError, match="captions for"):
        toy_metrics.joint_agreement(videos[:2], captions[:1])
