"""Video codecs: video [B, F, H, W, 3] in [−1, 1] ⇄ normalised latents [B, T, h, w, C], behind one interface
(`Codec`) that the data manifests and the model folders name (`describe()["name"]`, `open_codec`):

  ToyCodec  the toy world's lossless space-to-depth codec (below), numpy or jax, no params;
  WanVAE    the Wan2.1 VAE (`uvigu.models.wan_vae`), an NNX module with params, loaded from a model folder.

The toy world's codec stands where the Wan VAE stands:

Space-to-depth by a factor s (the toy world's: 2): each s×s pixel block becomes one latent position with s·s·3
channels, so [B, F, 16, 16, 3] -> [B, F, 8, 8, 12]; time is not compressed (stride (1, s, s)). Like the Wan VAE's latents, the
result is normalised per channel with fixed constants: every latent channel holds one RGB channel of one pixel of the
block, and uses that RGB channel's mean / std (`WorldSpec.codec_mean` / `codec_std`, measured once on the world).
Being an affine reshuffle, decode(encode(x)) == x up to float rounding.

Latent channel order: c = (dy·s + dx)·3 + rgb for the pixel at offset (dy, dx) inside its block.

The same code runs on numpy arrays (shard building: no device round trip) and on jax arrays (decoding samples, under
jit): it only uses `reshape`, `transpose` and arithmetic with numpy constants, which both array types share.

Shape letters: B batch, F frames, H/W pixels, T/h/w latent grid, C latent channels.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np


class Codec(Protocol):
    """What the data layer, the pipeline and the evaluation need of a video codec."""

    @property
    def latent_channels(self) -> int: ...

    @property
    def stride(self) -> tuple[int, int, int]:
        """Pixels per latent position along (frames, height, width)."""

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T, h, w, C) of one video; a ValueError for sizes the codec cannot take."""

    def encode(self, video) -> Any:
        """video [B, F, H, W, 3] in [−1, 1] -> normalised latents [B, T, h, w, C]."""

    def decode(self, latents) -> Any:
        """normalised latents [B, T, h, w, C] -> video [B, F, H, W, 3] in [−1, 1]."""

    def describe(self) -> dict:
        """What a manifest or model folder records to reopen the codec: {"name": ..., ...}."""


def open_codec(description: dict, model_folder=None) -> Codec:
    """The codec a manifest describes. ToyCodec is rebuilt from its description; a WanVAE is loaded from
    `model_folder` (a converted DST or its `vae/`), since its params are not in the description."""
    name = description.get("name")
    if name == "ToyCodec":
        return ToyCodec(description["factor"], description["mean"], description["std"])
    if name == "WanVAE":
        if model_folder is None:
            raise ValueError("a WanVAE codec needs the model folder that holds its vae/")
        from uvigu import checkpoint  # the only codec with params; imported on demand

        return checkpoint.load_pretrained(model_folder, kind=checkpoint.WAN_VAE)
    raise ValueError(f"unknown codec {name!r} in {description}; known: ToyCodec, WanVAE")


class ToyCodec:
    """Lossless, normalised space-to-depth codec. `encode` / `decode` / `latent_channels` / `stride` / `latent_shape`
    are the interface the Wan VAE wrapper will share."""

    def __init__(self, factor: int = 4, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0)):
        if factor < 1:
            raise ValueError(f"space-to-depth factor must be >= 1, got {factor}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 RGB means and 3 positive stds, got mean={mean}, std={std}")
        self.factor = factor
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # Per latent channel: channel c holds RGB channel c % 3.
        self._mean = np.tile(np.asarray(self.mean, np.float32), factor * factor)
        self._std = np.tile(np.asarray(self.std, np.float32), factor * factor)

    @classmethod
    def from_spec(cls, spec) -> "ToyCodec":
        """From a toy-world `WorldSpec` (its codec factor and RGB statistics)."""
        return cls(spec.codec_factor, spec.codec_mean, spec.codec_std)

    @property
    def latent_channels(self) -> int:
        return self.factor * self.factor * 3

    @property
    def stride(self) -> tuple[int, int, int]:
        """Pixels per latent position along (frames, height, width)."""
        return (1, self.factor, self.factor)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T, h, w, C) of one video of `frames` × `height` × `width` pixels."""
        if height % self.factor or width % self.factor:
            raise ValueError(f"{height}x{width} pixels are not divisible by the codec factor {self.factor}")
        return (frames, height // self.factor, width // self.factor, self.latent_channels)

    def describe(self) -> dict:
        """What a manifest records about the codec (enough to rebuild it)."""
        return {"name": "ToyCodec", "factor": self.factor, "mean": list(self.mean), "std": list(self.std)}

    def encode(self, video):
        """video [B, F, H, W, 3] in [−1, 1] -> latents [B, T, h, w, C] (T = F)."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"expected video [B, F, H, W, 3], got shape {tuple(video.shape)}")
        b, f, height, width, _ = video.shape
        _, h, w, c = self.latent_shape(f, height, width)
        s = self.factor
        blocks = video.reshape(b, f, h, s, w, s, 3).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, f, h, w, c)
        return (blocks - self._mean) / self._std

    def decode(self, latents):
        """latents [B, T, h, w, C] -> video [B, F, H, W, 3] (F = T), the exact inverse of `encode`."""
        if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
            raise ValueError(f"expected latents [B, T, h, w, {self.latent_channels}], got {tuple(latents.shape)}")
        b, t, h, w, _ = latents.shape
        s = self.factor
        pixels = latents * self._std + self._mean
        return pixels.reshape(b, t, h, w, s, s, 3).transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, h * s, w * s, 3)
