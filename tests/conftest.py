"""Test setup: make `tests/` importable (shared reference helpers) and keep JAX on the CPU unless told otherwise.

Parity tests compare fp32 on the CPU. GPU tests (`-m gpu`) need the GPU visible: run them with
`JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu`; without a GPU they skip.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(config, items):
    import jax

    try:
        has_gpu = bool(jax.devices("gpu"))
    except RuntimeError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with JAX_PLATFORMS=cuda,cpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
