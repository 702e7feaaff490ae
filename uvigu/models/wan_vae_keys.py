"""How `WanVAE`'s params relate to diffusers' `AutoencoderKLWan` state dict and to the original `Wan2.1_VAE.pth`.

Three namespaces:
  diffusers  `decoder.up_blocks.1.resnets.0.conv1.weight` [O, I, kT, kH, kW]
  original   `decoder.upsamples.4.residual.2.weight`      (wan/modules/vae.py, `Wan2.1_VAE.pth`)
  ours       `decoder.up_blocks.1.resnets.0.conv1.kernel` [kT, kH, kW, I, O]  (flat dotted NNX path)
diffusers <-> ours is a rename plus transposes: 3-D conv weight [O, I, T, H, W] <-> kernel [T, H, W, I, O]; the
resamplers' Conv2d `resample.1.weight` [O, I, 3, 3] <-> `resample.kernel` [3, 3, I, O]; the attention block's 1×1
Conv2d `to_qkv` / `proj` [O, I, 1, 1] <-> dense kernel [I, O]; RMS_norm `gamma` [C, 1, 1(, 1)] <-> [C].
original <-> diffusers is a rename (diffusers' `convert_wan_vae_to_diffusers`, generalised to any stage count):
  conv1 / conv2 (top level) = quant_conv / post_quant_conv; {encoder,decoder}.conv1 = conv_in;
  head.0 / head.2 = norm_out / conv_out; middle.0 / middle.1 / middle.2 = mid_block.resnets.0 / attentions.0 /
  resnets.1; residual.0 / .2 / .3 / .6 = norm1 / conv1 / norm2 / conv2; shortcut = conv_shortcut;
  encoder.downsamples.N = encoder.down_blocks.N (same flat list); decoder.upsamples is flat: stage i holds
  num_res_blocks + 1 residual blocks then one resampler, so upsamples.{i·(r+2) + j} = up_blocks.i.resnets.j and
  upsamples.{i·(r+2) + r + 1} = up_blocks.i.upsamplers.0.
The original release has no config: `infer_config` reads the architecture off the tensor shapes.
Everything here works on numpy arrays and plain dicts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx

from uvigu.models.flat_params import shape_problems
from uvigu.models.flat_params import to_numpy as _to_numpy
from uvigu.models.wan_vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE, WanVAEConfig

# ----------------------------------------------------------------------------------------------------------------------
# diffusers <-> ours.
# ----------------------------------------------------------------------------------------------------------------------


def param_shapes(cfg: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    """{our flat path: shape} of a WanVAE with `cfg` (abstract: nothing allocated)."""
    return dict(_param_shapes(dataclasses.replace(cfg, dtype="float32", param_dtype="float32")))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    model = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
    return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _is_attention(path: str) -> bool:
    # the attention block's tensors: to_qkv.*, proj.*, norm.gamma (res blocks have norm1 / norm2, heads norm_out)
    owner = path.split(".")[-2] if "." in path else ""
    return owner in ("to_qkv", "proj", "norm")


def our_to_diffusers_key(path: str) -> str:
    path = re.sub(r"(^|\.)resample\.(kernel|bias)$", r"\1resample.1.\2", path)  # Sequential(pad/upsample, conv)
    return path[: -len("kernel")] + "weight" if path.endswith(".kernel") else path


def diffusers_to_our_key(key: str) -> str:
    key = re.sub(r"(^|\.)resample\.1\.", r"\1resample.", key)
    return key[: -len("weight")] + "kernel" if key.endswith(".weight") else key


def _diffusers_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our param shape -> the diffusers tensor's shape."""
    if path.endswith(".gamma"):
        return (shape[0], 1, 1) if _is_attention(path) else (shape[0], 1, 1, 1)
    if path.endswith(".kernel"):
        if len(shape) == 2:  # attention 1×1 conv as dense [I, O]
            return (shape[1], shape[0], 1, 1)
        return (shape[-1], shape[-2], *shape[:-2])
    return shape


def _to_diffusers_array(path: str, a: np.ndarray) -> np.ndarray:
    if path.endswith(".gamma"):
        return a.reshape(_diffusers_shape(path, a.shape))
    if path.endswith(".kernel"):
        if a.ndim == 2:
            return a.T.reshape(_diffusers_shape(path, a.shape))
        return np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(a.ndim - 2)))
    return a


def _from_diffusers_array(path: str, a: np.ndarray) -> np.ndarray:
    if path.endswith(".gamma"):
        return a.reshape(a.shape[0])
    if path.endswith(".kernel"):
        if _is_attention(path):
            return a.reshape(a.shape[0], a.shape[1]).T
        return np.transpose(a, (*range(2, a.ndim), 1, 0))
    return a


def expected_diffusers_shapes(cfg: WanVAEConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers state-dict key: shape} of an AutoencoderKLWan with `cfg`'s architecture."""
    return {our_to_diffusers_key(p): _diffusers_shape(p, s) for p, s in param_shapes(cfg).items()}


def diffusers_to_params(state_dict: Mapping[str, Any], cfg: WanVAEConfig) -> dict[str, np.ndarray]:
    """A diffusers AutoencoderKLWan state dict (numpy / torch tensors) -> {our flat path: array}. Every key must be
    present with its shape and nothing else; otherwise a ValueError lists the problems."""
    expected = expected_diffusers_shapes(cfg)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = shape_problems(shapes, expected)
    if problems:
        raise ValueError("diffusers Wan VAE state dict does not match the config: " + "; ".join(problems))
    return {diffusers_to_our_key(k): _from_diffusers_array(diffusers_to_our_key(k), _to_numpy(v))
            for k, v in state_dict.items()}


def params_to_diffusers(flat: Mapping[str, Any], cfg: WanVAEConfig) -> dict[str, np.ndarray]:
    """{our flat path: array} -> a diffusers AutoencoderKLWan state dict (numpy), checked against `cfg`."""
    problems = shape_problems({k: tuple(v.shape) for k, v in flat.items()}, param_shapes(cfg))
    if problems:
        raise ValueError("Wan VAE params do not match the config: " + "; ".join(problems))
    return {our_to_diffusers_key(p): _to_diffusers_array(p, np.asarray(a)) for p, a in flat.items()}


# ----------------------------------------------------------------------------------------------------------------------
# original <-> diffusers.
# ----------------------------------------------------------------------------------------------------------------------

# ResidualBlock.residual = Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d)
_RES_ORIGINAL = {"residual.0.gamma": "norm1.gamma", "residual.3.gamma": "norm2.gamma",
                 **{f"residual.{i}.{p}": f"conv{n}.{p}" for i, n in ((2, 1), (6, 2)) for p in ("weight", "bias")},
                 "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_RES_DIFFUSERS = {v: k for k, v in _RES_ORIGINAL.items()}
_TOP_ORIGINAL = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_TOP_DIFFUSERS = {v: k for k, v in _TOP_ORIGINAL.items()}
_PART_ORIGINAL = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_PART_DIFFUSERS = {v: k for k, v in _PART_ORIGINAL.items()}
_MIDDLE_ORIGINAL = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_DIFFUSERS = {v: k for k, v in _MIDDLE_ORIGINAL.items()}


def _rename_res(rest: str, table: Mapping[str, str]) -> str:
    return table.get(rest, rest)  # attention / resampler tensors keep their names


def original_to_diffusers_key(key: str, num_res_blocks: int = 2) -> str:
    """`Wan2.1_VAE.pth` name -> diffusers name; ValueError for a key outside the Wan2.1 VAE layout."""
    top, _, rest = key.partition(".")
    if top in _TOP_ORIGINAL and rest in ("weight", "bias"):
        return f"{_TOP_ORIGINAL[top]}.{rest}"
    if top in ("encoder", "decoder"):
        for orig, ours in _PART_ORIGINAL.items():
            if rest.startswith(orig + "."):
                return f"{top}.{ours}.{rest[len(orig) + 1:]}"
        m = re.match(r"^middle\.(\d+)\.(.+)$", rest)
        if m and m.group(1) in _MIDDLE_ORIGINAL:
            return f"{top}.mid_block.{_MIDDLE_ORIGINAL[m.group(1)]}.{_rename_res(m.group(2), _RES_ORIGINAL)}"
        m = re.match(r"^downsamples\.(\d+)\.(.+)$", rest)
        if m and top == "encoder":
            return f"encoder.down_blocks.{m.group(1)}.{_rename_res(m.group(2), _RES_ORIGINAL)}"
        m = re.match(r"^upsamples\.(\d+)\.(.+)$", rest)
        if m and top == "decoder":
            stage, j = divmod(int(m.group(1)), num_res_blocks + 2)
            if j == num_res_blocks + 1:
                return f"decoder.up_blocks.{stage}.upsamplers.0.{m.group(2)}"
            return f"decoder.up_blocks.{stage}.resnets.{j}.{_rename_res(m.group(2), _RES_ORIGINAL)}"
    raise ValueError(f"not a Wan2.1 VAE key (original naming): {key!r}")


def diffusers_to_original_key(key: str, num_res_blocks: int = 2) -> str:
    """diffusers name -> `Wan2.1_VAE.pth` name (inverse of `original_to_diffusers_key`)."""
    top, _, rest = key.partition(".")
    if top in _TOP_DIFFUSERS and rest in ("weight", "bias"):
        return f"{_TOP_DIFFUSERS[top]}.{rest}"
    if top in ("encoder", "decoder"):
        for ours, orig in _PART_DIFFUSERS.items():
            if rest.startswith(ours + "."):
                return f"{top}.{orig}.{rest[len(ours) + 1:]}"
        m = re.match(r"^mid_block\.((?:resnets|attentions)\.\d+)\.(.+)$", rest)
        if m and m.group(1) in _MIDDLE_DIFFUSERS:
            return f"{top}.middle.{_MIDDLE_DIFFUSERS[m.group(1)]}.{_rename_res(m.group(2), _RES_DIFFUSERS)}"
        m = re.match(r"^down_blocks\.(\d+)\.(.+)$", rest)
        if m and top == "encoder":
            return f"encoder.downsamples.{m.group(1)}.{_rename_res(m.group(2), _RES_DIFFUSERS)}"
        m = re.match(r"^up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$", rest)
        if m and top == "decoder":
            base = int(m.group(1)) * (num_res_blocks + 2)
            if m.group(3) is None:
                return f"decoder.upsamples.{base + num_res_blocks + 1}.{m.group(4)}"
            if int(m.group(3)) <= num_res_blocks:
                return f"decoder.upsamples.{base + int(m.group(3))}.{_rename_res(m.group(4), _RES_DIFFUSERS)}"
    raise ValueError(f"not a Wan2.1 VAE key (diffusers naming): {key!r}")


def original_to_diffusers(state_dict: Mapping[str, Any], num_res_blocks: int | None = None) -> dict[str, Any]:
    """A whole original state dict renamed to diffusers keys (values untouched). `num_res_blocks` is read off the
    shapes when not given."""
    if num_res_blocks is None:
        num_res_blocks = _original_num_res_blocks(state_dict)
    return {original_to_diffusers_key(k, num_res_blocks): v for k, v in state_dict.items()}


def _original_num_res_blocks(state_dict: Mapping[str, Any]) -> int:
    # decoder.upsamples: stage 0 is r + 1 residual blocks, then the first resampler.
    idx = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^decoder\.upsamples\.(\d+)\.resample\.", k))})
    if not idx:
        raise ValueError("cannot tell num_res_blocks: no decoder.upsamples.N.resample.* tensor (needs >= 2 stages)")
    return idx[0] - 1


# ----------------------------------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------------------------------


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> tuple[WanVAEConfig, list[str]]:
    """The architecture read off {key: shape} (diffusers or original naming; the original release ships no config)
    -> (config, notes saying where each value came from). Raises ValueError when the shapes are not a Wan VAE."""
    shapes = {k: tuple(v) for k, v in shapes.items()}
    notes = []
    if "encoder.conv1.weight" in shapes:  # original naming
        shapes = original_to_diffusers(shapes)
        notes.append("original (Wan2.1_VAE.pth) key names")
    try:
        base_dim = shapes["encoder.conv_in.weight"][0]
        z_dim = shapes["post_quant_conv.weight"][0]
    except KeyError as e:
        raise ValueError(f"not a Wan VAE state dict: no {e.args[0]}") from None
    notes.append(f"base_dim={base_dim} from encoder.conv_in.weight, z_dim={z_dim} from post_quant_conv.weight")
    # The encoder's flat down_blocks list: residual blocks, then a resampler closing each stage but the last.
    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))})
    dim_mult, temporal, res_in_stage, res_counts = [], [], 0, []
    for i in blocks:
        p = f"encoder.down_blocks.{i}."
        if p + "conv1.weight" in shapes:
            if res_in_stage == 0:
                out = shapes[p + "conv1.weight"][0]
                if out % base_dim:
                    raise ValueError(f"{p}conv1.weight has {out} channels, not a multiple of base_dim {base_dim}")
                dim_mult.append(out // base_dim)
            res_in_stage += 1
        elif p + "resample.1.weight" in shapes:
            temporal.append(p + "time_conv.weight" in shapes)
            res_counts.append(res_in_stage)
            res_in_stage = 0
        else:
            raise ValueError(f"encoder.down_blocks.{i} is neither a residual block nor a resampler (attention "
                             f"outside the mid block is not supported)")
    res_counts.append(res_in_stage)
    if len(set(res_counts)) != 1 or res_counts[0] < 1:
        raise ValueError(f"encoder stages have {res_counts} residual blocks; expected the same number >= 1 in each")
    notes.append(f"dim_mult={tuple(dim_mult)}, num_res_blocks={res_counts[0]}, temperal_downsample={tuple(temporal)} "
                 f"from the encoder's down_blocks")
    if z_dim == len(WAN21_LATENTS_MEAN):
        mean, std = WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
        notes.append("latents_mean/std: not in the weights; Wan2.1's 16 values assumed")
    else:
        mean, std = (0.0,) * z_dim, (1.0,) * z_dim
        notes.append(f"latents_mean/std: not in the weights and z_dim={z_dim} != 16; identity (0 / 1) used")
    fields = dict(base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=res_counts[0],
                  temperal_downsample=tuple(temporal), latents_mean=mean, latents_std=std)
    fields.update(overrides)
    cfg = WanVAEConfig(**fields)
    problems = shape_problems(shapes, expected_diffusers_shapes(cfg))
    if problems:
        raise ValueError(f"shapes do not match the inferred Wan VAE config {cfg}: " + "; ".join(problems))
    return cfg, notes


# diffusers AutoencoderKLWan config fields we read; the rest must hold their Wan2.1 values (checked below).
_DIFFUSERS_FIELDS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
                     "latents_mean", "latents_std")
_WAN21_ONLY = {"is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None}


def config_from_diffusers(config_json: Mapping[str, Any], **overrides) -> WanVAEConfig:
    """A diffusers `vae/config.json` (as a dict) -> WanVAEConfig; missing fields take diffusers' defaults (the
    Wan2.1 VAE). Wan2.2-style VAEs (is_residual, patchified) are refused with a ValueError."""
    for field, value in _WAN21_ONLY.items():
        if config_json.get(field, value) != value:
            raise ValueError(f"diffusers VAE config has {field}={config_json[field]!r}; only the Wan2.1 VAE "
                             f"({field}={value!r}) is supported")
    dec = config_json.get("decoder_base_dim")
    if dec is not None and dec != config_json.get("base_dim", 96):
        raise ValueError(f"diffusers VAE config has decoder_base_dim={dec} != base_dim; not supported")
    fields = {k: config_json[k] for k in _DIFFUSERS_FIELDS if k in config_json}
    fields.update(overrides)
    return WanVAEConfig(**fields)
