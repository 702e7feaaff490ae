"""A small reader and writer for the safetensors format, without torch and without the `safetensors` package.

Why our own: the converter must stream a 14B checkpoint tensor by tensor with peak RAM near the size of its output,
and must say exactly which file and which tensor is broken when a download was cut short. The format is simple
enough to read directly (https://github.com/huggingface/safetensors, "Format"):

    [8 bytes: N, unsigned little-endian]  [N bytes: JSON header]  [data buffer]

The header maps each tensor name to {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]} (offsets relative
to the start of the data buffer) plus an optional "__metadata__" dict of strings. Data is little-endian, C order.

Tensors are memory-mapped (`np.memmap`) and handed out one at a time as read-only numpy views; `release(name)` drops
the pages a tensor touched from this process (madvise DONTNEED), so reading a whole file does not leave the whole
file resident in the converter's RSS on top of its output.

Sharded checkpoints (`*.safetensors.index.json`, {"weight_map": {tensor: shard file}}) and loose sets of files read
through the same interface (`TensorCollection`): `keys()`, `info(name)`, `get(name)`, `release(name)`, `where(name)`.

Hostile or broken input is a `SafetensorsError` naming the file, never a traceback: a header that is not a JSON
object (or is nested 100,000 deep), a header length past the end of the file, offsets outside the data buffer or
overlapping, metadata that is not {str: str}; an index whose shard names are absolute or contain `..` (an index may
only name files in its own folder).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from tools.convert_wan_weights.jsonfile import parse_json, read_json, short_repr

__all__ = [
    "DTYPES",
    "SafetensorsError",
    "TensorInfo",
    "SafetensorsFile",
    "TensorCollection",
    "MultiFileTensors",
    "open_safetensors_index",
    "write_safetensors",
    "write_safetensors_lazy",
    "write_sharded_safetensors",
]

# safetensors dtype name -> little-endian numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAME_OF_DTYPE = {dt: name for name, dt in DTYPES.items()}

# A header this large is certainly corrupt (real headers of 14B models are ~100 KB); refusing it early avoids
# trying to parse gigabytes of tensor data as JSON.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file or index that cannot be read as promised; the message names the file (and tensor)."""


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor, without reading it."""

    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


class TensorCollection:
    """Interface of a set of named tensors that can be read one at a time (safetensors files, a torch state dict).

    Subclasses provide `keys`, `info`, `get`, `where`; `release` is optional (a no-op here).
    """

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def where(self, name: str) -> Path:
        raise NotImplementedError

    def release(self, name: str) -> None:
        pass

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, name: str) -> bool:
        return name in set(self.keys())

    @property
    def files(self) -> list[Path]:
        raise NotImplementedError


class SafetensorsFile(TensorCollection):
    """One memory-mapped .safetensors file. The header is parsed and validated on open; tensor data is not touched
    until `get`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            if self.path.is_dir():
                raise SafetensorsError(f"{self.path}: is a folder, expected a safetensors file")
            size = self.path.stat().st_size
            if size < 8:
                raise SafetensorsError(f"{self.path}: truncated: {size} bytes, shorter than the 8-byte header length")
            with open(self.path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                if header_len > size - 8:
                    raise SafetensorsError(
                        f"{self.path}: corrupt or truncated: header length {header_len} runs past the end of the file "
                        f"({size} bytes)"
                    )
                if header_len > _MAX_HEADER_BYTES:
                    raise SafetensorsError(f"{self.path}: corrupt header: claims {header_len} bytes of JSON")
                raw = f.read(header_len)
        except FileNotFoundError:
            raise SafetensorsError(f"{self.path}: no such safetensors file") from None
        except OSError as e:  # no permission, I/O error: name the file, no traceback
            raise SafetensorsError(f"{self.path}: cannot read ({e.strerror or e})") from None
        header = parse_json(raw, str(self.path), SafetensorsError, expect=None,
                            what="corrupt header: not valid UTF-8 JSON")
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: corrupt header: expected a JSON object, got {type(header).__name__}")

        meta = header.pop("__metadata__", None) or {}
        # The format (and the reference library) allows only {str: str} here.
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SafetensorsError(f"{self.path}: corrupt header: __metadata__ is not an object of strings "
                                   f"({short_repr(meta)})")
        self.metadata: dict[str, str] = meta
        data_start = 8 + header_len
        data_len = size - data_start
        self._infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self._infos[name] = _parse_entry(self.path, name, entry, data_start, data_len)
        _check_no_overlap(self.path, self._infos)
        self._mmap: np.memmap | None = None

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self._infos)} tensors)"

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None

    def where(self, name: str) -> Path:
        self.info(name)
        return self.path

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def _buffer(self) -> np.memmap:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mmap

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view onto the mapped file (no copy)."""
        info = self.info(name)
        if info.nbytes == 0:
            empty = np.zeros(info.shape, info.numpy_dtype)
            empty.flags.writeable = False
            return empty
        raw = self._buffer()[info.begin : info.begin + info.nbytes]
        return np.ndarray(info.shape, dtype=info.numpy_dtype, buffer=raw).view(np.ndarray)

    def release(self, name: str) -> None:
        """Drops the pages of tensor `name` from this process's resident set (they stay in the page cache).

        Call it once the tensor has been copied out and no view of it is used any more: reading through the mapping
        again afterwards is still correct (the pages fault back in), just slower.
        """
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.info(name)
        if info.nbytes == 0:
            return
        page = mmap.PAGESIZE
        start = (info.begin // page) * page
        self._mmap._mmap.madvise(mmap.MADV_DONTNEED, start, info.begin + info.nbytes - start)

    def close(self) -> None:
        """Forgets the mapping; numpy unmaps it once no view of it is alive."""
        self._mmap = None


def _parse_entry(path: Path, name: str, entry, data_start: int, data_len: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise SafetensorsError(f"{where}: corrupt header entry {short_repr(entry)} (needs dtype, shape, data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(f"{where}: unsupported dtype {short_repr(dtype)}; supported: {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{where}: corrupt shape {short_repr(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise SafetensorsError(f"{where}: corrupt data_offsets {short_repr(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise SafetensorsError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, but shape {shape} x {dtype} needs {expected}"
        )
    if end > data_len:
        raise SafetensorsError(
            f"{where}: truncated file: the tensor's data ends at byte {data_start + end}, the file has only "
            f"{data_start + data_len} bytes"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=data_start + begin, nbytes=end - begin)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _check_no_overlap(path: Path, infos: Mapping[str, TensorInfo]) -> None:
    spans = sorted((i.begin, i.begin + i.nbytes, n) for n, i in infos.items() if i.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SafetensorsError(f"{path}: corrupt header: tensors {n0!r} and {n1!r} overlap in the data buffer")


# ----------------------------------------------------------------------------------------------------------------------
# Several files as one set of tensors.
# ----------------------------------------------------------------------------------------------------------------------


class MultiFileTensors(TensorCollection):
    """The union of several safetensors files; a name present in two files is an error naming both."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self._files = [SafetensorsFile(p) for p in paths]
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self._files:
            for name in f.keys():
                if name in self._owner:
                    raise SafetensorsError(
                        f"tensor {name!r} is stored twice: in {self._owner[name].path} and in {f.path}"
                    )
                self._owner[name] = f

    def __repr__(self) -> str:
        return f"MultiFileTensors({[str(f.path) for f in self._files]})"

    @property
    def files(self) -> list[Path]:
        return [f.path for f in self._files]

    def keys(self) -> list[str]:
        return list(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, name: str) -> bool:
        return name in self._owner

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._owner[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {[str(f.path) for f in self._files]}") from None

    def info(self, name: str) -> TensorInfo:
        return self._file(name).info(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def release(self, name: str) -> None:
        self._file(name).release(name)

    def where(self, name: str) -> Path:
        return self._file(name).path


def open_safetensors_index(index_path: str | os.PathLike) -> MultiFileTensors:
    """Opens a sharded checkpoint from its `*.safetensors.index.json`.

    The index and the shards must agree: a shard file the index names must exist, every tensor the index maps to a
    shard must be in that shard, and every shard's tensors must be listed in the index (a mismatch means a stale or
    mixed download, which we would rather report than guess about).
    """
    index_path = Path(index_path)
    index = read_json(index_path, SafetensorsError, expect=None)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SafetensorsError(f"{index_path}: no 'weight_map' {{tensor name: shard file}} in the index")
    not_names = [f"{k!r}: {short_repr(v)}" for k, v in weight_map.items() if not isinstance(v, str) or not v]
    if not_names:
        raise SafetensorsError(f"{index_path}: weight_map values must be shard file names; got {not_names[:5]}")
    shard_names = sorted(set(weight_map.values()))
    outside = [s for s in shard_names if not _is_plain_relative(s)]
    if outside:
        raise SafetensorsError(
            f"{index_path}: shard name(s) {outside[:10]} are absolute or contain '..'; an index may only name files "
            "in its own folder (refusing to read files elsewhere)")
    missing = [s for s in shard_names if not (index_path.parent / s).is_file()]
    if missing:
        raise SafetensorsError(f"{index_path}: shard file(s) listed in the index are missing: {missing}")
    tensors = MultiFileTensors(index_path.parent / s for s in shard_names)
    for name, shard in weight_map.items():
        if name not in tensors:
            raise SafetensorsError(f"{index_path}: tensor {name!r} is mapped to {shard}, which does not contain it")
        if tensors.where(name).name != Path(shard).name:
            raise SafetensorsError(
                f"{index_path}: tensor {name!r} is mapped to {shard} but found in {tensors.where(name).name}"
            )
    unlisted = [n for n in tensors.keys() if n not in weight_map]
    if unlisted:
        raise SafetensorsError(
            f"{index_path}: shard(s) hold tensors the index does not list: {unlisted[:10]}"
            + (f" (+{len(unlisted) - 10} more)" if len(unlisted) > 10 else "")
        )
    return tensors


def _is_plain_relative(name: str) -> bool:
    """A shard name that stays inside the index's folder: relative, no '..' part (either slash), no NUL. Symlinks are
    not resolved: the Hugging Face cache keeps every file as a link into ../../blobs/."""
    parts = name.replace("\\", "/").split("/")
    return (not name.startswith(("/", "\\")) and "\0" not in name and ".." not in parts
            and not (len(name) >= 2 and name[0].isalpha() and name[1] == ":"))  # C:\... written on Windows


# ----------------------------------------------------------------------------------------------------------------------
# Writing (tests and the peak-RAM script synthesise checkpoints with these).
# ----------------------------------------------------------------------------------------------------------------------


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Writes `tensors` (name -> numpy array; any dtype in `DTYPES`) to one .safetensors file, in the given order;
    returns the file size."""
    entries = []
    for name, array in tensors.items():
        array = np.asarray(array)
        entries.append((name, array.shape, array.dtype, lambda a=array: a))
    return _write(Path(path), entries, metadata)


def _write(path: Path, entries, metadata) -> int:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype, _ in entries:
        dtype = np.dtype(dtype)
        if dtype.newbyteorder("<") not in _NAME_OF_DTYPE and dtype not in _NAME_OF_DTYPE:
            raise SafetensorsError(f"{path}: tensor {name!r}: dtype {dtype} has no safetensors name")
        st_dtype = _NAME_OF_DTYPE.get(dtype) or _NAME_OF_DTYPE[dtype.newbyteorder("<")]
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data buffer starts 8-byte aligned (the format allows trailing spaces)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype, produce in entries:
            array = np.asarray(produce())
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise SafetensorsError(f"{path}: tensor {name!r} changed shape/dtype while being written")
            little = array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.byteorder == ">" else array
            f.write(np.ascontiguousarray(little).tobytes(order="C"))
    return 8 + len(raw) + offset


def write_safetensors_lazy(
    path: str | os.PathLike,
    entries: Iterable[tuple[str, tuple[int, ...], np.dtype, "callable"]],
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Like `write_safetensors`, for (name, shape, dtype, produce) entries whose arrays are made by `produce()` only
    when written, one at a time (the peak-RAM script writes hundreds of MB this way with little memory)."""
    return _write(Path(path), list(entries), metadata)


def write_sharded_safetensors(
    folder: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    num_shards: int,
    basename: str = "diffusion_pytorch_model",
) -> Path:
    """Splits `tensors` over `num_shards` files named like diffusers / transformers do
    (`{basename}-00001-of-00002.safetensors`) and writes `{basename}.safetensors.index.json`; returns the index path.
    Tensors are assigned in order, balancing bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if not 1 <= num_shards <= max(1, len(names)):
        raise ValueError(f"cannot split {len(names)} tensors into {num_shards} shards")
    sizes = [np.asarray(tensors[n]).nbytes for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    running, k = 0, 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        remaining_names = len(names) - i
        remaining_shards = num_shards - k - 1
        # Move on once this shard holds its share of bytes, but never leave a later shard empty.
        if shards[k] and k < num_shards - 1 and (running >= total * (k + 1) / num_shards
                                                 or remaining_names <= remaining_shards):
            k += 1
        shards[k].append(name)
        running += size
    weight_map = {}
    for k, shard_names in enumerate(shards):
        file = f"{basename}-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        write_safetensors(folder / file, {n: tensors[n] for n in shard_names})
        weight_map.update({n: file for n in shard_names})
    index = folder / f"{basename}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return index
