"""Multi-process training on localhost (2 processes × 2 CPU devices, gloo collectives), against one process on one
device: the same losses and params (the global batch and its random draws do not depend on the process count),
checkpoints that move between process counts, the export written by every process, and a SIGTERM reaching one
process stopping both at the same step with a save and exit 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from uvigu import run_config

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "model.wan.num_layers": 1, "model.wan.dim": 32, "model.wan.ffn_dim": 64, "model.wan.num_heads": 2,
    "model.wan.text_len": 16, "init.kind": "scratch", "init.path": "",
    "data.train_size": 64, "data.val_size": 16, "data.test_size": 16, "data.global_batch_size": 4,
    "optim.schedule": "constant", "optim.warmup_steps": 1,
    "total_steps": 4, "log_every": 1, "ckpt_every": 2, "eval_every": 0, "eval_examples": 0,
}

_CHILD = """
import json, os, sys
import jax
num_processes, process_id, port, devices, config, workdir, out = sys.argv[1:]
jax.config.update("jax_num_cpu_devices", int(devices))
if int(num_processes) > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", int(num_processes), int(process_id))
import ml_collections
from uvigu import train
c = ml_collections.ConfigDict(json.loads(open(config).read()))
result = train.train_and_evaluate(c, workdir)
open(out, "w").write(json.dumps({k: result[k] for k in ("history", "step", "stopped_early")}
                                | {"devices": jax.device_count(), "processes": jax.process_count()}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
               JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return root, env


def _config(root: Path, **overrides) -> Path:
    c = run_config.load("pretrain_t2v", "tiny")
    c.update_from_flattened_dict({**TINY, "data.path": str(root / "world"), **overrides})
    path = root / f"config-{len(list(root.glob('config-*')))}.json"
    path.write_text(c.to_json())
    return path


def _start(env, config: Path, workdir: Path, processes: int, devices: int) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-c", _CHILD, str(processes), str(i), str(port), str(devices),
                              str(config), str(workdir), str(workdir) + f".out{i}.json"],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> None:
    errors = [p.communicate(timeout=timeout)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]


def _run(env, config, workdir, processes, devices) -> list[dict]:
    _finish(_start(env, config, workdir, processes, devices))
    return [json.loads(Path(str(workdir) + f".out{i}.json").read_text()) for i in range(processes)]


def _params(workdir: Path, step: int) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    path = (workdir / "checkpoints" / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        args = ocp.args.PyTreeRestore(restore_args=jax_tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                                  tree))
        state = ckptr.restore(path, args=args)
    return _flat(state["params"])


def jax_tree_map(fn, tree):
    import jax

    return jax.tree.map(fn, tree)


def _flat(tree, prefix="") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


def _assert_close(a: dict, b: dict, what: str, rtol=1e-4):
    assert sorted(a) == sorted(b), what
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-6, err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def runs(setup):
    """Four steps with 2 processes x 2 devices and with 1 process x 1 device (checkpoints at 2 and 4)."""
    root, env = setup
    config = _config(root)
    two = _run(env, config, root / "two", 2, 2)
    one = _run(env, config, root / "one", 1, 1)
    return config, two, one


def test_two_processes_match_one_device(setup, runs):
    root, _ = setup
    _, two, one = runs
    assert two[0]["devices"] == 4 and two[0]["processes"] == 2 and one[0]["devices"] == 1
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[name] for r in two[0]["history"]], [r[name] for r in one[0]["history"]],
                                   rtol=1e-5, err_msg=name)
    assert two[0]["history"] == two[1]["history"]  # both processes log the same global metrics
    _assert_close(_params(root / "two", 4), _params(root / "one", 4), "params after 4 steps")
    # The export at the end is written by both processes and holds the final params.
    from uvigu import checkpoint
    from uvigu.models import flat_params

    exported = {k: np.asarray(v) for k, v in
                flat_params.state_to_flat_params(checkpoint.load_pretrained(root / "two" / "export")).items()}
    _assert_close(exported, _params(root / "two", 4), "export vs last checkpoint", rtol=0)
    assert not list((root / "two" / "export").glob(".*partial*"))


def test_checkpoints_move_between_process_counts(setup, runs):
    """A step-2 checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2, both to the
    uninterrupted run's step 4."""
    root, env = setup
    _, two, one = runs
    for src, processes, devices in (("two", 1, 1), ("one", 2, 2)):
        work = root / f"from-{src}"
        shutil.copytree(root / src, work)
        shutil.rmtree(work / "checkpoints" / "4")
        resumed = _run(env, _config(root), work, processes, devices)
        assert resumed[0]["step"] == 4 and len(resumed[0]["history"]) == 2
        np.testing.assert_allclose([r["loss"] for r in resumed[0]["history"]],
                                   [r["loss"] for r in one[0]["history"][2:]], rtol=1e-5)
        _assert_close(_params(work, 4), _params(root / "one", 4), f"resumed from {src} in {processes} process(es)")


def test_sigterm_to_one_process_stops_both_at_the_same_step(setup):
    root, env = setup
    config = _config(root, total_steps=10_000, ckpt_every=10_000, log_every=1000)
    workdir = root / "sigterm"
    procs = _start(env, config, workdir, 2, 2)
    deadline = time.monotonic() + 300
    while not (workdir / "run_config.json").exists() or not list(workdir.glob("events.out.tfevents*")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.5)
    time.sleep(8)  # into the loop (compiled, stepping)
    procs[1].send_signal(signal.SIGTERM)
    _finish(procs)
    outs = [json.loads(Path(str(workdir) + f".out{i}.json").read_text()) for i in range(2)]
    assert outs[0]["stopped_early"] and outs[1]["stopped_early"]
    assert outs[0]["step"] == outs[1]["step"] and outs[0]["step"] < 10_000
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [outs[0]["step"]]  # the stop step was saved, by both (one checkpoint)
