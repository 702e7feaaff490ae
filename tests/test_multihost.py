"""Multi-process training on localhost (2 processes × 2 CPU devices, gloo collectives), against one process on one
device: the same losses, params and evaluation (the global batch and its random draws do not depend on the process
count; evaluation batches are split over all four devices), for the DiT and for the unified model; checkpoints that
move between process counts; the export written by every process; a SIGTERM reaching one process stopping both at
the same step with a save and exit 0, and stopping both at once during a compilation or an evaluation."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xla_env import default_compiler, without_device_count

from uvigu import run_config

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "model.wan.num_layers": 1, "model.wan.dim": 32, "model.wan.ffn_dim": 64, "model.wan.num_heads": 2,
    "model.wan.text_len": 16, "init.kind": "scratch", "init.path": "",
    "data.train_size": 64, "data.val_size": 16, "data.test_size": 16, "data.global_batch_size": 4,
    "optim.schedule": "constant", "optim.warmup_steps": 1,
    "total_steps": 4, "log_every": 1, "ckpt_every": 2, "eval_every": 0, "eval_examples": 0,
}
STEP_LINE = re.compile(r"(?:\] ?|absl:)\[(\d+)\] .*\bloss=")  # the metric writer's log line of a step
EVAL = {"eval_examples": 8, "eval_batch_size": 4, "sample.num_steps": 2}  # at the end: 2 batches per split

_CHILD = """
import json, os, sys
import jax
from absl import logging
logging.set_verbosity(logging.INFO)  # (the progress lines the tests wait for)
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
    env["XLA_FLAGS"] = without_device_count(env.get("XLA_FLAGS", ""))  # (the child sets its count)
    return root, env


def _config(root: Path, stage: str = "pretrain_t2v", **overrides) -> Path:
    c = run_config.load(stage, "tiny")
    c.update_from_flattened_dict({**TINY, "data.path": str(root / "world"), **overrides})
    path = root / f"config-{len(list(root.glob('config-*')))}.json"
    path.write_text(c.to_json())
    return path


def _start(env, config: Path, workdir: Path, processes: int, devices: int) -> list[subprocess.Popen]:
    """The processes of one run; process i's log goes to WORKDIR.logI.txt."""
    port = _free_port()
    procs = []
    for i in range(processes):
        with open(str(workdir) + f".log{i}.txt", "w") as log:
            procs.append(subprocess.Popen([sys.executable, "-c", _CHILD, str(processes), str(i), str(port),
                                           str(devices), str(config), str(workdir), str(workdir) + f".out{i}.json"],
                                          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True))
    return procs


def _log(workdir: Path, i: int) -> str:
    return Path(str(workdir) + f".log{i}.txt").read_text()


def _kill(procs: list[subprocess.Popen]) -> None:
    """A run that hangs or fails its test must not outlive it (and slow every later test)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _finish(procs: list[subprocess.Popen], workdir: Path, timeout: float = 600) -> None:
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        _kill(procs)
    for i, p in enumerate(procs):
        assert p.returncode == 0, _log(workdir, i)[-3000:]


def _run(env, config, workdir, processes, devices) -> list[dict]:
    _finish(_start(env, config, workdir, processes, devices), workdir)
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
    """Four steps with 2 processes x 2 devices and with 1 process x 1 device (checkpoints at 2 and 4), each evaluated
    at the end."""
    root, env = setup
    config = _config(root, **EVAL)
    two = _run(env, config, root / "two", 2, 2)
    one = _run(env, config, root / "one", 1, 1)
    return config, two, one


def _gif_frames(path: Path) -> np.ndarray:
    from PIL import Image, ImageSequence

    return np.stack([np.asarray(f.convert("RGB"), np.int16) for f in ImageSequence.Iterator(Image.open(path))])


def _assert_same_evaluation(a: Path, b: Path, step: int, modes: tuple[str, ...]):
    """The evaluation reports of two workdirs agree, and so do their samples (the generated clips, the captions)."""
    report_a, report_b = (json.loads((w / "eval" / f"step_{step}.json").read_text()) for w in (a, b))
    for split in ("validation", "test"):
        assert sorted(report_a[split]) == sorted(modes)
        assert report_a[split] == report_b[split], split
        samples_a, samples_b = a / "samples" / f"step_{step}" / split, b / "samples" / f"step_{step}" / split
        assert (samples_a / "captions.txt").read_text() == (samples_b / "captions.txt").read_text()
        gifs = sorted(p.name for p in samples_a.glob("*.gif"))
        assert gifs and gifs == sorted(p.name for p in samples_b.glob("*.gif"))
        for name in gifs:  # (a palette image: allow one level of rounding)
            np.testing.assert_allclose(_gif_frames(samples_a / name), _gif_frames(samples_b / name), atol=1,
                                       err_msg=f"{split}/{name}")


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

    # (loaded in the run's layer layout: the tiny configs loop over layers, the folder holds them stacked)
    run_layout = run_config.load("pretrain_t2v", "tiny").model.wan.scan_layers
    exported = {k: np.asarray(v) for k, v in flat_params.state_to_flat_params(
        checkpoint.load_pretrained(root / "two" / "export", scan_layers=run_layout)).items()}
    _assert_close(exported, _params(root / "two", 4), "export vs last checkpoint", rtol=0)
    assert not list((root / "two" / "export").glob(".*partial*"))
    # The final evaluation, its batches split over the 4 devices of 2 processes, scores what 1 device scores.
    _assert_same_evaluation(root / "two", root / "one", 4, modes=("t2v",))


def test_unified_model_trains_and_evaluates_the_same_on_two_processes(setup, runs):
    """Stage 1 (UniViGU: both flows, then T2V, V2T and joint sampling in the evaluation) from the DiT exported above,
    on 2 processes x 2 devices and on 1 device: the same losses, params and evaluation."""
    root, env = setup
    config = _config(root, "stage1", **EVAL, total_steps=2, **{"init.kind": "wan",
                                                               "init.path": str(root / "two" / "export" / "dit")})
    two = _run(env, config, root / "stage1-two", 2, 2)
    one = _run(env, config, root / "stage1-one", 1, 1)
    np.testing.assert_allclose([r["loss"] for r in two[0]["history"]], [r["loss"] for r in one[0]["history"]],
                               rtol=1e-5)
    _assert_close(_params(root / "stage1-two", 2), _params(root / "stage1-one", 2), "stage-1 params after 2 steps")
    _assert_same_evaluation(root / "stage1-two", root / "stage1-one", 2, modes=("t2v", "v2t", "joint"))


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
    config = _config(root, total_steps=10_000, ckpt_every=10_000, log_every=1)
    workdir = root / "sigterm"
    procs = _start(env, config, workdir, 2, 2)
    try:
        deadline = time.monotonic() + 300
        while not STEP_LINE.search(_log(workdir, 0)):  # into the loop (compiled, stepping, steps unsaved)
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
    except BaseException:
        _kill(procs)
        raise
    _finish(procs, workdir, timeout=120)
    outs = [json.loads(Path(str(workdir) + f".out{i}.json").read_text()) for i in range(2)]
    assert outs[0]["stopped_early"] and outs[1]["stopped_early"]
    assert outs[0]["step"] == outs[1]["step"] and outs[0]["step"] < 10_000
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [outs[0]["step"]]  # the stop step was saved, by both (one checkpoint)


@pytest.mark.parametrize("when, signalled", [("compilation", (1,)), ("evaluation", (1,)), ("compilation", (0, 1))])
def test_sigterm_during_compilation_or_evaluation_stops_both_at_once(setup, when, signalled):
    """Nothing unsaved on either process (the first step still compiling; the final evaluation, after the last
    save): SIGTERM to process 1 (or to both, as a preemption does) ends both within seconds, exit 0, without
    waiting for the compile or the evaluation to return (their main threads are inside XLA), nothing half-written."""
    root, env = setup
    workdir = root / f"sigterm-{when}-{len(signalled)}"
    if when == "compilation":  # a model no other test compiles, default optimisations, no compilation cache
        env = default_compiler(env)
        config = _config(root, **{"model.wan.num_layers": 3, "model.wan.dim": 48, "model.wan.num_heads": 3})
        ready = lambda: "trainable)" in _log(workdir, 0) and "trainable)" in _log(workdir, 1)
    else:  # 2 x 32 clips, 200 sampling steps each (seconds even on a fast machine), after the step-2 save and export
        config = _config(root, total_steps=2, eval_examples=32, eval_batch_size=4, **{"sample.num_steps": 200})
        ready = lambda: all("evaluation at step 2:" in _log(workdir, i) for i in range(2))
    procs = _start(env, config, workdir, 2, 2)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _log(workdir, 0)[-3000:]
            time.sleep(0.05)
        if when == "compilation":
            time.sleep(1.0)  # inside the compile (the evaluation is under way once both logged its start)
        for i in signalled:
            procs[i].send_signal(signal.SIGTERM)
        start = time.monotonic()
        for p in procs:
            p.wait(timeout=120)
        seconds = time.monotonic() - start
    finally:
        _kill(procs)
    logs = [_log(workdir, i) for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert seconds < (10 if when == "compilation" else 30), f"{seconds:.1f} s to stop both after SIGTERM in {when}"
    for text in logs:
        assert "nothing unsaved since the last checkpoint on any process: stopping now" in text
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    if when == "compilation":
        assert steps == [] and not any(STEP_LINE.search(text) for text in logs)
    else:
        assert steps == [2] and not (workdir / "eval").exists()
        assert not list((workdir / "checkpoints").glob("*tmp*"))
    assert not (workdir / ".lock").exists()
    print(f"SIGTERM to {len(signalled)} of 2 processes during {when}: both stopped in {seconds:.2f} s")
