"""The toy world: generator, codec, tokenizer, shards (cache, corruption), grain source and the TFDS path.

Builds use a small spec (96 / 32 / 32 examples, 40 per shard: three train shards) and a stand-in prompt encoder (a
fixed random embedding table), so the whole file runs in seconds; generator-level checks use the default spec,
which costs no rendering.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import pickle
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvigu.data import world
from uvigu.codec import ToyCodec
from uvigu.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from uvigu.data.toy_world import (CorruptShardError, ToyWorldPaths, ToyWorldSource, build_toy_world, decode_record,
                                  encode_record)

SMALL = world.WorldSpec(num_train=96, num_validation=32, num_test=32, examples_per_shard=40)


class StubEncoder:
    """Stand-in for the frozen umT5 encoder: a fixed random embedding table, zeroed at padding."""

    def __init__(self, seed: int = 0, dim: int = 8):
        self.table = np.random.default_rng(seed).standard_normal((256, dim)).astype(np.float32)
        self.calls = 0

    def __call__(self, ids, mask):
        self.calls += 1
        return self.table[ids] * mask[..., None]


def _build(cache_dir, spec=SMALL):
    return build_toy_world(cache_dir, spec, None, StubEncoder(0), "stub-0")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("cache"))


def _file_digests(paths: ToyWorldPaths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for s in world.SPLITS for p in paths.shards[s]}


# ----------------------------------------------------------------------------------------------------------------------
# Generator.
# ----------------------------------------------------------------------------------------------------------------------


def test_spec_rejects_inconsistent_worlds():
    with pytest.raises(ValueError, match="does not fit"):
        world.WorldSpec(half_extents=(4, 12))
    with pytest.raises(ValueError, match="never occurs in training"):  # every completion of (circle, red) held out
        world.WorldSpec(held_out=tuple(("circle", "red", m) for m in ("left", "right", "up", "down")))
    with pytest.raises(ValueError, match="among"):
        world.WorldSpec(colours=("red", "purple"))
    with pytest.raises(ValueError, match="divisible"):
        world.WorldSpec(height=33)


def test_generation_is_seeded_and_reproducible():
    spec = world.WorldSpec()
    world.split_scenes.cache_clear()
    first = world.split_scenes(spec, "train")
    world.split_scenes.cache_clear()
    assert world.split_scenes(spec, "train") == first
    other = world.split_scenes(dataclasses.replace(spec, seed=1), "train")
    assert sum(a != b for a, b in zip(first, other)) > 0.9 * len(first)
    np.testing.assert_array_equal(world.render(spec, first[3]), world.render(spec, first[3]))
    assert spec.fingerprint() == world.WorldSpec().fingerprint() != dataclasses.replace(spec, seed=1).fingerprint()


def test_splits_are_disjoint_and_test_is_compositional():
    spec = world.WorldSpec()
    scenes = {s: world.split_scenes(spec, s) for s in world.SPLITS}
    combo = lambda sc: (sc.shape, sc.colour, sc.motion)  # noqa: E731
    held = set(spec.held_out)
    assert not {combo(sc) for sc in scenes["train"] + scenes["validation"]} & held
    assert {combo(sc) for sc in scenes["test"]} == held  # every held-out triple is tested
    assert {combo(sc) for sc in scenes["train"]} == set(spec.combinations("train"))  # all others are trained on
    train_pairs = {(i, j, combo(sc)[i], combo(sc)[j]) for sc in scenes["train"] for i, j in ((0, 1), (0, 2), (1, 2))}
    for triple in held:  # each pair inside a held-out triple was seen in training
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert (i, j, triple[i], triple[j]) in train_pairs
    assert not set(scenes["train"]) & set(scenes["validation"])
    train_videos = {world.render(spec, sc).tobytes() for sc in scenes["train"]}
    assert not any(world.render(spec, sc).tobytes() in train_videos for sc in scenes["validation"])
    for name in world.ATTRIBUTES:  # every value of every attribute occurs in training
        assert {sc.attributes[name] for sc in scenes["train"]} == (
            set(world.POSITIONS) if name == "position" else set(spec.values(name)))


def test_videos_keep_the_shape_whole_and_in_frame():
    spec = world.WorldSpec()
    for scene in world.split_scenes(spec, "train")[:200]:
        video = world.render(spec, scene)
        assert video.shape == (spec.frames, spec.height, spec.width, 3) == (5, 16, 16, 3)
        assert video.dtype == np.float32
        assert set(np.unique(video)) <= {-1.0, 0.0, 1.0}
        shape_pixels = (video != np.asarray(world.BACKGROUND_RGB[scene.background])).any(-1).sum((1, 2))
        assert len(set(shape_pixels.tolist())) == 1 and shape_pixels[0] > 0, scene  # never clipped by the border
    # A small (5 px) square in the top lane, 2 px per frame from x = 2: x 0..4 in frame 0, 8..12 in frame 4.
    scene = world.Scene("square", "red", "right", "small", "fast", "top", "gray", lane_offset=0, start=2)
    video = world.render(spec, scene)
    assert (video[0, 0:5, 0:5] == (1, -1, -1)).all() and (video[-1, 0:5, 8:13] == (1, -1, -1)).all()
    assert (video[0, 5:] == 0).all() and (video[-1, :, 13:] == 0).all() and (video[-1, :, :8] == 0).all()
    assert world.prompt_text(scene) == "a red square moves right"
    assert world.caption_text(scene) == "a small red square moves right quickly along the top on a gray background"


# ----------------------------------------------------------------------------------------------------------------------
# Codec.
# ----------------------------------------------------------------------------------------------------------------------


def test_codec_round_trip_shapes_and_layout():
    spec = world.WorldSpec()
    default = ToyCodec.from_spec(spec)  # the world's: 16x16 RGB -> 8x8x12, as many values as pixels x 3
    assert default.latent_channels == 12 and default.latent_shape(5, 16, 16) == (5, 8, 8, 12)
    codec = ToyCodec(4, spec.codec_mean, spec.codec_std)
    assert codec.latent_channels == 48 and codec.stride == (1, 4, 4)
    assert codec.latent_shape(9, 32, 32) == (9, 8, 8, 48)
    video = np.random.default_rng(0).uniform(-1, 1, (2, 9, 32, 32, 3)).astype(np.float32)
    latents = codec.encode(video)
    assert latents.shape == (2, 9, 8, 8, 48) and latents.dtype == np.float32
    np.testing.assert_allclose(codec.decode(latents), video, atol=1e-6, rtol=0)
    # channel (dy·4 + dx)·3 + rgb of latent (1, 2) is pixel (4 + dy, 8 + dx)
    np.testing.assert_allclose(latents[0, 0, 1, 2, (3 * 4 + 1) * 3 + 2] * codec.std[2] + codec.mean[2],
                               video[0, 0, 4 + 3, 8 + 1, 2], atol=1e-6)
    jitted = jax.jit(codec.encode)(jnp.asarray(video))
    np.testing.assert_allclose(np.asarray(jitted), latents, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(codec.decode)(jitted)), video, atol=1e-6)
    with pytest.raises(ValueError):
        codec.encode(video[0])
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape(9, 30, 32)


def test_codec_constants_describe_the_world():
    spec = world.WorldSpec()
    mean, std = world.pixel_statistics(spec, limit=512)
    np.testing.assert_allclose(mean, spec.codec_mean, atol=0.02)
    np.testing.assert_allclose(std, spec.codec_std, atol=0.02)
    videos = np.stack([world.render(spec, s) for s in world.split_scenes(spec, "validation")[:64]])
    latents = ToyCodec.from_spec(spec).encode(videos)
    assert abs(latents.mean()) < 0.1 and abs(latents.std() - 1) < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------------------------------


def test_tokenizer_round_trips_every_text(tmp_path):
    spec = world.WorldSpec()
    tok = build_tokenizer(tmp_path, spec)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size <= spec.tokenizer_max_vocab
    for name in world.ATTRIBUTES:  # every attribute word is one token
        for value in spec.values(name):
            word = world.SPEED_ADVERBS.get(value, value)
            ids, _ = tok.encode([word], 4)
            assert ids[0, 1] == tok.eos_id and ids[0, 0] > 2, word
    texts = [f(s) for split in world.SPLITS for s in world.split_scenes(spec, split)
             for f in (world.prompt_text, world.caption_text)]
    ids, mask = tok.encode(texts, spec.caption_len)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (len(texts), spec.caption_len)
    assert not (ids == tok.unk_id).any()
    assert tok.decode(ids) == texts
    assert (mask == (np.cumsum(ids == tok.eos_id, axis=1) - (ids == tok.eos_id) == 0)).all()  # up to and incl. eos
    assert (ids[~mask] == tok.pad_id).all()


def test_tokenizer_is_deterministic_truncates_and_loads(tmp_path):
    spec = world.WorldSpec()
    tok = build_tokenizer(tmp_path, spec)
    again = SentencePieceTokenizer.train(world.training_corpus(spec), spec.tokenizer_max_vocab)
    assert again.model_proto == tok.model_proto
    path = tmp_path / "copy.model"
    tok.save(path)
    loaded = SentencePieceTokenizer.load(path)
    assert pickle.loads(pickle.dumps(loaded)).sha256 == tok.sha256
    ids, mask = loaded.encode(["a large red circle moves left", ""], 4)
    assert ids[0].tolist()[-1] == loaded.eos_id and mask[0].all()  # truncated, still ends in eos
    assert ids[1].tolist() == [loaded.eos_id, 0, 0, 0] and mask[1].tolist() == [True, False, False, False]
    assert loaded.decode(np.array([[3, 0, 999, 1, 5]]))[0].startswith("a")  # pad skipped, unknown id tolerated
    assert loaded.decode([[loaded.eos_id, 3]]) == [""]


# ----------------------------------------------------------------------------------------------------------------------
# Shards.
# ----------------------------------------------------------------------------------------------------------------------


def test_shards_hold_the_examples(built):
    manifest = built.read_manifest()
    assert [len(built.shards[s]) for s in world.SPLITS] == [3, 1, 1]
    assert manifest["fields"]["latents"]["shape"] == [5, 8, 8, 12]
    assert manifest["fields"]["context"]["shape"] == [SMALL.prompt_len, 8]
    tok, codec, stub = built.open_tokenizer(), built.open_codec(), StubEncoder(0)
    for split in world.SPLITS:
        source = ToyWorldSource(built, split)
        scenes = world.split_scenes(SMALL, split)
        assert len(source) == len(scenes) == manifest["splits"][split]["num_examples"]
        for i in sorted({0, 31, 32, len(source) - 1} & set(range(len(source)))):  # both sides of a shard boundary
            record, scene = source[i], scenes[i]
            assert record["index"] == i and record["attributes"] == scene.attributes
            assert record["prompt"] == world.prompt_text(scene) and record["caption"] == world.caption_text(scene)
            assert record["latents"].dtype == np.float32 and record["context"].dtype == np.float32
            np.testing.assert_allclose(codec.decode(record["latents"][None])[0], world.render(SMALL, scene),
                                       atol=1e-6)
            assert tok.decode(record["prompt_ids"][None]) == [record["prompt"]]
            assert tok.decode(record["caption_ids"][None]) == [record["caption"]]
            np.testing.assert_array_equal(record["context"], stub(record["prompt_ids"], record["prompt_mask"]))
            np.testing.assert_array_equal(record["attribute_ids"], world.attribute_ids(SMALL, scene.attributes))


def test_build_is_byte_reproducible(built, tmp_path):
    again = _build(tmp_path / "same")
    assert _file_digests(again) == _file_digests(built)
    other = _build(tmp_path / "other", spec=dataclasses.replace(SMALL, seed=1))
    assert not set(_file_digests(other).values()) & set(_file_digests(built).values())


def test_cache_is_reused_and_rebuilt_on_change(tmp_path):
    encoder = StubEncoder(0)
    paths = build_toy_world(tmp_path, SMALL, None, encoder, "stub-0")
    assert encoder.calls == 1  # 48 distinct prompts: one padded batch
    files = sorted(paths.root.iterdir())
    stamps = {p.name: p.stat().st_mtime_ns for p in files}
    again = build_toy_world(tmp_path, SMALL, None, encoder, "stub-0")
    assert again == paths and encoder.calls == 1
    assert {p.name: p.stat().st_mtime_ns for p in sorted(again.root.iterdir())} == stamps
    key = paths.read_manifest()["key"]

    rebuilt = build_toy_world(tmp_path, dataclasses.replace(SMALL, seed=3), None, encoder, "stub-0")
    assert encoder.calls == 2 and rebuilt.root != paths.root  # a new version folder, never rebuilt in place
    assert (tmp_path / "toy_world").resolve() == rebuilt.root and rebuilt.root.parent == paths.root.parent
    assert rebuilt.read_manifest()["spec"]["seed"] == 3 and rebuilt.read_manifest()["key"] != key
    context = ToyWorldSource(rebuilt, "test")[0]["context"]
    reencoded = build_toy_world(tmp_path, dataclasses.replace(SMALL, seed=3), None, StubEncoder(1), "stub-1")
    assert reencoded.read_manifest()["encoder_id"] == "stub-1"
    assert not np.array_equal(ToyWorldSource(reencoded, "test")[0]["context"], context)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".toy_world.") and p.suffix != ".lock"] == []
    # No reader is open on the older versions: each build swept them; only the current one is left.
    assert [p for p in (tmp_path / "toy_world.versions").iterdir() if not p.name.startswith(".")] == \
        [reencoded.root]

    # A damaged cache (a shard of the wrong size) is rebuilt, not reused.
    victim = reencoded.shards["train"][1]
    victim.write_bytes(victim.read_bytes()[:100])
    repaired = build_toy_world(tmp_path, dataclasses.replace(SMALL, seed=3), None, StubEncoder(1), "stub-1")
    assert len(ToyWorldSource(repaired, "train")) == SMALL.num_train


def test_rebuild_never_pulls_files_from_under_an_open_reader(tmp_path):
    first = build_toy_world(tmp_path, SMALL, None, StubEncoder(0), "stub-0")
    reader = ToyWorldSource(first, "train")  # opened; its shard files are not opened yet (lazily, per shard)
    want = [reader[i]["caption"] for i in (0, 40, 95)]
    later = ToyWorldSource(first, "validation")
    rebuilt = build_toy_world(tmp_path, dataclasses.replace(SMALL, seed=5), None, StubEncoder(0), "stub-0")
    assert rebuilt.root != first.root and first.root.exists()  # the open readers' version is kept
    assert [reader[i]["caption"] for i in (0, 40, 95)] == want
    assert later[0]["index"] == 0 and later[0]["caption"] == world.caption_text(
        world.split_scenes(SMALL, "validation")[0])  # first read after the rebuild: still the old world's files
    assert ToyWorldSource(rebuilt, "train")[0]["caption"] != want[0]
    # Once its readers are gone, the next build removes the old version.
    del reader, later
    import gc

    gc.collect()
    build_toy_world(tmp_path, SMALL, None, StubEncoder(0), "stub-0")
    assert not first.root.exists() and not rebuilt.root.exists()


def _copy_world(built, tmp_path) -> ToyWorldPaths:
    shutil.copytree(built.root, tmp_path / "toy_world")
    return ToyWorldPaths.from_root(tmp_path / "toy_world")


def test_truncated_shard_names_file_and_records(built, tmp_path):
    paths = _copy_world(built, tmp_path)
    victim = paths.shards["train"][1]  # examples 32..63 (96 over three shards)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match=rf"{victim.name}.*truncated.*records 32\.\.63") as err:
        ToyWorldSource(paths, "train")
    assert err.value.path == victim and err.value.record == 32

    # Past the size check (the manifest edited to match), the shard's record count gives it away on first read.
    manifest = json.loads(paths.manifest.read_text())
    manifest["splits"]["train"]["files"][1]["bytes"] = victim.stat().st_size
    paths.manifest.write_text(json.dumps(manifest))
    source = ToyWorldSource(paths, "train")
    assert source[0]["index"] == 0  # other shards still read
    with pytest.raises(CorruptShardError, match=rf"{victim.name}: cannot read record 5 \(example 37 .*truncated"):
        source[37]


def test_corrupt_bytes_name_file_and_record(built, tmp_path):
    paths = _copy_world(built, tmp_path)
    victim = paths.shards["validation"][0]
    data = bytearray(victim.read_bytes())
    data[200:216] = bytes(b ^ 0xFF for b in data[200:216])  # inside the first records' chunks
    victim.write_bytes(bytes(data))
    source = ToyWorldSource(paths, "validation")
    errors = []
    for i in range(len(source)):
        try:
            source[i]
        except CorruptShardError as e:
            errors.append(e)
    assert errors, "damage went unnoticed"
    for e in errors:
        assert e.path == victim and f"{victim}: " in str(e) and f"(example {e.record} of split" in str(e)


def test_record_checksum_catches_damage():
    record = encode_record({"index": 3, "x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": "hi",
                            "d": {"a": "b"}})
    decoded = decode_record(record)
    assert decoded["index"] == 3 and decoded["s"] == "hi" and decoded["d"] == {"a": "b"}
    np.testing.assert_array_equal(decoded["x"], np.arange(6, dtype=np.float32).reshape(2, 3))
    damaged = bytearray(record)
    damaged[-3] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        decode_record(bytes(damaged))
    with pytest.raises(ValueError, match="not a toy-world record"):
        decode_record(b"JUNK" + record[4:])


def test_grain_reads_the_source(built):
    source = ToyWorldSource(built, "train")
    clone = pickle.loads(pickle.dumps(source))  # what a grain worker process receives
    assert repr(clone) == repr(source) and clone[50]["caption"] == source[50]["caption"]
    with pytest.raises(IndexError):
        source[len(source)]
    keep = ("index", "latents", "context", "caption_ids", "caption_mask")
    ds = (grain.MapDataset.source(source).shuffle(seed=0).map(lambda r: {k: r[k] for k in keep})
          .batch(8, drop_remainder=True))
    batches = list(ds.to_iter_dataset())
    assert len(batches) == len(source) // 8
    assert batches[0]["latents"].shape == (8, 5, 8, 8, 12) and batches[0]["caption_ids"].shape == (8, 16)
    seen = sorted(int(i) for b in batches for i in b["index"])
    assert seen == list(range(len(source)))  # every example once per epoch, shuffled
    assert [int(i) for i in batches[0]["index"]] != list(range(8))


def test_tfds_data_source_reads_the_world(built):
    tfds = pytest.importorskip("tensorflow_datasets")
    from uvigu.data.toy_world_tfds import export_tfds

    data_dir = export_tfds(built)
    info = data_dir / "uvigu_toy_world" / "1.0.0" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns
    assert export_tfds(built) == data_dir and info.stat().st_mtime_ns == stamp  # made once
    sources = tfds.data_source("uvigu_toy_world", data_dir=str(data_dir))
    assert set(sources) == set(world.SPLITS)
    for split in world.SPLITS:
        ours, theirs = ToyWorldSource(built, split), sources[split]
        assert len(theirs) == len(ours)
        for i in (0, len(ours) - 1):
            a, b = theirs[i], ours[i]
            for name in ("latents", "context", "prompt_ids", "prompt_mask", "caption_ids", "caption_mask"):
                np.testing.assert_array_equal(a[name], b[name])
            assert a["caption"].decode() == b["caption"] and json.loads(a["attributes"]) == b["attributes"]


_WITHOUT_TF = """
import sys

from importlib.machinery import PathFinder

_find_spec = PathFinder.find_spec.__func__


def _without_tensorflow(cls, name, path=None, target=None):  # as if not installed: no finder finds it
    if name == "tensorflow" or name.startswith("tensorflow."):
        return None
    return _find_spec(cls, name, path, target)


PathFinder.find_spec = classmethod(_without_tensorflow)
try:
    import tensorflow  # noqa: F401
    raise SystemExit("tensorflow was not blocked")
except ImportError:
    pass

import json
import numpy as np
import tensorflow_datasets as tfds
from uvigu.data import world
from uvigu.data.toy_world import ToyWorldPaths, ToyWorldSource
from uvigu.data.toy_world_tfds import export_tfds

paths = ToyWorldPaths.from_root(sys.argv[1])
data_dir = export_tfds(paths, sys.argv[2])
sources = tfds.data_source("uvigu_toy_world", data_dir=str(data_dir))
for split in world.SPLITS:
    ours, theirs = ToyWorldSource(paths, split), sources[split]
    assert len(theirs) == len(ours)
    a, b = theirs[len(ours) - 1], ours[len(ours) - 1]
    np.testing.assert_array_equal(a["latents"], b["latents"])
    assert a["caption"].decode() == b["caption"] and json.loads(a["attributes"]) == b["attributes"]
assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")], "tensorflow was imported"
print("OK without tensorflow")
"""


def test_tfds_path_runs_without_tensorflow(built, tmp_path):
    # TensorFlow is installed here, so "works without TensorFlow" is checked in a child where it cannot be imported.
    pytest.importorskip("tensorflow_datasets")
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TF, str(built.root), str(tmp_path / "tfds")], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK without tensorflow" in proc.stdout, proc.stderr[-3000:]


def test_prompt_scenes_lists_every_scene_a_prompt_can_draw():
    spec = world.WorldSpec()
    for split in world.SPLITS:
        for scene in world.split_scenes(spec, split):
            assert scene in set(world.prompt_scenes(spec, scene.shape, scene.colour, scene.motion))
    scenes = world.prompt_scenes(spec, "circle", "red", "left")
    assert len(scenes) == len(set(scenes)) == 420  # sizes x speeds x backgrounds x 7 lane places x path starts
    assert {(s.shape, s.colour, s.motion) for s in scenes} == {("circle", "red", "left")}
    for s in scenes:  # the shape is whole in every frame: the same number of pixels in each
        areas = np.all(world.render(spec, s) == world.COLOUR_RGB["red"], axis=-1).sum(axis=(1, 2))
        assert areas.min() == areas.max() > 0
