"""The XLA settings of the test processes. `conftest.py` puts the fast-compile flag in the environment on the CPU and
every subprocess inherits it; these helpers add a device count to the inherited flags, or take the compile
shortcuts out for a test whose subject is the default program."""

from __future__ import annotations

import os

FAST_COMPILE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"
_DEVICE_COUNT = "xla_force_host_platform_device_count"


def with_fast_compile(flags: str) -> str:
    """`flags` plus FAST_COMPILE_XLA_FLAG, unless they already set that flag either way."""
    return flags if "xla_cpu_use_fusion_emitters" in flags else f"{flags} {FAST_COMPILE_XLA_FLAG}".strip()


def without_device_count(flags: str) -> str:
    return " ".join(f for f in flags.split() if _DEVICE_COUNT not in f)


def host_device_flags(devices: int) -> str:
    """`XLA_FLAGS` for a child with `devices` fake CPU devices, keeping the flags this process runs with."""
    return f"{without_device_count(os.environ.get('XLA_FLAGS', ''))} --{_DEVICE_COUNT}={devices}".strip()


def default_compiler(env: dict[str, str], keep_cache: bool = False) -> dict[str, str]:
    """`env` without the suite's compile shortcuts: XLA's default optimisations and emitters, and no compilation
    cache unless `keep_cache`."""
    dropped = ("JAX_DISABLE_MOST_OPTIMIZATIONS",) + (() if keep_cache else ("JAX_COMPILATION_CACHE_DIR",))
    env = {k: v for k, v in env.items() if k not in dropped}
    flags = " ".join(f for f in env.pop("XLA_FLAGS", "").split() if f != FAST_COMPILE_XLA_FLAG)
    return env | ({"XLA_FLAGS": flags} if flags else {})
