"""The one record schema and shard format shared by every producer of training data (the toy world, preprocessed real
videos) and every reader (training, evaluation, TFDS export).

A record is one training example, a dict:

    index          int                    the example's id: its index in its split (toy world) or its line in the
                                          input manifest (preprocessed videos); the reader checks it (see below)
    latents        float32 [T, h, w, C]   the codec's normalised latents of the video (ToyCodec / WanVAE)
    context        float32 [S_c, G]       the prompt's frozen text-encoder embedding, rows past the prompt zeroed
    prompt_ids     int32   [S_p]          + prompt_mask  bool [S_p]    tokenised prompt (stage 1's target), eos, pad
    caption_ids    int32   [S_cap]        + caption_mask bool [S_cap]  tokenised detailed caption (stage 2's target)
    prompt, caption str
  producer extras: toy world `attribute_ids` int32 [7] and `attributes` {name: value}; preprocessed videos `video`
  (the source path) and `bucket` [F, H, W] (the pixel size the clip was cut and cropped to).

On disk a record is b"UVTW" + crc32(payload) (4 bytes, little endian) + payload, the payload a msgpack map whose
arrays are {dtype, shape, data}. The crc is ours, on top of ArrayRecord's own chunk hashes, so damage that gets past
the container is still caught and reported with the file and record.

A shard set is a folder with `manifest.json` (format, tokenizer, codec, fields, and per split the shard files in
record order: name, num_records, bytes, sha256, optionally `bucket` [F, H, W] and `indices`, the record ids the file
holds in order; without `indices` a split's files hold ids 0, 1, 2, ... contiguously) and the ArrayRecord files.
Formats: "uvigu-toy-world" (`toy_world.py`) and "uvigu-shards" (`preprocess.py`); both are read by `ShardPaths` and
`ShardSource`. Shards are written under a temporary name, fsynced and renamed into place (`write_shard`), so a shard
file under its final name is always whole.

Shape letters: T/h/w latent grid, C latent channels, S_p/S_cap prompt/caption tokens, S_c/G context tokens/width,
F/H/W frames and pixels of a bucket.
"""

from __future__ import annotations

import bisect
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import struct
import threading
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from array_record.python import array_record_module

RECORD_MAGIC = b"UVTW"
# group_size 1: every record is its own compressed chunk, so a random read decompresses one record (what grain's
# random access wants); zstd shrinks the mostly flat latents several-fold.
WRITER_OPTIONS = "group_size:1,zstd:3"
MANIFEST_FILE = "manifest.json"
# In a versioned shard set (the toy world's `toy_world.versions/<version>/`): every open ShardSource holds a shared
# flock on this file, and a builder deletes an old version only when it can take the lock exclusively, so a rebuild
# never removes files under a reader that is still open.
READERS_LOCK = ".readers.lock"
SPLITS = ("train", "validation", "test")
TOY_WORLD_FORMAT = "uvigu-toy-world"
SHARDS_FORMAT = "uvigu-shards"
FORMATS = {TOY_WORLD_FORMAT: 1, SHARDS_FORMAT: 1}  # format -> the version this code reads


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
        raise ValueError(f"not a toy-world record or latent-shard record (length {len(data)}, starts "
                         f"{bytes(data[:4])!r})")
    (crc,) = struct.unpack("<I", data[4:8])
    payload = data[8:]
    if zlib.crc32(payload) != crc:
        raise ValueError(f"checksum mismatch (stored crc32 {crc:#010x}, computed {zlib.crc32(payload):#010x})")
    try:
        return msgpack.unpackb(payload, object_hook=_unpack_array, raw=False)
    except Exception as e:  # the crc matched, so this is a writer/reader version mismatch, not damage
        raise ValueError(f"payload does not decode: {e}") from e


def field_shapes(latents: Sequence[int] | None, context: Sequence[int], prompt_len: int,
                 caption_len: int) -> dict[str, dict[str, Any]]:
    """The manifest's `fields` entry for the common schema (latents None: it differs per bucket)."""
    return {
        "latents": {"shape": None if latents is None else list(latents), "dtype": "float32"},
        "context": {"shape": list(context), "dtype": "float32"},
        "prompt_ids": {"shape": [prompt_len], "dtype": "int32"},
        "prompt_mask": {"shape": [prompt_len], "dtype": "bool"},
        "caption_ids": {"shape": [caption_len], "dtype": "int32"},
        "caption_mask": {"shape": [caption_len], "dtype": "bool"},
    }


# ----------------------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """The hidden name `write_shard` / `write_json` stage `path` under (a leftover one is from a killed writer)."""
    return path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"


def is_temp_of(candidate: Path, path: Path) -> bool:
    return candidate.parent == path.parent and candidate.name.startswith(f".{path.name}.tmp-")


def write_shard(path: str | os.PathLike, records: Iterable[Mapping[str, Any] | bytes]) -> dict[str, Any]:
    """Writes `records` (dicts or `encode_record` bytes) as one ArrayRecord file at `path`: staged under a hidden
    temporary name, fsynced, renamed into place (then the folder fsynced). A crash leaves at most the temp file, never
    a partial file under `path`. Returns the manifest entry {name, num_records, bytes, sha256}."""
    path = Path(path)
    tmp = temp_name(path)
    count = 0
    writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record if isinstance(record, bytes) else encode_record(record))
            count += 1
        writer.close()
        writer = None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        entry = {"name": path.name, "num_records": count, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp)}
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # already failing; the temp file goes either way
                pass
        tmp.unlink(missing_ok=True)
        raise
    return entry


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON written atomically (temp name, fsync, rename)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """A shard set's manifest.json, its format checked; FileNotFoundError / CorruptShardError / ValueError naming it."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no shard manifest (build the toy world with build_toy_world, or preprocess "
                                "videos with `python -m uvigu.data.preprocess`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptShardError(f"{path}: manifest is not valid JSON ({e})", path=path) from e
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if FORMATS.get(fmt) != version:
        readable = ", ".join(f"{k!r} v{v}" for k, v in FORMATS.items())
        raise ValueError(f"{path}: format {fmt!r} v{version}, this code reads {readable}")
    return manifest


# ----------------------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------------------


def bucket_name(bucket: Sequence[int] | str) -> str:
    """(F, H, W) or "FxHxW" -> "FxHxW"."""
    if isinstance(bucket, str):
        return bucket
    return "x".join(str(int(v)) for v in bucket)


@dataclasses.dataclass(frozen=True)
class ShardPaths:
    """Where a shard set lives. `shards[split]` lists the split's ArrayRecord files in record order."""

    root: Path
    manifest: Path
    tokenizer: Path
    shards: Mapping[str, tuple[Path, ...]]

    @classmethod
    def from_root(cls, root: str | os.PathLike) -> "ShardPaths":
        root = Path(root)
        manifest = read_manifest(root / MANIFEST_FILE)
        if manifest.get("complete") is False:
            raise ValueError(f"{root / MANIFEST_FILE}: preprocessing is not finished ({manifest.get('status', '')}); "
                             "rerun `python -m uvigu.data.preprocess` with the same arguments for the missing "
                             "processes")
        return cls(root=root, manifest=root / MANIFEST_FILE, tokenizer=root / manifest["tokenizer"]["file"],
                   shards={split: tuple(root / f["name"] for f in manifest["splits"][split]["files"])
                           for split in SPLITS})

    def read_manifest(self) -> dict[str, Any]:
        return read_manifest(self.manifest)

    def buckets(self, split: str) -> list[str]:
        """The buckets ("FxHxW") of a split's shards, in order of first appearance (none for the toy world)."""
        out: list[str] = []
        for entry in self.read_manifest()["splits"][split]["files"]:
            if "bucket" in entry and bucket_name(entry["bucket"]) not in out:
                out.append(bucket_name(entry["bucket"]))
        return out

    def open_tokenizer(self):
        """The tokenizer the records were tokenised with: the toy world's SentencePiece model, or the umT5 tokenizer
        folder copied next to preprocessed shards."""
        kind = self.read_manifest()["tokenizer"].get("model")
        if kind == "umt5_tokenizer":
            from uvigu.data.umt5_tokenizer import UMT5Tokenizer

            return UMT5Tokenizer.load(self.tokenizer)
        from uvigu.data.tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.load(self.tokenizer)

    def open_codec(self, model_folder=None):
        """The codec the manifest names. A WanVAE needs the model folder its latents came from: `model_folder`, else
        the one the manifest records."""
        from uvigu.codec import open_codec

        manifest = self.read_manifest()
        if model_folder is None:
            model_folder = manifest.get("model", {}).get("path")
        return open_codec(manifest["codec"], model_folder)


class ShardSource:
    """One split of a shard set (optionally one bucket of it) as a grain `RandomAccessDataSource`: len(source),
    source[i] -> record dict.

    Readers are opened lazily, one per shard, shared by threads (ArrayRecord readers are thread-safe) and not pickled
    (grain worker processes reopen them). Every failure to read a record raises CorruptShardError naming the shard
    file, the record's position in it and the example's index in the split: shard sizes are checked against the
    manifest up front (a truncated file fails at construction), the shard's record count when it is opened, the
    record's ArrayRecord chunk hash, our crc32 and the record's id (`index`, against the manifest) when it is read.

    bucket: (F, H, W) or "FxHxW": only that bucket's shards (a batch holds one shape). None: every shard of the split.
    """

    def __init__(self, path: str | os.PathLike | ShardPaths, split: str, *, bucket: Sequence[int] | str | None = None):
        paths = path if isinstance(path, ShardPaths) else ShardPaths.from_root(path)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits are {SPLITS}")
        manifest = paths.read_manifest()
        entries = manifest["splits"][split]["files"]
        if bucket is not None:
            want = bucket_name(bucket)
            known = paths.buckets(split)
            if want not in known:
                raise ValueError(f"{paths.manifest}: split {split!r} has no bucket {want!r}; its buckets: {known}")
            entries = [e for e in entries if bucket_name(e.get("bucket", "")) == want]
        self.split = split
        self.bucket = None if bucket is None else bucket_name(bucket)
        self.root = paths.root
        self.key = manifest["key"]
        self._files = [paths.root / e["name"] for e in entries]
        self._counts = [e["num_records"] for e in entries]
        self._ends = np.cumsum(self._counts).tolist()
        # The id each record must carry: listed per shard, else contiguous over the split.
        self._ids = [list(e["indices"]) if "indices" in e else None for e in entries]
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
        self._hold = _hold_version(self.root)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __repr__(self) -> str:
        bucket = f", bucket={self.bucket!r}" if self.bucket else ""
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}{bucket}, key={self.key[:16]!r})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self._files)
        del state["_lock"], state["_hold"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._hold = _hold_version(self.root)

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
        ids = self._ids[shard]
        expected = index if ids is None else ids[position]
        if example.get("index") != expected:
            raise CorruptShardError(f"{where} holds example {example.get('index')}, the manifest says {expected} "
                                    "(shards out of order?)", path=path, record=index)
        return example


def _hold_version(root: Path):
    """A shared flock on `root`'s READERS_LOCK (None where the shard set has none): held as long as the returned file
    is open, i.e. as long as the ShardSource lives (a grain worker's copy takes its own)."""
    path = Path(root) / READERS_LOCK
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    fcntl.flock(f, fcntl.LOCK_SH)
    return f
