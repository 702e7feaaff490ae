"""Pretrained-model folders of every kind: save a model's params with its config, load them back as a ready module.

A model folder holds

    config.json   {"model": KIND, "format_version": 1, "config": {...}, "source": {...}}
    params/       an Orbax (StandardCheckpointer) tree of the nnx.Param values, nested by param path

Kinds (`MODEL_KINDS`), each with the subfolder a converted or exported DST keeps it in:

    wan_dit       WanDiT        dit/       config: WanConfig fields
    univigu       UniViGU       univigu/   config: {"wan": WanConfig fields, "univigu": UniViGUConfig fields}
    wan_vae       WanVAE        vae/       config: WanVAEConfig fields
    umt5_encoder  UMT5Encoder   umt5/      config: UMT5Config fields

On disk layer stacks are always in the *stacked* layout (`blocks.attn1.to_q.kernel` [L, D, D]) whatever the model's
`scan_layers` was: one canonical form means a converter can write it without building a model, and either execution
layout (scan or a Python loop) loads it (`load_pretrained` slices the stack per layer when `scan_layers=False`).

Folders are written into a hidden temporary sibling and renamed into place only when complete (`staged_folder`), so
a crash or a bad input never leaves something at `path` that looks loadable.

`load_pretrained(path, **overrides)` takes execution overrides (dtype, param_dtype, scan_layers, remat_policy,
attention_backend, where the model has them): they change how the weights run, not what they are. Dtypes may be
given as Flax users write them: `jnp.bfloat16`, `np.float32`, `"bfloat16"`. Architecture fields are fixed by the
weights; overriding one to a different value is an error rather than a silently mismatched model. Params are restored
straight into `param_dtype` and, with `mesh=`, straight into their shards (no device holds the unsharded model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from uvigu import atomic_files, sharding
from uvigu.models import flat_params

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

WAN_DIT, UNIVIGU, WAN_VAE, UMT5_ENCODER = "wan_dit", "univigu", "wan_vae", "umt5_encoder"

# Config fields that say how weights are executed, not what they are: free to override on load.
EXECUTION_FIELDS = frozenset({"dtype", "param_dtype", "scan_layers", "remat_policy", "attention_backend"})
_DTYPE_FIELDS = ("dtype", "param_dtype")


class CheckpointError(ValueError):
    """A model folder that cannot be written or loaded as asked; the message names the path and the problem."""


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One kind of model folder. Classes are named `module:attr` and imported on first use, so that reading a
    folder of one kind never imports the others."""

    name: str
    subfolder: str  # where a converted / exported DST keeps it
    module_class: str
    config_class: str
    stacks: tuple[str, ...]  # param-path prefixes of layer stacks (stacked on disk, looped when scan_layers=False)
    build: Callable[[Any, nnx.Rngs], nnx.Module] | None = None  # default: module_class(config, rngs=rngs)

    def module_type(self) -> type:
        return _import(self.module_class)

    def config_type(self) -> type:
        return _import(self.config_class)

    def make(self, config, rngs: nnx.Rngs) -> nnx.Module:
        return self.build(config, rngs) if self.build else self.module_type()(config, rngs=rngs)


def _import(name: str):
    module, attr = name.split(":")
    return getattr(importlib.import_module(module), attr)


MODEL_KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind(UNIVIGU, "univigu", "uvigu.models.univigu:UniViGU", "uvigu.models.univigu:UniViGUModelConfig",
              ("dit.blocks", "ffn_t"), build=lambda config, rngs: config.build(rngs)),
    ModelKind(WAN_DIT, "dit", "uvigu.models.wan:WanDiT", "uvigu.models.wan:WanConfig", ("blocks",)),
    ModelKind(WAN_VAE, "vae", "uvigu.models.wan_vae:WanVAE", "uvigu.models.wan_vae:WanVAEConfig", ()),
    ModelKind(UMT5_ENCODER, "umt5", "uvigu.models.umt5:UMT5Encoder", "uvigu.models.umt5:UMT5Config", ("blocks",)),
)}
# What `load_pretrained(DST)` picks in a DST holding several parts: the denoiser, a unified model first.
_DEFAULT_ORDER = (UNIVIGU, WAN_DIT)


def kind_of(model: nnx.Module) -> ModelKind:
    for kind in MODEL_KINDS.values():
        if type(model).__name__ == kind.module_class.split(":")[1] and isinstance(model, kind.module_type()):
            return kind
    raise CheckpointError(f"no model-folder kind for a {type(model).__name__}; kinds: {sorted(MODEL_KINDS)}")


def model_config(model: nnx.Module):
    """The config a folder of `model` records (a UniViGU's is its DiT's and its own together)."""
    if kind_of(model).name == UNIVIGU:
        from uvigu.models.univigu import UniViGUModelConfig

        return UniViGUModelConfig(model.dit.config, model.config)
    return model.config


# ----------------------------------------------------------------------------------------------------------------------
# Config helpers that see through a UniViGU's two sections.
# ----------------------------------------------------------------------------------------------------------------------


def _sections(config) -> list:
    return [config.wan, config.univigu] if hasattr(config, "univigu") else [config]


def _execution(config):
    """The section holding the execution fields (a UniViGU's DiT config)."""
    return _sections(config)[0]


def _num_layers(config) -> int:
    return getattr(_execution(config), "num_layers", 0)


def _stacked(config):
    """`config` with scan_layers=True where it has that field: the layout on disk."""
    ex = _execution(config)
    if not hasattr(ex, "scan_layers") or ex.scan_layers:
        return config
    return _with_execution(config, dataclasses.replace(ex, scan_layers=True))


def _with_execution(config, ex):
    return dataclasses.replace(config, wan=ex) if hasattr(config, "univigu") else ex


def _dtype_name(value) -> str:
    """'bfloat16' for jnp.bfloat16, np.dtype('bfloat16'), 'bfloat16', ...: what Flax users pass as a dtype."""
    if isinstance(value, str):
        return value
    try:
        return jnp.dtype(value).name
    except TypeError:
        raise CheckpointError(f"{value!r} is not a dtype") from None


# ----------------------------------------------------------------------------------------------------------------------
# Saving.
# ----------------------------------------------------------------------------------------------------------------------


def save_pretrained(path: str | Path, model: nnx.Module, *, source: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Writes `model`'s params and config to the model folder `path` (e.g. `DST/dit`), layer stacks stacked.

    Multi-process: every process calls it with its shards of the same model (Orbax writes each process's part).
    A looped model (`scan_layers=False`) is stacked on its devices first, which holds one extra copy of the blocks
    there.
    """
    kind, config = kind_of(model), model_config(model)
    flat = flat_params.state_to_flat_params(model)
    if _stacked(config) is not config:
        flat = flat_params.stack_blocks(flat, _num_layers(config), kind.stacks)
    return save_params(path, kind.name, _stacked(config), flat, source=source, overwrite=overwrite)


def save_params(path: str | Path, kind: str, config, params: Mapping[str, Any], *,
                source: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Writes flat params ({dotted path: numpy or jax array}, stacked layout) and `config` as a `kind` model folder.

    The params must be exactly those of the module `config` builds, in the stacked layout, with their shapes:
    converters call this with numpy arrays they filled themselves, and a mistake there must not produce a folder that
    loads wrongly.
    """
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {sorted(MODEL_KINDS)}")
    config = _stacked(config)
    expected = _abstract_param_shapes(MODEL_KINDS[kind], config)
    problems = flat_params.shape_problems({k: tuple(np.shape(v)) for k, v in params.items()}, expected)
    if problems:
        raise CheckpointError(f"{path}: params do not match {kind} ({_describe(config)}): {'; '.join(problems)}")
    meta = {"model": kind, "format_version": FORMAT_VERSION, "config": config.to_dict(), "source": dict(source or {})}
    with staged_folder(Path(path), overwrite) as staging:
        with _params_writer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, args=ocp.args.PyTreeSave(_nest(params)))
        if jax.process_index() == 0:
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
def staged_folder(final: Path, overwrite: bool) -> Iterator[Path]:
    """Yields an empty hidden sibling of `final` to write into; renames it to `final` when the block succeeds, removes
    it when the block raises (an existing `final` is then left as it was).

    Multi-process (every process calls it, e.g. around a sharded Orbax save): the staging name comes from process 0,
    process 0 alone creates, renames and removes, and the processes meet before and after the writes."""
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
    primary = jax.process_index() == 0
    staging = final.parent / f".{final.name}.partial-{_shared_token()}"
    if primary:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    _barrier(f"staged:{staging.name}:created")
    try:
        yield staging
        _barrier(f"staged:{staging.name}:written")
        if primary:
            # One atomic step: without overwrite a `final` that appeared meanwhile (another writer) is an error and
            # is kept; with it, old and new are swapped and the old tree (now at `staging`) removed.
            try:
                atomic_files.publish(staging, final, overwrite)
            except atomic_files.DestinationExists as e:
                raise CheckpointError(f"{final} appeared while it was being written (another writer?); it was left "
                                      "untouched, this write was dropped") from e
            if staging.exists():
                shutil.rmtree(staging)
            shutil.rmtree(staging.parent / f"{staging.name}.retired", ignore_errors=True)
        _barrier(f"staged:{staging.name}:renamed")
    except BaseException:
        if primary:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _shared_token() -> str:
    """A random hex token, the same in every process (process 0's)."""
    token = uuid.uuid4().hex[:8]
    if jax.process_count() == 1:
        return token
    from jax.experimental import multihost_utils

    value = multihost_utils.broadcast_one_to_all(np.frombuffer(bytes.fromhex(token), np.uint8))
    return bytes(np.asarray(value, np.uint8)).hex()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"config.json cannot hold a {type(value).__name__}: {value!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------------------


def find_model_folder(path: str | Path, kind: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The model folder and its parsed config.json, given the folder itself or a converted / exported DST. In a DST,
    `kind` picks the part (`vae`, ...); without it the denoiser: a UniViGU if there is one, else the Wan DiT."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if kind is not None and kind not in MODEL_KINDS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {sorted(MODEL_KINDS)}")
    order = (kind,) if kind else _DEFAULT_ORDER
    candidates = [path / CONFIG_FILE] + [path / MODEL_KINDS[k].subfolder / CONFIG_FILE for k in order]
    config_path = next((c for c in candidates if c.is_file()), None)
    if config_path is None:
        raise CheckpointError(f"{path}: no {CONFIG_FILE} (looked at {[str(c) for c in candidates]}); is this a folder "
                              "written by `python -m tools.convert_wan_weights` or `save_pretrained`?")
    try:
        meta = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{config_path}: not a uvigu model config (no 'model' field); a diffusers or original "
                              "Wan folder must be converted first: python -m tools.convert_wan_weights")
    if meta["model"] not in MODEL_KINDS:
        raise CheckpointError(f"{config_path}: unknown model kind {meta['model']!r}; known: {sorted(MODEL_KINDS)}")
    if kind is not None and meta["model"] != kind:
        raise CheckpointError(f"{config_path}: holds a {meta['model']}, not a {kind}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{config_path}: format_version {meta.get('format_version')!r}; this code reads "
                              f"version {FORMAT_VERSION}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config_path}: no 'config' object")
    return config_path.parent, meta


def load_config(path: str | Path, *, kind: str | None = None, **overrides):
    """The config a `load_pretrained(path, **overrides)` would build, without reading any weights."""
    folder, meta = find_model_folder(path, kind)
    return _apply_overrides(folder, meta, overrides)


def load_pretrained(path: str | Path, *, mesh: Mesh | None = None, kind: str | None = None,
                    **overrides) -> nnx.Module:
    """The module recorded in `path/config.json` with its pretrained params.

    `path`: a model folder, or a converted / exported DST (its denoiser: `univigu/`, else `dit/`; `kind=` picks
    another part, e.g. kind="wan_vae"). `overrides`: config fields to change; execution fields (`EXECUTION_FIELDS`)
    freely, architecture fields only to the value they already have. `mesh`: restore every param directly into the
    sharding `uvigu.sharding.state_shardings` gives it on that mesh; without it params go to the default device.
    """
    folder, meta = find_model_folder(path, kind)
    spec = MODEL_KINDS[meta["model"]]
    config = _apply_overrides(folder, meta, overrides)
    params_dir = (folder / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{folder}: no {PARAMS_DIR}/ (the Orbax params checkpoint)")

    stacked_config = _stacked(config)
    stacked_abstract = nnx.eval_shape(lambda: spec.make(stacked_config, nnx.Rngs(0)))
    stacked_params = nnx.state(stacked_abstract, nnx.Param)
    targets = _restore_targets(stacked_params, _execution(config).storage_dtype, mesh)

    stored = read_param_metadata(folder)
    problems = flat_params.shape_problems({k: v.shape for k, v in stored.items()},
                                          {k: v.shape for k, v in targets.items()})
    if problems:
        raise CheckpointError(f"{params_dir}: stored params do not match {spec.module_class.split(':')[1]}"
                              f"({_describe(config)}): {'; '.join(problems)}")
    with ocp.StandardCheckpointer() as checkpointer:
        restored = _flatten(checkpointer.restore(params_dir, _nest(targets)))

    if stacked_config is config:
        abstract = stacked_abstract
    else:
        abstract = nnx.eval_shape(lambda: spec.make(config, nnx.Rngs(0)))
        restored = _unstack(restored, nnx.state(abstract, nnx.Param), _num_layers(config), spec.stacks, mesh)
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


def _apply_overrides(folder: Path, meta: dict[str, Any], overrides: Mapping[str, Any]):
    config_cls = MODEL_KINDS[meta["model"]].config_type()
    try:
        saved = config_cls.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid config ({e})") from None
    overrides = {k: _dtype_name(v) if k in _DTYPE_FIELDS else v for k, v in overrides.items()}
    sections = _sections(saved)
    names = [{f.name for f in dataclasses.fields(s)} for s in sections]
    unknown = sorted(set(overrides) - set().union(*names))
    if unknown:
        raise CheckpointError(f"load_pretrained: unknown override(s) {unknown}; {meta['model']} fields are "
                              f"{sorted(set().union(*names))} (execution fields: {sorted(EXECUTION_FIELDS)})")
    replaced, changed = [], []
    for section, fields in zip(sections, names):
        mine = {k: v for k, v in overrides.items() if k in fields}
        try:
            new = dataclasses.replace(section, **mine)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"load_pretrained: invalid override(s) {mine}: {e}") from None
        changed += [f"{n}: checkpoint {getattr(section, n)!r}, override {getattr(new, n)!r}"
                    for n in sorted(fields - EXECUTION_FIELDS) if getattr(section, n) != getattr(new, n)]
        replaced.append(new)
    if changed:
        raise CheckpointError(f"load_pretrained({folder}): architecture override(s) disagree with the checkpoint: "
                              f"{'; '.join(changed)}. Only {sorted(EXECUTION_FIELDS)} can change on load.")
    return dataclasses.replace(saved, wan=replaced[0], univigu=replaced[1]) if len(replaced) == 2 else replaced[0]


def _restore_targets(params: nnx.State, dtype, mesh: Mesh | None) -> dict[str, jax.ShapeDtypeStruct]:
    """{dotted path: ShapeDtypeStruct in `dtype` with its sharding} for every param of an abstract state."""
    if mesh is None:
        device = SingleDeviceSharding(jax.local_devices()[0])
        shardings = {k: device for k in _dotted_variables(params)}
    else:
        shardings = {k: v.get_value() for k, v in _dotted_variables(sharding.state_shardings(params, mesh)).items()}
    return {k: jax.ShapeDtypeStruct(tuple(v.shape), dtype, sharding=shardings[k])
            for k, v in _dotted_variables(params).items()}


def _unstack(stacked: dict[str, jax.Array], looped: nnx.State, num_layers: int, prefixes: tuple[str, ...],
             mesh: Mesh | None) -> dict[str, jax.Array]:
    """Stacked params -> the looped layout's `<stack>.{i}.…`, one stacked param at a time (each is dropped once
    sliced, so peak memory is the model plus one stacked param)."""
    looped_vars = _dotted_variables(looped)
    shardings = (None if mesh is None
                 else {k: v.get_value() for k, v in _dotted_variables(sharding.state_shardings(looped, mesh)).items()})
    out = {}
    for key in list(stacked):
        value = stacked.pop(key)
        prefix = next((p for p in prefixes if key.startswith(p + ".")), None)
        if prefix is None:
            out[key] = value
            continue
        rest = key[len(prefix) + 1:]
        for i in range(num_layers):
            name = f"{prefix}.{i}.{rest}"
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


def _abstract_param_shapes(kind: ModelKind, config) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: kind.make(config, nnx.Rngs(0)))
    return {k: tuple(v.shape) for k, v in _dotted_variables(nnx.state(abstract, nnx.Param)).items()}


def _describe(config) -> str:
    fields = ("dim", "ffn_dim", "num_heads", "num_layers", "text_dim", "text_flow", "vocab_size", "base_dim",
              "z_dim", "dim_mult", "d_model")
    return ", ".join(f"{n}={getattr(s, n)}" for s in _sections(config) for n in fields if hasattr(s, n))
