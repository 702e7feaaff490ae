"""Pretrained-model folders: save a model's params with its config, load them back as a ready NNX module.

A model folder (the converter writes `DST/dit/`) holds

    config.json   {"model": "wan_dit", "format_version": 1, "config": WanConfig.to_dict(), "source": {...}}
    params/       an Orbax (StandardCheckpointer) tree of the nnx.Param values, nested by param path

On disk the blocks are always in the *stacked* layout (`blocks.attn1.to_q.kernel` [L, D, D]) whatever the model's
`scan_layers` was: one canonical form means the converter can write it without building a model, and either execution
layout (scan or a Python loop) loads it (`load_pretrained` slices the stack per layer when `scan_layers=False`).

Folders are written into a hidden temporary sibling and renamed into place only when complete, so a crash or a bad
input never leaves something at `path` that looks loadable.

`load_pretrained(path, **overrides)` takes execution overrides (dtype, param_dtype, scan_layers, remat_policy,
attention_backend): they change how the weights run, not what they are. Architecture fields are fixed by the weights;
overriding one to a different value is an error rather than a silently mismatched model. Params are restored straight
into `param_dtype` and, with `mesh=`, straight into their shards (no device ever holds the whole unsharded model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from uvigu import sharding
from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig, WanDiT

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
WAN_DIT = "wan_dit"

# model kind recorded in config.json -> (config class, module class, default subfolder of a converted DST)
MODEL_KINDS: dict[str, tuple[type, type, str]] = {
    WAN_DIT: (WanConfig, WanDiT, "dit"),
}

# Config fields that say how weights are executed, not what they are: free to override on load.
EXECUTION_FIELDS = frozenset({"dtype", "param_dtype", "scan_layers", "remat_policy", "attention_backend"})


class CheckpointError(ValueError):
    """A model folder that cannot be written or loaded as asked; the message names the path and the problem."""


# ----------------------------------------------------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------------------------------------------------


def save_wan_dit(path: str | Path, model: WanDiT, *, source: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Writes `model`'s params and config to the model folder `path` (e.g. `DST/dit`), blocks stacked; returns it.

    A looped model (`scan_layers=False`) is stacked on the host first, which holds one extra copy of the blocks.
    """
    config = model.config
    flat = wan_keys.state_to_flat_params(model)
    if not config.scan_layers:
        flat = wan_keys.stack_blocks(flat, config.num_layers)
    return save_wan_dit_params(path, flat, dataclasses.replace(config, scan_layers=True), source=source,
                               overwrite=overwrite)


def save_wan_dit_params(path: str | Path, params: Mapping[str, Any], config: WanConfig, *,
                        source: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes flat params ({dotted path: numpy or jax array}, stacked layout) and `config` as a model folder.

    The params must be exactly those of `WanDiT(config)` in the stacked layout, with their shapes: the converter
    calls this with numpy arrays it filled itself, and a mistake there must not produce a folder that loads wrongly.
    """
    expected = _abstract_param_shapes(dataclasses.replace(config, scan_layers=True))
    problems = _compare_shapes(expected, {k: tuple(np.shape(v)) for k, v in params.items()})
    if problems:
        raise CheckpointError(f"{path}: params do not match WanDiT({_describe(config)}): {problems}")
    meta = {
        "model": WAN_DIT,
        "format_version": FORMAT_VERSION,
        "config": dataclasses.replace(config, scan_layers=True).to_dict(),
        "source": dict(source or {}),
    }
    with _staged_folder(Path(path), overwrite) as staging:
        with _params_writer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, args=ocp.args.PyTreeSave(_nest(params)))
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    return Path(path)


def _params_writer() -> ocp.Checkpointer:
    """A synchronous Orbax pytree writer that adds no copy of the params on top of the caller's.

    Orbax's defaults deep-copy every numpy array before writing (a guard against the caller mutating it meanwhile;
    ours are not touched until the save returns) and compress every array into a second buffer, all arrays at once:
    together ~1.5x the params on top of them, which would make the converter's peak RAM 2.5x its output. Without
    compression the files are ~20% larger on disk and load faster; the format is the same, `load_pretrained`
    (StandardCheckpointer) reads either.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


@contextlib.contextmanager
def _staged_folder(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yields an empty hidden sibling of `final` to write into; renames it to `final` when the block succeeds, removes
    it when the block raises (an existing `final` is then left as it was)."""
    final = final.absolute()
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            retired = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(retired)
            staging.rename(final)
            shutil.rmtree(retired)
        else:
            staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"config.json cannot hold a {type(value).__name__}: {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------------------


def find_model_folder(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The model folder and its parsed config.json, given the folder itself or a converted DST (which holds `dit/`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    candidates = [path / CONFIG_FILE] + [path / sub / CONFIG_FILE for _, _, sub in MODEL_KINDS.values()]
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (looked at {[str(c) for c in candidates]}); is this a folder "
                              "written by `python -m tools.convert_wan_weights` or `save_wan_dit`?")
    try:
        meta = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{config_path}: not a uvigu model config (no 'model' field); a diffusers or original "
                              "Wan folder must be converted first: python -m tools.convert_wan_weights")
    if meta["model"] not in MODEL_KINDS:
        raise CheckpointError(f"{config_path}: unknown model kind {meta['model']!r}; known: {sorted(MODEL_KINDS)}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {meta.get('format_version')!r}; this code reads "
                              f"version {FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config_path}: no 'config' object")
    return config_path.parent, meta


def load_config(path: str | Path, **overrides) -> WanConfig:
    """The config a `load_pretrained(path, **overrides)` would build, without reading any weights."""
    folder, meta = find_model_folder(path)
    return _apply_overrides(folder, meta, overrides)


def load_pretrained(path: str | Path, *, mesh: Mesh | None = None, **overrides) -> nnx.Module:
    """The module recorded in `path/config.json` with its pretrained params.

    `path`: a model folder or a converted DST (its `dit/` is used). `overrides`: config fields to change; execution
    fields (`EXECUTION_FIELDS`) freely, architecture fields only to the value they already have. `mesh`: restore every
    param directly into the sharding `uvigu.sharding.state_shardings` gives it on that mesh; without it params go to
    the default device.
    """
    folder, meta = find_model_folder(path)
    config = _apply_overrides(folder, meta, overrides)
    _, model_cls, _ = MODEL_KINDS[meta["model"]]
    params_dir = (folder / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{folder}: no {PARAMS_DIR}/ (the Orbax params checkpoint)")

    stacked_config = dataclasses.replace(config, scan_layers=True)
    stacked_abstract = nnx.eval_shape(lambda: model_cls(stacked_config, rngs=nnx.Rngs(0)))
    stacked_params = nnx.state(stacked_abstract, nnx.Param)
    targets = _restore_targets(stacked_params, config.storage_dtype, mesh)

    stored = read_param_metadata(folder)
    problems = _compare_shapes({k: v.shape for k, v in targets.items()}, {k: v.shape for k, v in stored.items()})
    if problems:
        raise CheckpointError(f"{params_dir}: stored params do not match {model_cls.__name__}"
                              f"({_describe(config)}): {problems}")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = _flatten(checkpointer.restore(params_dir, _nest(targets)))

    if config.scan_layers:
        abstract = stacked_abstract
    else:
        abstract = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
        restored = _unstack(restored, nnx.state(abstract, nnx.Param), config.num_layers, mesh)
    return _merge(abstract, restored)


def read_param_metadata(path: str | Path) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted param path: shape and dtype as stored} of a model folder, without reading any weights. (A converted
    checkpoint may store a few params in a wider dtype than `param_dtype`, e.g. fp32 norms of a bf16 release.)"""
    folder, _ = find_model_folder(path)
    params_dir = (folder / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{folder}: no {PARAMS_DIR}/ (the Orbax params checkpoint)")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(params_dir).item_metadata.tree
    return {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype) for k, v in _flatten(tree).items()}


def _apply_overrides(folder: Path, meta: dict[str, Any], overrides: Mapping[str, Any]) -> WanConfig:
    config_cls, _, _ = MODEL_KINDS[meta["model"]]
    try:
        saved = config_cls.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid config ({e})") from None
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise CheckpointError(f"load_pretrained: unknown override(s) {unknown}; {config_cls.__name__} fields are "
                              f"{sorted(names)} (execution fields: {sorted(EXECUTION_FIELDS)})")
    try:
        config = dataclasses.replace(saved, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"load_pretrained: invalid override(s) {dict(overrides)}: {e}") from None
    changed = [f"{n}: checkpoint {getattr(saved, n)!r}, override {getattr(config, n)!r}"
               for n in sorted(names - EXECUTION_FIELDS) if getattr(saved, n) != getattr(config, n)]
    if changed:
        raise CheckpointError(f"load_pretrained({folder}): architecture override(s) disagree with the checkpoint: "
                              f"{'; '.join(changed)}. Only {sorted(EXECUTION_FIELDS)} can change on load.")
    return config


def _restore_targets(params: nnx.State, dtype, mesh: Mesh | None) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted path: ShapeDtypeStruct in `dtype` with its sharding} for every param of an abstract state."""
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = {k: device for k in _dotted_variables(params)}
    else:
        shardings = {k: v.get_value() for k, v in _dotted_variables(sharding.state_shardings(params, mesh)).items()}
    return {k: jax.ShapeDtypeStruct(tuple(v.shape), dtype, sharding=shardings[k])
            for k, v in _dotted_variables(params).items()}


def _unstack(stacked: dict[str, jax.Array], looped: nnx.State, num_layers: int,
             mesh: Mesh | None) -> dict[str, jax.Array]:
    """Stacked params -> the looped layout's `blocks.{i}.…`, one stacked param at a time (each is dropped once sliced,
    so peak memory is the model plus one stacked param)."""
    looped_vars = _dotted_variables(looped)
    shardings = (None if mesh is None
                 else {k: v.get_value() for k, v in _dotted_variables(sharding.state_shardings(looped, mesh)).items()})
    out = {}
    for key in list(stacked):
        value = stacked.pop(key)
        if not key.startswith("blocks."):
            out[key] = value
            continue
        rest = key[len("blocks."):]
        for i in range(num_layers):
            name = f"blocks.{i}.{rest}"
            if name not in looped_vars:
                raise CheckpointError(f"stacked param {key} has no looped counterpart {name}")
            layer = value[i]
            out[name] = layer if shardings is None else jax.device_put(layer, shardings[name])
        del value
    return out


def _merge(abstract: nnx.Module, flat: Mapping[str, jax.Array]) -> nnx.Module:
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise CheckpointError(f"{type(abstract).__name__} has non-param state {rest}; checkpoints hold params only")
    filled = []
    for path, var in nnx.to_flat_state(params):
        key = ".".join(map(str, path))
        filled.append((path, var.replace(flat[key])))
    return nnx.merge(graphdef, nnx.from_flat_state(filled), rest)


# ----------------------------------------------------------------------------------------------------------------------
# Path bookkeeping: flat dotted paths <-> the nested dicts Orbax stores.
# ----------------------------------------------------------------------------------------------------------------------


def _dotted_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): v for path, v in nnx.to_flat_state(state)}


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _abstract_param_shapes(config: WanConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: WanDiT(config, rngs=nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in _dotted_variables(nnx.state(abstract, nnx.Param)).items()}


def _compare_shapes(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> str:
    """'' when the two {path: shape} tables agree, else a message naming missing, unexpected and mis-shaped paths."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [f"{k} expected {tuple(expected[k])} got {tuple(got[k])}"
             for k in sorted(set(expected) & set(got)) if tuple(expected[k]) != tuple(got[k])]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", wrong)):
        if items:
            parts.append(f"{len(items)} {label}: " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
    return "; ".join(parts)


def _describe(config: WanConfig) -> str:
    return (f"dim={config.dim}, ffn_dim={config.ffn_dim}, num_heads={config.num_heads}, "
            f"num_layers={config.num_layers}, text_dim={config.text_dim}")
