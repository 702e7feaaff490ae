"""LoRA files for Wan in the ecosystem's three layouts, read into and written from `lora.Adapters`.

  diffusers / PEFT  `transformer.blocks.N.attn1.to_q.lora_A.weight` [R, I], `...lora_B.weight` [O, R]
                    (also without `transformer.`, PEFT's `base_model.model.` prefix, or an adapter name
                    `lora_A.default.weight`). α is not in the tensors: it comes from PEFT's `adapter_config.json`
                    (`lora_alpha`, `alpha_pattern`, `rank_pattern`, `use_rslora`) or from diffusers' safetensors
                    metadata `lora_adapter_metadata` (the same fields prefixed `transformer.`); absent both, α = R
                    (scale 1, diffusers' rule). Written with that metadata so diffusers reads α back.
  original          `diffusion_model.blocks.N.self_attn.q.lora_A.weight` (ai-toolkit, diffusion-pipe; the Wan
                    release's module names: self_attn / cross_attn .q .k .v .o, ffn.0, ffn.2, head.head, ...),
                    `lora_down` / `lora_up` accepted for A / B; an optional scalar `<module>.alpha`, else α = R.
  musubi            `lora_unet_blocks_N_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha` (musubi-tuner:
                    the original module name with dots as underscores; scale α / R).
UniViGU's text FFN is `blocks.N.ffn_t.net.0.proj` / `.net.2` (the released checkpoint's naming) in the diffusers
layout, `blocks.N.ffn_t.0` / `.2` in the original one and `lora_unet_blocks_N_ffn_t_0` in musubi's.

Loading detects the layout from the keys; a key that fits none, a module that is not a Linear of Wan, an A without
its B, or weight-diff keys (`.diff`, `.diff_b`, `lora_B.bias`, DoRA) raise a ValueError naming them. The original and
musubi layouts store α per module, so every layout round-trips exactly (save -> load -> the same arrays and α).
Arrays are numpy; `safetensors` with framework "numpy" reads bf16 through ml_dtypes.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from uvigu.models import lora, wan_keys
from uvigu.models.flat_params import abbrev
from uvigu.models.flat_params import to_numpy as _to_numpy
from uvigu.models.model_config import DTYPES

FORMATS = ("diffusers", "original", "musubi")
DIFFUSERS_PREFIX = "transformer."
ORIGINAL_PREFIX = "diffusion_model."
MUSUBI_PREFIX = "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (JSON of the LoraConfig fields)
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"

# Wan's Linears outside the blocks, diffusers names (the original names come from wan_keys).
_TOP_LINEARS = (
    "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
    "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
    "condition_embedder.text_embedder.linear_2", "proj_out",
)
_FFN_T = {"ffn_t.net.0.proj": "ffn_t.0", "ffn_t.net.2": "ffn_t.2"}  # diffusers <-> original, text FFN
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[A-Za-z0-9_-]+))?"
                     r"\.weight$")
_ALPHA = re.compile(r"^(?P<module>.+)\.alpha$")
_UNSUPPORTED = re.compile(r"(\.diff|\.diff_b|\.lora_B\.bias|\.lora_up\.bias|dora_scale|lora_magnitude_vector|"
                          r"\.hada_|\.lokr_)")


# ----------------------------------------------------------------------------------------------------------------------
# Module names across the layouts.
# ----------------------------------------------------------------------------------------------------------------------


def _diffusers_to_original(name: str) -> str:
    m = _BLOCK.match(name)
    if m and m.group(2) in _FFN_T:
        return f"blocks.{m.group(1)}.{_FFN_T[m.group(2)]}"
    return wan_keys.diffusers_to_original_key(name + ".weight")[: -len(".weight")]


def _original_to_diffusers(name: str) -> str:
    m = _BLOCK.match(name)
    inverse = {v: k for k, v in _FFN_T.items()}
    if m and m.group(2) in inverse:
        return f"blocks.{m.group(1)}.{inverse[m.group(2)]}"
    return wan_keys.original_to_diffusers_key(name + ".weight")[: -len(".weight")]


def _check_diffusers_name(name: str) -> str:
    """`name` if it is a LoRA-able Linear of Wan / UniViGU in diffusers naming, else KeyError."""
    target, _ = lora.parse_module_name(name)  # KeyError for an unknown block module
    if not _BLOCK.match(name) and target not in _TOP_LINEARS:
        raise KeyError(f"{name!r} is not a Linear of a Wan2.1 DiT")
    return name


# Block-relative original names of every LoRA-able Linear, for musubi's underscored names (which are ambiguous
# without a table: `self_attn_q` -> `self_attn.q`, `ffn_t_0` -> `ffn_t.0`).
_ORIGINAL_BLOCK_LINEARS = tuple(_diffusers_to_original(f"blocks.0.{d}")[len("blocks.0."):]
                                for d in lora.BLOCK_LINEARS.values())
_ORIGINAL_TOP_LINEARS = tuple(_diffusers_to_original(d) for d in _TOP_LINEARS)
_MUSUBI_BLOCK = {n.replace(".", "_"): n for n in _ORIGINAL_BLOCK_LINEARS}
_MUSUBI_TOP = {n.replace(".", "_"): n for n in _ORIGINAL_TOP_LINEARS}
_MUSUBI_BLOCK_KEY = re.compile(r"^blocks_(\d+)_(.+)$")


def _musubi_to_original(name: str) -> str:
    m = _MUSUBI_BLOCK_KEY.match(name)
    if m and m.group(2) in _MUSUBI_BLOCK:
        return f"blocks.{m.group(1)}.{_MUSUBI_BLOCK[m.group(2)]}"
    if name in _MUSUBI_TOP:
        return _MUSUBI_TOP[name]
    raise KeyError(f"{MUSUBI_PREFIX}{name!r} is not a Linear of a Wan2.1 DiT in musubi-tuner naming")


# ----------------------------------------------------------------------------------------------------------------------
# State dicts <-> adapters.
# ----------------------------------------------------------------------------------------------------------------------


def _strip(key: str) -> tuple[str, str]:
    """(layout family from the prefix, key without it)."""
    for prefix in ("base_model.model.", DIFFUSERS_PREFIX):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith(MUSUBI_PREFIX):
        return "musubi", key[len(MUSUBI_PREFIX):]
    for prefix in (wan_keys.ORIGINAL_PREFIX, ORIGINAL_PREFIX):
        if key.startswith(prefix):
            return "original", key[len(prefix):]
    return "", key


def detect_format(keys) -> str:
    """'diffusers', 'original' or 'musubi' from a LoRA state dict's keys; ValueError when they mix or fit none."""
    found: dict[str, list[str]] = {}
    for key in keys:
        family, rest = _strip(key)
        if not family:
            m = _FACTOR.match(rest) or _ALPHA.match(rest)
            module = m.group("module") if m else rest
            family = "original" if re.search(r"(^|\.)(self_attn|cross_attn|ffn\.\d|ffn_t\.\d|head\.head|"
                                              r"text_embedding|time_embedding|time_projection)(\.|$)", module) \
                else "diffusers"
        found.setdefault(family, []).append(key)
    if not found:
        raise ValueError("empty LoRA state dict: no tensors")
    if len(found) > 1:
        raise ValueError("LoRA keys mix layouts: " + "; ".join(f"{f}: {abbrev(sorted(k), 3)}" for f, k in
                                                              sorted(found.items())))
    return next(iter(found))


def _pattern_value(pattern: Mapping[str, Any], name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it equals or ends (after a dot)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def from_state_dict(state_dict: Mapping[str, Any], *, adapter_config: Mapping[str, Any] | None = None,
                    alpha: float | None = None) -> tuple[lora.Adapters, str]:
    """A LoRA state dict (numpy or torch tensors) in any of the three layouts -> (adapters, layout).

    α per module: the file's `.alpha` tensor, else `adapter_config` (PEFT fields: lora_alpha, alpha_pattern,
    rank_pattern, use_rslora), else `alpha`, else the rank.
    """
    fmt = detect_format(state_dict.keys())
    unsupported = sorted(k for k in state_dict if _UNSUPPORTED.search(k))
    if unsupported:
        raise ValueError(f"unsupported LoRA tensors (weight diffs / bias deltas / DoRA / LoHa / LoKr): "
                         f"{abbrev(unsupported)}")
    factors: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, float] = {}
    bad, adapters_seen = [], set()
    for key, value in state_dict.items():
        _, rest = _strip(key)
        m_factor, m_alpha = _FACTOR.match(rest), _ALPHA.match(rest)
        m = m_factor or m_alpha
        if m is None:
            bad.append(f"{key} (not a lora_A / lora_B / lora_down / lora_up weight or an alpha)")
            continue
        try:
            if fmt == "musubi":
                name = _check_diffusers_name(_original_to_diffusers(_musubi_to_original(m.group("module"))))
            elif fmt == "original":
                name = _check_diffusers_name(_original_to_diffusers(m.group("module")))
            else:
                name = _check_diffusers_name(m.group("module"))
        except KeyError as e:
            bad.append(f"{key} ({e.args[0]})")
            continue
        if m_alpha:
            alphas[name] = float(np.asarray(_to_numpy(value), np.float64).reshape(()))
            continue
        if m_factor.group("adapter"):
            adapters_seen.add(m_factor.group("adapter"))
        side = "a" if m_factor.group("kind") in ("lora_A", "lora_down") else "b"
        if side in factors.setdefault(name, {}):
            bad.append(f"{key} (a second {side.upper()} factor for {name})")
            continue
        factors[name][side] = _to_numpy(value)
    if len(adapters_seen) > 1:
        bad.append(f"several named adapters {sorted(adapters_seen)} in one file: load one at a time")
    for name, f in factors.items():
        if set(f) != {"a", "b"}:
            bad.append(f"{name} has only its {'A' if 'a' in f else 'B'} factor")
        elif f["a"].ndim != 2 or f["b"].ndim != 2 or f["a"].shape[0] != f["b"].shape[1]:
            bad.append(f"{name}: A {f['a'].shape} and B {f['b'].shape} are not [R, I] and [O, R]")
    orphans = sorted(set(alphas) - set(factors))
    if orphans:
        bad.append(f"alpha without factors for {abbrev(orphans)}")
    if bad:
        raise ValueError(f"bad LoRA state dict ({fmt} layout): {len(bad)} problem(s): {abbrev(bad)}")

    config = dict(adapter_config or {})
    out: lora.Adapters = {}
    for name in lora_sorted(factors):
        a, b = factors[name]["a"].T, factors[name]["b"].T  # [R, I] -> [I, R]; [O, R] -> [R, O]
        rank = a.shape[1]
        if name in alphas:
            alpha_m = alphas[name]
        elif config:
            want_rank = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", rank))
            if int(want_rank) != rank:
                raise ValueError(f"{name}: the tensors have rank {rank}, the adapter config says {want_rank}")
            alpha_m = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))
            if config.get("use_rslora"):
                alpha_m *= math.sqrt(rank)  # rsLoRA scales by α/√R: the same ΔW as α√R/R
        else:
            alpha_m = float(rank if alpha is None else alpha)
        out[name] = lora.LoRAWeight(np.ascontiguousarray(a), np.ascontiguousarray(b), alpha_m)
    return out, fmt


def lora_sorted(names) -> list[str]:
    """Module names, blocks in numeric order (stable files and reports)."""
    return wan_keys.iter_keys(names)


def to_state_dict(adapters: Mapping[str, lora.LoRAWeight], fmt: str = "diffusers", *, dtype=None,
                  ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Adapters -> (tensors, safetensors metadata) in layout `fmt`; `dtype` (e.g. "bfloat16") casts the factors."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; known: {FORMATS}")
    cast = _caster(dtype)
    tensors: dict[str, np.ndarray] = {}
    metadata: dict[str, str] = {}
    bad = []
    for name in lora_sorted(adapters):
        w = adapters[name]
        try:
            _check_diffusers_name(name)
            original = _diffusers_to_original(name)
        except KeyError as e:
            bad.append(f"{name} ({e.args[0]})")
            continue
        a_t, b_t = cast(w.a.T), cast(w.b.T)
        alpha = np.asarray(w.alpha, np.float32)
        if fmt == "diffusers":
            tensors[f"{DIFFUSERS_PREFIX}{name}.lora_A.weight"] = a_t
            tensors[f"{DIFFUSERS_PREFIX}{name}.lora_B.weight"] = b_t
        elif fmt == "original":
            tensors[f"{ORIGINAL_PREFIX}{original}.lora_A.weight"] = a_t
            tensors[f"{ORIGINAL_PREFIX}{original}.lora_B.weight"] = b_t
            tensors[f"{ORIGINAL_PREFIX}{original}.alpha"] = alpha
        else:
            stem = MUSUBI_PREFIX + original.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = a_t
            tensors[f"{stem}.lora_up.weight"] = b_t
            tensors[f"{stem}.alpha"] = alpha
    if bad:
        raise ValueError(f"cannot write these adapters in the {fmt} layout: {abbrev(bad)}")
    if fmt == "diffusers" and adapters:
        metadata[METADATA_KEY] = json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in peft_config(adapters).items()},
                                            sort_keys=True)
    return tensors, metadata


def peft_config(adapters: Mapping[str, lora.LoRAWeight]) -> dict[str, Any]:
    """The PEFT `LoraConfig` fields that reproduce these adapters' ranks and α: the most common (rank, α) as r /
    lora_alpha, the others as rank_pattern / alpha_pattern by full module name."""
    pairs = [(w.rank, w.alpha) for w in adapters.values()]
    r, alpha = max(set(pairs), key=pairs.count)
    suffixes = sorted({_BLOCK.match(n).group(2) if _BLOCK.match(n) else n for n in adapters})
    return {
        "r": r, "lora_alpha": alpha, "target_modules": suffixes,
        "rank_pattern": {n: w.rank for n, w in adapters.items() if w.rank != r},
        "alpha_pattern": {n: w.alpha for n, w in adapters.items() if w.alpha != alpha},
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
    }


def _caster(dtype):
    """Casts to `dtype` ("float32", "bfloat16", "float16" or a numpy / jnp dtype; bf16 via ml_dtypes)."""
    if dtype is None:
        return np.ascontiguousarray
    target = np.dtype(DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
    return lambda x: np.ascontiguousarray(np.asarray(x).astype(target))


# ----------------------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read LoRA file {path}: {e}") from None


def _metadata_config(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata {METADATA_KEY!r} is not JSON: {e}") from None
    config = {k[len(DIFFUSERS_PREFIX):]: v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
    return config or None


def load_lora(path: str | os.PathLike, *, alpha: float | None = None) -> tuple[lora.Adapters, str]:
    """A LoRA `.safetensors` file, or a folder holding PEFT's `adapter_model.safetensors` (+ `adapter_config.json`)
    or diffusers' `pytorch_lora_weights.safetensors` -> (adapters, layout). α: `.alpha` tensors, else
    `adapter_config.json` beside the weights, else the file's diffusers metadata, else `alpha`, else the rank."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in (PEFT_WEIGHTS, DIFFUSERS_WEIGHTS) if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither {PEFT_WEIGHTS} nor {DIFFUSERS_WEIGHTS}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file {path}: only .safetensors is read (no pickle)")
    tensors, metadata = _read_safetensors(path)
    config = None
    if (path.parent / PEFT_CONFIG).is_file():
        try:
            config = json.loads((path.parent / PEFT_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.parent / PEFT_CONFIG} is not JSON: {e}") from None
    config = config or _metadata_config(metadata, path)
    try:
        return from_state_dict(tensors, adapter_config=config, alpha=alpha)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_lora(adapters: Mapping[str, lora.LoRAWeight], path: str | os.PathLike, fmt: str = "diffusers", *,
              dtype=None) -> Path:
    """Writes `adapters` as one `.safetensors` file in layout `fmt` (atomically: a temp file, then a rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file {path} must end in .safetensors")
    if not adapters:
        raise ValueError("no adapters to save")
    tensors, metadata = to_state_dict(adapters, fmt, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)
    return path
