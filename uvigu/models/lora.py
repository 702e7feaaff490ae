"""Low-rank adapters (LoRA) for a `WanDiT` or a `UniViGU`, added in place without changing the model's class.

Two forms of the same adapter:

* **In the model** (training, or running an adapter unmerged): `add_lora(model, LoRAConfig(...), rngs=...)` swaps
  each targeted `nnx.Linear` for a `LoRALinear` (an `nnx.Linear` subclass) that keeps the *same* `kernel` / `bias`
  Variables under the same names and adds `lora_a` [.., I, R] and `lora_b` [.., R, O] (`LoRAParam`):
  y = x·W + b + (α / R)·(x·A)·B. Base param paths do not move (`blocks.attn1.to_q.kernel` stays), so base weights
  load, save and shard exactly as before. With `scan_layers` the adapters are stacked like the kernels
  (`blocks.attn1.to_q.lora_a` [L, I, R]) and `nnx.scan` slices them with the block; looped models get one per
  layer. A and B carry logical axis names taken from the kernel's (A: kernel's input axis, B: its output axis, the
  rank axis replicated), so `uvigu.sharding` places them next to their kernel. B starts at zero: a fresh adapter is
  the identity. `LoRAParam` is not an `nnx.Param`: `lora_filter` (= `LoRAParam`) selects the adapters only,
  `nnx.Param` the frozen base only; train with `nnx.Optimizer(model, tx, wrt=lora_filter)` and grads taken with
  `nnx.DiffState(0, lora_filter)`.
* **Interchange** (`Adapters`): {module name: `LoRAWeight(a [I, R], b [R, O], alpha)`}, keyed by the diffusers
  module name of the Linear (`blocks.3.attn1.to_q`, `blocks.3.ffn.net.0.proj`, UniViGU's
  `blocks.3.ffn_t.net.0.proj`, top-level `proj_out`), arrays in our [in, out] orientation (the transposes of
  PEFT's lora_A.weight [R, I] / lora_B.weight [O, R]). `uvigu.models.lora_formats` reads and writes it in the
  ecosystem's file formats; `merge_lora` folds it into base kernels (what `uvigu.generate --lora` does);
  `get_adapters` / `set_adapters` / `attach_adapters` move it in and out of a wrapped model.

Targets are named relative to a DiT block (`attn1.to_q`, `attn1.to_out`, `ffn.proj_in`, ...), `ffn_t.proj_in` /
`ffn_t.proj_out` for UniViGU's text FFN, or by their full path for Linears outside the blocks (`proj_out`,
`condition_embedder.time_proj`). ΔW = (α / R)·A·B, the PEFT convention (α = R gives scale 1).

Shape letters: L layers, I in features, O out features, R rank.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jaxtyping import Array, Float

from uvigu import sharding
from uvigu.models.flat_params import abbrev
from uvigu.models.model_config import DTYPES, ModelConfig

# Block-relative names of the Linears of a DiT block (ours) -> their diffusers names; ffn_t is UniViGU's text FFN,
# which lives in its own stack here and at `blocks.N.ffn_t` in the released checkpoint's (diffusers) naming.
BLOCK_LINEARS: dict[str, str] = {
    **{f"attn{n}.to_{p}": f"attn{n}.to_{p}" for n in (1, 2) for p in "qkv"},
    "attn1.to_out": "attn1.to_out.0",
    "attn2.to_out": "attn2.to_out.0",
    "ffn.proj_in": "ffn.net.0.proj",
    "ffn.proj_out": "ffn.net.2",
    "ffn_t.proj_in": "ffn_t.net.0.proj",
    "ffn_t.proj_out": "ffn_t.net.2",
}
_BLOCK_FROM_DIFFUSERS = {v: k for k, v in BLOCK_LINEARS.items()}
_TEXT_FFN = ("ffn_t.proj_in", "ffn_t.proj_out")
# issue 9 §3: self/cross-attention q, k, v, o and the FFN's two Linears, FFN_t included (skipped on a plain WanDiT).
DEFAULT_TARGETS: tuple[str, ...] = tuple(BLOCK_LINEARS)
_MODULE_NAME = re.compile(r"^blocks\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------------------------------
# Config, variable type, the wrapped Linear.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAConfig(ModelConfig):
    """Rank R, α (ΔW = α/R · A·B; None = R, scale 1), the targeted Linears, and the adapters' storage dtype.

    A target of `ffn_t.*` is skipped on a model without a text FFN (a plain WanDiT); any other target that names no
    Linear of the model is an error.
    """

    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    param_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRAConfig.alpha must be a positive number or None, got {self.alpha!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRAConfig.targets must be non-empty and without repeats, got {self.targets}")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"LoRAConfig.param_dtype={self.param_dtype!r} is not one of {tuple(DTYPES)}")

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


class LoRAParam(nnx.Variable):
    """A LoRA factor (A [.., I, R] or B [.., R, O]). Deliberately not an `nnx.Param`: filters on `nnx.Param` (the
    base checkpoint, a full-model optimiser) never see adapters, and `lora_filter` sees nothing else."""


lora_filter = LoRAParam  # an nnx filter: only adapter factors (`nnx.Optimizer(model, tx, wrt=lora_filter)`)


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` plus a low-rank update: y = x·W + b + scale·(x·A)·B, computed in the Linear's dtype.

    Holds the wrapped Linear's own `kernel` / `bias` Variables (same objects, same names) and its call settings;
    `scale` = α / R is static. Built by `add_lora` / `attach_adapters`, not directly.
    """

    def __init__(self, base: nnx.Linear, lora_a: LoRAParam, lora_b: LoRAParam, scale: float):
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, nnx.data(None) if name == "bias" and value is None else value)
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = float(scale)

    def __call__(self, inputs: Float[Array, "... I"], out_sharding=None) -> Float[Array, "... O"]:
        y = super().__call__(inputs, out_sharding)
        x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        h = jnp.einsum("...I,IR->...R", x, a, precision=self.precision)
        return y + self.scale * jnp.einsum("...R,RO->...O", h, b, precision=self.precision)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]


def _plain_linear(wrapped: LoRALinear) -> nnx.Linear:
    """A plain `nnx.Linear` with the same settings holding `wrapped`'s kernel and bias (no adapter)."""
    settings = dict(use_bias=wrapped.use_bias, dtype=wrapped.dtype, param_dtype=wrapped.param_dtype,
                    precision=wrapped.precision, dot_general=wrapped.dot_general,
                    promote_dtype=wrapped.promote_dtype, preferred_element_type=wrapped.preferred_element_type)
    plain = nnx.eval_shape(lambda: nnx.Linear(wrapped.in_features, wrapped.out_features, rngs=nnx.Rngs(0),
                                              **settings))
    plain.kernel = wrapped.kernel
    plain.bias = wrapped.bias if wrapped.bias is not None else nnx.data(None)
    return plain


# ----------------------------------------------------------------------------------------------------------------------
# Finding the targeted Linears.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Site:
    """Every Linear of one target: one stacked module (`layers` = {None: ...}, kernel [L, I, O]), one module per
    layer (looped), or one top-level module."""

    target: str
    in_stack: bool
    modules: dict[int | None, tuple[tuple, nnx.Linear]] = dataclasses.field(default_factory=dict)

    @property
    def stacked(self) -> bool:
        return self.in_stack and None in self.modules

    @property
    def num_layers(self) -> int | None:
        if not self.in_stack:
            return None
        if self.stacked:
            return self.modules[None][1].kernel.shape[0]
        return len(self.modules)

    def module(self, layer: int | None) -> tuple[nnx.Linear, int | None]:
        """The module holding `layer` and the index into its leading axis (None: the whole kernel)."""
        if self.stacked:
            return self.modules[None][1], layer
        return self.modules[layer][1], None


def _classify(path: tuple) -> tuple[str, bool, int | None]:
    """A Linear's graph path -> (target name, in a layer stack, layer index or None)."""
    parts = list(path)
    if parts and parts[0] == "dit":  # UniViGU wraps its DiT
        parts = parts[1:]
    if len(parts) > 1 and parts[0] in ("blocks", "ffn_t"):
        layer = parts[1] if isinstance(parts[1], int) else None
        rest = [str(p) for p in parts[(2 if layer is not None else 1):]]
        name = ".".join(rest) if parts[0] == "blocks" else ".".join(["ffn_t", *rest])
        return name, True, layer
    return ".".join(map(str, parts)), False, None


def _sites(model: nnx.Module) -> dict[str, _Site]:
    sites: dict[str, _Site] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear):
            target, in_stack, layer = _classify(path)
            sites.setdefault(target, _Site(target, in_stack)).modules[layer] = (tuple(path), node)
    return sites


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) or isinstance(parent, (nnx.Dict, nnx.List)) else getattr(parent, p)
    if isinstance(path[-1], int) or isinstance(parent, (nnx.Dict, nnx.List)):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def module_name(target: str, layer: int | None) -> str:
    """Our target (+ layer) -> its diffusers module name, the key of `Adapters`
    ('attn1.to_out', 3 -> 'blocks.3.attn1.to_out.0')."""
    if target in BLOCK_LINEARS:
        if layer is None:
            raise ValueError(f"target {target!r} lives in the blocks and needs a layer index")
        return f"blocks.{layer}.{BLOCK_LINEARS[target]}"
    return target


def parse_module_name(name: str) -> tuple[str, int | None]:
    """Inverse of `module_name`: 'blocks.3.ffn.net.2' -> ('ffn.proj_out', 3); 'proj_out' -> ('proj_out', None)."""
    m = _MODULE_NAME.match(name)
    if m:
        if m.group(2) not in _BLOCK_FROM_DIFFUSERS:
            raise KeyError(f"{name!r} is not a LoRA-able Linear of a Wan block "
                           f"(known: {sorted(_BLOCK_FROM_DIFFUSERS)})")
        return _BLOCK_FROM_DIFFUSERS[m.group(2)], int(m.group(1))
    return name, None


# ----------------------------------------------------------------------------------------------------------------------
# Adding and removing adapters.
# ----------------------------------------------------------------------------------------------------------------------


def _axes(kernel: nnx.Variable) -> tuple | None:
    return kernel.get_metadata().get("out_sharding")


def _place(value: jax.Array, axes, like) -> jax.Array:
    """`value` sharded like its kernel when the kernel is a concrete array spread over a mesh."""
    mesh_sharding = getattr(like, "sharding", None) if isinstance(like, jax.Array) else None
    if axes is None or not isinstance(mesh_sharding, NamedSharding):
        return value
    mesh = mesh_sharding.mesh
    return jax.device_put(value, NamedSharding(mesh, sharding.resolve_spec(axes, value.shape, mesh)))


def _wrap(linear: nnx.Linear, rank: int, scale: float, param_dtype, key: jax.Array | None) -> LoRALinear:
    """`linear` with a new adapter: A ~ U(±1/√I) (PEFT's kaiming-uniform, a=√5) or zero without a key; B = 0."""
    kernel = linear.kernel
    *lead, fan_in, fan_out = kernel.shape
    axes = _axes(kernel)
    a_axes = None if axes is None else (*axes[:-1], None)
    b_axes = None if axes is None else (*axes[:-2], None, axes[-1])
    if key is None:
        a = jnp.zeros((*lead, fan_in, rank), param_dtype)
    else:
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (*lead, fan_in, rank), jnp.float32, -bound, bound).astype(param_dtype)
    b = jnp.zeros((*lead, rank, fan_out), param_dtype)
    like = kernel.get_value() if hasattr(kernel, "get_value") else kernel[...]
    meta = lambda ax: {} if ax is None else {"out_sharding": ax}
    lora_a = LoRAParam(_place(a, a_axes, like), eager_sharding=False, **meta(a_axes))
    lora_b = LoRAParam(_place(b, b_axes, like), eager_sharding=False, **meta(b_axes))
    return LoRALinear(linear, lora_a, lora_b, scale)


def _resolve_targets(sites: Mapping[str, _Site], targets: Iterable[str]) -> list[str]:
    chosen, unknown = [], []
    for t in targets:
        if t in sites:
            chosen.append(t)
        elif t not in _TEXT_FFN:
            unknown.append(t)
    if unknown:
        raise ValueError(f"LoRA target(s) {unknown} name no Linear of this {_kind(sites)}; its Linears are "
                         f"{abbrev(sorted(sites), 40)}")
    return chosen


def _kind(sites) -> str:
    return "UniViGU" if "ffn_t.proj_in" in sites else "model"


def add_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Adds a fresh adapter (B = 0: the model's output is unchanged) to every Linear `config.targets` names, in
    place; returns `model`. Raises on a target that matches nothing and on a Linear that already has one."""
    sites = _sites(model)
    for target in _resolve_targets(sites, config.targets):
        for layer, (path, linear) in sorted(sites[target].modules.items(), key=lambda kv: -1 if kv[0] is None
                                            else kv[0]):
            if isinstance(linear, LoRALinear):
                raise ValueError(f"{'.'.join(map(str, path))} already has a LoRA adapter")
            _replace(model, path, _wrap(linear, config.rank, config.scale, DTYPES[config.param_dtype],
                                        rngs.params()))
    return model


def remove_lora(model: nnx.Module, *, merge: bool = True) -> nnx.Module:
    """Turns every `LoRALinear` back into a plain `nnx.Linear`, in place; with `merge` its update is folded into
    the kernel first (the model computes the same function without adapters), else the adapter is dropped."""
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, LoRALinear):
            if merge:
                delta = node.scale * jnp.einsum("...IR,...RO->...IO", node.lora_a[...].astype(jnp.float32),
                                                node.lora_b[...].astype(jnp.float32))
                node.kernel[...] = (node.kernel[...].astype(jnp.float32) + delta).astype(node.kernel.dtype)
            _replace(model, tuple(path), _plain_linear(node))
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(n, LoRALinear) for _, n in nnx.iter_graph(model))


# ----------------------------------------------------------------------------------------------------------------------
# The interchange form.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoRAWeight:
    """One Linear's adapter: ΔW [I, O] = (alpha / R)·a·b with a [I, R], b [R, O] (numpy, our orientation)."""

    a: np.ndarray
    b: np.ndarray
    alpha: float

    def __post_init__(self):
        self.a, self.b, self.alpha = np.asarray(self.a), np.asarray(self.b), float(self.alpha)
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[1] != self.b.shape[0]:
            raise ValueError(f"LoRA factors must be a [I, R] and b [R, O], got {self.a.shape} and {self.b.shape}")

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """ΔW [I, O] in float32."""
        return self.scale * (self.a.astype(np.float32) @ self.b.astype(np.float32))


Adapters = dict[str, LoRAWeight]  # diffusers module name ('blocks.3.attn1.to_q') -> adapter


def _grouped(sites: Mapping[str, _Site], adapters: Mapping[str, LoRAWeight]) -> dict[str, dict[int | None, tuple]]:
    """Adapters grouped by target and layer, each checked against the model's Linear: every problem in one error."""
    out: dict[str, dict[int | None, tuple]] = {}
    unknown, wrong = [], []
    for name, w in adapters.items():
        try:
            target, layer = parse_module_name(name)
        except KeyError as e:
            unknown.append(f"{name} ({e.args[0]})")
            continue
        site = sites.get(target)
        if site is None or (site.in_stack != (layer is not None)) or (
                layer is not None and not 0 <= layer < site.num_layers):
            unknown.append(name)
            continue
        module, _ = site.module(layer)
        fan_in, fan_out = module.kernel.shape[-2:]
        if (w.a.shape[0], w.b.shape[1]) != (fan_in, fan_out):
            wrong.append(f"{name}: adapter maps {w.a.shape[0]} -> {w.b.shape[1]}, the Linear {fan_in} -> {fan_out}")
            continue
        out.setdefault(target, {})[layer] = (name, w)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} adapter(s) name no Linear of the model: {abbrev(sorted(unknown))}")
    if wrong:
        problems.append(f"{len(wrong)} adapter(s) of the wrong shape: {abbrev(sorted(wrong))}")
    if problems:
        raise ValueError("LoRA adapters do not match the model: " + "; ".join(problems))
    return out


def merge_lora(model: nnx.Module, adapters: Mapping[str, LoRAWeight], scale: float = 1.0) -> nnx.Module:
    """Folds `scale`·ΔW of every adapter into its base kernel, in place (float32 accumulation, cast back to the
    kernel's dtype); returns `model`. One update per target: stacked kernels get all their layers' deltas at once.
    Every adapter must name a Linear of the model with matching shapes. A wrapped model keeps its own adapters."""
    sites = _sites(model)
    for target, by_layer in _grouped(sites, adapters).items():
        site = sites[target]
        if site.stacked:
            linear = site.modules[None][1]
            delta = np.zeros(linear.kernel.shape, np.float32)
            for layer, (_, w) in by_layer.items():
                delta[layer] = w.delta()
            _add(linear.kernel, delta, scale)
        else:
            for layer, (_, w) in by_layer.items():
                _add(site.module(layer)[0].kernel, w.delta(), scale)
    return model


def unmerge_lora(model: nnx.Module, adapters: Mapping[str, LoRAWeight], scale: float = 1.0) -> nnx.Module:
    """Takes back what `merge_lora(model, adapters, scale)` added (exact up to float rounding)."""
    return merge_lora(model, adapters, -scale)


@jax.jit
def _added(kernel, delta, scale):
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def _add(kernel: nnx.Variable, delta: np.ndarray, scale: float) -> None:
    value = kernel[...]
    d = jnp.asarray(delta)
    if isinstance(getattr(value, "sharding", None), NamedSharding):
        d = jax.device_put(d, value.sharding)  # the sum keeps the kernel's layout
    kernel[...] = _added(value, d, jnp.float32(scale))


def get_adapters(model: nnx.Module) -> Adapters:
    """The adapters of a wrapped model in the interchange form (one entry per Linear and layer), numpy float32
    (or the adapters' storage dtype), alpha = scale·R."""
    out: Adapters = {}
    for target, site in _sites(model).items():
        for key, (_, linear) in site.modules.items():
            if not isinstance(linear, LoRALinear):
                continue
            a, b = np.asarray(linear.lora_a[...]), np.asarray(linear.lora_b[...])
            layers = range(a.shape[0]) if site.stacked else [key]
            for layer in layers:
                pick = (lambda x: x[layer]) if site.stacked else (lambda x: x)
                out[module_name(target, layer)] = LoRAWeight(pick(a), pick(b), linear.scale * linear.rank)
    return out


def set_adapters(model: nnx.Module, adapters: Mapping[str, LoRAWeight], *, strict: bool = True) -> nnx.Module:
    """Writes `adapters` into a wrapped model's `lora_a` / `lora_b`, in place. An adapter of a smaller rank is
    zero-padded; a different α/R than the module's is folded into B, so the update is exact. With `strict`, every
    wrapped Linear must be covered (else the uncovered ones are zeroed: no update there)."""
    sites = _sites(model)
    grouped = _grouped(sites, adapters)
    missing, problems = [], []
    for target, site in sites.items():
        wrapped = [(k, lin) for k, (_, lin) in site.modules.items() if isinstance(lin, LoRALinear)]
        if not wrapped:
            if target in grouped:
                problems.append(f"{target} has no adapter in the model (add_lora / attach_adapters first)")
            continue
        by_layer = grouped.get(target, {})
        for key, linear in wrapped:
            a = np.zeros(linear.lora_a.shape, np.float32)
            b = np.zeros(linear.lora_b.shape, np.float32)
            layers = range(a.shape[0]) if site.stacked else [key]
            for layer in layers:
                if layer not in by_layer:
                    missing.append(module_name(target, layer))
                    continue
                name, w = by_layer[layer]
                if w.rank > linear.rank:
                    problems.append(f"{name}: rank {w.rank} > the module's rank {linear.rank}")
                    continue
                idx = (layer,) if site.stacked else ()
                a[idx + (slice(None), slice(0, w.rank))] = w.a
                b[idx + (slice(0, w.rank), slice(None))] = w.b * (w.scale / linear.scale)
            linear.lora_a[...] = _placed_like(a, linear.lora_a)
            linear.lora_b[...] = _placed_like(b, linear.lora_b)
    if strict and missing:
        problems.append(f"{len(missing)} adapted Linear(s) get no weights: {abbrev(missing)}")
    if problems:
        raise ValueError("cannot set LoRA adapters: " + "; ".join(problems))
    return model


def _placed_like(value: np.ndarray, variable: nnx.Variable) -> jax.Array:
    old = variable[...]
    new = jnp.asarray(value, old.dtype)
    if isinstance(getattr(old, "sharding", None), NamedSharding):
        new = jax.device_put(new, old.sharding)
    return new


def attach_adapters(model: nnx.Module, adapters: Mapping[str, LoRAWeight], scale: float = 1.0, *,
                    param_dtype: Any = jnp.float32) -> nnx.Module:
    """Wraps exactly the Linears `adapters` names and loads them: the adapter runs unmerged (training on from a
    file, or switching adapters at run time), times `scale` (the `--lora_scale` of the merged path). Per target the
    module rank is the largest rank given; layers without an adapter get none (zeros)."""
    sites = _sites(model)
    grouped = _grouped(sites, adapters)
    for target, by_layer in grouped.items():
        site = sites[target]
        rank = max(w.rank for _, w in by_layer.values())
        scales = {w.scale for _, w in by_layer.values()}
        module_scale = scales.pop() if len(scales) == 1 else 1.0  # `scale` goes into B (it may be 0)
        for key, (path, linear) in site.modules.items():
            if isinstance(linear, LoRALinear):
                raise ValueError(f"{'.'.join(map(str, path))} already has a LoRA adapter")
            if site.stacked or key in by_layer:
                _replace(model, path, _wrap(linear, rank, module_scale, param_dtype, None))
    set_adapters(model, {name: (LoRAWeight(w.a, w.b, w.alpha * scale) if scale != 1.0 else w)
                         for by_layer in grouped.values() for name, w in by_layer.values()}, strict=False)
    return model


def extract_lora(base: nnx.Module, tuned: nnx.Module, rank: int, targets: Iterable[str] = DEFAULT_TARGETS,
                 ) -> Adapters:
    """The best rank-`rank` adapters (truncated SVD of the kernel difference, alpha = rank) turning `base` into
    `tuned` on the targeted Linears: distils a fine-tuned model into a LoRA file."""
    base_sites, tuned_sites = _sites(base), _sites(tuned)
    out: Adapters = {}
    for target in _resolve_targets(base_sites, targets):
        if target not in tuned_sites:
            raise ValueError(f"the tuned model has no Linear {target!r}")
        for key in base_sites[target].modules:
            kb = np.asarray(base_sites[target].modules[key][1].kernel[...], np.float32)
            kt = np.asarray(tuned_sites[target].modules[key][1].kernel[...], np.float32)
            diffs = list(enumerate(kt - kb)) if base_sites[target].stacked else [(key, kt - kb)]
            for layer, d in diffs:
                u, s, vt = np.linalg.svd(d, full_matrices=False)
                r = min(rank, s.shape[0])
                out[module_name(target, layer)] = LoRAWeight(u[:, :r] * s[:r], vt[:r], float(r))
    return out
