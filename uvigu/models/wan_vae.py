"""The Wan2.1 video VAE in Flax NNX, exact to diffusers' `AutoencoderKLWan` (and the original `wan/modules/vae.py`).

Layout: channels-last everywhere, video [B, F, H, W, 3] in [-1, 1], latents [B, T, h, w, z]. Conv kernels are
[kT, kH, kW, Cin, Cout] (3-D) or [kH, kW, Cin, Cout] (2-D); the attention block's 1×1 convs are dense kernels
[Cin, Cout]. Param paths mirror diffusers' state dict (`encoder.down_blocks.0.conv1.kernel`,
`decoder.up_blocks.0.upsamplers.0.resample.kernel`, `quant_conv`, `post_quant_conv`) so converting is a rename plus
transposes (`wan_vae_keys`); diffusers' `resample.1.weight` (the conv after the pad / upsample) is `resample.kernel`.

Facts this follows (checked against diffusers 0.42):
- CausalConv3d pads time in front only (2·p frames, none behind); 1×1×1 convs see one frame.
- Chunked execution: encode runs the encoder on frames [1, 4, 4, ...] (F = 1 + 4k), decode on one latent frame at a
  time. Every 3×3×3 conv keeps a 2-frame cache of its input (after norm + SiLU in res blocks): the next chunk
  prepends it instead of zeros. A zero cache is exactly the reference's "no cache yet" (zero padding), so chunk 0
  starts from zeros and every chunk after it has the same cache shapes: chunk 0 runs unrolled, the rest under one
  `lax.scan` with the caches as the carry (one compile whatever the frame count).
- Downsample-with-time: spatial pad (0, 1, 0, 1) + stride-2 3×3 conv, then a (3, 1, 1) stride-(2, 1, 1) time conv
  over [last frame of the previous chunk, chunk]; chunk 0 skips it and only caches its last frame.
- Upsample-with-time: time_conv dim -> 2·dim (kernel (3, 1, 1), causal); chunk 0 skips it (the reference's "Rep"
  sentinel, which later behaves as a zero cache); afterwards the two channel halves are two output frames,
  interleaved: channels-last that is (B, T, H, W, 2, C) -> (B, T, 2, H, W, C) -> (B, 2T, H, W, C). Then nearest ×2
  (in fp32) and a 3×3 conv dim -> dim // 2.
- RMS_norm: x / max(‖x‖₂ over channels, 1e-12) · √C · γ. Attention (mid blocks only): per frame, one head of width
  C over the H·W positions.
- Encoder emits μ ‖ logvar (2z channels) after `quant_conv`; logvar is clamped to [-30, 20]. Decode clamps to [-1, 1].
  `encode` / `decode` normalise with the 16 per-channel latents_mean / latents_std (diffusers' pipeline does this
  outside the VAE); `encode_moments` / `decode_raw` work on raw latents (what the released Uni-ViGU code feeds).
- Unchunked mode (`chunked=False`) runs every layer once over the whole clip with the same result: a causal conv over
  the whole clip equals the chunked one with caches, and the time resamplers' chunk-0 special cases become "keep
  frame 0, time-conv the rest" (`Resample`).

Shape letters: B batch, F frames, T latent frames (or frames at the current level), H/W height/width at the current
level, C channels, L/M positions of one frame (H·W), K conv kernel extent, z latent channels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from uvigu.models import layers
from uvigu.models.model_config import ModelConfig

CACHE_T = 2  # frames of history a causal 3×3×3 conv keeps between chunks
ENCODE_CHUNK = 4  # frames per encoder chunk after the first (the first is 1 frame)
LOGVAR_RANGE = (-30.0, 20.0)

# diffusers' AutoencoderKLWan defaults (the Wan2.1 VAE).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# ----------------------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(ModelConfig):
    """Architecture of a Wan2.1-style video VAE plus its latent normalisation and dtypes (diffusers' field names,
    including its spelling `temperal_downsample`)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"  # compute
    param_dtype: str = "float32"  # storage

    def __post_init__(self):
        # JSON / diffusers configs give lists: store tuples so the config stays hashable and comparable.
        for name, kind in (("dim_mult", int), ("attn_scales", float), ("temperal_downsample", bool),
                           ("latents_mean", float), ("latents_std", float)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        name = type(self).__name__
        if self.base_dim < 1 or self.z_dim < 1 or self.num_res_blocks < 1:
            raise ValueError(f"{name}: base_dim, z_dim and num_res_blocks must be >= 1, got {self.base_dim}, "
                             f"{self.z_dim}, {self.num_res_blocks}")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"{name}.dim_mult must be non-empty positive multipliers, got {self.dim_mult}")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"{name}: temperal_downsample has {len(self.temperal_downsample)} entries, needs "
                             f"len(dim_mult) - 1 = {len(self.dim_mult) - 1} (one per downsampling stage)")
        if sum(self.temperal_downsample) > 2:
            raise ValueError(f"{name}: at most 2 temporal downsamples (encoder chunks are {ENCODE_CHUNK} frames), "
                             f"got temperal_downsample={self.temperal_downsample}")
        if self.attn_scales:
            raise ValueError(f"{name}.attn_scales must be () (Wan2.1 has attention only in the mid blocks, and "
                             f"diffusers' decoder ignores attn_scales), got {self.attn_scales}")
        for field in ("latents_mean", "latents_std"):
            if len(getattr(self, field)) != self.z_dim:
                raise ValueError(f"{name}.{field} has {len(getattr(self, field))} values, z_dim is {self.z_dim}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"{name}.latents_std must be positive, got {self.latents_std}")
        self.check_dtypes()

    @property
    def stride(self) -> tuple[int, int, int]:
        """Pixels per latent position along (frames, height, width)."""
        s = 2 ** (len(self.dim_mult) - 1)
        return (2 ** sum(self.temperal_downsample), s, s)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanVAEConfig":
        # __post_init__ turns JSON lists back into tuples.
        return super().from_dict(dict(d))


PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),
    # Unit-test size: 3 stages, one of them downsampling time; stride (2, 4, 4).
    "tiny": WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1, temperal_downsample=(False, True),
                         latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.5, 0.5, 1.0, 2.0)),
}
WanVAEConfig.PRESETS = PRESETS


@dataclasses.dataclass(frozen=True)
class TileOptions:
    """Spatial tiling, in pixels, as diffusers' `enable_tiling` (tile_sample_min_* / tile_sample_stride_*): tiles of
    min_height × min_width every stride pixels, overlaps blended linearly. Only used when the video is larger."""

    min_height: int = 256
    min_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def check(self, spatial_stride: int) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 1 or v % spatial_stride:
                raise ValueError(f"TileOptions.{f.name}={v} must be a positive multiple of the VAE's spatial stride "
                                 f"{spatial_stride}")
        if self.stride_height > self.min_height or self.stride_width > self.min_width:
            raise ValueError(f"TileOptions strides {self.stride_height}x{self.stride_width} exceed the tile size "
                             f"{self.min_height}x{self.min_width}")


# ----------------------------------------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------------------------------------

_DIMENSION_NUMBERS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


class Conv(nnx.Module):
    """An N-d convolution (N = 2 or 3) with kernel [*K, Cin, Cout] and a bias; `padding` is (low, high) per dim.
    Torch's default init (uniform ±1/√fan_in): random models are reasonable without weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], *,
                 stride: tuple[int, ...] | None = None, padding: tuple[tuple[int, int], ...] | None = None,
                 dtype, param_dtype, rngs: nnx.Rngs):
        n = len(kernel_size)
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride or (1,) * n)
        self.padding = tuple(padding or ((0, 0),) * n)
        self.dtype = dtype
        bound = 1.0 / math.sqrt(in_channels * math.prod(kernel_size))
        self.kernel = nnx.Param(
            jax.random.uniform(rngs.params(), (*kernel_size, in_channels, out_channels), param_dtype, -bound, bound),
            out_sharding=(None,) * (n + 2),
        )
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), param_dtype, -bound, bound),
                              out_sharding=(None,))

    def __call__(self, x: Float[Array, "B ... C"], padding=None) -> Float[Array, "B ... D"]:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=self.stride,
            padding=self.padding if padding is None else padding,
            dimension_numbers=_DIMENSION_NUMBERS[len(self.kernel_size)],
        )
        return y + self.bias[...].astype(self.dtype)


class CausalConv3d(Conv):
    """Conv3d that pads time in front only (2·p frames) and symmetrically in space. `prefix` (cached frames of the
    previous chunk) replaces that many frames of zero padding, as the reference's `cache_x`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int], *,
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0,
                 dtype, param_dtype, rngs: nnx.Rngs):
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.time_pad = 2 * pt
        super().__init__(in_channels, out_channels, k, stride=s, padding=((0, 0), (ph, ph), (pw, pw)),
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Float[Array, "B T H W C"], prefix: Float[Array, "B P H W C"] | None = None):
        front = self.time_pad
        if prefix is not None and front > 0:
            x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
            front = max(front - prefix.shape[1], 0)
        return super().__call__(x, padding=((front, 0), *self.padding[1:]))


class FeatureCache:
    """The causal convs' caches for one chunk: reads the previous chunk's entries in call order (the reference's
    `feat_idx` order), collects this chunk's. `entries=None` is chunk 0: every conv starts from zeros."""

    def __init__(self, entries: list[Array] | None = None):
        self.entries = entries
        self.new: list[Array] = []

    @property
    def first(self) -> bool:
        return self.entries is None

    def take(self) -> Array | None:
        return None if self.entries is None else self.entries[len(self.new)]

    def put(self, x: Array) -> None:
        self.new.append(x)


def _cached_conv(conv: CausalConv3d, x: Float[Array, "B T H W C"], cache: FeatureCache | None):
    """A 3×3×3 causal conv with its 2-frame cache: prepend the previous chunk's frames (zeros for chunk 0) and keep
    the last 2 input frames of [cache, x] for the next chunk. Without a cache (whole clip): plain causal conv."""
    if cache is None:
        return conv(x)
    prev = cache.take()
    if prev is None:
        prev = jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype)
    cache.put(jnp.concatenate([prev, x], axis=1)[:, -CACHE_T:])
    return conv(x, prefix=prev)


class RMSNorm(nnx.Module):
    """Wan's RMS_norm: L2-normalise over channels (eps 1e-12, in fp32), times √C and a learned γ [C]."""

    def __init__(self, dim: int, *, param_dtype):
        self.scale = math.sqrt(dim)
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(None,))

    def __call__(self, x: Float[Array, "... C"]) -> Float[Array, "... C"]:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = (xf / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return y * self.scale * self.gamma[...].astype(x.dtype)


class ResidualBlock(nnx.Module):
    """RMSNorm -> SiLU -> causal conv 3³ -> RMSNorm -> SiLU -> (dropout, off) -> causal conv 3³, plus a shortcut
    (a 1×1×1 conv when the width changes)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, **conv)
        self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, **conv)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, **conv) if in_dim != out_dim else None

    def __call__(self, x: Float[Array, "B T H W C"], cache: FeatureCache | None = None) -> Float[Array, "B T H W D"]:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = _cached_conv(self.conv1, jax.nn.silu(self.norm1(x)), cache)
        x = _cached_conv(self.conv2, jax.nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention within each frame over its H·W positions (head width C), residual."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        proj = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = layers.dense(dim, 3 * dim, (None, None), **proj)
        self.proj = layers.dense(dim, dim, (None, None), **proj)

    def __call__(self, x: Float[Array, "B T H W C"], cache: FeatureCache | None = None) -> Float[Array, "B T H W C"]:
        del cache  # per frame: no state across chunks
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, t, h * w, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # channel order q | k | v, as the reference's chunk(3)
        logits = jnp.einsum("BTLC,BTMC->BTLM", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("BTLM,BTMC->BTLC", probs, v).reshape(b, t, h, w, c)
        return x + self.proj(out)


RESAMPLE_MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")


class Resample(nnx.Module):
    """Spatial ×2 up / down-sampling, optionally with time (see the module docstring for the chunk rules)."""

    def __init__(self, dim: int, mode: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        if mode not in RESAMPLE_MODES:
            raise ValueError(f"Resample mode {mode!r} is not one of {RESAMPLE_MODES}")
        self.mode = mode
        conv = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if mode.startswith("up"):
            self.resample = Conv(dim, dim // 2, (3, 3), padding=((1, 1), (1, 1)), **conv)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **conv) if mode == "upsample3d" \
                else None
        else:
            # ZeroPad2d((0, 1, 0, 1)): one row below, one column right; then a stride-2 valid conv.
            self.resample = Conv(dim, dim, (3, 3), stride=(2, 2), padding=((0, 1), (0, 1)), **conv)
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **conv) if mode == "downsample3d" \
                else None

    def _upsample_time(self, x, cache):
        if cache is None:  # whole clip: frame 0 passes, the rest see a zero history (the "Rep" sentinel)
            if x.shape[1] == 1:
                return x
            return jnp.concatenate([x[:, :1], self._interleave(self.time_conv(x[:, 1:]))], axis=1)
        if cache.first:
            cache.put(jnp.zeros((x.shape[0], CACHE_T, *x.shape[2:]), x.dtype))
            return x
        return self._interleave(_cached_conv(self.time_conv, x, cache))

    @staticmethod
    def _interleave(y: Float[Array, "B T H W 2C"]) -> Float[Array, "B 2T H W C"]:
        # The trap: channel half s of input frame t is output frame 2t + s.
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
        return y.reshape(b, 2 * t, h, w, c2 // 2)

    def _downsample_time(self, x, cache):
        if cache is None:  # whole clip: frame 0 passes, then stride-2 windows over frames (0,1,2), (2,3,4), ...
            if x.shape[1] < 3:
                return x[:, :1]
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        if cache.first:
            cache.put(x[:, -1:])
            return x
        prev = cache.take()
        cache.put(x[:, -1:])
        return self.time_conv(jnp.concatenate([prev, x], axis=1))

    def __call__(self, x: Float[Array, "B T H W C"], cache: FeatureCache | None = None) -> Float[Array, "B t h w D"]:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        b, t, h, w, c = x.shape
        frames = x.reshape(b * t, h, w, c)
        if self.mode.startswith("up"):
            # nearest ×2 in fp32 (the reference upsamples in float and casts back)
            frames = jnp.repeat(jnp.repeat(frames.astype(jnp.float32), 2, axis=1), 2, axis=2).astype(x.dtype)
        frames = self.resample(frames)
        x = frames.reshape(b, t, *frames.shape[1:])
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x


class MidBlock(nnx.Module):
    """ResidualBlock -> AttentionBlock -> ResidualBlock at constant width."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        mod = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **mod), ResidualBlock(dim, dim, **mod)])
        self.attentions = nnx.List([AttentionBlock(dim, **mod)])

    def __call__(self, x: Float[Array, "B T H W C"], cache: FeatureCache | None = None) -> Float[Array, "B T H W C"]:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class UpBlock(nnx.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler (diffusers' `WanUpBlock`)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample_mode: str | None, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        mod = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, **mod) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nnx.List([Resample(out_dim, upsample_mode, **mod)] if upsample_mode else [])

    def __call__(self, x: Float[Array, "B T H W C"], cache: FeatureCache | None = None) -> Float[Array, "B t h w D"]:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for up in self.upsamplers:
            x = up(x, cache)
        return x


class Encoder(nnx.Module):
    """conv_in -> down_blocks (flat list: residual blocks and resamplers) -> mid_block -> RMSNorm, SiLU, conv_out
    (to 2z channels: μ ‖ logvar before quant_conv)."""

    def __init__(self, base_dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_downsample, *, dtype,
                 param_dtype, rngs: nnx.Rngs, in_channels: int = 3):
        mod = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [base_dim * u for u in (1, *dim_mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1, **mod)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **mod))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d", **mod))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **mod)
        self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], z_dim, 3, padding=1, **mod)

    def __call__(self, x: Float[Array, "B F H W 3"], cache: FeatureCache | None = None) -> Float[Array, "B T h w Z"]:
        x = _cached_conv(self.conv_in, x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return _cached_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache)


class Decoder(nnx.Module):
    """conv_in -> mid_block -> up_blocks -> RMSNorm, SiLU, conv_out (to RGB). Stage i > 0 starts at half the
    previous stage's width (the upsampler's conv halves it)."""

    def __init__(self, base_dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_upsample, *, dtype,
                 param_dtype, rngs: nnx.Rngs, out_channels: int = 3):
        mod = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [base_dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv_in = CausalConv3d(z_dim, dims[0], 3, padding=1, **mod)
        self.mid_block = MidBlock(dims[0], **mod)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            in_dim = in_dim // 2 if i > 0 else in_dim
            mode = None
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, num_res_blocks, mode, **mod))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1, **mod)

    def __call__(self, x: Float[Array, "B T h w Z"], cache: FeatureCache | None = None) -> Float[Array, "B F H W 3"]:
        x = _cached_conv(self.conv_in, x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return _cached_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache)


def run_chunked(module: nnx.Module, x: Float[Array, "B F ..."], first: int, size: int) -> Array:
    """Runs `module(chunk, cache)` over frames [first, size, size, ...] of `x` carrying the feature caches:
    chunk 0 unrolled (it creates the caches), the rest under one `lax.scan`. Outputs concatenated along time."""
    n = x.shape[1]
    if n < first or (n - first) % size:
        raise ValueError(f"{n} frames do not split into chunks [{first}, {size}, {size}, ...]")
    cache = FeatureCache()
    out0 = module(x[:, :first], cache)
    steps = (n - first) // size
    if steps == 0:
        return out0
    rest = x[:, first:].reshape(x.shape[0], steps, size, *x.shape[2:]).swapaxes(0, 1)  # [S, B, size, ...]
    graphdef, state = nnx.split(module)

    def step(entries, chunk):
        c = FeatureCache(entries)
        y = nnx.merge(graphdef, state)(chunk, c)
        return c.new, y

    _, ys = jax.lax.scan(step, cache.new, rest)  # [S, B, t, ...]
    ys = ys.swapaxes(0, 1)
    ys = ys.reshape(ys.shape[0], steps * ys.shape[2], *ys.shape[3:])
    return jnp.concatenate([out0, ys], axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# The VAE.
# ----------------------------------------------------------------------------------------------------------------------


def _blend(a: Array, b: Array, extent: int, axis: int) -> Array:
    """b with its first `extent` rows along `axis` faded in from a's last ones (diffusers' blend_v / blend_h)."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent <= 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    wb = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape).astype(b.dtype)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    rest = jax.lax.slice_in_dim(b, extent, b.shape[axis], axis=axis)
    return jnp.concatenate([tail * (1 - wb) + head * wb, rest], axis=axis)


def _tiled(run, x: Array, tile_in: tuple[int, int], stride_in: tuple[int, int], blend: tuple[int, int],
           stride_out: tuple[int, int], size_out: tuple[int, int]) -> Array:
    """Runs `run` on overlapping spatial tiles of x [B, T, H, W, C] and stitches them as diffusers does: each tile is
    blended with its (already blended) upper and left neighbours, cropped to `stride_out`, concatenated."""
    height, width = x.shape[2], x.shape[3]
    rows = []
    for i in range(0, height, stride_in[0]):
        rows.append([run(x[:, :, i:i + tile_in[0], j:j + tile_in[1]]) for j in range(0, width, stride_in[1])])
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend[0], axis=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend[1], axis=3)
            row[j] = tile  # the reference blends in place: later neighbours see the blended tile
        out_rows.append(jnp.concatenate([t[:, :, :stride_out[0], :stride_out[1]] for t in row], axis=3))
    return jnp.concatenate(out_rows, axis=2)[:, :, :size_out[0], :size_out[1]]


class WanVAE(nnx.Module):
    """The Wan2.1 VAE with the codec interface (`uvigu.codec.Codec`): video [B, F, H, W, 3] in [-1, 1]
    <-> normalised latents [B, T, h, w, z], F = 1 + 4k frames.

    `encode` / `decode` use normalised latents ((μ − mean) / std); `encode_moments` / `decode_raw` raw ones.
    `chunked=False` runs the whole clip at once (same numbers, more memory); `tiled=True` (or a `TileOptions`)
    splits space into overlapping tiles like diffusers' tiled_encode / tiled_decode.
    """

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        mod = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype, rngs=rngs)
        z = config.z_dim
        self.encoder = Encoder(config.base_dim, 2 * z, config.dim_mult, config.num_res_blocks,
                               config.temperal_downsample, **mod)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1, **mod)
        self.post_quant_conv = CausalConv3d(z, z, 1, **mod)
        self.decoder = Decoder(config.base_dim, z, config.dim_mult, config.num_res_blocks,
                               config.temperal_downsample[::-1], **mod)

    # --- codec interface ---

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    @property
    def stride(self) -> tuple[int, int, int]:
        return self.config.stride

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T, h, w, z) of one video of `frames` × `height` × `width` pixels; frames must be 1 + 4k."""
        st, s, _ = self.stride
        if frames < 1 or (frames - 1) % ENCODE_CHUNK:
            raise ValueError(f"WanVAE encodes 1 + {ENCODE_CHUNK}k frames (1, 5, 9, ...), got {frames}")
        if height < 1 or width < 1 or height % s or width % s:
            raise ValueError(f"WanVAE: {height}x{width} pixels are not divisible by the spatial stride {s}")
        return (1 + (frames - 1) // st, height // s, width // s, self.config.z_dim)

    def frames_for(self, latent_frames: int) -> int:
        """Frames `decode` returns for `latent_frames` latent frames."""
        return 1 + (latent_frames - 1) * self.stride[0]

    def describe(self) -> dict:
        """What a manifest records about the codec (enough to rebuild it, weights aside)."""
        cfg = self.config.to_dict()
        return {"name": "WanVAE", "stride": list(self.stride), "latent_channels": self.latent_channels,
                "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}

    def normalize(self, z_raw: Float[Array, "B T h w z"]) -> Float[Array, "B T h w z"]:
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return (z_raw.astype(jnp.float32) - mean) / std

    def denormalize(self, z: Float[Array, "B T h w z"]) -> Float[Array, "B T h w z"]:
        mean = jnp.asarray(self.config.latents_mean, jnp.float32)
        std = jnp.asarray(self.config.latents_std, jnp.float32)
        return z.astype(jnp.float32) * std + mean

    def encode(self, video: Float[Array, "B F H W 3"], *, tiled: bool | TileOptions = False,
               chunked: bool = True) -> Float[Array, "B T h w z"]:
        """video in [-1, 1] -> normalised latents (μ − mean) / std, float32."""
        mu, _ = self.encode_moments(video, tiled=tiled, chunked=chunked)
        return self.normalize(mu)

    def decode(self, latents: Float[Array, "B T h w z"], *, tiled: bool | TileOptions = False,
               chunked: bool = True) -> Float[Array, "B F H W 3"]:
        """normalised latents -> video in [-1, 1], float32."""
        self._check_latents(latents)
        return self.decode_raw(self.denormalize(latents), tiled=tiled, chunked=chunked)

    def encode_moments(self, video: Float[Array, "B F H W 3"], *, tiled: bool | TileOptions = False,
                       chunked: bool = True) -> tuple[Float[Array, "B T h w z"], Float[Array, "B T h w z"]]:
        """video -> (μ, logvar) of the raw posterior, float32; logvar clamped to [-30, 20]."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"WanVAE.encode expects video [B, F, H, W, 3], got shape {tuple(video.shape)}")
        self.latent_shape(*video.shape[1:4])  # validates frames and size
        x = video.astype(self.config.compute_dtype)
        tiles = self._tile_options(tiled)
        s = self.stride[1]
        if tiles is not None and (x.shape[2] > tiles.min_height or x.shape[3] > tiles.min_width):
            enc = _tiled(lambda t: self._encode_raw(t, chunked), x, (tiles.min_height, tiles.min_width),
                         (tiles.stride_height, tiles.stride_width),
                         ((tiles.min_height - tiles.stride_height) // s, (tiles.min_width - tiles.stride_width) // s),
                         (tiles.stride_height // s, tiles.stride_width // s), (x.shape[2] // s, x.shape[3] // s))
        else:
            enc = self._encode_raw(x, chunked)
        enc = enc.astype(jnp.float32)
        z = self.config.z_dim
        return enc[..., :z], jnp.clip(enc[..., z:], *LOGVAR_RANGE)

    def decode_raw(self, z_raw: Float[Array, "B T h w z"], *, tiled: bool | TileOptions = False,
                   chunked: bool = True) -> Float[Array, "B F H W 3"]:
        """raw latents (no un-normalisation) -> video clamped to [-1, 1], float32."""
        self._check_latents(z_raw)
        x = z_raw.astype(self.config.compute_dtype)
        tiles = self._tile_options(tiled)
        s = self.stride[1]
        if tiles is not None and (x.shape[2] > tiles.min_height // s or x.shape[3] > tiles.min_width // s):
            out = _tiled(lambda t: self._decode_raw(t, chunked), x, (tiles.min_height // s, tiles.min_width // s),
                         (tiles.stride_height // s, tiles.stride_width // s),
                         (tiles.min_height - tiles.stride_height, tiles.min_width - tiles.stride_width),
                         (tiles.stride_height, tiles.stride_width), (x.shape[2] * s, x.shape[3] * s))
        else:
            out = self._decode_raw(x, chunked)
        return jnp.clip(out.astype(jnp.float32), -1.0, 1.0)

    # --- internals ---

    def _check_latents(self, z: Array) -> None:
        if z.ndim != 5 or z.shape[-1] != self.config.z_dim or min(z.shape[1:4]) < 1:
            raise ValueError(f"WanVAE.decode expects latents [B, T, h, w, {self.config.z_dim}], got shape "
                             f"{tuple(z.shape)}")

    def _tile_options(self, tiled: bool | TileOptions) -> TileOptions | None:
        if tiled is False or tiled is None:
            return None
        tiles = TileOptions() if tiled is True else tiled
        if not isinstance(tiles, TileOptions):
            raise ValueError(f"tiled must be a bool or a TileOptions, got {tiled!r}")
        tiles.check(self.stride[1])
        return tiles

    def _encode_raw(self, x: Float[Array, "B F H W 3"], chunked: bool) -> Float[Array, "B T h w 2z"]:
        enc = run_chunked(self.encoder, x, 1, ENCODE_CHUNK) if chunked else self.encoder(x)
        return self.quant_conv(enc)

    def _decode_raw(self, z: Float[Array, "B T h w z"], chunked: bool) -> Float[Array, "B F H W 3"]:
        x = self.post_quant_conv(z)
        return run_chunked(self.decoder, x, 1, 1) if chunked else self.decoder(x)
