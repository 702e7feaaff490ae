"""SPMD layout: one device mesh with named axes and one table of logical-axis rules.

Params are tagged with *logical* axis names when they are created (`nnx.with_partitioning`, e.g. a q projection
kernel is ('embed', 'heads')); activations are constrained with logical names too ('act_batch', 'act_length', ...).
`LOGICAL_AXIS_RULES` below is the one place that maps those names to mesh axes, so re-laying out the model for a new
topology touches one table. A logical dim whose size does not divide the mesh axes it maps to is replicated instead
(XLA would otherwise pad it); `resolve_spec` reports which dims that happened to through `explain_spec`.

Mesh axes: `data` (pure data parallel, params replicated), `fsdp` (data parallel with params and optimizer state
sharded over the embed dim), `tensor` (heads / FFN hidden / vocab split, Megatron style), `context` (sequence split
of the video tokens; reserved for context-parallel attention, size 1 today).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
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
    ("act_length", "context"),
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
    return jax.lax.with_sharding_constraint(x, resolve_spec(logical_axes, x.shape, mesh))


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
