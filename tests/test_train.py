"""The training loop end to end on the toy world, at tiny sizes (one layer, width 32, batch 4, 64 training clips).

  1. two steps of every stage (pretrain_t2v; stage 1 and stage 2 for both text flows), each stage initialised from
     the one before it (the pretrain export; the stage-1 workdir), and the weights handed over exactly;
  2. an interrupted-then-resumed run reproduces an uninterrupted one bit for bit, data order included (and each run
     compiles its train step once);
  3. SIGTERM to `python -m uvigu.main`: exit 0, a checkpoint at the step it stopped at, a run that continues from it;
  4. 8 fake CPU devices (fsdp 4 x tensor 2) give the 1-device numbers; their checkpoint resumes on 8 devices and on 1;
  5. stage 1 from a converted diffusers `WanTransformer3DModel` starts from exactly the converted weights;
  6. bad input (missing init checkpoint, unknown config key, a workdir of another model, a truncated shard) fails
     with a message naming the culprit and leaves nothing damaged;
  7. the NaN guard: a non-finite step raises FloatingPointError naming it; the saved params stay finite;
  8. evaluation writes eval/step_N.json (validation and test, per attribute) and samples.

Speed: every run compiles its train step, which dominates the time on a CPU. This module compiles with
`jax_disable_most_optimizations` (XLA's backend optimisations off: several times faster to compile, and the same
program every time, so bit-exactness checks are unaffected) and keeps compiled programs in a persistent cache under
pytest's cache folder (`.pytest_cache/d/uvigu-jax-cache`), shared with the subprocesses it starts: runs with the same
program (the stage-1 discrete runs, the pretrain runs) compile once, and a second session of this file mostly reuses
them. Both settings are put back when the module ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from xla_env import host_device_flags

from uvigu import checkpoint, run_config, sharding, train
from uvigu import workdir as workdir_lib
from uvigu.data import pipeline, toy_world
from uvigu.data.world import ATTRIBUTES, PROMPT_ATTRIBUTES
from uvigu.models import flat_params

REPO = Path(__file__).resolve().parent.parent

# The tiny run every test starts from (flattened config keys, so the same table feeds `--config.KEY=VALUE` flags).
# Constant lr after a one-step warm-up: the lr of a step does not depend on total_steps, so runs of different lengths
# compile the same train step (and "2 steps, then resume to 4" is the same schedule as "4 steps").
TINY = {
    "model.wan.num_layers": 1, "model.wan.dim": 32, "model.wan.ffn_dim": 64, "model.wan.num_heads": 2,
    "model.wan.text_len": 16,
    "data.train_size": 64, "data.val_size": 16, "data.test_size": 16, "data.global_batch_size": 4,
    "optim.schedule": "constant", "optim.warmup_steps": 1,
    "total_steps": 2, "log_every": 1, "ckpt_every": 2, "eval_every": 0, "eval_examples": 0, "eval_batch_size": 4,
    "sample.num_steps": 2, "sample.num_saved": 2,
    # A mixture in which two steps of batch 4 reach every param (the demo's mostly-V2T mixture may not touch the
    # video-only ones, nor the prompt embedder's kernel when every prompt is dropped).
    "flow.clean_video_prob": 0.25, "flow.clean_text_prob": 0.25, "flow.cond_dropout": 0.5,
}
_SETTINGS: dict[str, str] = {}  # the module's compilation cache folder, for subprocesses


# ----------------------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles(request, tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache

    cache = getattr(request.config, "cache", None)
    folder = str(cache.mkdir("uvigu-jax-cache") if cache is not None else tmp_path_factory.mktemp("jax-cache"))
    names = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    before = {n: jax.config.values[n] for n in names}
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # the cache is set up once per process: set it up again with this folder
    _SETTINGS["cache"] = folder
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    compilation_cache.reset_cache()


def subprocess_env(**extra) -> dict[str, str]:
    """The environment of a child python: CPU, the same compile settings and cache as this module."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true",
               JAX_COMPILATION_CACHE_DIR=_SETTINGS["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The toy world's cache folder, shared by the module (built by the first run that opens it)."""
    return tmp_path_factory.mktemp("toy_world_cache")


def tiny_config(stage: str, world: Path, flow: str = "discrete", **overrides) -> ml_collections.ConfigDict:
    """`configs/{stage}.py:tiny` shrunk by TINY, starting from scratch unless `init__*` overrides say otherwise;
    `overrides` use flattened keys with '__' for '.'."""
    c = run_config.load(stage, "tiny")
    c.update_from_flattened_dict({**TINY, "init.kind": "scratch", "init.path": "", "data.path": str(world),
                                  "model.univigu.text_flow": flow,
                                  **{k.replace("__", "."): v for k, v in overrides.items()}})
    return c


def run(c: ml_collections.ConfigDict, workdir: Path, poison_step: int | None = None) -> dict:
    """`train.train_and_evaluate(c, workdir)` in-process, also returning the batches the loop fed its steps (in
    `result['batches']`, numpy) and the params the run itself started from (`result['start_params']`: the model
    `train.create_model` handed the loop, copied before any step). `poison_step`: that step's latents are NaN."""
    batches, started = [], []
    real = pipeline.to_global
    real_create = train.create_model

    def create_spy(*args, **kwargs):
        model = real_create(*args, **kwargs)
        started.append(model_params(model))
        return model

    def spy(batch, mesh):
        batch = {k: np.array(v) for k, v in batch.items()}
        batches.append(batch)
        if len(batches) == poison_step:
            batch = dict(batch, latents=np.full_like(batch["latents"], np.nan))
        return real(batch, mesh)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "to_global", spy)
        mp.setattr(train, "create_model", create_spy)
        result = train.train_and_evaluate(c, str(workdir))
    result["batches"] = batches
    result["start_params"] = started[0] if started else None
    return result


class _CompileLog(logging.Handler):
    def __init__(self, name: str):
        super().__init__()
        self.pattern, self.count = f"Compiling jit({name})", 0

    def emit(self, record):
        self.count += self.pattern in record.getMessage()


@contextlib.contextmanager
def compiles_of(name: str):
    """Counts the compilations of the jitted function `name` (each logged with jax_log_compiles)."""
    handler, logger, before = _CompileLog(name), logging.getLogger("jax"), jax.config.values["jax_log_compiles"]
    logger.addHandler(handler)
    jax.config.update("jax_log_compiles", True)
    try:
        yield handler
    finally:
        jax.config.update("jax_log_compiles", before)
        logger.removeHandler(handler)


def flat(tree) -> dict[str, np.ndarray]:
    """{dotted path: numpy array} of a nested dict of arrays (pure dict, checkpoint tree)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = np.asarray(leaf)
    return out


def model_params(model) -> dict[str, np.ndarray]:
    return flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def checkpoint_steps(workdir: Path) -> list[int]:
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def checkpoint_state(workdir: Path, step: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """A training checkpoint's {'params', 'opt'} as flat numpy dicts (whatever mesh wrote it)."""
    step = checkpoint_steps(workdir)[-1] if step is None else step
    path = (Path(workdir) / "checkpoints" / str(step) / "state").absolute()
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {"params": flat(state["params"]), "opt": flat(state["opt"])}


_LOOPED = re.compile(r"^(.*?(?:blocks|ffn_t))\.(\d+)\.(.+)$")


def stacked_layout(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat params of a looped model (`blocks.{i}.x`: the toy configs loop over layers) in the stacked layout
    (`blocks.x` [L, ...]) of model folders and scanned models; stacked params come back unchanged."""
    found = [m for m in map(_LOOPED.match, params) if m]
    if not found:
        return params
    prefixes = tuple(sorted({m.group(1) for m in found}))
    return flat_params.stack_blocks(params, max(int(m.group(2)) for m in found) + 1, prefixes)


def assert_params_equal(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str) -> None:
    """Equal params, compared in the stacked layout (a looped run's checkpoints against a model folder)."""
    got, want = stacked_layout(got), stacked_layout(want)
    assert sorted(got) == sorted(want), what
    different = [k for k in want if not np.array_equal(got[k], want[k])]
    assert not different, f"{what}: {len(different)} params differ, e.g. {different[:5]}"


def changed_fraction(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    assert sorted(before) == sorted(after)
    return np.mean([not np.array_equal(before[k], after[k]) for k in before])


def assert_trained(result: dict, steps: int) -> None:
    assert result["step"] == steps and not result["stopped_early"]
    assert len(result["history"]) == steps and len(result["batches"]) == steps
    for row in result["history"]:
        assert {"loss", "grad_norm", "loss_video"} <= set(row)
        assert all(np.isfinite(v) for v in row.values()), row


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------------
# The stage chain, built once and shared: pretrain -> stage 1 (per flow) -> stage 2 (per flow).
# ----------------------------------------------------------------------------------------------------------------------


class Chain:
    def __init__(self, world: Path, root: Path):
        self.world, self.root, self._done = world, root, {}

    def _memo(self, key, make):
        if key not in self._done:
            self._done[key] = make()
        return self._done[key]

    def pretrain(self) -> dict:
        def make():
            c = tiny_config("pretrain_t2v", self.world)
            return dict(config=c, workdir=self.root / "pretrain", result=run(c, self.root / "pretrain"))
        return self._memo("pretrain", make)

    def stage1(self, flow: str) -> dict:
        def make():
            export = self.pretrain()["result"]["export"]
            c = tiny_config("stage1", self.world, flow, init__kind="wan", init__path=export)
            workdir = self.root / f"stage1_{flow}"
            return dict(config=c, workdir=workdir, result=run(c, workdir))
        return self._memo(("stage1", flow), make)

    def stage2(self, flow: str) -> dict:
        def make():
            src = self.stage1(flow)["workdir"]
            # The discrete run also evaluates (test 8): 4 examples per split, 2 sampling steps.
            extra = {"eval_examples": 4} if flow == "discrete" else {}
            c = tiny_config("stage2", self.world, flow, init__kind="stage", init__path=str(src), **extra)
            workdir = self.root / f"stage2_{flow}"
            return dict(config=c, workdir=workdir, result=run(c, workdir))
        return self._memo(("stage2", flow), make)


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory) -> Chain:
    return Chain(world, tmp_path_factory.mktemp("chain"))


def initial_params(c) -> dict[str, np.ndarray]:
    """The params a run of `c` starts from (before any step): `train.create_model` on the run's mesh."""
    return model_params(train.create_model(c, sharding.make_mesh(c.mesh.to_dict())))


# ----------------------------------------------------------------------------------------------------------------------
# 1. Two steps of every stage.
# ----------------------------------------------------------------------------------------------------------------------


def test_pretrain_two_steps(chain):
    run_ = chain.pretrain()
    result, workdir = run_["result"], run_["workdir"]
    assert_trained(result, 2)
    assert checkpoint_steps(workdir) == [2]
    assert json.loads((workdir / train.RUN_CONFIG_FILE).read_text())["model"]["model"] == "wan_dit"
    final = checkpoint_state(workdir)["params"]
    # From scratch the DiT's output projection starts at zero and the first step's lr is 0 (warm-up from 0), so
    # after two steps only the head has moved; the stages below start from a non-zero head and move everything.
    start = result["start_params"]
    assert not np.array_equal(start["proj_out.kernel"], final["proj_out.kernel"])
    # The export is the final params as a Wan model folder.
    export = checkpoint.load_pretrained(result["export"])
    assert_params_equal(model_params(export), final, "export vs final checkpoint")


@pytest.mark.parametrize("flow", ["embedding", "discrete"])
def test_stage1_two_steps_from_pretrain_export(chain, flow):
    run_ = chain.stage1(flow)
    result, workdir = run_["result"], run_["workdir"]
    assert_trained(result, 2)
    assert {"loss_text"} <= set(result["history"][0])
    assert ("loss_rounding" in result["history"][0]) == (flow == "embedding")
    # Stage 1 starts from the pretrain export: the UniViGU's DiT is the exported DiT, param for param.
    start = result["start_params"]
    exported = model_params(checkpoint.load_pretrained(chain.pretrain()["result"]["export"]))
    assert_params_equal({k[len("dit."):]: v for k, v in start.items() if k.startswith("dit.")}, exported,
                        "stage-1 DiT at step 0 vs pretrain export")
    assert len(start) > len(exported)  # plus the text side
    final = checkpoint_state(workdir)["params"]
    assert changed_fraction(start, final) > 0.9


@pytest.mark.parametrize("flow", ["embedding", "discrete"])
def test_stage2_two_steps_from_stage1_workdir(chain, flow):
    run_ = chain.stage2(flow)
    result, workdir = run_["result"], run_["workdir"]
    assert_trained(result, 2)
    # The stage-2 model before its first step is exactly stage 1's last checkpoint.
    start = result["start_params"]
    stage1_final = checkpoint_state(chain.stage1(flow)["workdir"])["params"]
    assert_params_equal(start, stage1_final, "stage-2 params at step 0 vs stage-1 final params")
    assert changed_fraction(start, checkpoint_state(workdir)["params"]) > 0.9
    # Same examples in the same order (same seed) as stage 1, but the target text is the caption, not the prompt.
    s1, s2 = chain.stage1(flow)["result"]["batches"][0], result["batches"][0]
    np.testing.assert_array_equal(s2["latents"], s1["latents"])
    assert not np.array_equal(s2["text_ids"], s1["text_ids"])
    # The stage ends by exporting a UniViGU model folder holding its final params.
    exported = checkpoint.load_pretrained(result["export"])
    assert type(exported).__name__ == "UniViGU" and result["export"].endswith("export/univigu")
    assert exported.config.text_flow == flow
    assert_params_equal(model_params(exported), checkpoint_state(workdir)["params"], "export vs last checkpoint")


# ----------------------------------------------------------------------------------------------------------------------
# 2. Resume equality.
# ----------------------------------------------------------------------------------------------------------------------


def test_resume_reproduces_uninterrupted_run(chain, tmp_path):
    first = chain.stage1("discrete")  # B, part 1: total_steps=2, checkpoint at 2
    workdir_b = tmp_path / "b"
    shutil.copytree(first["workdir"], workdir_b)
    c4 = first["config"].copy_and_resolve_references()
    c4.total_steps = 4
    with compiles_of("train_step") as compiled:
        resumed = run(c4, workdir_b)  # B, part 2: a fresh call resumes at step 2
    assert compiled.count == 1  # the restored state has the shardings the step returns: no second compile
    assert resumed["step"] == 4 and len(resumed["history"]) == 2 and len(resumed["batches"]) == 2
    assert checkpoint_steps(workdir_b) == [2, 4]

    with compiles_of("train_step") as compiled:
        straight = run(c4, tmp_path / "a")  # A: 4 steps, uninterrupted
    assert compiled.count == 1
    assert_trained(straight, 4)
    # Data order: the batches of steps 3-4 are the ones an uninterrupted run reads (not a restart of the stream).
    for i, (a, b) in enumerate(zip(straight["batches"], first["result"]["batches"] + resumed["batches"])):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"batch of step {i + 1}, field {name}")
    assert not np.array_equal(straight["batches"][2]["latents"], straight["batches"][0]["latents"])
    # Every metric of every step, bit for bit (losses, gradient norm); and the final params.
    assert straight["history"] == first["result"]["history"] + resumed["history"]
    assert_params_equal(checkpoint_state(workdir_b)["params"], checkpoint_state(tmp_path / "a")["params"],
                        "final params, resumed vs uninterrupted")


# ----------------------------------------------------------------------------------------------------------------------
# 3. SIGTERM.
# ----------------------------------------------------------------------------------------------------------------------


def _wait_for(predicate, proc, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_sigterm_saves_and_resumes(chain, world, tmp_path):
    chain.pretrain()  # compiles (and caches) the same train step the subprocess runs
    workdir = tmp_path / "run"
    overrides = {**TINY, "data.path": str(world), "total_steps": 100_000, "ckpt_every": 100_000}
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "uvigu.main", "--config=configs/pretrain_t2v.py", f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in overrides.items())]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        steps = re.compile(r"\] ?\[(\d+)\] .*\bloss=")  # the metric writer's log line for a step
        _wait_for(lambda: steps.search(log.read_text()), proc, 240, "a logged training step")
        run_config_text = (workdir / train.RUN_CONFIG_FILE).read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    assert rc == 0, stderr[-3000:]
    saved = checkpoint_steps(workdir)
    match = re.search(r"SIGTERM: saving step (\d+)", stderr)
    assert match and saved == [int(match.group(1))], (saved, stderr[-2000:])
    stopped_at = saved[0]
    assert stopped_at > 0
    assert not [p for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()]  # no half-written save
    assert (workdir / train.RUN_CONFIG_FILE).read_text() == run_config_text
    json.loads(run_config_text)
    assert not (workdir / "export").exists()  # a stopped run is not finished

    # Resume in-process for two more steps: it continues from the saved step.
    c = tiny_config("pretrain_t2v", world, total_steps=stopped_at + 2, ckpt_every=100_000)
    result = run(c, workdir)
    assert result["step"] == stopped_at + 2 and len(result["history"]) == 2
    assert all(np.isfinite(r["loss"]) for r in result["history"])
    assert checkpoint_steps(workdir) == [stopped_at, stopped_at + 2]


# ----------------------------------------------------------------------------------------------------------------------
# 4. 8 fake devices.
# ----------------------------------------------------------------------------------------------------------------------

_CHILD = """
import json, logging, shutil, sys
import jax, ml_collections
from uvigu import train
compiles = []
handler = logging.Handler()
handler.emit = lambda record: compiles.append(1) if "Compiling jit(train_step)" in record.getMessage() else None
logging.getLogger("jax").addHandler(handler)
jax.config.update("jax_log_compiles", True)
config, workdir, copy, out = sys.argv[1:]
c = ml_collections.ConfigDict(json.loads(open(config).read()))
first = train.train_and_evaluate(c, workdir)
first_compiles = len(compiles)
shutil.copytree(workdir, copy)  # the step-2 checkpoint, for a 1-device resume
c.total_steps = 3
resumed = train.train_and_evaluate(c, workdir)  # resume on 8 devices
open(out, "w").write(json.dumps({"devices": jax.device_count(), "history": first["history"],
                                 "resumed": resumed["history"], "compiles": [first_compiles, len(compiles)]}))
"""


def test_eight_devices_match_one(chain, tmp_path):
    one = chain.stage1("discrete")  # 1 device
    c = one["config"].copy_and_resolve_references()
    c.mesh.update(dict(data=1, fsdp=4, tensor=2, context=1))
    (tmp_path / "config.json").write_text(c.to_json())
    out, workdir, copy = tmp_path / "result.json", tmp_path / "run", tmp_path / "step2"
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "config.json"), str(workdir), str(copy),
                           str(out)], cwd=REPO, env=subprocess_env(XLA_FLAGS=host_device_flags(8)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = json.loads(out.read_text())
    assert eight["devices"] == 8
    assert eight["compiles"] == [1, 2]  # one train-step compile per run: its outputs keep the inputs' shardings
    want, got = one["result"]["history"], eight["history"]
    assert len(got) == len(want) == 2
    names = ("loss", "loss_video", "loss_text", "grad_norm")
    for name in names:
        np.testing.assert_allclose([r[name] for r in got], [r[name] for r in want], rtol=1e-5, err_msg=name)
    # The params after an update (step 2 has a non-zero lr) agree too.
    got_p, want_p = checkpoint_state(copy)["params"], checkpoint_state(one["workdir"])["params"]
    assert sorted(got_p) == sorted(want_p)
    for k in want_p:
        np.testing.assert_allclose(got_p[k], want_p[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # The 8-device checkpoint resumes on 8 devices (in the child) and on 1 (here), to the same step 3.
    c1 = one["config"].copy_and_resolve_references()
    c1.total_steps = 3
    resumed = run(c1, copy)
    assert resumed["step"] == 3 and len(resumed["history"]) == 1 and len(eight["resumed"]) == 1
    for name in names:
        np.testing.assert_allclose(eight["resumed"][0][name], resumed["history"][0][name], rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Stage 1 from a converted diffusers checkpoint.
# ----------------------------------------------------------------------------------------------------------------------


def test_stage1_from_converted_diffusers_checkpoint(tmp_path, tmp_path_factory):
    import torch
    from reference import diffusers_wan

    from tools.convert_wan_weights import cli

    # A diffusers folder says nothing of the context length, so the converter records Wan's 512: the run must use
    # the same (its toy world then pads prompt embeddings to 512 rows; a separate cache, the shared one pads to 16).
    world512 = tmp_path_factory.mktemp("toy_world_512")
    c = tiny_config("stage1", world512, "embedding", model__wan__text_len=512)
    wcfg = run_config.wan_config(c)
    reference = diffusers_wan(wcfg, seed=3)
    reference.save_pretrained(tmp_path / "diffusers")
    assert cli.main(["--src", str(tmp_path / "diffusers"), "--dst", str(tmp_path / "converted")]) == 0

    c.init.update(dict(kind="wan", path=str(tmp_path / "converted")))
    start = initial_params(c)
    dit = {k[len("dit."):]: v for k, v in start.items() if k.startswith("dit.")}
    converted = model_params(checkpoint.load_pretrained(tmp_path / "converted"))
    assert_params_equal(dit, converted, "UniViGU DiT at step 0 vs converted checkpoint")
    with torch.no_grad():  # ... and those are the diffusers model's weights
        np.testing.assert_array_equal(dit["proj_out.kernel"], reference.proj_out.weight.numpy().T)
        np.testing.assert_array_equal(dit["scale_shift_table"], reference.scale_shift_table.numpy())

    result = run(c, tmp_path / "run")
    assert_trained(result, 2)
    assert changed_fraction(start, checkpoint_state(tmp_path / "run")["params"]) > 0.9

    # The toy default (context 16) cannot start from it, and says why.
    c16 = tiny_config("stage1", world512, "embedding", init__kind="wan", init__path=str(tmp_path / "converted"))
    with pytest.raises(train.TrainingError, match=r"text_len: checkpoint 512, override 16"):
        train.create_model(c16, sharding.make_mesh(c16.mesh.to_dict()))


# ----------------------------------------------------------------------------------------------------------------------
# 6. Bad input.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wan", "stage"])
def test_missing_init_checkpoint(world, tmp_path, kind):
    missing = tmp_path / "no_such_export" / "dit"
    c = tiny_config("stage1" if kind == "wan" else "stage2", world, init__kind=kind, init__path=str(missing))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.TrainingError, match=re.escape(str(missing))):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert signal.getsignal(signal.SIGTERM) is handler  # a failed run puts the SIGTERM handler back
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_card_command_on_a_fresh_clone_says_what_to_run_first(tmp_path):
    """`python -m uvigu.main --config=configs/stage1.py` with no toy generator yet: no traceback, no workdir, and the
    one command to run first."""
    proc = subprocess.run([sys.executable, "-m", "uvigu.main", f"--config={REPO / 'configs' / 'stage1.py'}",
                           f"--workdir={tmp_path / 'stage1'}"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "configs/pretrain_t2v.py --workdir=runs/pretrain_t2v` first" in proc.stderr
    assert not (tmp_path / "stage1").exists()


def test_unknown_init_kind(world, tmp_path):
    c = tiny_config("stage1", world, init__kind="hub", init__path=str(tmp_path))
    with pytest.raises(train.TrainingError, match=re.escape("init.kind='hub' is not one of scratch | wan | stage")):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_is_an_error(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "uvigu.main", "--config=configs/stage1.py",
                           "--config.nonexistent=1", f"--workdir={workdir}"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "nonexistent" in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists()


def test_workdir_of_another_model_is_refused_untouched(chain, tmp_path):
    src = chain.stage1("discrete")
    workdir = tmp_path / "run"
    shutil.copytree(src["workdir"], workdir)
    before = listing(workdir)
    c = src["config"].copy_and_resolve_references()
    c.model.wan.update(dict(dim=64, num_heads=4))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(train.TrainingError, match=r"wan\.dim: checkpoint 32 vs config 64") as err:
        train.train_and_evaluate(c, str(workdir))
    assert "wan.num_heads" in str(err.value) and str(workdir) in str(err.value)
    assert listing(workdir) == before
    assert signal.getsignal(signal.SIGTERM) is handler


def test_resume_under_another_optimizer_structure_is_refused_untouched(chain, tmp_path):
    # optim is not an identity key of the run config, so the workdir check lets this through; the restore must then
    # name the mismatch rather than file the intact checkpoint as broken and move it to checkpoints.broken/.
    src = chain.stage1("discrete")
    workdir = tmp_path / "run"
    shutil.copytree(src["workdir"], workdir)
    files = lambda: {k: v for k, v in listing(workdir).items() if "tfevents" not in k}  # noqa: E731 (not the logs)
    before = files()
    c = src["config"].copy_and_resolve_references()
    c.update_from_flattened_dict({"optim.freeze_video": True, "total_steps": 4})
    with pytest.raises(workdir_lib.WorkdirError, match=r"checkpoint step 2 in .* holds a training state of another "
                                                       r"structure .* Nothing was moved"):
        train.train_and_evaluate(c, str(workdir))
    assert files() == before and not (workdir / "checkpoints.broken").exists()


def test_truncated_shard_is_named(chain, world, tmp_path):
    chain.pretrain()  # the world exists
    shards = tmp_path / "shards"
    shutil.copytree(world / toy_world.ROOT_NAME, shards)
    victim = sorted(shards.glob("train.array_record-*"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    c = tiny_config("stage1", world, data__kind="shards", data__path=str(shards))
    with pytest.raises(toy_world.CorruptShardError, match=re.escape(str(victim))):
        train.train_and_evaluate(c, str(tmp_path / "run"))


# ----------------------------------------------------------------------------------------------------------------------
# 7. The NaN guard.
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_step_raises_and_saved_params_stay_finite(chain, tmp_path):
    chain.stage1("discrete")  # same program: compiled already
    c = chain.stage1("discrete")["config"].copy_and_resolve_references()
    c.update_from_flattened_dict({"total_steps": 4, "log_every": 2, "ckpt_every": 1})
    workdir = tmp_path / "run"
    # Step 3 sees NaN latents; its update is skipped, and the check before step 3's checkpoint (ckpt_every 1 is not a
    # multiple of log_every 2) stops the run: nothing is saved at or after a non-finite step.
    with pytest.raises(FloatingPointError, match=r"at step 3\b"):
        run(c, workdir, poison_step=3)
    assert checkpoint_steps(workdir) == [1, 2]
    assert all(np.isfinite(v).all() for v in checkpoint_state(workdir, 2)["params"].values())


# ----------------------------------------------------------------------------------------------------------------------
# 7b. The DiT's learning rate apart from the text side's (optim.video_lr_scale).
# ----------------------------------------------------------------------------------------------------------------------


def _second_update(c: ml_collections.ConfigDict) -> tuple[dict[str, np.ndarray], Any]:
    """Each param's change in the second AdamW step (the first is the warm-up's lr 0) of `c`'s UniViGU under the
    same fixed, non-uniform gradients: ({dotted path: delta}, the optimizer state's tree structure)."""
    from uvigu.models.univigu import UniViGU
    from uvigu.models.wan import WanDiT

    model = UniViGU(WanDiT(run_config.wan_config(c), rngs=nnx.Rngs(0)), run_config.univigu_config(c),
                    rngs=nnx.Rngs(1))
    optimizer = train.make_optimizer(c, model)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    grads = jax.tree.unflatten(treedef, [rng.normal(size=np.shape(x)).astype(np.float32) for x in leaves])
    optimizer.update(model, grads)
    before = flat_params.state_to_flat_params(model)
    optimizer.update(model, grads)
    after = flat_params.state_to_flat_params(model)
    deltas = {k: np.asarray(after[k]) - np.asarray(before[k]) for k in before}
    return deltas, jax.tree.structure(nnx.to_pure_dict(nnx.state(optimizer)))


def test_video_lr_scale_slows_only_the_dit(world):
    # Clipping off, so the two optimizers see the same gradients whatever their norm.
    base = tiny_config("stage1", world, optim__clip_norm=1e9, optim__weight_decay=0.1)
    scaled = tiny_config("stage1", world, optim__clip_norm=1e9, optim__weight_decay=0.1, optim__video_lr_scale=0.25)
    run_config.validate(scaled)
    (plain, plain_state), (slow, slow_state) = _second_update(base), _second_update(scaled)
    # The same optimizer state: a checkpoint resumes under another scale (a structure change would make Orbax refuse
    # it, and the loop would file the step as broken).
    assert slow_state == plain_state
    dit = [k for k in plain if k.startswith("dit.")]
    text = [k for k in plain if not k.startswith("dit.")]
    assert dit and text and {k.split(".")[0] for k in text} >= {"ffn_t", "text_head", "vocab_embed"}
    # The whole update (Adam step and weight decay) at a quarter of the rate. The deltas are ~lr = 2e-3 wide; atol is
    # the float32 rounding of `after - before` on params of order 1.
    for k in dit:
        np.testing.assert_allclose(slow[k], 0.25 * plain[k], rtol=1e-4, atol=2e-7, err_msg=k)
    for k in text:
        np.testing.assert_allclose(slow[k], plain[k], rtol=1e-4, atol=2e-7, err_msg=k)
    assert all(np.abs(plain[k]).max() > 0 for k in dit + text)


@pytest.mark.parametrize("stage, overrides, message", [
    ("pretrain_t2v", {"optim__video_lr_scale": 0.5}, "needs stage1 / stage2"),
    ("stage1", {"optim__video_lr_scale": 0.5, "optim__freeze_video": True}, "not LoRA, not freeze_video"),
    ("stage2", {"optim__video_lr_scale": 0.0}, "video_lr_scale=0.0 is out of range"),
    ("stage2", {"optim__video_lr_scale": 1.5}, "video_lr_scale=1.5 is out of range"),
])
def test_video_lr_scale_bad_values_are_named(world, stage, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_config.validate(tiny_config(stage, world, **overrides))


# ----------------------------------------------------------------------------------------------------------------------
# 8. Evaluation.
# ----------------------------------------------------------------------------------------------------------------------


def test_evaluation_report_and_samples(chain):
    run_ = chain.stage2("discrete")  # eval_examples=4, 2 sampling steps
    workdir, report = run_["workdir"], run_["result"]["eval"]
    path = workdir / "eval" / "step_2.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    assert report["step"] == 2 and report["stage"] == "stage2"
    for split in ("validation", "test"):
        section = report[split]
        assert set(section) == {"t2v", "v2t", "joint"}
        assert set(section["t2v"]) == {*PROMPT_ATTRIBUTES, "exact_match", "count"}
        assert set(section["v2t"]) == {*ATTRIBUTES, "exact_match", "count"}  # stage 2: every attribute
        for mode in ("t2v", "v2t"):
            assert section[mode]["count"] == 4
            assert all(0.0 <= v <= 1.0 for k, v in section[mode].items() if k != "count")
        samples = workdir / "samples" / "step_2" / split
        names = {p.name for p in samples.iterdir()}
        assert {"captions.txt", "t2v_0.gif", "t2v_1.gif", "joint_0.gif", "joint_1.gif"} <= names
        assert (samples / "t2v_0.gif").read_bytes()[:6] in (b"GIF87a", b"GIF89a")
        captions = (samples / "captions.txt").read_text()
        assert "generated:" in captions and "joint [0]:" in captions
    # Evaluation is off (eval_examples=0) in the other runs: no report, no samples.
    assert "eval" not in chain.stage2("embedding")["result"]
    assert not (chain.stage2("embedding")["workdir"] / "eval").exists()
