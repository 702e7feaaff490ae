"""The released Uni-ViGU checkpoint (Fr0zenCrane/Uni-ViGU, `inference_unified_wan.py`) -> a `DST/univigu/` model folder.

    python -m tools.convert_wan_weights --src WAN_DIFFUSERS --univigu CKPT.pth --dst DST

The release is one torch `.pth` whose `"model"` entry (or the file itself: a bare state dict) is the whole state dict
of its `WanUnifiedTransformer`, used on top of a diffusers Wan2.1-T2V folder. The base DiT is read from that folder's
`transformer/` (the usual diffusers conversion, `conversion.fill_params`) and every base key the .pth holds replaces
its tensor; the text side comes only from the .pth.

Reading: `torch.load(weights_only=True)` only. A file that needs arbitrary code to unpickle is refused (no fallback).
Key prefixes `_fsdp_wrapped_module.` and `_orig_mod.` are removed wherever they occur (as the release's loader does).

Key map (release key -> our flat path in the stacked layout; Linear weights [out, in] are transposed to kernels
[in, out], a Conv3d weight [D, C, t, h, w] to [t, h, w, C, D]; N = block index, stacked on axis 0):

  base (DiT; the release renames a few of diffusers' modules, both spellings are accepted):
    blocks.N.<diffusers block key>                         -> dit.blocks.<ours>[N]      (`wan_keys`: attn1/attn2,
                                                              norm2 = the affine cross-attention norm, ffn.net.{0.proj,2},
                                                              scale_shift_table [1, 6, D])
    patch_embedding.{weight,bias}                          -> dit.patch_embedding.{kernel,bias}
    time_embedding_v.time_embedder.linear_{1,2}.*          -> dit.condition_embedder.time_embedder.linear_{1,2}.*
      (diffusers: condition_embedder.time_embedder.linear_{1,2}.*)
    time_embedding_v.time_proj.*                           -> dit.condition_embedder.time_proj.*
      (diffusers: condition_embedder.time_proj.*)
    cond_text_embedder.linear_{1,2}.*                      -> dit.condition_embedder.text_embedder.linear_{1,2}.*
      (diffusers: condition_embedder.text_embedder.linear_{1,2}.*)
    scale_shift_table_v [1, 2, D]  (the VIDEO head's table)-> dit.scale_shift_table        (diffusers: scale_shift_table)
    video_head.proj_out.*                                  -> dit.proj_out.*               (diffusers: proj_out.*)
  text side:
    vocab_embed.weight [V (+1 with a mask source), D]      -> vocab_embed.embedding
    time_embedding_t.time_embedder.linear_{1,2}.*          -> text_time.time_embedder.linear_{1,2}.*
    time_embedding_t.time_proj.*                           -> text_time.time_proj.*
    scale_shift_table_t [1, 2, D]  (the TEXT head's table) -> text_head.scale_shift_table
    text_head.norm_final.weight [D] (weight-only LayerNorm, eps 1e-5)
                                                           -> text_head.norm_scale   (UniViGUConfig text_head_norm=
                                                              "weight", text_head_eps=1e-5)
    text_head.linear.{weight,bias} [V (+1), D]             -> text_head.proj.{kernel,bias}
    blocks.N.ffn_t.net.0.proj.{weight,bias}                -> ffn_t.proj_in.{kernel,bias}[N]
    blocks.N.ffn_t.net.2.{weight,bias}                     -> ffn_t.proj_out.{kernel,bias}[N]
  checked, not stored:
    rotary_emb_text.inv_freq [K/2]                         must equal 1 / 10000^(2i/K) (K = head dim): our text RoPE
                                                           (rotate-half, positions 0..S-1); anything else is refused.
  Not in the file (no params): the norms norm1 / norm3 / norm3_t / video_head.norm_out (non-affine), the time
  sinusoid, the video RoPE (non-persistent buffers).

Where the two tables go (checked in the release's `WanUnifiedTransformer.forward`): `scale_shift_table_v` + temb_v
modulates `video_head` (Wan's head), `scale_shift_table_t` + temb_t modulates `text_head`. Inside the blocks both
modalities use the block's own `scale_shift_table` (with e0_v / e0_t), as our UniViGU does.

Inferred (the .pth carries no config): V and the source kind from the rows of `vocab_embed.weight` and
`text_head.linear.weight` (equal row counts R: R = tokenizer vocab + 1 -> a "mask" source, mask id V = R - 1, whose
head also scores the mask id (`head_mask_logit`); otherwise a uniform source with V = R); FFN_t's width from
`blocks.0.ffn_t.net.0.proj.weight`; the layer count must be the base DiT's. The text length is not in any shape:
`max_text_len` (default 256, the release's `--max_length` in inference.sh) is a choice, recorded as such.

Every problem (missing, unexpected, duplicate, mis-shaped keys; non-finite tensors; a wrong inv_freq) is collected and
raised as one `ConversionError` naming the keys; the caller (`release.convert_release`) then publishes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from tools.convert_wan_weights import conversion
from tools.convert_wan_weights.conversion import ConversionError
from tools.convert_wan_weights.sources import detect_source
from uvigu import checkpoint
from uvigu.models import wan_keys
from uvigu.models.flat_params import abbrev
from uvigu.models.univigu import UniViGUConfig, UniViGUModelConfig
from uvigu.models.wan import WanConfig

PART = "univigu"
STRIPPED_PREFIXES = ("_fsdp_wrapped_module.", "_orig_mod.")
RELEASE_TEXT_LEN = 256  # inference.sh's --max_length
RELEASE_HEAD_EPS = 1e-5  # F.layer_norm's default, used by the release's text head LayerNorm
ROPE_THETA = 10000.0

# Release spellings of base modules -> diffusers' (the rest of the base keys are diffusers' own names).
_BASE_RENAMES = {
    "time_embedding_v.time_embedder.linear_1": "condition_embedder.time_embedder.linear_1",
    "time_embedding_v.time_embedder.linear_2": "condition_embedder.time_embedder.linear_2",
    "time_embedding_v.time_proj": "condition_embedder.time_proj",
    "cond_text_embedder.linear_1": "condition_embedder.text_embedder.linear_1",
    "cond_text_embedder.linear_2": "condition_embedder.text_embedder.linear_2",
    "video_head.proj_out": "proj_out",
}
# Text-side modules: release module -> (our module, kind); kind "linear" transposes the weight.
_TEXT_TOP = {
    "time_embedding_t.time_embedder.linear_1": ("text_time.time_embedder.linear_1", "linear"),
    "time_embedding_t.time_embedder.linear_2": ("text_time.time_embedder.linear_2", "linear"),
    "time_embedding_t.time_proj": ("text_time.time_proj", "linear"),
    "text_head.linear": ("text_head.proj", "linear"),
}
_TEXT_BLOCK = {"ffn_t.net.0.proj": "ffn_t.proj_in", "ffn_t.net.2": "ffn_t.proj_out"}
_TEXT_PLAIN = {"vocab_embed.weight": "vocab_embed.embedding", "scale_shift_table_t": "text_head.scale_shift_table",
               "text_head.norm_final.weight": "text_head.norm_scale"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LINEAR_PARAMS = {"weight": "kernel", "bias": "bias"}
_INV_FREQ = "rotary_emb_text.inv_freq"


@dataclasses.dataclass
class Converted:
    """What `convert` wrote: the config, the inferred facts and notes, the counts."""

    config: UniViGUModelConfig
    notes: list[str]
    base_overridden: int  # base tensors taken from the .pth instead of the diffusers folder
    text_tensors: int
    parameter_count: int


# ----------------------------------------------------------------------------------------------------------------------
# Reading the .pth.
# ----------------------------------------------------------------------------------------------------------------------


def strip_key(key: str) -> str:
    for prefix in STRIPPED_PREFIXES:
        key = key.replace(prefix, "")
    return key


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The release's state dict as numpy arrays (bf16 as ml_dtypes.bfloat16), keys stripped of FSDP / compile
    prefixes. Only `torch.load(weights_only=True)`; anything that needs more is refused with a ConversionError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file" if not path.exists() else
                              f"{path}: is not a file; --univigu takes the released .pth")
    try:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            raw = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        text = " ".join(str(e).split())
        detail = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \d+)", text)
        detail = detail.group(1) if detail else text[:200]
        if "Unsupported global" not in text:  # not a pickle torch could read at all
            raise ConversionError(f"{path}: not a readable torch checkpoint ({detail})") from None
        raise ConversionError(
            f"{path}: refused: torch.load(weights_only=True) cannot load it ({detail}): loading it would run code "
            "named in the file, which this converter never does. Re-save only the tensors, e.g. "
            "torch.save({'model': state_dict}, 'clean.pth'), from a trusted environment.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: expected a state dict under 'model' (or a bare state dict), got "
                              f"{type(state).__name__}")
    out, bad, clashes = {}, [], []
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            bad.append(f"{key!r} ({type(value).__name__})")
            continue
        clean = strip_key(key)
        if clean in out:
            clashes.append(f"{key} (stripped: {clean})")
            continue
        out[clean] = _to_numpy(value)
    problems = []
    if bad:
        problems.append(f"{len(bad)} entries that are not tensors: {abbrev(bad)}")
    if clashes:
        problems.append(f"{len(clashes)} keys that collide once prefixes are stripped: {abbrev(clashes)}")
    if problems:
        raise ConversionError(f"{path}: " + "; ".join(problems))
    return out


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float32, torch.float16):
        return t.numpy()
    return t.to(torch.float32).numpy()  # float64 and friends: stored as float32


# ----------------------------------------------------------------------------------------------------------------------
# Planning: every key to its place, every problem collected.
# ----------------------------------------------------------------------------------------------------------------------


def base_to_diffusers_key(key: str) -> str | None:
    """A release base key -> its diffusers name (None when it is not a base key)."""
    if key == "scale_shift_table_v":
        return "scale_shift_table"
    for release, diffusers in _BASE_RENAMES.items():
        if key.startswith(release + "."):
            return diffusers + key[len(release):]
    return key


def text_target(key: str) -> tuple[str, int | None, str] | None:
    """A release text-side key -> (our flat path, layer or None, kind: "linear_weight" | "plain"); None if it is not
    a text-side key."""
    if key in _TEXT_PLAIN:
        return _TEXT_PLAIN[key], None, "plain"
    m = _BLOCK.match(key)
    table, rest, layer = (_TEXT_BLOCK, m.group(2), int(m.group(1))) if m else (None, key, None)
    if table is not None:
        module, _, param = rest.rpartition(".")
        if module in table and param in _LINEAR_PARAMS:
            return f"{table[module]}.{_LINEAR_PARAMS[param]}", layer, "linear_" + param
        return None
    module, _, param = key.rpartition(".")
    if module in _TEXT_TOP and param in _LINEAR_PARAMS:
        ours, _ = _TEXT_TOP[module]
        return f"{ours}.{_LINEAR_PARAMS[param]}", None, "linear_" + param
    return None


def infer_text_config(state: Mapping[str, np.ndarray], wan: WanConfig, *, tokenizer_vocab: int | None,
                      max_text_len: int) -> tuple[UniViGUConfig, list[str]]:
    """The text side's `UniViGUConfig` from the tensor shapes (see the module docstring); notes say what was
    inferred or assumed. Raises a ConversionError when the shapes cannot be a release's."""
    notes, problems = [], []
    for key in ("vocab_embed.weight", "text_head.linear.weight", "blocks.0.ffn_t.net.0.proj.weight"):
        if key not in state:
            problems.append(f"missing key {key} (needed to infer the text side)")
        elif state[key].ndim != 2:
            problems.append(f"{key}: expected 2 dims, got shape {state[key].shape}")
    if problems:
        raise ConversionError("; ".join(problems))
    rows_embed, dim_embed = state["vocab_embed.weight"].shape
    rows_head, dim_head = state["text_head.linear.weight"].shape
    if dim_embed != wan.dim or dim_head != wan.dim:
        problems.append(f"vocab_embed.weight {state['vocab_embed.weight'].shape} / text_head.linear.weight "
                        f"{state['text_head.linear.weight'].shape}: width must be the DiT's dim {wan.dim}")
    if rows_embed != rows_head:
        problems.append(f"vocab_embed.weight has {rows_embed} rows but text_head.linear.weight {rows_head}: the release "
                        "builds both with V (+1 with a mask source)")
    if problems:
        raise ConversionError("; ".join(problems))
    if tokenizer_vocab is not None and rows_embed == tokenizer_vocab + 1:
        source, vocab = "mask", rows_embed - 1
        notes.append(f"vocab_embed has tokenizer vocab + 1 = {rows_embed} rows: a 'mask' source (mask id {vocab}), "
                     "the head scores V + 1 ids")
    else:
        source, vocab = "uniform", rows_embed
        notes.append(f"vocab_size={vocab} and a 'uniform' source inferred from vocab_embed.weight "
                     f"({rows_embed} rows)")
        if tokenizer_vocab is None:
            notes.append("no tokenizer to compare with: a mask source (V + 1 rows) cannot be told apart; assumed "
                         "uniform")
        elif vocab != tokenizer_vocab:
            notes.append(f"warning: the tokenizer has {tokenizer_vocab} ids, the checkpoint {vocab}")
    ffn_t_dim = int(state["blocks.0.ffn_t.net.0.proj.weight"].shape[0])
    notes.append(f"max_text_len={max_text_len}: not readable from shapes (the release's --max_length)")
    config = UniViGUConfig(text_flow="discrete", vocab_size=vocab, max_text_len=max_text_len,
                           ffn_t_dim=None if ffn_t_dim == wan.ffn_dim else ffn_t_dim, ffn_t_init="copy",
                           text_rope_theta=ROPE_THETA, discrete_source=source, text_head_norm="weight",
                           text_head_eps=RELEASE_HEAD_EPS, head_mask_logit=source == "mask")
    return config, notes


def check_inv_freq(value: np.ndarray | None, head_dim: int) -> str | None:
    """A problem text when the release's text RoPE frequencies are not ours, else None."""
    want = 1.0 / (ROPE_THETA ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if value is None:
        return f"missing key {_INV_FREQ}"
    got = np.asarray(value, np.float64)
    if got.shape != want.shape:
        return f"{_INV_FREQ}: expected shape {want.shape} (head dim {head_dim}), got {got.shape}"
    if not np.allclose(got, want, rtol=1e-6, atol=0.0):
        return (f"{_INV_FREQ} is not 1 / 10000^(2i/{head_dim}) (max rel. diff "
                f"{float(np.max(np.abs(got - want) / want)):.2e}): our text RoPE would rotate differently")
    return None


def plan_text_and_base(state: Mapping[str, np.ndarray], wan: WanConfig, expected_text: Mapping[str, tuple],
                       ) -> tuple[dict[str, tuple[str, int | None, str]], dict[str, str], list[str]]:
    """Routes every key of the state dict: text keys -> (our path, layer, kind); base keys -> their diffusers name.
    Returns (text routes, base routes, problems)."""
    base_shapes = wan_keys.expected_diffusers_shapes(wan)
    text_routes, base_routes, owner = {}, {}, {}
    unexpected, duplicates, misshaped = [], [], []
    for key in wan_keys.iter_keys(state):
        if key == _INV_FREQ:
            continue
        target = text_target(key)
        if target is not None:
            path, layer, kind = target
            if path not in expected_text or (layer is not None and layer >= wan.num_layers):
                unexpected.append(key)
                continue
            shape = expected_text[path][1:] if layer is not None else expected_text[path]
            got = state[key].shape[::-1] if kind == "linear_weight" else state[key].shape
            if tuple(got) != tuple(shape):
                want = tuple(shape)[::-1] if kind == "linear_weight" else tuple(shape)
                misshaped.append(f"{key}: expected {want}, got {tuple(state[key].shape)}")
                continue
            text_routes[key] = target
            continue
        dkey = base_to_diffusers_key(key)
        if dkey not in base_shapes:
            unexpected.append(key)
            continue
        if dkey in owner:
            duplicates.append(f"{owner[dkey]} and {key} both map to {dkey}")
            continue
        owner[dkey] = key
        if tuple(state[key].shape) != base_shapes[dkey]:
            misshaped.append(f"{key}: expected {base_shapes[dkey]}, got {tuple(state[key].shape)}")
            continue
        base_routes[key] = dkey
    filled = {(p, l) for p, l, _ in text_routes.values()}
    missing = []
    for path, shape in expected_text.items():
        layers = range(shape[0]) if path.startswith("ffn_t.") else [None]
        for layer in layers:
            if (path, layer) not in filled:
                missing.append(_release_name(path, layer))
    problems = []
    for label, items in (("missing key(s)", missing), ("unexpected key(s)", unexpected),
                         ("duplicate key(s)", duplicates), ("mis-shaped tensor(s)", misshaped)):
        if items:
            problems.append(f"{len(items)} {label}: {abbrev(items, 20)}")
    return text_routes, base_routes, problems


def _release_name(path: str, layer: int | None) -> str:
    """Our text-side path -> the release key that fills it (for reports)."""
    plain = {ours: release for release, ours in _TEXT_PLAIN.items()}
    if path in plain:
        return plain[path]
    module, _, param = path.rpartition(".")
    torch_param = {"kernel": "weight", "bias": "bias"}[param]
    for release, theirs in _TEXT_BLOCK.items():
        if theirs == module:
            return f"blocks.{layer}.{release}.{torch_param}"
    for release, (ours, _) in _TEXT_TOP.items():
        if ours == module:
            return f"{release}.{torch_param}"
    return path


# ----------------------------------------------------------------------------------------------------------------------
# The part.
# ----------------------------------------------------------------------------------------------------------------------


def convert(src: str | Path, ckpt: str | Path, out: str | Path, *, dtype: str = "keep", tokenizer_vocab: int | None,
            max_text_len: int = RELEASE_TEXT_LEN, allow_nonfinite: bool = False, log=print) -> Converted:
    """Writes the UniViGU model folder `out` from the diffusers Wan folder `src` and the release's `ckpt`. Raises a
    ConversionError (a ValueError) naming every problem; nothing is written then."""
    if dtype not in conversion.DTYPE_CHOICES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {conversion.DTYPE_CHOICES}")
    state = load_state_dict(ckpt)
    source = detect_source(src)
    wan = source.config
    text_config, notes = infer_text_config(state, wan, tokenizer_vocab=tokenizer_vocab, max_text_len=max_text_len)
    model_config = UniViGUModelConfig(dataclasses.replace(wan, scan_layers=True), text_config)
    all_shapes = checkpoint._abstract_param_shapes(checkpoint.MODEL_KINDS[checkpoint.UNIVIGU], model_config)
    expected_text = {k: v for k, v in all_shapes.items() if not k.startswith("dit.")}
    text_routes, base_routes, problems = plan_text_and_base(state, wan, expected_text)
    rope_problem = check_inv_freq(state.get(_INV_FREQ), wan.dim // wan.num_heads)
    if rope_problem:
        problems.append(rope_problem)
    if problems:
        raise ConversionError(f"{ckpt}: does not match a Uni-ViGU release on the Wan2.1 DiT of {src} "
                              f"(dim={wan.dim}, num_layers={wan.num_layers}, heads={wan.num_heads}):\n  "
                              + "\n  ".join(problems))

    # The base DiT from the diffusers folder (streamed, checked, NaN-guarded), then the .pth's base tensors over it.
    plan = conversion.plan_conversion(source, wan)
    dtypes = conversion.output_dtypes(source, plan, dtype)
    dit_params, _ = conversion.fill_params(source, plan, dtypes, allow_nonfinite=allow_nonfinite)
    main_dtype = conversion.main_dtype(dtypes, plan.param_shapes)
    out_dtype = (lambda a: a.dtype) if dtype == "keep" else (lambda a: np.dtype(conversion._OUTPUT_DTYPES[dtype]))
    nonfinite = []
    for key, dkey in base_routes.items():
        path, layer = wan_keys.param_target(dkey, wan)
        target = dit_params[path] if layer is None else dit_params[path][layer]
        target[...] = wan_keys.to_ours(dkey, state[key]).astype(target.dtype)
        if not conversion.all_finite(target):
            nonfinite.append(key)
    params = {f"dit.{k}": v for k, v in dit_params.items()}
    for path, shape in expected_text.items():
        keys = [k for k, (p, _, _) in text_routes.items() if p == path]
        dt = out_dtype(state[keys[0]])
        params[path] = np.empty(shape, dt)
    for key, (path, layer, kind) in text_routes.items():
        value = state[key].T if kind == "linear_weight" else state[key]
        target = params[path] if layer is None else params[path][layer]
        target[...] = value.astype(target.dtype)
        if not conversion.all_finite(target):
            nonfinite.append(key)
    if nonfinite and not allow_nonfinite:
        raise conversion.nonfinite_error(str(ckpt), nonfinite)

    model_config = UniViGUModelConfig(dataclasses.replace(wan, scan_layers=True, param_dtype=main_dtype), text_config)
    described = {"kind": "uni-vigu release", "checkpoint": str(Path(ckpt).absolute()), "base": str(source.folder),
                 "base_overridden_from_checkpoint": len(base_routes), "notes": notes + list(source.notes),
                 "converter": "tools.convert_wan_weights --univigu", "requested_dtype": dtype}
    if nonfinite:
        described["nonfinite_keys"] = nonfinite
    checkpoint.save_params(out, checkpoint.UNIVIGU, model_config, params, source=described)
    for note in notes:
        log(f"  note: {note}")
    return Converted(model_config, notes, len(base_routes), len(text_routes),
                     sum(math.prod(np.shape(v)) for v in params.values()))


def summary(result: Converted, output: Path | str) -> str:
    c, u = result.config.wan, result.config.univigu
    return "\n".join([
        f"converted the Uni-ViGU release: {result.text_tensors} text-side tensors, {result.base_overridden} base "
        "tensors taken from the checkpoint (the rest from the diffusers transformer)",
        f"  parameters: {result.parameter_count:,}",
        f"  config:     dim={c.dim} layers={c.num_layers} vocab_size={u.vocab_size} source={u.discrete_source} "
        f"max_text_len={u.max_text_len} ffn_t_dim={u.ffn_t_dim or c.ffn_dim}",
        f"  output:     {output}",
    ])


__all__ = ["PART", "Converted", "convert", "load_state_dict", "strip_key", "summary", "infer_text_config",
           "check_inv_freq", "base_to_diffusers_key", "text_target"]
