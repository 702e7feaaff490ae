"""Params as a flat {dotted path: array} dict, the form every converter and checkpoint speaks, and the two block
layouts: *stacked* (`blocks.x.y` [L, ...], for nnx.scan; the on-disk form) and *looped* (`blocks.{i}.x.y`).

Model-independent: `wan_keys` and `umt5_keys` map their reference layouts onto these paths and use these helpers.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx



def abbrev(items: list[str], n: int = 12) -> str:
    """The first `n` items and how many more: keeps error messages about big checkpoints readable."""
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def shape_problems(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], *,
                   optional: frozenset[str] = frozenset(), order=sorted) -> list[str]:
    """What keeps a checkpoint's {key: shape} from matching `expected`: counts and names of missing (all but
    `optional`), unexpected and mis-shaped keys, as message fragments; empty when it matches. `order` sorts keys for
    the report (e.g. blocks in numeric layer order)."""
    missing = order(set(expected) - set(shapes) - set(optional))
    unexpected = order(set(shapes) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k])}, got {tuple(shapes[k])}"
             for k in order(set(expected) & set(shapes)) if tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {abbrev(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {abbrev(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensor(s): {abbrev(wrong)}")
    return problems


def state_to_flat_params(model_or_state) -> dict[str, Any]:
    """{dotted path: array} of every nnx.Param of a module (or a State)."""
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {".".join(map(str, path)): v[...] for path, v in nnx.to_flat_state(state)}


def filled_state(state: nnx.State, flat: Mapping[str, Any]) -> nnx.State:
    """`state` (concrete or from `nnx.eval_shape`) with every param replaced by `flat[path]`, cast to the param's
    dtype; paths and shapes must match exactly, else a ValueError names them."""
    variables = {".".join(map(str, p)): (p, v) for p, v in nnx.to_flat_state(state)}
    missing, unexpected = sorted(set(variables) - set(flat)), sorted(set(flat) - set(variables))
    if missing or unexpected:
        raise ValueError(f"params do not match the model: missing [{abbrev(missing)}]; unexpected [{abbrev(unexpected)}]")
    filled = []
    for path, (key, var) in variables.items():
        value = flat[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"param {path}: expected shape {tuple(var.shape)}, got {tuple(value.shape)}")
        filled.append((key, var.replace(jnp.asarray(value, dtype=var.dtype))))
    return nnx.from_flat_state(filled)


def load_flat_params(model: nnx.Module, flat: Mapping[str, Any]) -> None:
    """Writes `flat` into `model`'s params in place; every param must be given exactly once with its shape."""
    nnx.update(model, filled_state(nnx.state(model, nnx.Param), flat))


def unstack_blocks(flat: Mapping[str, Any], num_layers: int, prefixes: tuple[str, ...] = ("blocks",)) -> dict[str, Any]:
    """Stacked layout (`blocks.x.y` [L, ...]) -> looped layout (`blocks.{i}.x.y`), for each layer-stack prefix
    (e.g. UniViGU's `dit.blocks` and `ffn_t`)."""
    out = {}
    for path, a in flat.items():
        prefix = next((p for p in prefixes if path.startswith(p + ".")), None)
        if prefix is None:
            out[path] = a
            continue
        for i in range(num_layers):
            out[f"{prefix}.{i}.{path[len(prefix) + 1:]}"] = a[i]
    return out


def stack_blocks(flat: Mapping[str, Any], num_layers: int, prefixes: tuple[str, ...] = ("blocks",)) -> dict[str, Any]:
    """Looped layout (`blocks.{i}.x.y`) -> stacked layout (`blocks.x.y` [L, ...]), for each layer-stack prefix."""
    looped = [re.compile(rf"^({re.escape(p)})\.(\d+)\.(.+)$") for p in prefixes]
    out, per_layer = {}, {}
    for path, a in flat.items():
        m = next((m for m in (r.match(path) for r in looped) if m), None)
        if m:
            per_layer.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = a
        else:
            out[path] = a
    for name, by_layer in per_layer.items():
        if sorted(by_layer) != list(range(num_layers)):
            raise ValueError(f"{name} (stacked): have layers {sorted(by_layer)}, expected 0..{num_layers - 1}")
        out[name] = _stack([by_layer[i] for i in range(num_layers)])
    return out


def _stack(arrays: list) -> Any:
    """numpy in, numpy out; jax arrays are stacked on their devices (a multi-process model's arrays span other
    processes' devices and cannot be fetched to one host)."""
    if any(isinstance(a, jax.Array) for a in arrays):
        return jnp.stack(arrays)
    return np.stack(arrays)


def to_numpy(x) -> np.ndarray:
    """A numpy array from numpy / jax / torch; torch bf16 (no numpy dtype) goes through float32 to ml_dtypes."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(x)
