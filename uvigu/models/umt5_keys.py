"""How `UMT5Encoder`'s params relate to transformers' `UMT5EncoderModel` state dict (and Wan's own T5 naming).

Three namespaces:
  hf        `encoder.block.3.layer.0.SelfAttention.q.weight`   (transformers, e.g. diffusers' `text_encoder/`)
  original  `blocks.3.attn.q.weight`                            (Wan2.1 release, `models_t5_umt5-xxl-enc-bf16.pth`)
  ours      `blocks.attention.q.kernel[3]`                      (flat dotted NNX path, stacked layout)
original <-> hf is a pure rename; hf <-> ours is a rename plus Linear weight [out, in] -> kernel [in, out].

The token embedding is tied in transformers: `UMT5EncoderModel.state_dict()` holds it twice, as `shared.weight` and
`encoder.embed_tokens.weight` (one tensor), while files saved by `save_pretrained` keep only `shared.weight`. Either
or both are accepted; when both are present they must be identical.
Everything here works on numpy arrays and plain dicts so a converter can stream one tensor at a time.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import nnx

from uvigu.models.flat_params import filled_state as _filled_state
from uvigu.models.flat_params import (stack_blocks, state_to_flat_params,  # noqa: F401 (re-exported)
                                      unstack_blocks)
from uvigu.models.flat_params import shape_problems
from uvigu.models.flat_params import to_numpy as _to_numpy
from uvigu.models.umt5 import UMT5Config, UMT5Encoder

SHARED_KEY = "shared.weight"
TIED_KEY = "encoder.embed_tokens.weight"
EMBEDDING_PATH = "embed_tokens.embedding"

_HF_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_ORIGINAL_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# hf key (minus `encoder.block.{i}.`) -> (our path minus `blocks.`, is a Linear weight)
_HF_BLOCK = {
    "layer.0.layer_norm.weight": ("attention_norm.scale", False),
    **{f"layer.0.SelfAttention.{p}.weight": (f"attention.{p}.kernel", True) for p in "qkvo"},
    "layer.0.SelfAttention.relative_attention_bias.weight": ("attention.relative_attention_bias", False),
    "layer.1.layer_norm.weight": ("ffn_norm.scale", False),
    **{f"layer.1.DenseReluDense.{p}.weight": (f"ffn.{p}.kernel", True) for p in ("wi_0", "wi_1", "wi", "wo")},
}
_HF_TOP = {
    SHARED_KEY: (EMBEDDING_PATH, False),
    TIED_KEY: (EMBEDDING_PATH, False),
    "encoder.final_layer_norm.weight": ("final_norm.scale", False),
}

# Wan2.1's own T5 module names (wan/modules/t5.py, T5Encoder with shared_pos=False) -> hf. Its FFN computes
# fc1(x) * gelu(gate.0(x)), so gate.0 is transformers' wi_0 (the activated one) and fc1 is wi_1.
_ORIGINAL_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    **{f"attn.{p}.weight": f"layer.0.SelfAttention.{p}.weight" for p in "qkvo"},
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_ORIGINAL_TOP = {"token_embedding.weight": SHARED_KEY, "norm.weight": "encoder.final_layer_norm.weight"}


# ----------------------------------------------------------------------------------------------------------------------
# original <-> hf.
# ----------------------------------------------------------------------------------------------------------------------


def original_to_hf_key(key: str) -> str:
    """A Wan2.1-release T5 encoder key -> its transformers name. Read off Wan's module code; not run against it."""
    m = _ORIGINAL_BLOCK_KEY.match(key)
    if m and m.group(2) in _ORIGINAL_BLOCK:
        return f"encoder.block.{m.group(1)}.{_ORIGINAL_BLOCK[m.group(2)]}"
    if key in _ORIGINAL_TOP:
        return _ORIGINAL_TOP[key]
    raise KeyError(f"unexpected key in a Wan2.1 T5 encoder checkpoint: {key!r}")


def hf_to_original_key(key: str) -> str:
    """Inverse of `original_to_hf_key` (the tied `encoder.embed_tokens.weight` maps to `token_embedding.weight`)."""
    if key == TIED_KEY:
        return "token_embedding.weight"
    m = _HF_BLOCK_KEY.match(key)
    if m:
        for original, hf in _ORIGINAL_BLOCK.items():
            if hf == m.group(2):
                return f"blocks.{m.group(1)}.{original}"
    for original, hf in _ORIGINAL_TOP.items():
        if hf == key:
            return original
    raise KeyError(f"no Wan2.1 T5 name for {key!r}")


# ----------------------------------------------------------------------------------------------------------------------
# hf <-> ours, one tensor at a time.
# ----------------------------------------------------------------------------------------------------------------------


def _lookup(hf_key: str) -> tuple[str, bool, int | None]:
    """hf key -> (our param path in the stacked layout, is a Linear weight, layer index or None)."""
    m = _HF_BLOCK_KEY.match(hf_key)
    if m and m.group(2) in _HF_BLOCK:
        ours, linear = _HF_BLOCK[m.group(2)]
        return "blocks." + ours, linear, int(m.group(1))
    if hf_key in _HF_TOP:
        ours, linear = _HF_TOP[hf_key]
        return ours, linear, None
    raise KeyError(f"unexpected key in a transformers UMT5EncoderModel state dict: {hf_key!r}")


def param_target(hf_key: str, cfg: UMT5Config | None = None) -> tuple[str, int | None]:
    """hf key -> (our flat param path in the stacked layout, layer index or None)."""
    path, _, layer = _lookup(hf_key)
    if cfg is not None and layer is not None and layer >= cfg.num_layers:
        raise KeyError(f"{hf_key!r}: layer {layer} but the config has {cfg.num_layers} layers")
    return path, layer


def to_ours(hf_key: str, array: np.ndarray) -> np.ndarray:
    """One tensor from torch layout to ours (a transposed view for Linear weights: no copy until written)."""
    _, linear, _ = _lookup(hf_key)
    return array.T if linear else array


def to_hf(hf_key: str, array: np.ndarray) -> np.ndarray:
    """Inverse of `to_ours`."""
    _, linear, _ = _lookup(hf_key)
    return array.T if linear else array


# ----------------------------------------------------------------------------------------------------------------------
# Whole state dicts.
# ----------------------------------------------------------------------------------------------------------------------


def expected_hf_shapes(cfg: UMT5Config, *, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Every key of a transformers `UMT5EncoderModel` with this architecture and its torch shape; `tied` adds the
    second name of the embedding (`encoder.embed_tokens.weight`), as `state_dict()` lists it."""
    d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {SHARED_KEY: (cfg.vocab_size, d)}
    if tied:
        shapes[TIED_KEY] = (cfg.vocab_size, d)
    wi = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    for i in range(cfg.num_layers):
        b = f"encoder.block.{i}."
        for p in "qkv":
            shapes[f"{b}layer.0.SelfAttention.{p}.weight"] = (inner, d)
        shapes[f"{b}layer.0.SelfAttention.o.weight"] = (d, inner)
        shapes[f"{b}layer.0.SelfAttention.relative_attention_bias.weight"] = (
            cfg.relative_attention_num_buckets, cfg.num_heads)
        shapes[f"{b}layer.0.layer_norm.weight"] = (d,)
        for p in wi:
            shapes[f"{b}layer.1.DenseReluDense.{p}.weight"] = (f, d)
        shapes[f"{b}layer.1.DenseReluDense.wo.weight"] = (d, f)
        shapes[f"{b}layer.1.layer_norm.weight"] = (d,)
    shapes["encoder.final_layer_norm.weight"] = (d,)
    return shapes


def expected_param_shapes(cfg: UMT5Config) -> dict[str, tuple[int, ...]]:
    """Our flat param paths (stacked layout) and shapes, derived from the hf table."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in expected_hf_shapes(cfg).items():
        path, layer = param_target(key)
        ours = to_ours(key, np.empty(shape, np.uint8)).shape
        out[path] = (cfg.num_layers, *ours) if layer is not None else ours
    return out


def check_shapes(shapes: Mapping[str, tuple[int, ...]], cfg: UMT5Config, what: str = "checkpoint") -> None:
    """Raises a ValueError naming every missing, unexpected and mis-shaped key. The embedding may appear under
    `shared.weight`, `encoder.embed_tokens.weight` or both."""
    problems = shape_problems(shapes, expected_hf_shapes(cfg, tied=True), optional=frozenset({SHARED_KEY, TIED_KEY}),
                              order=iter_keys)
    if SHARED_KEY not in shapes and TIED_KEY not in shapes:
        problems.insert(0, f"missing key: {SHARED_KEY} (or {TIED_KEY})")
    if problems:
        raise ValueError(f"{what} does not match the umT5 encoder config (d_model={cfg.d_model}, "
                         f"layers={cfg.num_layers}, heads={cfg.num_heads}x{cfg.d_kv}, d_ff={cfg.d_ff}, "
                         f"vocab={cfg.vocab_size}, gated={cfg.is_gated}): " + "; ".join(problems))


def hf_to_params(state_dict: Mapping[str, Any], cfg: UMT5Config, dtype=None) -> dict[str, np.ndarray]:
    """A whole transformers `UMT5EncoderModel` state dict (numpy or torch tensors) -> our flat params, stacked
    layout. Raises ValueError naming missing, unexpected and mis-shaped keys, or a tied pair that differs."""
    arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
    check_shapes({k: a.shape for k, a in arrays.items()}, cfg, "state dict")
    if SHARED_KEY in arrays and TIED_KEY in arrays:
        a, b = arrays[SHARED_KEY], arrays[TIED_KEY]
        if a.dtype != b.dtype or not np.array_equal(a, b):
            raise ValueError(f"state dict: {SHARED_KEY} and {TIED_KEY} are the same tied embedding in "
                             "transformers but differ here; refusing to guess which one is meant")
        del arrays[TIED_KEY]
    out: dict[str, np.ndarray] = {}
    for key, a in arrays.items():
        path, layer = param_target(key, cfg)
        a = to_ours(key, a)
        if layer is None:
            out[path] = np.array(a, dtype=dtype or a.dtype)
        else:
            if path not in out:
                out[path] = np.empty((cfg.num_layers, *a.shape), dtype or a.dtype)
            out[path][layer] = a
    return out


def params_to_hf(flat: Mapping[str, Any], cfg: UMT5Config, *, tied: bool = True) -> dict[str, np.ndarray]:
    """Our flat params (stacked layout) -> a transformers state dict of numpy arrays. `tied=True` also writes
    `encoder.embed_tokens.weight` (as `state_dict()` has it, so `load_state_dict(strict=True)` accepts the result);
    False writes only `shared.weight` (as saved files have it)."""
    out = {}
    for key in expected_hf_shapes(cfg, tied=tied):
        path, layer = param_target(key)
        a = np.asarray(flat[path])
        out[key] = np.ascontiguousarray(to_hf(key, a if layer is None else a[layer]))
    return out


def infer_config(shapes: Mapping[str, tuple[int, ...]], **known) -> tuple[UMT5Config, list[str]]:
    """A `UMT5Config` from the tensor shapes of a transformers-named checkpoint, with `known` fields taking precedence
    (the ones shapes determine are cross-checked). Returns the config and notes on what was not given.

    Shapes fix everything but relative_attention_max_distance, layer_norm_epsilon and the FFN activation: those
    default to umT5's 128, 1e-6 and "gated-gelu" (or "relu" for an ungated FFN, transformers' default) with a note.
    """
    def need(key):
        if key not in shapes:
            raise ValueError(f"cannot infer the umT5 config: tensor {key!r} is missing")
        return tuple(shapes[key])

    embed = tuple(shapes[SHARED_KEY]) if SHARED_KEY in shapes else need(TIED_KEY)
    layer_ids = {int(m.group(1)) for k in shapes if (m := _HF_BLOCK_KEY.match(k))}
    if not layer_ids:
        raise ValueError("cannot infer the umT5 config: no encoder.block.* tensors")
    b = "encoder.block.0."
    buckets, heads = need(f"{b}layer.0.SelfAttention.relative_attention_bias.weight")
    inner = need(f"{b}layer.0.SelfAttention.q.weight")[0]
    if inner % heads:
        raise ValueError(f"attention width {inner} is not divisible by the {heads} heads of the bias table")
    gated = f"{b}layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = need(f"{b}layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]
    inferred = {
        "vocab_size": embed[0],
        "d_model": embed[1],
        "num_heads": heads,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": max(layer_ids) + 1,
        "relative_attention_num_buckets": buckets,
    }
    notes = []
    for name, value in inferred.items():
        if known.get(name) is not None:
            if known[name] != value:
                raise ValueError(f"config field {name}={known[name]!r} disagrees with the tensors, which say {value!r}")
        else:
            notes.append(f"{name}={value!r} inferred from tensor shapes")
    fields = {**inferred, **{k: v for k, v in known.items() if v is not None}}
    if "feed_forward_proj" in fields:
        if fields["feed_forward_proj"].startswith("gated-") != gated:
            raise ValueError(f"feed_forward_proj={fields['feed_forward_proj']!r} disagrees with the tensors, which "
                             f"have {'a gated (wi_0, wi_1)' if gated else 'an ungated (wi)'} FFN")
    else:
        fields["feed_forward_proj"] = "gated-gelu" if gated else "relu"
        notes.append(f"feed_forward_proj={fields['feed_forward_proj']!r} assumed (not readable from shapes)")
    for name, default in (("relative_attention_max_distance", 128), ("layer_norm_epsilon", 1e-6)):
        if name not in fields:
            fields[name] = default
            notes.append(f"{name}={default!r} assumed (umT5's value; not readable from shapes)")
    return UMT5Config(**fields), notes


# transformers config.json field -> ours (same name); everything else there (decoder, dropout, ids) is not ours.
_HF_CONFIG_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon",
                     "feed_forward_proj")


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> UMT5Config:
    """A `UMT5Config` from a transformers UMT5 config dict (`config.json` or `UMT5Config.to_dict()`), plus
    `overrides` (e.g. dtype). Decoder, dropout and token-id fields are ignored; a model_type other than umt5 (T5 and
    mT5 share layer 0's position bias across layers) is refused."""
    model_type = hf_config.get("model_type", "umt5")
    if model_type != "umt5":
        raise ValueError(f"config has model_type {model_type!r}; only 'umt5' (a position bias per layer) is supported")
    fields = {k: hf_config[k] for k in _HF_CONFIG_FIELDS if k in hf_config}
    return UMT5Config(**{**fields, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# Flat params <-> NNX state; stacked <-> looped layouts.
# ----------------------------------------------------------------------------------------------------------------------


def model_from_params(cfg: UMT5Config, flat: Mapping[str, Any]) -> UMT5Encoder:
    """A `UMT5Encoder` built from flat params (stacked layout) without running its random init (`nnx.eval_shape`,
    then fill); unstacked here when `cfg.scan_layers` is False. Raises ValueError naming any param whose path or
    shape does not match `cfg` (in the stacked names, whatever the layout)."""
    problems = shape_problems({k: tuple(v.shape) for k, v in flat.items()}, expected_param_shapes(cfg))
    if problems:
        raise ValueError("params do not match the umT5 encoder config: " + "; ".join(problems))
    if not cfg.scan_layers:
        flat = unstack_blocks(flat, cfg.num_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, _filled_state(state, flat))


def iter_keys(keys: Iterable[str]) -> list[str]:
    """Sorted keys, encoder blocks in numeric layer order (for stable reports)."""
    def sort_key(k):
        m = _HF_BLOCK_KEY.match(k)
        return (1, int(m.group(1)), m.group(2)) if m else (0, 0, k)

    return sorted(keys, key=sort_key)
