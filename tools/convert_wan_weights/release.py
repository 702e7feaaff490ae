"""Whole-release conversion: every part of a Wan2.1 release into one DST that `uvigu.pipeline.load(DST)` opens.

    DST/dit/         the DiT            (`conversion.convert`)
    DST/vae/         the video VAE      (`vae_part`)
    DST/umt5/        the prompt encoder (`umt5_part`)
    DST/tokenizer/   its tokenizer      (`tokenizer_part`)
    DST/pipeline.json  the scheduler's defaults (solver, shift) and the sampling defaults  (`scheduler` part)

Which parts: `parts=None` converts every part of a release. A diffusers pipeline folder (model_index.json) or an
original release folder holding any part besides the DiT is a release, and a part it lacks is an error naming it;
a lone transformer folder (or an original folder with only the DiT) converts the DiT alone and says what is
missing for the pipeline. `parts=("dit", "vae")` converts that subset on purpose; a requested part that is absent
is an error.

Writing (`staging`): the DST folder is locked for the run (a second conversion into it is refused) and staging left
by a killed conversion is swept away first, with a note. Every part is checked and written into its own hidden
staging folder; only when *all* parts are written are they published, each by one atomic rename, so bad input
anywhere leaves DST as it was. A destination that another process created during the run is never replaced
(without --overwrite): the run fails naming it, and its data is kept.

The released Uni-ViGU checkpoint (`univigu=CKPT.pth`, CLI `--univigu`): the denoiser part becomes DST/univigu/
(`univigu_part`: the diffusers transformer's weights, overridden by the base keys the .pth holds, plus its text side)
instead of DST/dit/, and pipeline.json records the release's scheduler (Euler, σ = shift(linspace(1, 0, N + 1)[:-1]),
shift 3) and its inference conventions (`RELEASED_CONVENTIONS`, read by `uvigu.pipeline`). The tokenizer part is
converted first so its vocabulary can tell a mask source (V + 1 rows) from a uniform one.

Every bad input is a ValueError (exit 2 in the CLI) naming the file: nested, truncated or non-object JSON, corrupt
safetensors headers, index shard names outside the index's folder, NaN / Inf tensors (unless allow_nonfinite), a
truncated or unreadable .pth, a folder where a file should be.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from tools.convert_wan_weights import conversion, staging, tokenizer_part, umt5_part, univigu_part, vae_part
from tools.convert_wan_weights.conversion import ConversionError
from tools.convert_wan_weights.jsonfile import read_json, short_repr

PARTS = ("dit", "vae", "umt5", "tokenizer", "scheduler")
PIPELINE_FILE = "pipeline.json"
PIPELINE_FORMAT_VERSION = 1

# What Wan2.1's own generate script uses for text-to-video (the original release ships no scheduler config).
ORIGINAL_SCHEDULER = {"solver": "unipc", "shift": 5.0}
SAMPLING_DEFAULTS = {"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50, "guidance_scale": 5.0,
                     "fps": 16, "negative_prompt": ""}

# The released Uni-ViGU inference (Fr0zenCrane/Uni-ViGU inference_unified_wan.py + inference.sh): its FlowMatchScheduler
# (sigma_min 0, extra_one_step) is Euler on shift(linspace(1, 0, N + 1)[:-1]) with shift 3; 50 steps (script default;
# inference.sh uses 100), cfg 5 (inference.sh), 21 latent frames = 81 frames at 480x832, fps 16.
RELEASED_SCHEDULER = {"solver": "euler", "shift": 3.0,
                      "source": "Uni-ViGU release (inference_unified_wan.py FlowMatchScheduler, shift 3)"}
RELEASED_DEFAULTS = {**SAMPLING_DEFAULTS, "guidance_scale": 5.0, "caption_steps": 50}
# How the release runs its model (uvigu.pipeline.Conventions documents each value).
RELEASED_CONVENTIONS = {"latents": "raw", "pad_context": "unzeroed", "t2v_text": "prompt_tokens",
                        "joint_text_time": "video_time", "joint_text_update": "released", "sigmas": "linspace_shift",
                        "caption_latents": "sample", "caption_sigmas": "uniform", "text_time_rounding": "integer"}


def _locate_scheduler(src: Path) -> dict[str, Any] | None:
    """The scheduler defaults of SRC: diffusers' `scheduler/scheduler_config.json`, or Wan's own values for an
    original release; None when SRC is neither (a lone transformer folder)."""
    path = src / "scheduler" / "scheduler_config.json"
    if path.is_file():
        raw = read_json(path, ConversionError)
        cls = raw.get("_class_name")
        if cls == "UniPCMultistepScheduler":
            if raw.get("prediction_type") != "flow_prediction" or not raw.get("use_flow_sigmas"):
                raise ConversionError(f"{path}: a UniPC scheduler without flow sigmas / flow_prediction is not Wan's")
            return {"solver": "unipc", "shift": _shift(path, raw, "flow_shift"), "source": str(path)}
        if cls == "FlowMatchEulerDiscreteScheduler":
            return {"solver": "euler", "shift": _shift(path, raw, "shift"), "source": str(path)}
        raise ConversionError(f"{path}: scheduler {cls!r} is not supported (UniPCMultistepScheduler with flow "
                              "sigmas, or FlowMatchEulerDiscreteScheduler)")
    if (src / "model_index.json").is_file():
        return None
    if vae_part.locate(src) or umt5_part.locate(src):  # an original release
        return {**ORIGINAL_SCHEDULER, "source": "Wan2.1 defaults (the original release has no scheduler config)"}
    return None


def _shift(path: Path, raw: dict[str, Any], field: str) -> float:
    value = raw.get(field, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConversionError(f"{path}: {field} must be a positive number, got {short_repr(value)}")
    return float(value)


def _is_release(src: Path, found: dict[str, Any]) -> bool:
    return (src / "model_index.json").is_file() or any(found[p] for p in ("vae", "umt5", "tokenizer"))


def convert_release(src: str | Path, dst: str | Path, *, parts: tuple[str, ...] | None = None, dtype: str = "keep",
                    overwrite: bool = False, allow_nonfinite: bool = False, univigu: str | Path | None = None,
                    max_text_len: int = univigu_part.RELEASE_TEXT_LEN, log=print) -> dict[str, Any]:
    """Converts the parts of `src` into `dst`; returns {part: its summary text}. Raises a ValueError naming the
    missing part / file / key on bad input (see the module docstring for which parts); DST is then as it was.
    `univigu`: the released Uni-ViGU .pth; the "dit" part is then written as DST/univigu/ (module docstring)."""
    src, dst = Path(src), Path(dst)
    if univigu is not None:
        univigu = Path(univigu)
        if not univigu.is_file():
            raise ConversionError(f"{univigu}: no such file" if not univigu.exists() else
                                  f"{univigu}: is not a file; --univigu takes the released .pth")
    output_name = lambda part: _output_name(part, univigu is not None)
    if not src.is_dir():
        raise ConversionError(f"{src}: no such file or folder" if not src.exists() else
                              f"{src}: is a file; SRC must be a release or checkpoint folder")
    unknown = sorted(set(parts or ()) - set(PARTS))
    if unknown:
        raise ConversionError(f"unknown part(s) {unknown}; parts are {','.join(PARTS)}")
    found = {"dit": True, "vae": vae_part.locate(src), "umt5": umt5_part.locate(src),
             "tokenizer": tokenizer_part.locate(src), "scheduler": _locate_scheduler(src)}
    if parts is None:
        missing = [p for p in PARTS if not found[p]]
        if _is_release(src, found):
            if missing:
                raise ConversionError(
                    f"{src}: this release lacks {', '.join(missing)} ({_where(missing)}); convert a subset on purpose "
                    f"with --parts {','.join(p for p in PARTS if p not in missing)}")
            parts = PARTS
        else:
            parts = ("dit",)
            log(f"note: {src} holds only a DiT; DST will lack {', '.join(missing)} (needed by uvigu.pipeline, not by "
                "training)")
    else:
        missing = [p for p in parts if not found[p]]
        if missing:
            raise ConversionError(f"{src}: requested part(s) {', '.join(missing)} not found ({_where(missing)})")
    if univigu is not None and "tokenizer" in parts:  # the tokenizer first: its vocabulary is needed by the model
        parts = ("tokenizer", *[p for p in parts if p != "tokenizer"])
    _refuse_existing(dst, parts, overwrite, names=output_name)

    with staging.locked(dst, [_output_name(p) for p in PARTS] + [univigu_part.PART], log):
        _refuse_existing(dst, parts, overwrite, names=output_name)  # again, now that the lock is held
        areas: dict[str, Path] = {}
        try:
            summaries = {}
            for part in parts:
                name = output_name(part)
                area = areas[part] = staging.new_area(dst, name)
                final, staged = dst / name, area / name
                if part == "dit" and univigu is not None:
                    vocab = None
                    if "tokenizer" in areas:
                        from uvigu.data.umt5_tokenizer import UMT5Tokenizer
                        vocab = UMT5Tokenizer.load(areas["tokenizer"] / "tokenizer").vocab_size
                    result = univigu_part.convert(src, univigu, staged, dtype=dtype, tokenizer_vocab=vocab,
                                                  max_text_len=max_text_len, allow_nonfinite=allow_nonfinite, log=log)
                    summaries[part] = univigu_part.summary(result, final)
                elif part == "scheduler" and univigu is not None:
                    summaries[part] = _write_pipeline_file(staged, RELEASED_SCHEDULER, shown=final,
                                                           defaults=RELEASED_DEFAULTS,
                                                           conventions=RELEASED_CONVENTIONS)
                elif part == "dit":
                    result = conversion.convert(src, area, dtype=dtype, allow_nonfinite=allow_nonfinite, log=log)
                    summaries[part] = conversion.summary(dataclasses.replace(result, output=final))
                elif part == "scheduler":
                    summaries[part] = _write_pipeline_file(staged, found["scheduler"], shown=final)
                else:
                    module = {"vae": vae_part, "umt5": umt5_part, "tokenizer": tokenizer_part}[part]
                    kwargs = {} if part == "tokenizer" else {"allow_nonfinite": allow_nonfinite}
                    result = module.convert(found[part], staged, dtype=dtype, **kwargs)
                    summaries[part] = module.summary({**result, "output": str(final)})
                log(summaries[part])
            staging.before_publish(list(parts))
            _refuse_existing(dst, parts, overwrite, during=True, names=output_name)  # a concurrent writer
            published = []
            for part in parts:
                name = output_name(part)
                try:
                    staging.publish(areas[part] / name, dst / name, overwrite)
                except ConversionError as e:
                    done = f"; already published: {', '.join(published)}" if published else "; nothing published"
                    raise ConversionError(f"{e}{done}") from None
                published.append(part)
            log(f"published {', '.join(published)} in {dst}")
        finally:
            for area in areas.values():
                staging.discard(area)
    return summaries


def _refuse_existing(dst: Path, parts: tuple[str, ...], overwrite: bool, during: bool = False,
                     names=None) -> None:
    names = names or _output_name
    existing = [dst / names(p) for p in parts if os.path.lexists(dst / names(p))]
    if existing and not overwrite:
        if during:
            raise staging.DestinationExists(
                f"{', '.join(map(str, existing))} already exists: another process wrote it while this conversion ran; "
                "it was left untouched and nothing was published; pass --overwrite to replace it")
        raise ConversionError(f"{', '.join(map(str, existing))} already exists; pass --overwrite to replace it")


def _output_name(part: str, univigu: bool = False) -> str:
    if part == "dit" and univigu:
        return univigu_part.PART
    return PIPELINE_FILE if part == "scheduler" else part


def _where(parts: list[str]) -> str:
    looked = {"vae": f"{vae_part.DIFFUSERS_FOLDER}/ or {vae_part.ORIGINAL_FILE}",
              "umt5": f"{umt5_part.DIFFUSERS_FOLDER}/ or {umt5_part.ORIGINAL_FILE}",
              "tokenizer": "tokenizer/ or google/umt5-xxl/", "scheduler": "scheduler/scheduler_config.json",
              "dit": "transformer/ or config.json + diffusion_pytorch_model*.safetensors"}
    return "; ".join(f"{p}: looked for {looked[p]}" for p in parts)


def _write_pipeline_file(path: Path, scheduler: dict[str, Any], shown: Path | None = None, *,
                         defaults: dict[str, Any] | None = None, conventions: dict[str, str] | None = None) -> str:
    """pipeline.json (written into the staging area; published with the other parts): the scheduler's solver and
    shift, the sampling defaults and (a Uni-ViGU release only) its inference conventions."""
    meta = {"format_version": PIPELINE_FORMAT_VERSION, "scheduler": scheduler,
            "defaults": dict(SAMPLING_DEFAULTS if defaults is None else defaults)}
    if conventions:
        meta["conventions"] = dict(conventions)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    extra = f", conventions {conventions}" if conventions else ""
    return (f"scheduler: {scheduler['solver']}, shift {scheduler['shift']} ({scheduler['source']}){extra} -> "
            f"{shown or path}")


__all__ = ["PARTS", "PIPELINE_FILE", "RELEASED_CONVENTIONS", "RELEASED_DEFAULTS", "RELEASED_SCHEDULER",
           "convert_release"]
