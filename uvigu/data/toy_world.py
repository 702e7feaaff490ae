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

On disk, a record is b"UVTW" + crc32(payload) (4 bytes, little endian) + payload, the payload a msgpack map whose
arrays are {dtype, shape, data}. The crc is ours, on top of ArrayRecord's own chunk hashes, so any damage that gets
past the container is still caught, and reported with the file and record.

Layout of `<cache_dir>/toy_world/`: `manifest.json` (format, cache key, spec, encoder id, tokenizer hash, codec, field
shapes, and per split the shard files with their record counts, sizes and sha256), `tokenizer.model`, and
`<split>.array_record-0000k-of-0000n`. The cache key hashes the spec (with the generator version), the tokenizer and
the encoder id: a build whose key matches (and whose files are all there at their recorded sizes) is reused, any
other is rebuilt in a temporary directory and swapped in by rename, under a file lock, so concurrent processes (say the
processes of a multi-process run on one machine) build once and a reader never sees half a world.

Shape letters: T/h/w latent grid, C latent channels, S_p/S_cap prompt/caption tokens, S_c/G context tokens/width.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import msgpack
import numpy as np
from array_record.python import array_record_module

from uvigu.codec import Codec, ToyCodec, open_codec
from uvigu.data.tokenizer import SentencePieceTokenizer, build_tokenizer
from uvigu.data.world import (ATTRIBUTES, SPLITS, WorldSpec, attribute_ids, caption_text, prompt_text, render,
                              split_scenes)

FORMAT = "uvigu-toy-world"
FORMAT_VERSION = 1
RECORD_MAGIC = b"UVTW"
# group_size 1: every record is its own compressed chunk, so a random read decompresses one record (what grain's
# random access wants); zstd shrinks the mostly flat latents several-fold.
WRITER_OPTIONS = "group_size:1,zstd:3"
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
ROOT_NAME = "toy_world"
# Rows per encoder call; the last call is padded to the same size so a jitted encoder compiles once.
ENCODER_BATCH = 64
RENDER_BATCH = 64

PromptEncoder = Callable[[np.ndarray, np.ndarray], Any]
"""encode_prompts(ids int32 [B, S_p], mask bool [B, S_p]) -> float [B, S_c, G]; frozen and deterministic."""

log = logging.getLogger(__name__)


class CorruptShardError(RuntimeError):
    """A shard or record that cannot be read back as written. `path` is the file; `record` the example's index in
    its split (None when a whole file is unusable before any record is asked for)."""

    def __init__(self, message: str, *, path: Path, record: int | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.record = record


# ----------------------------------------------------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------------------------------------------------


def _pack_array(value):
    if isinstance(value, np.ndarray):
        return {"__ndarray__": True, "dtype": value.dtype.str, "shape": list(value.shape),
                "data": np.ascontiguousarray(value).tobytes()}
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _unpack_array(obj):
    if obj.get("__ndarray__"):
        return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    return obj


def encode_record(example: Mapping[str, Any]) -> bytes:
    """A dict of numpy arrays, strings, ints and str->str dicts -> record bytes (magic + crc32 + msgpack)."""
    payload = msgpack.packb(dict(example), default=_pack_array, use_bin_type=True)
    return RECORD_MAGIC + struct.pack("<I", zlib.crc32(payload)) + payload


def decode_record(data: bytes) -> dict[str, Any]:
    """Record bytes -> the dict `encode_record` was given. Raises ValueError saying what is wrong with the bytes."""
    if len(data) < 8 or data[:4] != RECORD_MAGIC:
        raise ValueError(f"not a toy-world record (length {len(data)}, starts {bytes(data[:4])!r})")
    (crc,) = struct.unpack("<I", data[4:8])
    payload = data[8:]
    if zlib.crc32(payload) != crc:
        raise ValueError(f"checksum mismatch (stored crc32 {crc:#010x}, computed {zlib.crc32(payload):#010x})")
    try:
        return msgpack.unpackb(payload, object_hook=_unpack_array, raw=False)
    except Exception as e:  # the crc matched, so this is a writer/reader version mismatch, not damage
        raise ValueError(f"payload does not decode: {e}") from e


# ----------------------------------------------------------------------------------------------------------------------
# Paths and manifest.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyWorldPaths:
    """Where a built toy world lives. `shards[split]` lists the split's ArrayRecord files in record order."""

    root: Path
    manifest: Path
    tokenizer: Path
    shards: Mapping[str, tuple[Path, ...]]

    @classmethod
    def from_root(cls, root: str | os.PathLike) -> "ToyWorldPaths":
        root = Path(root)
        manifest = _read_manifest(root / MANIFEST_FILE)
        return cls(root=root, manifest=root / MANIFEST_FILE, tokenizer=root / manifest["tokenizer"]["file"],
                   shards={split: tuple(root / f["name"] for f in manifest["splits"][split]["files"])
                           for split in SPLITS})

    def read_manifest(self) -> dict[str, Any]:
        return _read_manifest(self.manifest)

    def open_tokenizer(self) -> SentencePieceTokenizer:
        return SentencePieceTokenizer.load(self.tokenizer)

    def open_codec(self, model_folder=None) -> Codec:
        """The codec the manifest names (a WanVAE needs the model folder its latents came from)."""
        return open_codec(self.read_manifest()["codec"], model_folder)


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no toy-world manifest (build the world with build_toy_world)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptShardError(f"{path}: manifest is not valid JSON ({e})", path=path) from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')}, this code "
                         f"reads {FORMAT!r} v{FORMAT_VERSION}")
    return manifest


def cache_key(spec: WorldSpec, tokenizer: SentencePieceTokenizer, encoder_id: str) -> str:
    """Everything the shard bytes depend on: format, world (spec + generator version), vocabulary, encoder."""
    blob = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.fingerprint(),
                       "tokenizer": tokenizer.sha256, "encoder_id": encoder_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    with _locked(cache_dir):
        reason = "rebuild requested" if rebuild else _stale_reason(root, key)
        if reason is None:
            return ToyWorldPaths.from_root(root)
        log.info("building the toy world in %s (%s)", root, reason)
        for leftover in cache_dir.glob(f".{ROOT_NAME}.*-*"):  # from a build that crashed; we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = cache_dir / f".{ROOT_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_world(tmp, spec, tokenizer, encode_prompts, encoder_id, key)
            if root.exists():
                old = cache_dir / f".{ROOT_NAME}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                root.rename(old)
                tmp.rename(root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return ToyWorldPaths.from_root(root)


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
            writer = array_record_module.ArrayRecordWriter(str(out / name), WRITER_OPTIONS)
            for b in range(lo, hi, RENDER_BATCH):
                batch = range(b, min(b + RENDER_BATCH, hi))
                latents = codec.encode(np.stack([render(spec, scenes[split][i]) for i in batch]))
                p_ids, p_mask = tokenizer.encode([prompts[split][i] for i in batch], spec.prompt_len)
                c_ids, c_mask = tokenizer.encode([captions[split][i] for i in batch], spec.caption_len)
                for row, i in enumerate(batch):
                    scene = scenes[split][i]
                    writer.write(encode_record({
                        "index": i,
                        "latents": latents[row].astype(np.float32),
                        "prompt_ids": p_ids[row], "prompt_mask": p_mask[row],
                        "caption_ids": c_ids[row], "caption_mask": c_mask[row],
                        "context": contexts[prompts[split][i]],
                        "attribute_ids": attribute_ids(spec, scene.attributes),
                        "attributes": scene.attributes,
                        "prompt": prompts[split][i], "caption": captions[split][i],
                    }))
            writer.close()
            files.append({"name": name, "num_records": hi - lo, "bytes": (out / name).stat().st_size,
                          "sha256": _sha256(out / name)})
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


# ----------------------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------------------


class ToyWorldSource:
    """One split of a built toy world as a grain `RandomAccessDataSource`: len(source), source[i] -> record dict.

    Readers are opened lazily, one per shard, shared by threads (ArrayRecord readers are thread-safe) and not pickled
    (grain worker processes reopen them). Every failure to read a record raises CorruptShardError naming the shard
    file, the record's position in it and the example's index in the split: shard sizes are checked against the
    manifest up front (a truncated file fails at construction), the shard's record count when it is opened, the
    record's ArrayRecord chunk hash and our crc32 when it is read.
    """

    def __init__(self, path: str | os.PathLike | ToyWorldPaths, split: str):
        paths = path if isinstance(path, ToyWorldPaths) else ToyWorldPaths.from_root(path)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        manifest = paths.read_manifest()
        entries = manifest["splits"][split]["files"]
        self.split = split
        self.root = paths.root
        self.key = manifest["key"]
        self._files = [paths.root / e["name"] for e in entries]
        self._counts = [e["num_records"] for e in entries]
        self._ends = np.cumsum(self._counts).tolist()
        for shard_path, entry, end in zip(self._files, entries, self._ends):
            first = end - entry["num_records"]
            if not shard_path.exists():
                raise CorruptShardError(f"{shard_path}: shard missing (records {first}..{end - 1} of split "
                                        f"{split!r})", path=shard_path, record=first)
            size = shard_path.stat().st_size
            if size != entry["bytes"]:
                raise CorruptShardError(
                    f"{shard_path}: {size} bytes, the manifest says {entry['bytes']} (truncated or overwritten?); "
                    f"records {first}..{end - 1} of split {split!r} cannot be trusted", path=shard_path, record=first)
        self._readers: list[Any] = [None] * len(self._files)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        return f"ToyWorldSource(root={str(self.root)!r}, split={self.split!r}, key={self.key[:16]!r})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self._files)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _reader(self, shard: int, record: int, position: int):
        if self._readers[shard] is not None:
            return self._readers[shard]
        path = self._files[shard]
        with self._lock:
            if self._readers[shard] is None:
                where = f"{path}: cannot read record {position} (example {record} of split {self.split!r})"
                try:
                    reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
                except Exception as e:
                    raise CorruptShardError(f"{where}: the shard does not open ({e})", path=path,
                                            record=record) from e
                if not reader.ok() or reader.num_records() != self._counts[shard]:
                    raise CorruptShardError(
                        f"{where}: the shard holds {reader.num_records()} readable records, the manifest says "
                        f"{self._counts[shard]} (truncated or corrupt file)", path=path, record=record)
                self._readers[shard] = reader
        return self._readers[shard]

    def __getitem__(self, index) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for split {self.split!r} of {len(self)} examples")
        shard = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[shard] - self._counts[shard])
        path = self._files[shard]
        reader = self._reader(shard, index, position)
        where = f"{path}: record {position} (example {index} of split {self.split!r})"
        try:
            data = reader.read([position])[0]
        except Exception as e:
            raise CorruptShardError(f"{where} cannot be read: {e}", path=path, record=index) from e
        try:
            example = decode_record(data)
        except ValueError as e:
            raise CorruptShardError(f"{where} is corrupt: {e}", path=path, record=index) from e
        if example.get("index") != index:
            raise CorruptShardError(f"{where} holds example {example.get('index')} (shards out of order?)",
                                    path=path, record=index)
        return example
