"""SPMD layout: one device mesh with named axes and one table of logical-axis rules.

Params are tagged with *logical* axis names when they are created (`nnx.with_partitioning`, e.g. a q projection
kernel is ('embed', 'heads')); activations are constrained with logical names too ('act_batch', 'act_length', ...).
`LOGICAL_AXIS_RULES` below is the one place that maps those names to mesh axes, so re-laying out the model for a new
topology touches one table. A logical dim whose size does not divide the mesh axes it maps to is replicated instead
(XLA would otherwise pad it); `explain_shardings` lists what was decided for every param, and `constrain` logs a
warning (once per shape) when an activation dim falls back to replicated that way.

Mesh axes: `data` (pure data parallel, params replicated), `fsdp` (data parallel with params and optimizer state
sharded over the embed dim), `tensor` (heads / FFN hidden / vocab split, Megatron style), `context` (sequence
parallel: the token axis `act_length` of every activation is split over it).

Context parallelism. The residual stream, norms, modulation, FFNs and cross-attention work per token, so with
`act_length` -> `context` each device computes only its contiguous chunk of the sequence (the unified model's
video / text split at L moves only the tokens that cross a shard edge).
Self-attention is the one place that mixes tokens: its queries stay split (`act_length`), its keys and values are
constrained to `act_kv_length`, which maps to nothing, i.e. XLA all-gathers K and V over `context` inside the
attention (and reduce-scatters their gradients). Each query row then sees every key locally, so the softmax and the
sums run in the same order as on one device: the numbers do not change. For the unified model the split is over the
concatenated [video; text] sequence, so L + S must be a multiple of the context size; if not, the token axis is
replicated (same numbers, no saving, and a warning) -- it is never padded. (Real sizes divide: 32,760 + 256 and
75,600 + 256 tokens split 8 ways.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # --- params ---
    ("embed", "fsdp"),  # model width D
    ("heads", "tensor"),  # N * K, the flattened attention heads
    ("mlp", "tensor"),  # FFN hidden F
    ("vocab", "tensor"),  # text vocabulary V
    ("text_embed", None),  # the text encoder's width (4096 for umT5-XXL) entering the text embedder
    ("freq", None),  # sinusoidal time features
    ("patch", None),  # patch kernel's t/h/w/channel dims
    ("modulation", None),  # the 6 (or 2) shift/scale/gate rows of a modulation table
    ("layers", None),  # the stacked-layers axis of scanned blocks
    ("norm", None),  # norm scales and biases (small)
    # --- activations ---
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),  # the token axis: sequence (context) parallelism
    ("act_kv_length", None),  # keys / values inside attention: gathered over `context` (each query sees all keys)
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        out[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return out


def make_mesh(shape: dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `MESH_AXES`. `shape` maps axis -> size; one axis may be -1 (takes the remaining devices); axes
    not named are 1. Default: everything on `fsdp`. Axis types are Auto (sharding propagated by XLA)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = {a: shape.get(a, 1) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {fill}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split over mesh {shape}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {len(devices)}")
    dev_array = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(dev_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def resolve_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules=LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Logical names of an array's dims -> the PartitionSpec on `mesh`.

    A dim is replicated when its name maps to nothing, when its size does not divide the product of its mesh axes,
    or when one of those mesh axes is already used by an earlier dim.
    """
    if not logical_axes:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match an array of shape {tuple(shape)}")
    table = _rules_dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in uvigu.sharding.LOGICAL_AXIS_RULES")
        axes = tuple(a for a in table[name] if mesh.shape.get(a, 1) > 1)
        if not axes or used.intersection(axes) or size % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (`jax.set_mesh`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = resolve_spec(logical_axes, x.shape, mesh)
    _warn_if_replicated(logical_axes, x.shape, spec, mesh)
    return jax.lax.with_sharding_constraint(x, spec)


_warned: set = set()


def _warn_if_replicated(logical_axes, shape, spec: PartitionSpec, mesh) -> None:
    """Logs (once per name, size and mesh) an activation dim that a >1 mesh axis should split but cannot, because
    its size does not divide: e.g. a [video; text] sequence whose length is not a multiple of the `context` size."""
    table = _rules_dict(LOGICAL_AXIS_RULES)
    for name, size, got in zip(logical_axes, shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if name is None or got is not None or not name.startswith("act_"):
            continue
        axes = tuple(a for a in table.get(name, ()) if mesh.shape.get(a, 1) > 1)
        parts = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % parts == 0:
            continue  # nothing to split over, or replicated because an earlier dim took the axis
        key = (name, size, tuple(sorted(mesh.shape.items())))
        if key in _warned:
            continue
        _warned.add(key)
        logging.warning("activation axis %r of size %d does not divide mesh axes %s (%d ways): replicated there, "
                        "so those devices repeat its work", name, size, axes, parts)


def _logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    return variable.get_metadata().get("out_sharding")


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """The NamedSharding of every variable in an (abstract or concrete) `nnx.State`, from its logical names."""

    def one(v):
        if isinstance(v, nnx.Variable):
            return v.replace(NamedSharding(mesh, resolve_spec(_logical_axes_of(v), v.shape, mesh)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def explain_shardings(state: Any, mesh: Mesh) -> list[tuple[str, tuple[int, ...], tuple, PartitionSpec]]:
    """(path, shape, logical axes, resolved spec) for every variable: what `state_shardings` decided and why."""
    rows = []
    for path, v in nnx.to_flat_state(state):
        names = _logical_axes_of(v)
        rows.append((".".join(map(str, path)), tuple(v.shape), names, resolve_spec(names, v.shape, mesh)))
    return rows


def sharded_init(create: Callable[[], nnx.Module], mesh: Mesh) -> nnx.Module:
    """Builds a module directly in its sharded layout: `nnx.eval_shape` first (no memory), then a jitted init whose
    out_shardings come from the params' logical names, so no device ever holds the full unsharded model."""
    abstract = nnx.eval_shape(create)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        state = nnx.state(create())
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        state = init()
    return nnx.merge(graphdef, state)
