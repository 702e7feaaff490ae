"""The umT5 encoder part of the converter: a Wan2.1 release's prompt encoder -> `DST/umt5/` (a "umt5_encoder" model
folder that `uvigu.checkpoint.load_pretrained(DST/umt5)` reads as a `UMT5Encoder`).

Where it is in SRC:
  original release   `models_t5_umt5-xxl-enc-bf16.pth`: a flat torch state dict in Wan's own T5 naming
                     (`blocks.3.attn.q.weight`, see `uvigu.models.umt5_keys`), no config: every size is inferred from
                     the tensor shapes (`umt5_keys.infer_config`), the three fields shapes cannot tell (activation,
                     max distance, eps) take umT5's values, and the summary's notes say so.
  diffusers pipeline `text_encoder/`: transformers' UMT5EncoderModel, `config.json` + `model.safetensors` or shards
                     with `model.safetensors.index.json`; the config is cross-checked against the tensor shapes.

Streaming: the .pth is memory-mapped by torch and safetensors by our reader; each target param (e.g.
`blocks.attention.q.kernel` [L, D, N*K]) is allocated once in the output dtype and filled layer by layer, and the
source pages are dropped after each copy. No second full copy of the weights is held.

Checks before any data is read: every stored key must map to exactly one slot and every slot be filled, with the
expected shape; missing / unexpected / mis-shaped keys are reported together, in the source's own naming. The tied
embedding may be stored as `shared.weight`, `encoder.embed_tokens.weight` or both (then they must be equal).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from tools.convert_wan_weights.conversion import ConversionError, all_finite, nonfinite_error
from tools.convert_wan_weights.jsonfile import read_json
from tools.convert_wan_weights.safetensors_io import (MultiFileTensors, SafetensorsFile, TensorCollection,
                                                      open_safetensors_index)
from tools.convert_wan_weights.sources import TorchStateDict
from uvigu import checkpoint
from uvigu.models import umt5_keys
from uvigu.models.flat_params import shape_problems
from uvigu.models.umt5 import UMT5Config

PART = "umt5"
KIND = "umt5_encoder"
ORIGINAL, DIFFUSERS = "original", "diffusers"
ORIGINAL_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
DIFFUSERS_FOLDER = "text_encoder"
DTYPE_CHOICES = ("keep", "float32", "bfloat16")

_STORABLE = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
             np.dtype(np.float16): "float16"}
_BY_NAME = {v: k for k, v in _STORABLE.items()}


@dataclasses.dataclass(frozen=True)
class Located:
    """Where the umT5 encoder is in SRC: its layout, the folder, the weight file(s) and (diffusers) the config."""

    layout: str  # ORIGINAL or DIFFUSERS
    folder: Path
    weights: tuple[Path, ...]  # the .pth; or the safetensors index; or the safetensors file(s)
    config_path: Path | None  # diffusers' config.json; None for the original release (no config)


def locate(src: Path) -> Located | None:
    """The umT5 encoder's files in SRC (an original release folder, a diffusers pipeline folder, or a lone
    transformers `text_encoder/` folder); None when SRC has none. Raises ConversionError when it cannot tell which
    of several candidate files is the encoder."""
    src = Path(src)
    if not src.is_dir():
        return None
    if (src / DIFFUSERS_FOLDER).is_dir():
        return _diffusers(src / DIFFUSERS_FOLDER)
    if (src / "config.json").is_file() and _is_umt5_config(src / "config.json"):
        return _diffusers(src)
    if (src / ORIGINAL_FILE).is_file():
        return Located(ORIGINAL, src, (src / ORIGINAL_FILE,), None)
    candidates = sorted(src.glob("models_t5*.pth"))
    if len(candidates) == 1:
        return Located(ORIGINAL, src, (candidates[0],), None)
    if candidates:
        raise ConversionError(f"{src}: several T5 checkpoints, cannot tell which is the umT5 encoder: "
                              f"{[p.name for p in candidates]}")
    return None


def _is_umt5_config(path: Path) -> bool:
    try:
        raw = read_json(path)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("model_type") in ("umt5", "t5", "mt5") and "d_model" in raw


def _diffusers(folder: Path) -> Located:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        return Located(DIFFUSERS, folder, tuple(indexes), folder / "config.json")
    return Located(DIFFUSERS, folder, tuple(sorted(folder.glob("*.safetensors"))), folder / "config.json")


# ----------------------------------------------------------------------------------------------------------------------
# Conversion.
# ----------------------------------------------------------------------------------------------------------------------


def convert(located: Located, out: Path, *, dtype: str = "keep", overwrite: bool = False,
            allow_nonfinite: bool = False) -> dict[str, Any]:
    """Converts the located encoder into the model folder `out` (e.g. DST/umt5); returns a summary dict.

    `dtype`: "keep" stores each param in its source dtype (bf16 for the release; a param whose tensors disagree, or
    are not float32 / bfloat16 / float16, is widened to float32 with a note), or "float32" / "bfloat16" for all.
    Raises a ValueError subclass naming the file / key on bad input; nothing is left at `out` then (an existing
    `out` is replaced only with `overwrite` and only once the new folder is complete). Tensors holding NaN / Inf are
    refused, naming them, unless `allow_nonfinite` (then the notes list them).
    """
    start = time.perf_counter()
    out = Path(out)
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"umT5: dtype {dtype!r} is not one of {DTYPE_CHOICES}")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it")
    notes: list[str] = []
    tensors, to_hf = _open(located)
    hf_of = _route(located, tensors, to_hf)
    shapes = {hf: tuple(tensors.info(key).shape) for key, hf in hf_of.items()}
    config = _config(located, shapes, notes)
    _check(located, tensors, hf_of, config)

    dtypes = _output_dtypes(tensors, hf_of, config, dtype, notes)
    param_shapes = umt5_keys.expected_param_shapes(config)
    count = Counter()
    for path, dt in dtypes.items():
        count[_STORABLE[dt]] += math.prod(param_shapes[path])
    config = dataclasses.replace(config, param_dtype=count.most_common(1)[0][0], scan_layers=True)

    nonfinite: list[str] = []
    params = _fill(located, tensors, hf_of, config, dtypes, param_shapes, nonfinite)
    if nonfinite and not allow_nonfinite:
        raise nonfinite_error(_where(located), nonfinite)
    if nonfinite:
        notes.append(f"{len(nonfinite)} tensor(s) hold NaN or Inf, converted as they are (--allow_nonfinite): "
                     f"{nonfinite[:20]}")
    parameter_count = sum(math.prod(a.shape) for a in params.values())
    source = {
        "part": PART,
        "layout": located.layout,
        "folder": str(located.folder.resolve()),
        "weight_files": [str(p.resolve()) for p in tensors.files],
        "config_file": str(located.config_path.resolve()) if located.config_path else None,
        "config_inferred_from_shapes": located.layout == ORIGINAL,
        "tensor_count": len(hf_of),
        "requested_dtype": dtype,
        "converter": "tools.convert_wan_weights",
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": list(notes),
    }
    checkpoint.save_params(out, KIND, config, params, source=source, overwrite=overwrite)
    del params
    return {
        "part": PART,
        "layout": located.layout,
        "source": str(located.folder),
        "weight_files": [str(p) for p in tensors.files],
        "output": str(out),
        "config": config.to_dict(),
        "dtype": " + ".join(sorted(_STORABLE[d] for d in set(dtypes.values()))),
        "tensors": len(hf_of),
        "parameters": parameter_count,
        "notes": notes,
        "seconds": time.perf_counter() - start,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _open(located: Located) -> tuple[TensorCollection, Callable[[str], str]]:
    """The stored tensors and the stored-name -> transformers-name map of the layout."""
    if located.layout == ORIGINAL:
        (path,) = located.weights
        return TorchStateDict(path), umt5_keys.original_to_hf_key
    if not located.weights:
        others = sorted(p.name for ext in ("*.bin", "*.pth", "*.pt") for p in located.folder.glob(ext))
        raise ConversionError(f"{located.folder}: no umT5 weights (looked for *.safetensors.index.json, *.safetensors)"
                              + (f"; found {others}: re-save them as safetensors" if others else ""))
    if located.weights[0].name.endswith(".index.json"):
        if len(located.weights) > 1:
            raise ConversionError(f"{located.folder}: several safetensors indexes, cannot tell which is the encoder: "
                                  f"{[p.name for p in located.weights]}")
        return open_safetensors_index(located.weights[0]), _hf_key
    if len(located.weights) == 1:
        return SafetensorsFile(located.weights[0]), _hf_key
    return MultiFileTensors(located.weights), _hf_key


def _hf_key(key: str) -> str:
    umt5_keys.param_target(key)  # KeyError for a key with no place
    return key


def _route(located: Located, tensors: TensorCollection, to_hf: Callable[[str], str]) -> dict[str, str]:
    """stored key -> transformers key; unmapped keys and two stored keys with one name are reported together."""
    hf_of, owner, unexpected, duplicates = {}, {}, [], []
    for key in tensors.keys():
        try:
            hf = to_hf(key)
        except KeyError:
            unexpected.append(f"{key} (in {tensors.where(key).name})")
            continue
        if hf in owner:
            duplicates.append(f"{owner[hf]} and {key} both map to {hf}")
            continue
        owner[hf] = key
        hf_of[key] = hf
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:12])}"
                        + (f", ... (+{len(unexpected) - 12} more)" if len(unexpected) > 12 else ""))
    if duplicates:
        problems.append(f"{len(duplicates)} duplicate key(s): {', '.join(duplicates[:12])}")
    if problems:
        raise ConversionError(f"{_where(located)}: not a umT5 encoder checkpoint in the {located.layout} naming: "
                              + "; ".join(problems))
    return hf_of


def _where(located: Located) -> str:
    return str(located.weights[0] if located.layout == ORIGINAL or len(located.weights) == 1 else located.folder)


def _config(located: Located, shapes: dict[str, tuple[int, ...]], notes: list[str]) -> UMT5Config:
    """Original: inferred from the shapes. Diffusers: config.json, cross-checked with the shapes field by field."""
    known: dict[str, Any] = {}
    if located.layout == DIFFUSERS:
        path = located.config_path
        if path is None or not path.is_file():
            raise ConversionError(f"{path}: missing (a diffusers text_encoder/ keeps the umT5 config there)")
        raw = read_json(path, ConversionError)
        try:
            known = umt5_keys.config_from_hf(raw).to_dict()
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{path}: not a usable umT5 config ({e})") from None
        known = {k: v for k, v in known.items() if k in raw}  # the rest: inferred or umT5 defaults, with a note
    try:
        config, inferred = umt5_keys.infer_config(shapes, **known)
    except (TypeError, ValueError) as e:
        where = located.config_path if located.layout == DIFFUSERS else located.weights[0]
        raise ConversionError(f"{where}: {e}") from None
    if located.layout == ORIGINAL:
        notes.append(f"no config in the original release: umT5 config inferred from tensor shapes "
                     f"({'; '.join(inferred)})")
    elif inferred:
        notes.append(f"not in {located.config_path.name}: {'; '.join(inferred)}")
    return config


def _check(located: Located, tensors: TensorCollection, hf_of: dict[str, str], config: UMT5Config) -> None:
    """Missing / unexpected / mis-shaped keys against `config`, named as the source names them."""
    stored = {key: tuple(tensors.info(key).shape) for key in hf_of}
    if located.layout == ORIGINAL:
        expected = {umt5_keys.hf_to_original_key(k): s for k, s in umt5_keys.expected_hf_shapes(config).items()}
        problems = shape_problems(stored, expected)
    else:
        problems = shape_problems(stored, umt5_keys.expected_hf_shapes(config, tied=True), order=umt5_keys.iter_keys,
                                  optional=frozenset({umt5_keys.SHARED_KEY, umt5_keys.TIED_KEY}))
        if umt5_keys.SHARED_KEY not in stored and umt5_keys.TIED_KEY not in stored:
            problems.insert(0, f"missing key: {umt5_keys.SHARED_KEY} (or {umt5_keys.TIED_KEY})")
    if problems:
        raise ConversionError(
            f"{_where(located)}: does not match a umT5 encoder with d_model={config.d_model}, "
            f"num_layers={config.num_layers}, num_heads={config.num_heads}x{config.d_kv}, d_ff={config.d_ff}, "
            f"vocab_size={config.vocab_size}: " + "; ".join(problems))


def _output_dtypes(tensors: TensorCollection, hf_of: dict[str, str], config: UMT5Config, requested: str,
                   notes: list[str]) -> dict[str, np.dtype]:
    """The dtype each of our params is stored in (see `convert`)."""
    paths = umt5_keys.expected_param_shapes(config)
    if requested != "keep":
        return {p: _BY_NAME[requested] for p in paths}
    found: dict[str, set] = {p: set() for p in paths}
    for key, hf in hf_of.items():
        found[umt5_keys.param_target(hf, config)[0]].add(np.dtype(tensors.info(key).numpy_dtype))
    out, widened = {}, []
    for path, dts in found.items():
        if len(dts) == 1 and next(iter(dts)) in _STORABLE:
            out[path] = next(iter(dts))
        else:
            out[path] = _BY_NAME["float32"]
            widened.append(f"{path} {sorted(str(d) for d in dts)}")
    if widened:
        notes.append(f"dtype keep: written as float32 (mixed or unstorable source dtypes): {widened}")
    return out


def _fill(located: Located, tensors: TensorCollection, hf_of: dict[str, str], config: UMT5Config,
          dtypes: dict[str, np.dtype], param_shapes: dict[str, tuple[int, ...]],
          nonfinite: list[str]) -> dict[str, np.ndarray]:
    """Allocates each param once and copies every stored tensor into its slot (layout change and cast in the copy).
    Stored keys whose slot holds NaN / Inf after the copy (so a cast overflow counts too) go to `nonfinite`."""
    params = {p: np.empty(s, dtypes[p]) for p, s in param_shapes.items()}
    filled = {p: [0] * (config.num_layers if p.startswith("blocks.") else 1) for p in param_shapes}
    by_hf = {hf: key for key, hf in hf_of.items()}
    tied_twice = umt5_keys.SHARED_KEY in by_hf and umt5_keys.TIED_KEY in by_hf
    for key, hf in hf_of.items():
        if tied_twice and hf == umt5_keys.TIED_KEY:
            continue  # the same tensor as shared.weight: compared below, not written twice
        path, layer = umt5_keys.param_target(hf, config)
        target = params[path] if layer is None else params[path][layer]
        target[...] = umt5_keys.to_ours(hf, tensors.get(key))
        tensors.release(key)
        if not all_finite(target):
            nonfinite.append(f"{key} (in {tensors.where(key).name})")
        filled[path][layer or 0] += 1
    if tied_twice:
        tied = tensors.get(by_hf[umt5_keys.TIED_KEY])
        shared = tensors.get(by_hf[umt5_keys.SHARED_KEY])
        if tied.dtype != shared.dtype or not np.array_equal(tied.view(np.uint8), shared.view(np.uint8)):
            raise ConversionError(f"{tensors.where(by_hf[umt5_keys.TIED_KEY])}: {umt5_keys.SHARED_KEY} and "
                                  f"{umt5_keys.TIED_KEY} are one tied embedding in transformers but differ here; "
                                  "refusing to guess which one is meant")
        tensors.release(by_hf[umt5_keys.TIED_KEY])
        tensors.release(by_hf[umt5_keys.SHARED_KEY])
    wrong = {p: c for p, c in filled.items() if any(n != 1 for n in c)}
    if wrong:  # the shape check above makes this unreachable unless the key tables themselves are wrong
        raise ConversionError(f"{_where(located)}: params not filled exactly once (count per layer): {wrong}")
    return params


def summary(result: dict[str, Any]) -> str:
    """A few lines for the CLI."""
    c = result["config"]
    lines = [
        f"umT5 encoder ({result['layout']}) {result['source']} -> {result['output']}",
        f"  tensors {result['tensors']}, parameters {result['parameters']:,}, dtype {result['dtype']}",
        f"  config: d_model={c['d_model']} num_layers={c['num_layers']} num_heads={c['num_heads']}x{c['d_kv']} "
        f"d_ff={c['d_ff']} vocab_size={c['vocab_size']} feed_forward_proj={c['feed_forward_proj']}",
    ]
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)


__all__ = ["Located", "locate", "convert", "summary", "KIND", "PART", "ORIGINAL", "DIFFUSERS", "ORIGINAL_FILE"]
