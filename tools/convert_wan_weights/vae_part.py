"""The VAE part of the converter: a Wan2.1 release's video VAE -> `DST/vae/` (a "wan_vae" model folder that
`uvigu.checkpoint.load_pretrained(DST, kind="wan_vae")` reads as a `WanVAE`, the pipeline's codec).

Where it is in SRC:
  original release   `Wan2.1_VAE.pth`: a torch state dict in the original naming (`encoder.downsamples.N...`,
                     `decoder.upsamples.N...`, see `uvigu.models.wan_vae_keys`) and no config: the architecture is
                     read off the tensor shapes (`wan_vae_keys.infer_config`) and latents_mean / latents_std are
                     Wan2.1's 16 published values (the original code hard-codes them); the notes say so.
  diffusers pipeline `vae/`: `config.json` (AutoencoderKLWan, with latents_mean / latents_std) and
                     `diffusion_pytorch_model.safetensors`; the config is cross-checked against the tensor shapes.

The VAE is small (~127M params, 0.5 GB fp32), so its state dict is read whole; keys and shapes are checked before
anything is written, and the folder appears only when complete (`checkpoint.save_params`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from tools.convert_wan_weights.conversion import ConversionError, all_finite, nonfinite_error
from tools.convert_wan_weights.jsonfile import read_json
from tools.convert_wan_weights.safetensors_io import MultiFileTensors, SafetensorsFile, open_safetensors_index
from tools.convert_wan_weights.sources import TorchStateDict
from uvigu import checkpoint
from uvigu.models import wan_vae_keys
from uvigu.models.flat_params import shape_problems

PART = "vae"
ORIGINAL, DIFFUSERS = "original", "diffusers"
ORIGINAL_FILE = "Wan2.1_VAE.pth"
DIFFUSERS_FOLDER = "vae"
DIFFUSERS_CLASS = "AutoencoderKLWan"
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@dataclasses.dataclass(frozen=True)
class Located:
    layout: str  # ORIGINAL or DIFFUSERS
    folder: Path
    weights: tuple[Path, ...]
    config_path: Path | None


def locate(src: Path) -> Located | None:
    """The VAE's files in SRC (an original release folder, a diffusers pipeline folder or a lone `vae/` folder);
    None when SRC has none."""
    src = Path(src)
    if not src.is_dir():
        return None
    if (src / DIFFUSERS_FOLDER / "config.json").is_file():
        return _diffusers(src / DIFFUSERS_FOLDER)
    if (src / "config.json").is_file() and _is_vae_config(src / "config.json"):
        return _diffusers(src)
    if (src / ORIGINAL_FILE).is_file():
        return Located(ORIGINAL, src, (src / ORIGINAL_FILE,), None)
    candidates = sorted(p for p in src.glob("*.pth") if "vae" in p.name.lower())
    if len(candidates) == 1:
        return Located(ORIGINAL, src, (candidates[0],), None)
    if candidates:
        raise ConversionError(f"{src}: several VAE checkpoints, cannot tell which to use: {[p.name for p in candidates]}")
    return None


def _is_vae_config(path: Path) -> bool:
    try:
        raw = read_json(path)
    except ValueError:
        return False
    return isinstance(raw, dict) and raw.get("_class_name") == DIFFUSERS_CLASS


def _diffusers(folder: Path) -> Located:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = tuple(indexes) if indexes else tuple(sorted(folder.glob("*.safetensors")))
    return Located(DIFFUSERS, folder, files, folder / "config.json")


def _read(located: Located) -> dict[str, np.ndarray]:
    """{stored key: array} of the whole VAE."""
    if located.layout == ORIGINAL:
        tensors = TorchStateDict(located.weights[0])
    elif not located.weights:
        raise ConversionError(f"{located.folder}: no VAE weights (looked for *.safetensors)")
    elif located.weights[0].name.endswith(".index.json"):
        tensors = open_safetensors_index(located.weights[0])
    elif len(located.weights) == 1:
        tensors = SafetensorsFile(located.weights[0])
    else:
        tensors = MultiFileTensors(located.weights)
    return {k: tensors.get(k) for k in tensors.keys()}


def convert(located: Located, out: Path, *, dtype: str = "keep", overwrite: bool = False,
            allow_nonfinite: bool = False) -> dict[str, Any]:
    """Converts the located VAE into the model folder `out` (e.g. DST/vae); returns a summary dict. Tensors holding
    NaN / Inf are refused, naming them, unless `allow_nonfinite` (then the notes list them)."""
    start = time.perf_counter()
    if dtype not in ("keep", *_DTYPES):
        raise ConversionError(f"--dtype {dtype!r} is not one of keep, float32, bfloat16")
    where = located.weights[0] if located.weights else located.folder
    stored = _read(located)
    notes: list[str] = []
    if located.layout == ORIGINAL:
        try:
            state = wan_vae_keys.original_to_diffusers(stored)
        except (KeyError, ValueError) as e:
            raise ConversionError(f"{where}: not a Wan2.1 VAE state dict in the original naming: {e}") from None
    else:
        state = stored
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    try:
        inferred, inferred_notes = wan_vae_keys.infer_config(shapes)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{where}: cannot read a Wan VAE architecture off the tensor shapes: {e}") from None
    if located.config_path is not None:
        raw = read_json(located.config_path, ConversionError)
        try:
            config = wan_vae_keys.config_from_diffusers(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise ConversionError(f"{located.config_path}: not a readable AutoencoderKLWan config ({e})") from None
        architecture = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample")
        differ = [f"{n}: config {getattr(config, n)!r}, tensors {getattr(inferred, n)!r}" for n in architecture
                  if getattr(config, n) != getattr(inferred, n)]
        if differ:
            raise ConversionError(f"{located.config_path}: the config disagrees with the tensors: {'; '.join(differ)}")
    else:
        config = inferred
        notes += ["no VAE config in an original release"] + inferred_notes
    problems = shape_problems(shapes, wan_vae_keys.expected_diffusers_shapes(config))
    if problems:
        raise ConversionError(f"{where}: the VAE does not match a Wan VAE with base_dim={config.base_dim}, "
                              f"z_dim={config.z_dim}, dim_mult={config.dim_mult}: " + "; ".join(problems))
    params = wan_vae_keys.diffusers_to_params(state, config)
    stored_dtypes = sorted({str(np.asarray(v).dtype) for v in stored.values()})
    target = _DTYPES.get(dtype) or (_DTYPES["bfloat16"] if stored_dtypes == ["bfloat16"] else _DTYPES["float32"])
    params = {k: np.asarray(v).astype(target) for k, v in params.items()}
    # Checked on the stored tensors (the names a user can look up) and again after the cast (an overflow to Inf).
    nonfinite = [k for k, v in stored.items() if not all_finite(np.asarray(v))]
    if not nonfinite:
        nonfinite = [f"{k} (after the cast to {target})" for k, v in params.items() if not all_finite(v)]
    if nonfinite and not allow_nonfinite:
        raise nonfinite_error(str(where), nonfinite)
    if nonfinite:
        notes.append(f"{len(nonfinite)} tensor(s) hold NaN or Inf, converted as they are (--allow_nonfinite): "
                     f"{nonfinite[:20]}")
    config = dataclasses.replace(config, param_dtype=str(target) if target != _DTYPES["bfloat16"] else "bfloat16")
    source = {"kind": located.layout, "path": str(where.resolve()), "notes": notes,
              "converter": "tools.convert_wan_weights", "requested_dtype": dtype}
    checkpoint.save_params(out, checkpoint.WAN_VAE, config, params, source=source, overwrite=overwrite)
    return {"part": PART, "layout": located.layout, "source": str(where), "output": str(out),
            "config": config.to_dict(), "tensors": len(state),
            "parameters": sum(math.prod(v.shape) for v in params.values()), "dtype": config.param_dtype,
            "notes": notes, "seconds": time.perf_counter() - start}


def summary(result: dict[str, Any]) -> str:
    c = result["config"]
    lines = [f"VAE ({result['layout']}) {result['source']} -> {result['output']}",
             f"  tensors {result['tensors']}, parameters {result['parameters']:,}, dtype {result['dtype']}",
             f"  config: base_dim={c['base_dim']} z_dim={c['z_dim']} dim_mult={c['dim_mult']} "
             f"num_res_blocks={c['num_res_blocks']} temperal_downsample={c['temperal_downsample']}"]
    lines += [f"  note: {n}" for n in result["notes"]]
    return "\n".join(lines)
