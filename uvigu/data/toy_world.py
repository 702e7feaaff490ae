"""The toy world on disk: ArrayRecord shards of ready-to-train examples, built on first use and cached.

What a record holds is what the real pipeline will hold for real videos: the codec's latents (where the Wan VAE's
will be), the tokenised prompt and detailed caption, and the prompt's embedding precomputed by the frozen text
encoder (where umT5-XXL's will be), plus the plain-text prompt, caption and attributes for evaluation:

    latents        float32 [T, h, w, C]   ToyCodec.encode of the video
    prompt_ids     int32   [S_p]          + prompt_mask  bool [S_p]
    caption_ids    int32   [S_cap]        + caption_mask bool [S_cap]
    context        float32 [S_c, G]       encode_prompts(prompt_ids, prompt_mask) for this example
    attribute_ids  int32   [7]            index of each attribute's value (world.ATTRIBUTES order; position: lane)
    attributes     {name: value}          all seven attribute values
    prompt, caption str;  index int (the example's index in its split)

The record schema, the on-disk record format (magic + crc32 + msgpack), the shard writer and the readers
(`ShardPaths` = `ToyWorldPaths`, `ShardSource` = `ToyWorldSource`) live in `uvigu.data.records`, shared with the
preprocessed real videos (`uvigu.data.preprocess`); this module is the toy world's producer.

Layout of `<cache_dir>/toy_world/`: `manifest.json` (format, cache key, spec, encoder id, tokenizer hash, codec, field
shapes, and per split the shard files with their record counts, sizes and sha256), `tokenizer.model`, and
`<split>.array_record-0000k-of-0000n`. The cache key hashes the spec (with the generator version), the tokenizer and
the encoder id: a build whose key matches (and whose files are all there at their recorded sizes) is reused, any
other is built, under a file lock (concurrent processes, say those of a multi-process run on one machine, build once),
into a new version folder `<cache_dir>/toy_world.versions/<key16>-<time>-<id>/`, and `<cache_dir>/toy_world`, a
symlink, is switched to it in one rename. Nothing is rebuilt in place: the paths a build returns are the version
folder's, so a reader opened before a rebuild keeps reading its own files; an old version is deleted only once no
open `ShardSource` holds it (each holds a shared flock on its `.readers.lock`), else by a later build.

Shape letters: T/h/w latent grid, C latent channels, S_p/S_cap prompt/caption tokens, S_c/G context tokens/width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from uvigu.codec import ToyCodec
from uvigu.data import records
from uvigu.data.records import (MANIFEST_FILE, RECORD_MAGIC, WRITER_OPTIONS,  # noqa: F401 (re-exported)
                                CorruptShardError, ShardPaths, ShardSource, decode_record, encode_record, write_shard)
from uvigu.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from uvigu.data.world import (ATTRIBUTES, SPLITS, WorldSpec, attribute_ids, caption_text, prompt_text, render,
                              split_scenes)

FORMAT = records.TOY_WORLD_FORMAT
FORMAT_VERSION = records.FORMATS[FORMAT]
TOKENIZER_FILE = "tokenizer.model"
ROOT_NAME = "toy_world"
VERSIONS_NAME = "toy_world.versions"
# Rows per encoder call; the last call is padded to the same size so a jitted encoder compiles once.
ENCODER_BATCH = 64
RENDER_BATCH = 64

PromptEncoder = Callable[[np.ndarray, np.ndarray], Any]
"""encode_prompts(ids int32 [B, S_p], mask bool [B, S_p]) -> float [B, S_c, G]; frozen and deterministic."""

log = logging.getLogger(__name__)


# The readers are the shared ones: a toy world is a shard set like any other.
ToyWorldPaths = ShardPaths
ToyWorldSource = ShardSource


def _read_manifest(path: Path) -> dict[str, Any]:
    """A manifest that must be a toy world's (the cache folder holds nothing else)."""
    manifest = records.read_manifest(path)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, not a toy world ({FORMAT!r})")
    return manifest


def cache_key(spec: WorldSpec, tokenizer: SentencePieceTokenizer, encoder_id: str) -> str:
    """Everything the shard bytes depend on: format, world (spec + generator version), vocabulary, encoder."""
    blob = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.fingerprint(),
                       "tokenizer": tokenizer.sha256, "encoder_id": encoder_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


_sha256 = records.sha256_file


def _stale_reason(root: Path, key: str) -> str | None:
    """Why the world at `root` cannot be reused for `key` (None: it can). Cheap: compares the key and file sizes;
    `verify_toy_world` compares checksums."""
    if not (root / MANIFEST_FILE).exists():
        return "no world built yet"
    try:
        manifest = _read_manifest(root / MANIFEST_FILE)
    except (ValueError, CorruptShardError) as e:
        return str(e)
    if manifest["key"] != key:
        return "the spec, tokenizer or encoder changed"
    files = [(manifest["tokenizer"]["file"], manifest["tokenizer"]["bytes"])]
    files += [(f["name"], f["bytes"]) for s in SPLITS for f in manifest["splits"][s]["files"]]
    for name, size in files:
        path = root / name
        if not path.exists():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def verify_toy_world(paths: ToyWorldPaths) -> None:
    """Checks every file against the manifest's sha256; raises CorruptShardError naming the first that differs."""
    manifest = paths.read_manifest()
    for split in SPLITS:
        for entry, path in zip(manifest["splits"][split]["files"], paths.shards[split]):
            if not path.exists():
                raise CorruptShardError(f"{path}: shard missing", path=path)
            if _sha256(path) != entry["sha256"]:
                raise CorruptShardError(f"{path}: sha256 differs from the manifest (damaged shard)", path=path)


# ----------------------------------------------------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(cache_dir: Path):
    with open(cache_dir / f".{ROOT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_toy_world(
    cache_dir: str | os.PathLike,
    spec: WorldSpec,
    tokenizer: SentencePieceTokenizer | None,
    encode_prompts: PromptEncoder,
    encoder_id: str,
    *,
    rebuild: bool = False,
) -> ToyWorldPaths:
    """The toy world in `<cache_dir>/toy_world`, built unless a build with the same cache key is already there.

    tokenizer: None trains (or reuses) the world's own (`build_tokenizer`); build the prompt encoder after it, since
      its embedding needs `vocab_size`.
    encode_prompts / encoder_id: the frozen prompt encoder and a string naming it (architecture, seed, weights); the
      id is part of the cache key, so a different encoder rebuilds the context embeddings. Called on each distinct
      prompt once, in batches of ENCODER_BATCH rows (the last one padded), so a jitted encoder compiles once.
    rebuild: build even if the cache is current.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer(cache_dir, spec)
    key = cache_key(spec, tokenizer, encoder_id)
    root = cache_dir / ROOT_NAME
    versions = cache_dir / VERSIONS_NAME
    with _locked(cache_dir):
        reason = "rebuild requested" if rebuild else _stale_reason(root, key)
        if reason is None:
            return ToyWorldPaths.from_root(root.resolve())
        log.info("building the toy world in %s (%s)", root, reason)
        versions.mkdir(exist_ok=True)
        for leftover in [*cache_dir.glob(f".{ROOT_NAME}.*-*"), *versions.glob(".tmp-*")]:  # crashed builds; we
            shutil.rmtree(leftover, ignore_errors=True)  # hold the lock
        tmp = versions / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_world(tmp, spec, tokenizer, encode_prompts, encoder_id, key)
            (tmp / records.READERS_LOCK).touch()
            version = versions / f"{key[:16]}-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
            tmp.rename(version)
            _point(root, version)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        _sweep_old_versions(versions, keep=version)
    return ToyWorldPaths.from_root(version)


def _point(root: Path, version: Path) -> None:
    """Makes `root` a symlink to `version` in one step (a new link renamed over the old one): a reader resolving
    `root` sees the old version or the new one, whole. A pre-versioning world (a real folder) is moved aside first."""
    if root.exists() and not root.is_symlink():
        root.rename(version.parent / f"legacy-{uuid.uuid4().hex[:8]}")
    link = root.parent / f".{ROOT_NAME}.link-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    link.symlink_to(os.path.relpath(version, root.parent))
    os.replace(link, root)


def _sweep_old_versions(versions: Path, keep: Path) -> None:
    """Deletes the versions other than `keep` that no open reader holds (see records.READERS_LOCK); a held one stays
    for a later build to sweep."""
    for old in versions.iterdir():
        if old == keep or old.name.startswith("."):
            continue
        lock_path = old / records.READERS_LOCK
        try:
            f = open(lock_path, "rb")
        except FileNotFoundError:  # a legacy folder: readers of it never registered, but they resolved the old root
            f = None
        try:
            if f is not None:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.info("keeping old toy-world version %s: a reader still has it open", old)
                    continue
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if f is not None:
                f.close()


def _encode_contexts(prompts: list[str], tokenizer: SentencePieceTokenizer, spec: WorldSpec,
                     encode_prompts: PromptEncoder) -> dict[str, np.ndarray]:
    """The context embedding of each distinct prompt (the encoder is per-row, so duplicates need no second call)."""
    unique = sorted(set(prompts))
    ids, mask = tokenizer.encode(unique, spec.prompt_len)
    n = len(unique)
    padded = math.ceil(n / ENCODER_BATCH) * ENCODER_BATCH
    ids = np.concatenate([ids, np.full((padded - n, spec.prompt_len), tokenizer.pad_id, np.int32)])
    mask = np.concatenate([mask, np.zeros((padded - n, spec.prompt_len), bool)])
    out = []
    for lo in range(0, padded, ENCODER_BATCH):
        context = np.asarray(encode_prompts(ids[lo : lo + ENCODER_BATCH], mask[lo : lo + ENCODER_BATCH]),
                             np.float32)
        if context.ndim != 3 or context.shape[0] != ENCODER_BATCH:
            raise ValueError(f"encode_prompts returned shape {context.shape}, expected [{ENCODER_BATCH}, S_c, G]")
        out.append(context)
    contexts = np.concatenate(out)[:n]
    if not np.isfinite(contexts).all():
        raise ValueError("encode_prompts returned non-finite values")
    return dict(zip(unique, contexts))


def _check_lengths(tokenizer: SentencePieceTokenizer, texts: list[str], max_len: int, what: str) -> None:
    counts = tokenizer.count_tokens(texts)
    longest = int(np.argmax(counts))
    if counts[longest] > max_len:
        raise ValueError(f"the {what} {texts[longest]!r} needs {counts[longest]} tokens with eos; "
                         f"WorldSpec.{what}_len is {max_len}")


def _write_world(out: Path, spec: WorldSpec, tokenizer: SentencePieceTokenizer, encode_prompts: PromptEncoder,
                 encoder_id: str, key: str) -> None:
    start = time.perf_counter()
    codec = ToyCodec.from_spec(spec)
    tokenizer.save(out / TOKENIZER_FILE)
    scenes = {split: split_scenes(spec, split) for split in SPLITS}
    prompts = {split: [prompt_text(s) for s in scenes[split]] for split in SPLITS}
    captions = {split: [caption_text(s) for s in scenes[split]] for split in SPLITS}
    every_prompt = [p for split in SPLITS for p in prompts[split]]
    _check_lengths(tokenizer, every_prompt, spec.prompt_len, "prompt")
    _check_lengths(tokenizer, [c for split in SPLITS for c in captions[split]], spec.caption_len, "caption")
    contexts = _encode_contexts(every_prompt, tokenizer, spec, encode_prompts)

    splits = {}
    for split in SPLITS:
        n = len(scenes[split])
        num_shards = math.ceil(n / spec.examples_per_shard)
        files = []
        for k in range(num_shards):
            lo, hi = k * n // num_shards, (k + 1) * n // num_shards
            name = f"{split}.array_record-{k:05d}-of-{num_shards:05d}"
            files.append(write_shard(out / name, _shard_records(spec, codec, tokenizer, scenes[split],
                                                                prompts[split], captions[split], contexts, lo, hi)))
        splits[split] = {"num_examples": n, "files": files}

    context_shape = next(iter(contexts.values())).shape
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": key,
        "spec": dataclasses.asdict(spec),
        "spec_fingerprint": spec.fingerprint(),
        "encoder_id": encoder_id,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                      "bytes": (out / TOKENIZER_FILE).stat().st_size},
        "codec": codec.describe(),
        "fields": {
            "latents": {"shape": list(codec.latent_shape(spec.frames, spec.height, spec.width)), "dtype": "float32"},
            "prompt_ids": {"shape": [spec.prompt_len], "dtype": "int32"},
            "prompt_mask": {"shape": [spec.prompt_len], "dtype": "bool"},
            "caption_ids": {"shape": [spec.caption_len], "dtype": "int32"},
            "caption_mask": {"shape": [spec.caption_len], "dtype": "bool"},
            "context": {"shape": list(context_shape), "dtype": "float32"},
            "attribute_ids": {"shape": [len(ATTRIBUTES)], "dtype": "int32"},
        },
        "splits": splits,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def _shard_records(spec: WorldSpec, codec: ToyCodec, tokenizer: SentencePieceTokenizer, scenes, prompts, captions,
                   contexts: dict[str, np.ndarray], lo: int, hi: int):
    """The records of examples lo..hi-1 of a split, rendered and tokenised RENDER_BATCH at a time."""
    for b in range(lo, hi, RENDER_BATCH):
        batch = range(b, min(b + RENDER_BATCH, hi))
        latents = codec.encode(np.stack([render(spec, scenes[i]) for i in batch]))
        p_ids, p_mask = tokenizer.encode([prompts[i] for i in batch], spec.prompt_len)
        c_ids, c_mask = tokenizer.encode([captions[i] for i in batch], spec.caption_len)
        for row, i in enumerate(batch):
            yield {
                "index": i,
                "latents": latents[row].astype(np.float32),
                "prompt_ids": p_ids[row], "prompt_mask": p_mask[row],
                "caption_ids": c_ids[row], "caption_mask": c_mask[row],
                "context": contexts[prompts[i]],
                "attribute_ids": attribute_ids(spec, scenes[i].attributes),
                "attributes": scenes[i].attributes,
                "prompt": prompts[i], "caption": captions[i],
            }
