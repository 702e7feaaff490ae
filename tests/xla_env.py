"""The XLA settings of the subprocesses tests start. They inherit the fast-compile defaults `conftest.py` puts in the
environment; these add a device count to them, or take them out for a test whose subject is the default program."""

from __future__ import annotations

import os

FAST_COMPILE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"  # (conftest.py adds it on the CPU)


def host_device_flags(devices: int) -> str:
    """`XLA_FLAGS` for a child with `devices` fake CPU devices, keeping the flags this process runs with."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def default_compiler(env: dict[str, str]) -> dict[str, str]:
    """`env` without the suite's compile shortcuts: XLA's default optimisations and emitters, no compilation cache."""
    env = {k: v for k, v in env.items() if k not in ("JAX_DISABLE_MOST_OPTIMIZATIONS", "JAX_COMPILATION_CACHE_DIR")}
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != FAST_COMPILE_XLA_FLAG)
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env
