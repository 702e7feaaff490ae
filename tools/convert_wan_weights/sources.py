"""Find out what a source folder holds and read its config, before any tensor data is touched.

Three kinds of folder are accepted (DESIGN.md §2, §5):

  original               the Wan-AI release: `config.json` with `dim, ffn_dim, num_heads, in_dim, ...` (`_class_name`
                         "WanModel" or none) next to `diffusion_pytorch_model*.safetensors` (one file, or shards with
                         a `*.safetensors.index.json`) or, in older repacks, a `.pth`/`.pt`; keys in the original
                         naming, maybe prefixed `model.diffusion_model.`.
  diffusers-pipeline     a diffusers pipeline folder: `model_index.json` and a `transformer/` subfolder.
  diffusers-transformer  a lone diffusers transformer folder: `config.json` with `_class_name: WanTransformer3DModel`.

The result, `Source`, knows its kind, its tensors (lazily readable), how to map each stored key to its diffusers name,
and the `WanConfig` the config.json describes, cross-checked against the tensor shapes (`wan_keys.infer_config`): a
field the config states but the tensors contradict is an error naming the field and both values; a field the config
omits (original releases leave out text_dim and patch_size) is read off the shapes and reported in `notes`.

Only text-to-video checkpoints are accepted: image-to-video, first-last-frame and VACE variants carry extra weights
(image embedder, extra cross-attention projections, VACE blocks) that `WanDiT` has no place for, so they are refused by
config and by key names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from tools.convert_wan_weights.jsonfile import read_json, short_repr
from tools.convert_wan_weights.safetensors_io import (
    MultiFileTensors,
    SafetensorsFile,
    TensorCollection,
    TensorInfo,
    open_safetensors_index,
)
from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig

ORIGINAL = "original"
DIFFUSERS_PIPELINE = "diffusers-pipeline"
DIFFUSERS_TRANSFORMER = "diffusers-transformer"

DIFFUSERS_CLASS = "WanTransformer3DModel"

# Weight names that only image-to-video / FLF2V / VACE variants have (original and diffusers spellings).
_NON_T2V_KEY = re.compile(r"(^|\.)(img_emb|image_embedder|k_img|v_img|norm_k_img|add_k_proj|add_v_proj|"
                          r"norm_added_k|vace_blocks|vace_patch_embedding)(\.|$)")

# Files in an original release folder that are not the DiT (VAE, text / image encoders).
_NOT_DIT_WEIGHTS = re.compile(r"vae|t5|clip|tokenizer|text_encoder|image_encoder", re.IGNORECASE)

# original config.json field -> WanConfig field
_ORIGINAL_FIELDS = {
    "dim": "dim",
    "ffn_dim": "ffn_dim",
    "freq_dim": "freq_dim",
    "num_heads": "num_heads",
    "num_layers": "num_layers",
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "text_dim": "text_dim",
    "text_len": "text_len",
    "patch_size": "patch_size",
    "eps": "eps",
    "cross_attn_norm": "cross_attn_norm",
}
# diffusers config.json field -> WanConfig field (dim / num_heads come from num_attention_heads x attention_head_dim)
_DIFFUSERS_FIELDS = {
    "ffn_dim": "ffn_dim",
    "freq_dim": "freq_dim",
    "num_layers": "num_layers",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "text_dim": "text_dim",
    "patch_size": "patch_size",
    "eps": "eps",
    "cross_attn_norm": "cross_attn_norm",
    "rope_max_seq_len": "rope_max_positions",
}


class SourceError(ValueError):
    """The source folder is not a convertible Wan2.1 T2V checkpoint; the message says what was looked for / wrong."""


@dataclasses.dataclass
class Source:
    """A detected checkpoint: what it is, where its config and tensors are, and the config they describe."""

    kind: str
    folder: Path  # the folder holding the DiT's config.json and weights (`transformer/` for a pipeline)
    config_path: Path
    raw_config: dict[str, Any]
    tensors: TensorCollection
    to_diffusers_key: Callable[[str], str]  # stored key -> diffusers key; KeyError for a key with no place
    config: WanConfig | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def weight_files(self) -> list[Path]:
        return self.tensors.files

    def describe(self, given: Path) -> dict[str, Any]:
        """What goes into the converted checkpoint's config.json under "source"."""
        return {
            "kind": self.kind,
            "path": str(given.resolve()),
            "config_file": str(self.config_path.resolve()),
            "weight_files": [str(p.resolve()) for p in self.weight_files],
            "tensor_count": len(self.tensors),
            "notes": list(self.notes),
        }


# ----------------------------------------------------------------------------------------------------------------------
# Detection.
# ----------------------------------------------------------------------------------------------------------------------

_LOOKED_FOR = (
    "looked for: (a) an original Wan2.1 release folder (config.json with dim / num_heads / num_layers / in_dim ... "
    "and diffusion_pytorch_model*.safetensors or a .pth), (b) a diffusers pipeline folder (model_index.json and "
    f"transformer/), (c) a diffusers transformer folder (config.json with _class_name {DIFFUSERS_CLASS})"
)


def detect_source(src: str | Path) -> Source:
    """Works out which kind of folder `src` is, opens its tensors (headers only) and builds the checked config."""
    src = Path(src)
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    if not src.is_dir():
        raise SourceError(f"{src}: is a file; SRC must be a checkpoint folder; {_LOOKED_FOR}")

    if (src / "transformer").is_dir() or (src / "model_index.json").is_file():
        source = _pipeline(src)
    elif (src / "config.json").is_file():
        raw = _read_json(src / "config.json")
        if _is_diffusers_config(raw):
            source = _diffusers_transformer(src, src / "config.json", raw, DIFFUSERS_TRANSFORMER)
        elif "dim" in raw and "num_heads" in raw:
            source = _original(src, src / "config.json", raw)
        else:
            raise SourceError(
                f"{src / 'config.json'}: not a Wan2.1 config (_class_name={raw.get('_class_name')!r}, keys "
                f"{sorted(raw)[:12]}); {_LOOKED_FOR}"
            )
    else:
        raise SourceError(f"{src}: no config.json or model_index.json; {_LOOKED_FOR}")

    _reject_non_t2v_keys(source)
    _check_key_naming(source)
    source.config = _checked_config(source)
    return source


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, SourceError)


def _is_diffusers_config(raw: dict[str, Any]) -> bool:
    """diffusers configs name their class; any Wan* transformer class counts here so that variants (VACE, ...) get
    a specific refusal rather than "not recognised"."""
    cls = str(raw.get("_class_name", ""))
    return cls == DIFFUSERS_CLASS or ("num_attention_heads" in raw and (cls.startswith("Wan") or not cls))


def _pipeline(src: Path) -> Source:
    index_path = src / "model_index.json"
    notes = []
    if index_path.is_file():
        index = _read_json(index_path)
        entry = index.get("transformer")
        cls = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
        if cls is None:
            raise SourceError(f"{index_path}: no 'transformer' component; {_LOOKED_FOR}")
        if cls != DIFFUSERS_CLASS:
            raise SourceError(
                f"{index_path}: transformer is a {cls}, only {DIFFUSERS_CLASS} (Wan2.1 text-to-video) is supported"
            )
        pipeline_cls = str(index.get("_class_name", ""))
        if "ImageToVideo" in pipeline_cls or "VACE" in pipeline_cls or index.get("image_encoder") not in (None, [None, None]):
            raise SourceError(
                f"{index_path}: {pipeline_cls or 'this pipeline'} is an image-to-video / VACE pipeline; only "
                "Wan2.1 text-to-video is supported"
            )
    else:
        notes.append(f"{src} has transformer/ but no model_index.json; converting transformer/ alone")
    folder = src / "transformer"
    if not (folder / "config.json").is_file():
        raise SourceError(f"{folder / 'config.json'}: missing (a diffusers pipeline keeps the DiT in transformer/)")
    raw = _read_json(folder / "config.json")
    if not _is_diffusers_config(raw):
        raise SourceError(
            f"{folder / 'config.json'}: _class_name {raw.get('_class_name')!r} is not {DIFFUSERS_CLASS}"
        )
    source = _diffusers_transformer(folder, folder / "config.json", raw, DIFFUSERS_PIPELINE)
    source.notes[:0] = notes
    return source


def _diffusers_transformer(folder: Path, config_path: Path, raw: dict[str, Any], kind: str) -> Source:
    cls = raw.get("_class_name")
    if cls is not None and cls != DIFFUSERS_CLASS:
        raise SourceError(f"{config_path}: _class_name {cls!r}: only {DIFFUSERS_CLASS} (text-to-video) is supported")
    for field in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if raw.get(field) is not None:
            raise SourceError(
                f"{config_path}: {field}={raw[field]!r} marks an image-to-video / first-last-frame model; only "
                "Wan2.1 text-to-video is supported"
            )
    qk_norm = raw.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise SourceError(f"{config_path}: qk_norm={qk_norm!r}; WanDiT implements only 'rms_norm_across_heads'")
    return Source(kind=kind, folder=folder, config_path=config_path, raw_config=raw,
                  tensors=_open_weights(folder, diffusers=True), to_diffusers_key=_diffusers_key)


def _original(folder: Path, config_path: Path, raw: dict[str, Any]) -> Source:
    notes = []
    model_type = raw.get("model_type")
    if model_type is None:
        notes.append("config.json has no model_type; treated as t2v (no image-to-video weights found)")
    elif model_type != "t2v":
        raise SourceError(
            f"{config_path}: model_type={model_type!r}; only Wan2.1 text-to-video ('t2v') checkpoints are supported"
        )
    window = raw.get("window_size", (-1, -1))
    if tuple(window) != (-1, -1):
        raise SourceError(f"{config_path}: window_size={window!r}; WanDiT implements only global attention (-1, -1)")
    if raw.get("qk_norm", True) is not True:
        raise SourceError(f"{config_path}: qk_norm={raw['qk_norm']!r}; WanDiT always applies q/k RMSNorm")
    return Source(kind=ORIGINAL, folder=folder, config_path=config_path, raw_config=raw,
                  tensors=_open_weights(folder, diffusers=False), to_diffusers_key=wan_keys.original_to_diffusers_key,
                  notes=notes)


def _diffusers_key(key: str) -> str:
    """diffusers checkpoints are stored under their own names; anything `param_target` does not know is unexpected."""
    wan_keys.param_target(key)
    return key


# ----------------------------------------------------------------------------------------------------------------------
# Weight files.
# ----------------------------------------------------------------------------------------------------------------------


def _open_weights(folder: Path, *, diffusers: bool) -> TensorCollection:
    """The DiT's tensors in `folder`: a safetensors index if there is one, else the safetensors files, else (original
    releases only) a single torch checkpoint that is not the VAE or a text / image encoder."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = [p for p in indexes if p.name.startswith("diffusion_pytorch_model")]
        if len(preferred) != 1:
            raise SourceError(f"{folder}: several safetensors indexes, cannot tell which is the DiT: "
                              f"{[p.name for p in indexes]}")
        indexes = preferred
    if indexes:
        return open_safetensors_index(indexes[0])

    files = sorted(p for p in folder.glob("*.safetensors") if not _NOT_DIT_WEIGHTS.search(p.name))
    if len(files) == 1:
        return SafetensorsFile(files[0])
    if files:
        return MultiFileTensors(files)

    if not diffusers:
        pth = sorted(p for ext in ("*.pth", "*.pt") for p in folder.glob(ext) if not _NOT_DIT_WEIGHTS.search(p.name))
        if len(pth) == 1:
            return TorchStateDict(pth[0])
        if pth:
            raise SourceError(f"{folder}: several torch checkpoints, cannot tell which is the DiT: "
                              f"{[p.name for p in pth]}")
    looked = "*.safetensors.index.json, *.safetensors" + ("" if diffusers else ", *.pth / *.pt")
    raise SourceError(f"{folder}: no DiT weights found (looked for {looked})")


_TORCH_TO_SAFETENSORS = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


class TorchStateDict(TensorCollection):
    """A `.pth` / `.pt` state dict, read with torch (an optional dependency) memory-mapped, so tensors are paged in
    one at a time as with safetensors. Needs the zipfile format torch has written since 1.6."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError:
            raise SourceError(f"{path}: reading .pth / .pt weights needs torch (pip install torch); safetensors "
                              "checkpoints convert without it") from None
        self.path = path
        try:
            obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises many kinds for a bad file; all mean the same here
            raise SourceError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and set(obj) == {wrapper}:
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise SourceError(f"{path}: not a flat state dict of tensors")
        self._tensors = obj

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        dtype = _TORCH_TO_SAFETENSORS.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise SourceError(f"{self.path}: tensor {name!r} has unsupported dtype {t.dtype}")
        return TensorInfo(dtype=dtype, shape=tuple(t.shape), begin=0, nbytes=t.numel() * t.element_size())

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._tensors[name].detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits, no copy
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def where(self, name: str) -> Path:
        return self.path


# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------


def _reject_non_t2v_keys(source: Source) -> None:
    bad = [k for k in source.tensors.keys() if _NON_T2V_KEY.search(k)]
    if bad:
        raise SourceError(
            f"{source.folder}: image-to-video / VACE weights found ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); only Wan2.1 text-to-video checkpoints are supported"
        )


def _maps(rename: Callable[[str], str], key: str) -> bool:
    try:
        rename(key)
        return True
    except KeyError:
        return False


def _check_key_naming(source: Source) -> None:
    """Refuses a folder whose tensors are mostly named in the *other* layout (original names next to a diffusers
    config, or the reverse): a mislabelled folder, better said plainly than as a list of every key being unexpected."""
    keys = source.tensors.keys()
    unmapped = [k for k in keys if not _maps(source.to_diffusers_key, k)]
    if len(unmapped) <= len(keys) // 2:
        return
    other = _diffusers_key if source.kind == ORIGINAL else wan_keys.original_to_diffusers_key
    if sum(_maps(other, k) for k in unmapped) > len(unmapped) // 2:
        ours, theirs = ("original", "diffusers") if source.kind == ORIGINAL else ("diffusers", "original Wan")
        raise SourceError(
            f"{source.folder}: {len(unmapped)} of {len(keys)} tensors have {theirs} names (e.g. {unmapped[0]!r}), "
            f"but {source.config_path.name} describes a{'n' if ours[0] == 'o' else ''} {ours} checkpoint; do the "
            "config and the weights belong together?"
        )


def diffusers_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """Tensor shapes under their diffusers names, for keys that have one (the rest surface later as unexpected)."""
    shapes = {}
    for key in source.tensors.keys():
        try:
            shapes.setdefault(source.to_diffusers_key(key), source.tensors.info(key).shape)
        except KeyError:
            continue
    return shapes


def _checked_config(source: Source) -> WanConfig:
    """WanConfig from config.json, cross-checked field by field against what the tensor shapes say."""
    raw, path = source.raw_config, source.config_path
    if source.kind == ORIGINAL:
        table = _ORIGINAL_FIELDS
        known = {ours: raw[theirs] for theirs, ours in table.items() if raw.get(theirs) is not None}
    else:
        table = dict(_DIFFUSERS_FIELDS)
        known = {ours: raw[theirs] for theirs, ours in table.items() if raw.get(theirs) is not None}
        if known.get("out_channels") is None and "in_channels" in known:  # diffusers: out_channels None = in_channels
            known["out_channels"] = known["in_channels"]
        heads, head_dim = raw.get("num_attention_heads"), raw.get("attention_head_dim")
        if heads is None or head_dim is None:
            raise SourceError(f"{path}: needs num_attention_heads and attention_head_dim (the head count cannot be "
                              "read off tensor shapes)")
        known["num_heads"] = heads
        known["dim"] = heads * head_dim
        table["num_attention_heads x attention_head_dim"] = "dim"
    if "num_heads" not in known:
        raise SourceError(f"{path}: needs num_heads (the head count cannot be read off tensor shapes)")
    if "patch_size" in known:
        patch = known["patch_size"]
        if not isinstance(patch, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in patch):
            raise SourceError(f"{path}: patch_size must be a list of integers, got {short_repr(patch)}")
        known["patch_size"] = tuple(patch)

    shapes = diffusers_shapes(source)
    try:
        config, notes = wan_keys.infer_config(shapes, **known)
    except (TypeError, ValueError) as e:  # TypeError: a field of the wrong JSON type
        message = str(e)
        for theirs, ours in table.items():  # speak the file's language: in_dim, not in_channels
            if theirs != ours:
                message = message.replace(f"config field {ours}=", f"config field {theirs} (our {ours})=")
        raise SourceError(f"{path}: {message}") from None
    source.notes.extend(f"{n} (not in {path.name})" for n in notes)
    if "text_len" not in known:
        source.notes.append(f"text_len={config.text_len} (Wan's default; not in {path.name})")
    return config
