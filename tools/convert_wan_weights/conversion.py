"""The streaming conversion: a detected `Source` -> our stacked params -> a model folder (`DST/dit/`).

Memory: each target param (e.g. `blocks.attn1.to_q.kernel`, [L, D, D]) is allocated once, in the output dtype, and
filled layer by layer from the memory-mapped source tensors, whose pages are dropped again right after the copy.
The Orbax writer is set up to add no copy either (`uvigu.checkpoint.save_params`). Peak RAM is therefore the
fixed floor of Python + JAX plus about the size of the output, never a second full copy (no torch.load of a whole
file, no stacking of per-layer copies); `measure_peak_ram.py` checks this.

Correctness: before any data is read, the source's keys and shapes are planned against the config: every target
slot (param, layer) must be filled by exactly one source tensor of the expected shape. Missing keys, unexpected keys,
two stored keys landing on one slot (e.g. a key with and without the `model.diffusion_model.` prefix) and mis-shaped
tensors are all collected and reported together, naming keys, files and expected vs got shapes. Every slot is checked
for NaN / Inf after its copy (so an overflow in the cast counts too); such keys are refused together, by name,
unless `allow_nonfinite`, which converts them and records them in config.json's "source" and the summary.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np

from tools.convert_wan_weights.sources import Source, SourceError, detect_source
from uvigu import checkpoint
from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig

DTYPE_CHOICES = ("float32", "bfloat16", "keep")
_OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                  "float16": np.dtype(np.float16)}
_NAME_OF_OUTPUT_DTYPE = {v: k for k, v in _OUTPUT_DTYPES.items()}


class ConversionError(ValueError):
    """The source cannot be converted as it is; the message lists every problem found."""


def all_finite(array: np.ndarray) -> bool:
    """No NaN / Inf in `array` (any numeric dtype, bfloat16 included; integers are always finite)."""
    return bool(np.isfinite(array).all())


def nonfinite_error(where: str, keys: list[str]) -> ConversionError:
    """The refusal of tensors holding NaN / Inf: names them and the flag that converts them anyway."""
    shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20} more)" if len(keys) > 20 else "")
    return ConversionError(f"{where}: {len(keys)} tensor(s) hold NaN or Inf: {shown}. A broken download or a "
                           "diverged checkpoint? Pass --allow_nonfinite to convert them anyway.")


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one stored tensor goes: our stacked param path and its layer (None for params outside the blocks)."""

    param: str
    layer: int | None


@dataclasses.dataclass
class Plan:
    """Stored key -> (diffusers key, slot), checked complete and unambiguous; target shapes of our params."""

    routes: dict[str, tuple[str, Slot]]
    param_shapes: dict[str, tuple[int, ...]]
    param_layers: dict[str, int | None]  # number of stacked layers of a param, None for non-block params


@dataclasses.dataclass
class ConversionResult:
    source: Source
    output: Path
    config: WanConfig
    dtype: str  # the stored dtype(s), e.g. "bfloat16" or "bfloat16 + float32"
    tensor_count: int
    parameter_count: int
    fill_counts: dict[str, list[int]]  # our param -> how many times each layer (or the one slot) was written
    seconds: float
    peak_rss_bytes: int
    nonfinite_keys: list[str] = dataclasses.field(default_factory=list)  # converted anyway (allow_nonfinite)


def plan_conversion(source: Source, config: WanConfig) -> Plan:
    """Routes every stored tensor to its slot and checks that the routes fill every slot exactly once with the
    expected shape; raises `ConversionError` listing all problems otherwise."""
    expected = wan_keys.expected_diffusers_shapes(config)
    routes: dict[str, tuple[str, Slot]] = {}
    owner: dict[str, str] = {}  # diffusers key -> the stored key that fills it
    unexpected, duplicates, misshaped = [], [], []
    for key in source.tensors.keys():
        try:
            dkey = source.to_diffusers_key(key)
        except KeyError:
            unexpected.append(f"{key} (in {source.tensors.where(key).name})")
            continue
        if dkey not in expected:
            unexpected.append(f"{key} (in {source.tensors.where(key).name})")
            continue
        if dkey in owner:
            duplicates.append(f"{owner[dkey]} and {key} both map to {dkey}")
            continue
        shape = tuple(source.tensors.info(key).shape)
        if shape != expected[dkey]:
            misshaped.append(f"{key}: expected {expected[dkey]}, got {shape} (in {source.tensors.where(key).name})")
        owner[dkey] = key
        param, layer = wan_keys.param_target(dkey, config)
        routes[key] = (dkey, Slot(param, layer))
    missing = [_display_missing(source, k) for k in wan_keys.iter_keys(expected) if k not in owner]

    problems = []
    for label, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                         ("duplicate key(s)", duplicates), ("mis-shaped tensor(s)", misshaped)):
        if items:
            shown = "\n    ".join(items[:20]) + (f"\n    ... (+{len(items) - 20} more)" if len(items) > 20 else "")
            problems.append(f"  {len(items)} {label}:\n    {shown}")
    if problems:
        raise ConversionError(
            f"{source.folder}: the checkpoint does not match a Wan2.1 T2V DiT with "
            f"dim={config.dim}, ffn_dim={config.ffn_dim}, num_layers={config.num_layers}, "
            f"text_dim={config.text_dim}:\n" + "\n".join(problems)
        )

    param_shapes = wan_keys.expected_param_shapes(config)
    param_layers = {name: config.num_layers if name.startswith("blocks.") else None for name in param_shapes}
    return Plan(routes=routes, param_shapes=param_shapes, param_layers=param_layers)


def _display_missing(source: Source, diffusers_key: str) -> str:
    """A missing key in the source's own naming (what the user would grep the file for), plus the diffusers name."""
    if source.kind != "original":
        return diffusers_key
    return f"{wan_keys.diffusers_to_original_key(diffusers_key)} (diffusers: {diffusers_key})"


def output_dtypes(source: Source, plan: Plan, requested: str) -> dict[str, np.dtype]:
    """The dtype each param is written in.

    float32 / bfloat16: every param in that dtype. `keep`: each param in its source dtype, so a checkpoint that is
    bf16 except for float32 norms / time embedder / modulation tables (what diffusers saves for a bf16 Wan, which keeps
    those modules in fp32) is stored as it is, losslessly and without doubling in size. A param whose layers disagree,
    or whose source dtype is not one we store (float64, integers, float8), is written float32 and noted.
    """
    if requested != "keep":
        return {name: _OUTPUT_DTYPES[requested] for name in plan.param_shapes}
    found: dict[str, set[np.dtype]] = {name: set() for name in plan.param_shapes}
    for key, (_, slot) in plan.routes.items():
        found[slot.param].add(np.dtype(source.tensors.info(key).numpy_dtype))
    out, widened = {}, []
    for name, dtypes in found.items():
        if len(dtypes) == 1 and next(iter(dtypes)) in _NAME_OF_OUTPUT_DTYPE:
            out[name] = next(iter(dtypes))
        else:
            out[name] = _OUTPUT_DTYPES["float32"]
            widened.append(f"{name} {sorted(str(d) for d in dtypes)}")
    if widened:
        source.notes.append(f"--dtype keep: written as float32 (mixed or unstorable source dtypes): {widened}")
    return out


def main_dtype(dtypes: dict[str, np.dtype], shapes: dict[str, tuple[int, ...]]) -> str:
    """The dtype holding most parameters: recorded as the config's param_dtype (what `load_pretrained` casts to)."""
    count = Counter()
    for name, dtype in dtypes.items():
        count[_NAME_OF_OUTPUT_DTYPE[dtype]] += math.prod(shapes[name])
    return count.most_common(1)[0][0]


def fill_params(source: Source, plan: Plan, dtypes: dict[str, np.dtype], *, allow_nonfinite: bool = False,
                nonfinite: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Allocates each target param once and copies every stored tensor into its slot (layout change and dtype cast
    happen in the copy). Returns the params and how often each slot was written (all ones, or it raises).

    Every slot is checked for NaN / Inf after the copy (so a value the cast overflowed counts too); the stored keys
    holding any are collected (into `nonfinite` when given) and refused together unless `allow_nonfinite`."""
    nonfinite = [] if nonfinite is None else nonfinite
    params = {name: np.empty(shape, dtypes[name]) for name, shape in plan.param_shapes.items()}
    counts = {name: [0] * (plan.param_layers.get(name) or 1) for name in plan.param_shapes}
    for key, (dkey, slot) in plan.routes.items():
        stored = source.tensors.get(key)
        target = params[slot.param] if slot.layer is None else params[slot.param][slot.layer]
        ours = wan_keys.to_ours(dkey, stored)
        if ours.shape != target.shape:  # the plan checked shapes; this guards the layout tables themselves
            raise ConversionError(f"{key}: converted shape {ours.shape} does not fit {slot.param} {target.shape}")
        target[...] = ours
        del stored, ours
        source.tensors.release(key)
        if not all_finite(target):
            nonfinite.append(f"{key} (in {source.tensors.where(key).name})")
        counts[slot.param][slot.layer or 0] += 1
    if nonfinite and not allow_nonfinite:
        raise nonfinite_error(str(source.folder), nonfinite)
    wrong = {name: c for name, c in counts.items() if any(n != 1 for n in c)}
    if wrong:
        raise ConversionError(f"params not filled exactly once (count per layer): {wrong}")
    return params, counts


def convert(src: str | Path, dst: str | Path, *, dtype: str = "keep", overwrite: bool = False,
            allow_nonfinite: bool = False, log=print) -> ConversionResult:
    """Converts the checkpoint folder `src` into `dst/dit/`. Raises `SourceError` / `ConversionError` /
    `SafetensorsError` (all ValueErrors) on bad input, leaving no `dst/dit` behind (an existing one is kept unless the
    new one is complete and `overwrite` is set). Tensors holding NaN / Inf are refused, naming them, unless
    `allow_nonfinite` (then they are listed in the summary and in config.json's "source")."""
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {DTYPE_CHOICES}")
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    out = dst / "dit"
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it")
    source = detect_source(src)
    config = source.config
    log(f"source: {source.kind} at {source.folder} ({len(source.tensors)} tensors in "
        f"{len(source.weight_files)} file(s))")
    for note in source.notes:
        log(f"  note: {note}")
    plan = plan_conversion(source, config)
    dtypes = output_dtypes(source, plan, dtype)
    stored = sorted({_NAME_OF_OUTPUT_DTYPE[d] for d in dtypes.values()})
    config = dataclasses.replace(config, param_dtype=main_dtype(dtypes, plan.param_shapes), scan_layers=True)
    nonfinite: list[str] = []
    params, counts = fill_params(source, plan, dtypes, allow_nonfinite=allow_nonfinite, nonfinite=nonfinite)
    parameter_count = sum(math.prod(a.shape) for a in params.values())
    described = source.describe(src)
    described.update(converter="tools.convert_wan_weights", requested_dtype=dtype,
                     converted_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if nonfinite:
        described["nonfinite_keys"] = list(nonfinite)
        log(f"  warning: {len(nonfinite)} tensor(s) hold NaN or Inf, converted as they are (--allow_nonfinite): "
            f"{nonfinite[:20]}")
    checkpoint.save_params(out, checkpoint.WAN_DIT, config, params, source=described, overwrite=overwrite)
    del params
    return ConversionResult(
        source=source, output=out, config=config, dtype=" + ".join(stored), tensor_count=len(plan.routes),
        parameter_count=parameter_count, fill_counts=counts, seconds=time.perf_counter() - start,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, nonfinite_keys=nonfinite,
    )


def summary(result: ConversionResult) -> str:
    c = result.config
    return "\n".join([
        f"converted {result.source.kind} checkpoint {result.source.folder}",
        f"  tensors:    {result.tensor_count}",
        f"  parameters: {result.parameter_count:,}",
        f"  config:     dim={c.dim} ffn_dim={c.ffn_dim} num_heads={c.num_heads} num_layers={c.num_layers} "
        f"in/out={c.in_channels}/{c.out_channels} text_dim={c.text_dim} patch={c.patch_size}",
        f"  dtype:      {result.dtype} (param_dtype {c.param_dtype})",
        f"  output:     {result.output}",
        f"  wall time:  {result.seconds:.1f} s",
        f"  peak RSS:   {result.peak_rss_bytes / 2**20:.0f} MiB",
    ] + ([f"  NaN / Inf:  {len(result.nonfinite_keys)} tensor(s) converted as they are: {result.nonfinite_keys[:20]}"]
         if result.nonfinite_keys else []))


__all__ = ["ConversionError", "ConversionResult", "all_finite", "nonfinite_error", "Plan", "Slot", "SourceError", "convert", "fill_params",
           "main_dtype", "output_dtypes", "plan_conversion", "summary", "DTYPE_CHOICES"]
