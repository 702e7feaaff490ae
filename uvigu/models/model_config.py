"""What every model config shares: dtype names, named presets, and JSON round trips.

Model configs are frozen dataclasses (architecture + execution fields) deriving from `ModelConfig`; each module
registers its presets on the class (`WanConfig.PRESETS = {...}`) right after defining them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ModelConfig:
    """Mixin for frozen-dataclass model configs with `dtype` (compute) and `param_dtype` (storage) fields."""

    PRESETS: ClassVar[dict[str, Any]] = {}

    def check_dtypes(self) -> None:
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is not one of {tuple(DTYPES)}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self):
        return DTYPES[self.param_dtype]

    @classmethod
    def preset(cls, name: str, **overrides):
        """A named architecture (`cls.PRESETS`), with any field overridden."""
        if name not in cls.PRESETS:
            raise KeyError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls.PRESETS)}")
        return dataclasses.replace(cls.PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
        return cls(**d)
