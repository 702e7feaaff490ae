"""How `WanDiT`'s params relate to the two public Wan2.1 layouts: the original release and diffusers.

Three namespaces:
  original   `blocks.3.self_attn.q.weight`   (Wan-AI release, maybe prefixed `model.diffusion_model.`)
  diffusers  `blocks.3.attn1.to_q.weight`    (`WanTransformer3DModel`)
  ours       `blocks.attn1.to_q.kernel[3]`   (flat dotted NNX path, stacked layout: blocks on a leading axis)
original <-> diffusers is a pure rename (note the norm2/norm3 swap); diffusers <-> ours is a rename plus a layout
change for Linear (weight [out, in] -> kernel [in, out]) and Conv3d (weight [D, C, t, h, w] -> kernel [t, h, w, C, D]).
Everything here works on numpy arrays and plain dicts so the converter can stream one tensor at a time.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from uvigu.models.flat_params import filled_state as _filled_state
from uvigu.models.flat_params import (load_flat_params, stack_blocks, state_to_flat_params,  # noqa: F401 (re-exported)
                                      unstack_blocks)
from uvigu.models.flat_params import shape_problems
from uvigu.models.flat_params import to_numpy as _to_numpy
from uvigu.models.wan import WanConfig

ORIGINAL_PREFIX = "model.diffusion_model."

# ----------------------------------------------------------------------------------------------------------------------
# original <-> diffusers (module names; the trailing `.weight` / `.bias` is carried along unchanged).
# ----------------------------------------------------------------------------------------------------------------------

_ORIGINAL_TOP = {
    "patch_embedding": "patch_embedding",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
_ORIGINAL_BLOCK = {
    **{f"{o}.{p}": f"{d}.to_{p}" for o, d in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qkv"},
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.o": "attn2.to_out.0",
    **{f"{o}.norm_{p}": f"{d}.norm_{p}" for o, d in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qk"},
    "norm3": "norm2",  # the affine cross-attention norm: norm3 in the original, norm2 in diffusers
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "modulation": "scale_shift_table",
}

# ----------------------------------------------------------------------------------------------------------------------
# diffusers module -> (our module, kind). Kinds say how params are named and laid out.
# ----------------------------------------------------------------------------------------------------------------------

_DIFFUSERS_TOP = {
    "patch_embedding": ("patch_embedding", "conv"),
    "condition_embedder.time_embedder.linear_1": ("condition_embedder.time_embedder.linear_1", "linear"),
    "condition_embedder.time_embedder.linear_2": ("condition_embedder.time_embedder.linear_2", "linear"),
    "condition_embedder.time_proj": ("condition_embedder.time_proj", "linear"),
    "condition_embedder.text_embedder.linear_1": ("condition_embedder.text_embedder.linear_1", "linear"),
    "condition_embedder.text_embedder.linear_2": ("condition_embedder.text_embedder.linear_2", "linear"),
    "proj_out": ("proj_out", "linear"),
    "scale_shift_table": ("scale_shift_table", "table"),
}
_DIFFUSERS_BLOCK = {
    **{f"attn{n}.to_{p}": (f"attn{n}.to_{p}", "linear") for n in (1, 2) for p in "qkv"},
    **{f"attn{n}.to_out.0": (f"attn{n}.to_out", "linear") for n in (1, 2)},
    **{f"attn{n}.norm_{p}": (f"attn{n}.norm_{p}", "rmsnorm") for n in (1, 2) for p in "qk"},
    "norm2": ("norm2", "layernorm"),
    "ffn.net.0.proj": ("ffn.proj_in", "linear"),
    "ffn.net.2": ("ffn.proj_out", "linear"),
    "scale_shift_table": ("scale_shift_table", "table"),
}
# torch param name -> ours, per kind ("" = the module is itself the param).
_PARAM_NAMES = {
    "linear": {"weight": "kernel", "bias": "bias"},
    "conv": {"weight": "kernel", "bias": "bias"},
    "layernorm": {"weight": "scale", "bias": "bias"},
    "rmsnorm": {"weight": "scale"},
    "table": {"": ""},
}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _split_module(rest: str, table: Mapping[str, Any]) -> tuple[str, str]:
    """'attn1.to_q.weight' -> ('attn1.to_q', 'weight'); tables ('scale_shift_table') have no param suffix."""
    if rest in table:
        return rest, ""
    module, _, param = rest.rpartition(".")
    return module, param


def _rename(key: str, top: Mapping[str, str], block: Mapping[str, str]) -> str:
    m = _BLOCK_KEY.match(key)
    table, prefix, rest = (block, f"blocks.{m.group(1)}.", m.group(2)) if m else (top, "", key)
    module, param = _split_module(rest, table)
    if module not in table:
        raise KeyError(key)
    return prefix + table[module] + (f".{param}" if param else "")


def original_to_diffusers_key(key: str) -> str:
    """An original-release key (with or without the `model.diffusion_model.` prefix) -> its diffusers name."""
    if key.startswith(ORIGINAL_PREFIX):
        key = key[len(ORIGINAL_PREFIX):]
    try:
        return _rename(key, _ORIGINAL_TOP, _ORIGINAL_BLOCK)
    except KeyError:
        raise KeyError(f"unexpected key in an original Wan2.1 checkpoint: {key!r}") from None


def diffusers_to_original_key(key: str) -> str:
    """A diffusers key -> its original-release name (no prefix)."""
    try:
        return _rename(key, {v: k for k, v in _ORIGINAL_TOP.items()}, {v: k for k, v in _ORIGINAL_BLOCK.items()})
    except KeyError:
        raise KeyError(f"unexpected key in a diffusers Wan2.1 checkpoint: {key!r}") from None


# ----------------------------------------------------------------------------------------------------------------------
# diffusers <-> ours.
# ----------------------------------------------------------------------------------------------------------------------


def _lookup(diffusers_key: str) -> tuple[str, str, int | None]:
    """diffusers key -> (our param path in the stacked layout, kind, layer index or None)."""
    m = _BLOCK_KEY.match(diffusers_key)
    table, layer, rest = (_DIFFUSERS_BLOCK, int(m.group(1)), m.group(2)) if m else (_DIFFUSERS_TOP, None, diffusers_key)
    module, param = _split_module(rest, table)
    if module not in table or param not in _PARAM_NAMES[table[module][1]]:
        raise KeyError(f"unexpected key in a diffusers Wan2.1 checkpoint: {diffusers_key!r}")
    ours, kind = table[module]
    name = _PARAM_NAMES[kind][param]
    path = ("blocks." if layer is not None else "") + ours + (f".{name}" if name else "")
    return path, kind + ("_weight" if param == "weight" else ""), layer


def param_target(diffusers_key: str, cfg: WanConfig | None = None) -> tuple[str, int | None]:
    """diffusers key -> (our flat param path in the stacked layout, layer index or None)."""
    path, _, layer = _lookup(diffusers_key)
    if cfg is not None and layer is not None and layer >= cfg.num_layers:
        raise KeyError(f"{diffusers_key!r}: layer {layer} but the config has {cfg.num_layers} layers")
    return path, layer


def to_ours(diffusers_key: str, array: np.ndarray) -> np.ndarray:
    """One tensor from torch layout to ours (a view where possible: no copy until written)."""
    _, kind, _ = _lookup(diffusers_key)
    if kind == "linear_weight":
        return array.T
    if kind == "conv_weight":
        return array.transpose(2, 3, 4, 1, 0)
    return array


def to_diffusers(diffusers_key: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_ours`."""
    _, kind, _ = _lookup(diffusers_key)
    if kind == "linear_weight":
        return array.T
    if kind == "conv_weight":
        return array.transpose(4, 3, 0, 1, 2)
    return array


def diffusers_config(cfg: WanConfig) -> dict[str, Any]:
    """The arguments of diffusers' `WanTransformer3DModel(**...)` (its config.json fields) for `cfg`'s architecture."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
                freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
                rope_max_seq_len=cfg.rope_max_positions)


def expected_diffusers_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a diffusers Wan2.1 T2V transformer with this architecture, and its torch shape."""
    d, f = cfg.dim, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_channels, *cfg.patch_size),
        "patch_embedding.bias": (d,),
        "condition_embedder.time_embedder.linear_1.weight": (d, cfg.freq_dim),
        "condition_embedder.time_embedder.linear_1.bias": (d,),
        "condition_embedder.time_embedder.linear_2.weight": (d, d),
        "condition_embedder.time_embedder.linear_2.bias": (d,),
        "condition_embedder.time_proj.weight": (6 * d, d),
        "condition_embedder.time_proj.bias": (6 * d,),
        "condition_embedder.text_embedder.linear_1.weight": (d, cfg.text_dim),
        "condition_embedder.text_embedder.linear_1.bias": (d,),
        "condition_embedder.text_embedder.linear_2.weight": (d, d),
        "condition_embedder.text_embedder.linear_2.bias": (d,),
        "proj_out.weight": (cfg.out_channels * math.prod(cfg.patch_size), d),
        "proj_out.bias": (cfg.out_channels * math.prod(cfg.patch_size),),
        "scale_shift_table": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        for n in (1, 2):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                shapes[f"{b}attn{n}.{p}.weight"] = (d, d)
                shapes[f"{b}attn{n}.{p}.bias"] = (d,)
            shapes[f"{b}attn{n}.norm_q.weight"] = (d,)
            shapes[f"{b}attn{n}.norm_k.weight"] = (d,)
        if cfg.cross_attn_norm:
            shapes[f"{b}norm2.weight"] = (d,)
            shapes[f"{b}norm2.bias"] = (d,)
        shapes[f"{b}ffn.net.0.proj.weight"] = (f, d)
        shapes[f"{b}ffn.net.0.proj.bias"] = (f,)
        shapes[f"{b}ffn.net.2.weight"] = (d, f)
        shapes[f"{b}ffn.net.2.bias"] = (d,)
        shapes[f"{b}scale_shift_table"] = (1, 6, d)
    return shapes


def expected_param_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Our flat param paths (stacked layout) and shapes, derived from the diffusers table."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in expected_diffusers_shapes(cfg).items():
        path, layer = param_target(key)
        ours = to_ours(key, np.empty(shape, np.uint8)).shape
        out[path] = (cfg.num_layers, *ours) if layer is not None else ours
    return out


def check_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: WanConfig, what: str = "checkpoint") -> None:
    """Raises a ValueError naming every missing, unexpected and mis-shaped diffusers key."""
    problems = shape_problems(shapes, expected_diffusers_shapes(cfg))
    if problems:
        raise ValueError(f"{what} does not match the Wan2.1 DiT config (dim={cfg.dim}, layers={cfg.num_layers}): "
                         + "; ".join(problems))


def diffusers_to_params(state_dict: Mapping[str, Any], cfg: WanConfig, dtype=None) -> dict[str, np.ndarray]:
    """A whole diffusers state dict (numpy or torch tensors) -> our flat params, stacked layout.

    In-memory convenience for tests and small models; the converter streams with `param_target` / `to_ours`.
    """
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    check_shapes({k: a.shape for k, a in arrays.items()}, cfg, "state dict")
    out: dict[str, np.ndarray] = {}
    for path, shape in expected_param_shapes(cfg).items():
        out[path] = None  # type: ignore[assignment]
    for key, a in arrays.items():
        path, layer = param_target(key, cfg)
        a = to_ours(key, a)
        if layer is None:
            out[path] = np.array(a, dtype=dtype or a.dtype)
        else:
            if out[path] is None:
                out[path] = np.empty((cfg.num_layers, *a.shape), dtype or a.dtype)
            out[path][layer] = a
    return out


def params_to_diffusers(flat: Mapping[str, Any], cfg: WanConfig) -> dict[str, np.ndarray]:
    """Our flat params (stacked layout) -> a diffusers state dict of numpy arrays."""
    out = {}
    for key in expected_diffusers_shapes(cfg):
        path, layer = param_target(key)
        a = np.asarray(flat[path])
        out[key] = np.ascontiguousarray(to_diffusers(key, a if layer is None else a[layer]))
    return out


def infer_config(shapes: Mapping[str, tuple[int, ...]], **known) -> tuple[WanConfig, list[str]]:
    """A `WanConfig` from the tensor shapes of a diffusers-named checkpoint, with `known` fields taking precedence
    (they are cross-checked against the shapes). Returns the config and notes on what was inferred, not given.

    The head count cannot be read off shapes (q/k norms span all heads): without `num_heads` it assumes Wan's head
    dim of 128 and says so.
    """
    def need(key):
        if key not in shapes:
            raise ValueError(f"cannot infer the Wan2.1 config: tensor {key!r} is missing")
        return tuple(shapes[key])

    pe = need("patch_embedding.weight")
    patch = tuple(pe[2:])
    layer_ids = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    inferred = {
        "dim": pe[0],
        "in_channels": pe[1],
        "patch_size": patch,
        "freq_dim": need("condition_embedder.time_embedder.linear_1.weight")[1],
        "text_dim": need("condition_embedder.text_embedder.linear_1.weight")[1],
        "ffn_dim": need("blocks.0.ffn.net.0.proj.weight")[0],
        "num_layers": (max(layer_ids) + 1) if layer_ids else 0,
        "out_channels": need("proj_out.weight")[0] // math.prod(patch),
        "cross_attn_norm": "blocks.0.norm2.weight" in shapes,
    }
    notes = []
    for name, value in inferred.items():
        if name in known and known[name] is not None:
            given = tuple(known[name]) if isinstance(known[name], (list, tuple)) else known[name]
            if given != value:
                raise ValueError(f"config field {name}={given!r} disagrees with the tensors, which say {value!r}")
        else:
            notes.append(f"{name}={value!r} inferred from tensor shapes")
    fields = {**inferred, **{k: v for k, v in known.items() if v is not None}}
    if "num_heads" not in fields:
        if inferred["dim"] % 128:
            raise ValueError(f"cannot infer num_heads for dim {inferred['dim']} (not a multiple of Wan's head dim "
                             "128): give num_heads in the config")
        fields["num_heads"] = inferred["dim"] // 128
        notes.append(f"num_heads={fields['num_heads']} assumed from Wan's head dim 128 (not readable from shapes)")
    fields["patch_size"] = tuple(fields["patch_size"])
    return WanConfig(**fields), notes


# ----------------------------------------------------------------------------------------------------------------------
# Flat params <-> NNX state; stacked <-> looped layouts.
# ----------------------------------------------------------------------------------------------------------------------


def model_from_params(cfg: WanConfig, flat: Mapping[str, Any]):
    """A `WanDiT` built from flat params without running its random init (`nnx.eval_shape`, then fill).

    `flat` is in the stacked layout; it is unstacked here when `cfg.scan_layers` is False.
    """
    from uvigu.models.wan import WanDiT

    if not cfg.scan_layers:
        flat = unstack_blocks(flat, cfg.num_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, _filled_state(state, flat))


def iter_keys(shapes: Iterable[str]) -> list[str]:
    """Sorted keys, blocks in numeric layer order (for stable reports)."""
    def sort_key(k):
        m = _BLOCK_KEY.match(k)
        return (1, int(m.group(1)), m.group(2)) if m else (0, 0, k)

    return sorted(shapes, key=sort_key)
