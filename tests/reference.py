"""The PyTorch references (diffusers' `WanTransformer3DModel`) at tiny random sizes, and how to compare with them.

Every param is re-drawn non-zero (diffusers zero-inits nothing here, but a zero head or bias would hide layout bugs).
"""

from __future__ import annotations

import numpy as np
import torch

from uvigu.models import wan_keys
from uvigu.models.wan import WanConfig


def diffusers_wan(cfg: WanConfig, seed: int = 0, dtype=torch.float32):
    """A random diffusers Wan transformer with `cfg`'s architecture, every param ~ N(0, 0.2²) + offset."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(**wan_keys.diffusers_config(cfg))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if p.ndim > 1 else 0.1
            offset = 1.0 if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * scale + offset)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def diffusers_forward(model, x_channels_last: np.ndarray, timestep: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Runs diffusers on channels-last latents and returns channels-last output (float32 numpy)."""
    dtype = next(model.parameters()).dtype
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_channels_last, -1, 1))).to(dtype)
    with torch.no_grad():
        y = model(x, torch.from_numpy(np.asarray(timestep)), torch.from_numpy(context).to(dtype),
                  return_dict=False)[0]
    return np.moveaxis(y.float().numpy(), 1, -1)


def rel_err(a, b) -> float:
    """‖a − b‖ / ‖b‖ over the whole tensor."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
