"""Test setup: make `tests/` importable (shared reference helpers) and keep JAX on the CPU unless told otherwise.

Parity tests compare fp32 on the CPU. GPU tests (`-m gpu`) need the GPU visible: run them with
`JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu`; without a GPU they skip.

On the CPU the suite is compile-bound (tiny models, a few steps each), so by default it compiles with XLA's backend
optimisations off (`JAX_DISABLE_MOST_OPTIMIZATIONS`: several times faster to compile; the numbers stay within the
parity tolerances), with XLA:CPU's older loop emitters instead of its MLIR fusion emitters (`XLA_FLAGS` gains
`--xla_cpu_use_fusion_emitters=false`: the tiny train steps compile in about half the time), and shares one
persistent compilation cache between the pytest workers and every subprocess they start (the environment is
inherited). All three are defaults only: set the variable (or that flag) to override it. The tests whose subject is
the default-flag program (the kill -9 bitwise rerun, SIGTERM inside a compile) clear them for their subprocesses
themselves (`xla_env.default_compiler`).
"""

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
from xla_env import with_fast_compile  # noqa: E402  (tests/ is on the path now)
if os.environ["JAX_PLATFORMS"] == "cpu":
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
    os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))


def pytest_configure(config):
    # In the controlling process only (the xdist workers it starts inherit the variables).
    if os.environ["JAX_PLATFORMS"] != "cpu" or hasattr(config, "workerinput"):
        return
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="uvigu-test-jax-cache-")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


# The files by their time on 2 cores (`--durations`, 2026-12-03), longest first: test_multihost 7.5 min, test_faults 5,
# test_train 4.5, ... down to about 15 s. `make test` hands whole files to its workers in collection order (`--dist
# loadfile --no-loadscope-reorder`): long files first, short ones last to even out the end, where one worker idling
# while the other finishes a long file costs wall time. Files not listed (a few seconds each) follow in name order.
LONGEST_FIRST = ("test_multihost.py", "test_faults.py", "test_train.py", "test_real_path.py", "test_pipeline.py",
                 "test_univigu.py", "test_wan_vae.py", "test_demo.py", "test_lora.py", "test_released_univigu.py",
                 "test_wan_parity.py", "test_context_parallel.py", "test_convert_faults.py", "test_notebook.py",
                 "test_checkpoint.py", "test_preprocess.py", "test_sharding.py", "test_cli.py", "test_toy_world.py")


def pytest_collection_modifyitems(config, items):
    import jax

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order inside a file is kept

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
