"""The training loop, one explicit function read top to bottom: setup, data, model, optimiser, checkpoint/resume,
the jitted step, the loop (logging, evaluation, checkpoints, SIGTERM), the end.

Stages (`config.stage`):
  pretrain_t2v  WanDiT alone, video flow matching (the toy world's stand-in for Wan2.1's pretraining);
                exported at the end as a Wan model folder (`WORKDIR/export/dit`).
  stage1        UniViGU, target text = the prompt (Knowledge Recall), init from a Wan model folder.
  stage2        UniViGU, target text = the detailed caption (Capability Refinement), init from a stage-1 workdir.
                Both export a UniViGU model folder at the end (`WORKDIR/export/univigu`).

A workdir holds `run_config.json` (the model it trains: a resumed run must match it), `checkpoints/` (Orbax:
params, optimiser state, RNG, step and the grain iterator), TensorBoard events, `eval/` (JSON per evaluation) and
`samples/`. Resuming is exact: the data order comes back with the iterator state and every step's randomness is
`fold_in(rng, step)`, so an interrupted-then-resumed run reproduces an uninterrupted one bit for bit on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers, periodic_actions
from flax import nnx

from uvigu import atomic_files, checkpoint, flow, run_config, run_data, sharding, stopping
from uvigu import workdir as workdir_lib
from uvigu.data import pipeline
from uvigu.models import lora, lora_formats
from uvigu.models.univigu import UniViGU, text_params
from uvigu.models.wan import WanDiT

RUN_CONFIG_FILE = "run_config.json"


class TrainingError(RuntimeError):
    """A run that cannot start or continue as configured; the message says what and where."""


# ======================================================================================================================
# Losses.
# ======================================================================================================================


def video_flow_loss(dit: WanDiT, batch: dict, key, fc) -> tuple[jax.Array, dict]:
    """pretrain_t2v: ‖v̂_v − u_v‖² averaged over video elements, v̂_v = −DiT(z_τ, (1 − τ)·1000, c)."""
    k_tau, k_noise, k_drop = jax.random.split(key, 3)
    z1 = batch["latents"]
    tau = flow.sample_tau(k_tau, z1.shape[0], fc.tau_sampling, shift=fc.tau_shift, mean=fc.tau_mean, std=fc.tau_std)
    z0 = jax.random.normal(k_noise, z1.shape, z1.dtype)
    context = flow.drop_condition(k_drop, batch["context"], fc.cond_dropout)
    pred = flow.wan_velocity_to_paper(dit(flow.interpolate(z1, z0, tau), flow.tau_to_wan_timestep(tau), context))
    loss = jnp.mean(jnp.square(pred - flow.velocity_target(z1, z0)))
    return loss, {"loss_video": loss}


def unified_flow_loss(model: UniViGU, batch: dict, key, fc) -> tuple[jax.Array, dict]:
    """stage 1 / 2: the uni-flow loss (`flow.uni_flow_loss`) with τ_v, τ_t drawn independently per example, plus,
    for the embedding flow, `rounding_weight` × the rounding cross-entropy that keeps predictions decodable."""
    k_tau, k_nv, k_nt, k_drop = jax.random.split(key, 4)
    z1, ids, mask = batch["latents"], batch["text_ids"], batch["text_mask"]
    k_tau, k_task = jax.random.split(k_tau)
    tau_v, tau_t = flow.sample_uni_tau(k_tau, z1.shape[0], fc.tau_sampling, shift=fc.tau_shift, mean=fc.tau_mean,
                                       std=fc.tau_std)
    tau_v, tau_t = flow.mix_tasks(k_task, tau_v, tau_t, fc.clean_video_prob, fc.clean_text_prob)
    z0 = jax.random.normal(k_nv, z1.shape, z1.dtype)
    # Exact V2T examples (clean video) drop the prompt as inference does; the others keep the usual CFG dropout, so
    # conditional generation stays trained.
    drop_p = jnp.where(tau_v >= 1.0, fc.clean_video_cond_dropout, fc.cond_dropout)
    context = flow.drop_condition(k_drop, batch["context"], drop_p)
    text_flow = model.text_flow
    text_in, text_target = text_flow.corrupt(k_nt, ids, tau_t)
    video_v, text_out = model(flow.interpolate(z1, z0, tau_v), text_in, tau_v, tau_t, context, mask)
    # A modality given clean (τ = 1) has nothing to denoise: its loss term skips that example.
    loss, parts = flow.uni_flow_loss(video_v, flow.velocity_target(z1, z0), text_out, text_target, mask,
                                     text_flow=text_flow, video_weight=(tau_v < 1.0).astype(jnp.float32),
                                     text_weight=(tau_t < 1.0).astype(jnp.float32))
    metrics = {"loss_video": parts["video"], "loss_text": parts["text"]}
    rounding = text_flow.auxiliary_loss(text_in, text_out, tau_t, ids, mask)
    if rounding is not None and fc.rounding_weight:
        loss = loss + fc.rounding_weight * rounding
        metrics["loss_rounding"] = rounding
    return loss, metrics


# ======================================================================================================================
# Pieces of setup.
# ======================================================================================================================


def model_description(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """What a workdir's checkpoints are: the stage's model kind and its architecture (not execution options)."""
    wan = run_config.wan_config(c).to_dict()
    for name in checkpoint.EXECUTION_FIELDS:
        wan.pop(name, None)
    desc = {"model": "wan_dit" if c.stage == "pretrain_t2v" else "univigu", "wan": wan}
    if c.stage != "pretrain_t2v":
        desc["univigu"] = run_config.univigu_config(c).to_dict()
    if c.optim.trainable == "lora":  # the checkpoints then hold adapters next to the frozen base
        desc["lora"] = lora_config(c).to_dict()
    return json.loads(json.dumps(desc))  # tuples -> lists, as read back from JSON


def lora_config(c: ml_collections.ConfigDict) -> lora.LoRAConfig:
    return lora.LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, targets=tuple(c.lora.targets))


def _check_same_model(found: dict, expected: dict, where: Path) -> None:
    if found == expected:
        return
    diffs = []
    for section in sorted(set(found) | set(expected)):
        a, b = found.get(section), expected.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{section}.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{section}: checkpoint {a!r} vs config {b!r}")
    raise TrainingError(f"{where} holds a checkpoint of a different model; refusing to resume or overwrite it. "
                        f"Differences: {'; '.join(diffs)}. Use a new --workdir.")


def create_model(c: ml_collections.ConfigDict, mesh) -> nnx.Module:
    """The stage's model, built straight into its shards (`jax.eval_shape` first, then a sharded init), then
    initialised from `config.init` (scratch | wan | stage); with `optim.trainable='lora'`, LoRA adapters are added
    around the initialised (then frozen) weights."""
    model = _create_base_model(c, mesh)
    if c.optim.trainable == "lora":
        lora.add_lora(model, lora_config(c), rngs=nnx.Rngs(c.seed + 2))
    return model


def _create_base_model(c: ml_collections.ConfigDict, mesh) -> nnx.Module:
    check_init_source(c)  # before the (possibly large) init; the loop calls it even earlier, before its workdir
    wcfg, seed = run_config.wan_config(c), c.seed
    if c.stage == "pretrain_t2v":
        make = lambda: WanDiT(wcfg, rngs=nnx.Rngs(seed))
    else:
        ucfg = run_config.univigu_config(c)
        make = lambda: UniViGU(WanDiT(wcfg, rngs=nnx.Rngs(seed)), ucfg, rngs=nnx.Rngs(seed + 1))
    model = sharding.sharded_init(make, mesh)

    kind, path = c.init.kind, c.init.path
    if kind == "scratch":
        return model
    if kind == "wan":
        execution = {k: getattr(wcfg, k) for k in checkpoint.EXECUTION_FIELDS}
        architecture = {k: v for k, v in wcfg.to_dict().items() if k not in checkpoint.EXECUTION_FIELDS}
        try:
            dit = checkpoint.load_pretrained(path, mesh=mesh, kind=checkpoint.WAN_DIT, **execution, **architecture)
        except checkpoint.CheckpointError as e:
            raise TrainingError(f"cannot initialise from {path}: {e}") from e
        target = model if c.stage == "pretrain_t2v" else model.dit
        nnx.update(target, nnx.state(dit, nnx.Param))
        if c.stage != "pretrain_t2v":
            model.inherit_from_dit()
        return model
    if kind == "stage":
        src = Path(path)
        found = json.loads((src / RUN_CONFIG_FILE).read_text())["model"]
        _check_same_model(found, model_description(c), src)
        with ocp.CheckpointManager((src / "checkpoints").absolute()) as mngr:
            step = mngr.latest_step()
            if step is None:
                raise TrainingError(f"init workdir {src} has no checkpoint")
            params = nnx.state(model, nnx.Param)
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=_restore_into({"params": _abstract(params)}, partial_restore=True)))
        _update_from_pure_dict(model, params, restored["state"]["params"])
        logging.info("initialised params from %s step %d", src, step)
        return model
    raise AssertionError(kind)  # check_init_source admits nothing else


INIT_KINDS = ("scratch", "wan", "stage")


def check_init_source(c: ml_collections.ConfigDict) -> None:
    """Fails fast (before a workdir, a dataset or a model exists) on an init source that cannot be loaded."""
    kind, path = c.init.kind, c.init.path
    if kind not in INIT_KINDS:
        raise TrainingError(f"config.init.kind={kind!r} is not one of {' | '.join(INIT_KINDS)}")
    if kind == "scratch":
        return
    if not path:
        raise TrainingError(f"config.init.kind={kind!r} needs config.init.path")
    if kind == "wan" and not Path(path).exists():
        hint = ""
        if c.variant == "tiny" and c.stage == "stage1":  # the card's command on a fresh clone: say what comes first
            hint = ("; stage 1 starts from the toy generator: run `python -m uvigu.main --config=configs/pretrain_t2v.py "
                    f"--workdir={Path(path).parent.parent}` first (or `make demo` for all three stages)")
        raise TrainingError(f"init checkpoint {path} does not exist (config.init.path){hint}")
    if kind == "stage" and not (Path(path) / RUN_CONFIG_FILE).exists():
        raise TrainingError(f"init workdir {path} has no {RUN_CONFIG_FILE} (config.init.path)")


def _update_from_pure_dict(module: nnx.Module, state, pure: dict) -> None:
    """Sets `module`'s `state` (taken from it) to the arrays of `pure` (its `nnx.to_pure_dict` form).
    (`nnx.replace_by_pure_dict` fills `state` in place and returns None.)"""
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)


def _abstract(state):
    """ShapeDtypeStructs carrying each array's sharding: Orbax restores straight into the shards."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        nnx.to_pure_dict(state))


def _restore_into(item, partial_restore: bool = False) -> ocp.args.PyTreeRestore:
    """Restores into `item`'s shapes, dtypes and shardings. (Orbax takes the shardings from `restore_args` only;
    without them it reuses the saved ones, which fails on another topology: a run resumed on fewer devices.)"""
    return ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=partial_restore)


def make_optimizer(c: ml_collections.ConfigDict, model: nnx.Module) -> nnx.Optimizer:
    """AdamW (β1 0.9, β2 0.95) behind global-norm clipping, linear warmup then cosine (or constant), guarded so a
    non-finite gradient skips the update instead of poisoning the params."""
    o = c.optim
    if o.schedule == "cosine":
        warmup = max(o.warmup_steps, 1)  # a run shorter than its warmup never reaches the cosine part
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(c.total_steps, warmup + 1),
                                                end_value=o.lr * o.min_lr_ratio)
    elif o.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, max(o.warmup_steps, 1)),
                                   optax.constant_schedule(o.lr)], [max(o.warmup_steps, 1)])
    else:
        raise TrainingError(f"config.optim.schedule={o.schedule!r} is not cosine | constant")
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    if o.get("video_lr_scale", 1.0) != 1.0:  # (checked by run_config.validate: a UniViGU stage, all params)
        tx = _scale_dit_updates(tx, o.video_lr_scale)
    # Never applies a non-finite update (optax gives up after max_consecutive_errors): the loop stops the run at the
    # first non-finite step it checks (every log and every save), so NaN never reaches the params.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)
    return nnx.Optimizer(model, tx, wrt=trainable_filter(c))


def _scale_dit_updates(tx: optax.GradientTransformation, scale: float) -> optax.GradientTransformation:
    """`tx` with the whole update of every DiT param (AdamW step and weight decay) times `scale`: its rate is
    lr × scale. Stateless on top of `tx`, so the optimizer state (and a checkpoint of it) is the same whatever the
    scale: a run resumes under another scale like under another lr."""

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        is_dit = jax.tree_util.tree_map_with_path(
            lambda path, _: not text_params(tuple(_key_name(k) for k in path), None), updates)
        return jax.tree.map(lambda u, dit: u * scale if dit else u, updates, is_dit), state

    return optax.GradientTransformation(tx.init, update)


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _replicate_unplaced(module: nnx.Module, mesh) -> None:
    """Puts every array of `module` that is not on the mesh yet (the optimiser's step counts and finite-update guard
    are created on the default device) onto it, replicated: the jitted step returns them so, and inputs that differ
    from its outputs would compile the step a second time."""
    state = nnx.state(module)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    placed = jax.tree.map(lambda a: a if isinstance(a.sharding, jax.sharding.NamedSharding)
                          else jax.device_put(a, replicated), nnx.to_pure_dict(state))
    _update_from_pure_dict(module, state, placed)


# What a training checkpoint holds of the model: its params and, with LoRA, the adapters.
SAVED = nnx.Any(nnx.Param, lora.LoRAParam)
TRAINABLE = ("all", "lora")


def trainable_filter(c: ml_collections.ConfigDict):
    if c.optim.trainable not in TRAINABLE:
        raise TrainingError(f"config.optim.trainable={c.optim.trainable!r} is not one of {' | '.join(TRAINABLE)}")
    if c.optim.trainable == "lora":
        if c.optim.freeze_video:
            raise TrainingError("config.optim.trainable='lora' trains adapters only; unset config.optim.freeze_video")
        return lora.lora_filter
    if c.optim.freeze_video:
        if c.stage == "pretrain_t2v":
            raise TrainingError("config.optim.freeze_video needs a UniViGU stage (stage1 / stage2)")
        return nnx.All(nnx.Param, text_params)
    return nnx.Param


# ======================================================================================================================
# The loop.
# ======================================================================================================================


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the configured stage in `workdir`; returns the final metrics and evaluation.

    However it ends (an exception included), checkpoint saves still in flight are finished and the previous SIGTERM
    handler is put back."""
    with contextlib.ExitStack() as cleanup:
        return _train_and_evaluate(c, workdir, cleanup)


def _train_and_evaluate(c: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    # ---------------------------------------------------------------------------------------------------- Setup ----
    # SIGTERM is caught from the first line. It stops the run at once when nothing since the last checkpoint would
    # be lost on any process (setup, a compilation, an evaluation after a save), else at the next step boundary,
    # with a save (`uvigu.stopping`).
    stop = cleanup.enter_context(stopping.StopOnSigterm())
    try:
        run_config.validate(c)  # every value, before a workdir, dataset or model exists
    except run_config.ConfigError as e:
        raise TrainingError(str(e)) from None
    check_init_source(c)
    run_config.resolve_from_folder(c)  # the from_folder variant: the architecture of the init folder
    try:
        workdir_path = workdir_lib.local_path(workdir)
    except workdir_lib.WorkdirError as e:
        raise TrainingError(str(e)) from None
    workdir_path.mkdir(parents=True, exist_ok=True)
    description = model_description(c)
    try:  # one run at a time; the same model, stage, init and data as the workdir's run (a new workdir: written)
        lock_note = cleanup.enter_context(workdir_lib.lock(workdir_path, enabled=jax.process_index() == 0))
        if jax.process_index() == 0:  # an immediate stop removes our note (the flock goes with the process)
            stop.before_exit = lambda: lock_note.unlink(missing_ok=True)
        workdir_lib.check_run_config(workdir_path, description, json.loads(c.to_json_best_effort()),
                                     allow_change=bool(c.allow_config_change),
                                     write=jax.process_index() == 0)
    except workdir_lib.WorkdirError as e:
        raise TrainingError(str(e)) from None
    mesh = sharding.make_mesh(c.mesh.to_dict())
    writer = metric_writers.create_default_writer(str(workdir_path), just_logging=jax.process_index() > 0)
    logging.info("stage %s, variant %s, mesh %s, workdir %s", c.stage, c.variant, dict(mesh.shape), workdir_path)

    # ----------------------------------------------------------------------------------------------------- Data ----
    data = run_data.open_datasets(c)
    train_iter = iter(pipeline.training_dataset(data.train, global_batch_size=c.data.global_batch_size,
                                                target=c.data.text_target, seed=c.seed,
                                                loss_on_padding=c.data.loss_on_padding))

    # ---------------------------------------------------------------------------------------------------- Model ----
    # (Not under jax.set_mesh: flax would read the params' *logical* axis names as mesh axes. sharded_init and the
    # restore place every array explicitly; the optimizer's state inherits the params' shardings.)
    model = create_model(c, mesh)
    optimizer = make_optimizer(c, model)
    _replicate_unplaced(optimizer, mesh)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_trainable = sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, trainable_filter(c))))
    logging.info("params: %s (%s trainable)", f"{n_params:,}", f"{n_trainable:,}")
    dit = model.dit if isinstance(model, UniViGU) else model
    data.check_shapes(in_channels=dit.config.in_channels, out_channels=dit.config.out_channels,
                      text_dim=dit.config.text_dim,
                      vocab_size=model.config.vocab_size if isinstance(model, UniViGU) else None)

    # ------------------------------------------------------------------------------------ Checkpoint / resume ----
    mngr = ocp.CheckpointManager(
        workdir_path / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, enable_async_checkpointing=True,
                                             create=True),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
    )
    cleanup.callback(mngr.close)  # waits for saves in flight
    stop.saving_in_progress = mngr.is_saving_in_progress
    rng = jax.random.key(c.seed)
    first_step = 0
    def restore_step(step: int):
        params, opt_state = nnx.state(model, SAVED), nnx.state(optimizer)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=_restore_into({"params": _abstract(params), "opt": _abstract(opt_state),
                                     "rng": np.asarray(jax.random.key_data(rng))})))
        except ValueError as e:
            if "tree structures do not match" not in str(e):
                raise
            # An intact step whose optimizer state has another tree than this config's (the run config's identity
            # keys do not cover optim): not a broken checkpoint, so nothing is moved aside.
            raise workdir_lib.WorkdirError(
                f"checkpoint step {step} in {workdir_path / 'checkpoints'} holds a training state of another structure "
                "than this config builds (a changed config.optim.freeze_video or trainable does that); resume it under "
                "the config it was written with, or use a new --workdir. Nothing was moved. Orbax: "
                f"{str(e)[:300]}") from None
        _restore_data_position(train_iter, workdir_path / "checkpoints" / str(step) / "data", step)
        return params, opt_state, restored

    # A step that does not restore (a truncated file) is moved to checkpoints.broken/ with a warning, and the one
    # before it is used; none intact is an error. The manager is reloaded so it no longer lists a moved step.
    found = workdir_lib.restore_latest_intact(workdir_path / "checkpoints", restore_step,
                                              move_broken=jax.process_index() == 0)
    if found is not None and found[0] != mngr.latest_step():
        mngr.reload()
    if found is not None:
        latest, (params, opt_state, restored) = found
        # (The RNG comes back as host data, uncommitted like a fresh run's key: committed to one device it could
        # not be used with a multi-device mesh.)
        _update_from_pure_dict(model, params, restored["state"]["params"])
        _update_from_pure_dict(optimizer, opt_state, restored["state"]["opt"])
        rng = jax.random.wrap_key_data(jnp.asarray(restored["state"]["rng"]))
        first_step = latest
        logging.info("resumed from step %d", latest)

    def save(step: int, force: bool = False) -> None:
        # The RNG key is the same on every process: saved as host numpy (a single-device jax.Array is "host local"
        # and Orbax refuses it in a multi-process save).
        state = {"params": nnx.to_pure_dict(nnx.state(model, SAVED)),
                 "opt": nnx.to_pure_dict(nnx.state(optimizer)), "rng": np.asarray(jax.random.key_data(rng))}
        with stop.hold_exit():  # an immediate stop happens before the save or after it has started, not during
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                    data=grain.checkpoint.CheckpointSave(train_iter)), force=force)
            stop.unsaved = False  # (the save still in flight is seen through stop.saving_in_progress)

    # ---------------------------------------------------------------------------------------------- Train step ----
    loss_fn = video_flow_loss if c.stage == "pretrain_t2v" else unified_flow_loss
    wrt = trainable_filter(c)
    fc = c.flow
    # The step hands params and optimiser state back in the shardings they came in with. (Left to XLA, some come out
    # laid out differently, e.g. replicated norm scales split over `tensor`: the layout drifts from the table and the
    # next call compiles the step a second time.)
    model_shardings = jax.tree.map(lambda a: a.sharding, nnx.state(model))
    opt_shardings = jax.tree.map(lambda a: a.sharding, nnx.state(optimizer))

    # The step's key is folded in here, not before the call: an eager fold_in would wait for the step in flight,
    # and the host could not prepare the next step (batch, dispatch) while the device runs this one.
    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, batch, rng, step):
        step_key = jax.random.fold_in(rng, step)
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: loss_fn(m, batch, step_key, fc), has_aux=True, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        nnx.update(model, jax.lax.with_sharding_constraint(nnx.state(model), model_shardings))
        nnx.update(optimizer, jax.lax.with_sharding_constraint(nnx.state(optimizer), opt_shardings))
        return {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}

    # ---------------------------------------------------------------------------------------------------- Loop ----
    # The model and optimiser graphs are walked once here instead of at every call (on the toy model that walk cost
    # ~15 ms of host time a step); their Variables stay shared, so saves and evaluations see every update.
    cached_step = nnx.cached_partial(train_step, model, optimizer)
    hooks = [periodic_actions.ReportProgress(num_train_steps=c.total_steps, writer=writer, every_steps=c.log_every)]
    history: list[dict[str, float]] = []
    pending: list[dict[str, jax.Array]] = []
    step = first_step
    t_start = time.perf_counter()

    def flush_metrics() -> list[dict[str, float]]:
        """The metrics of the steps since the last flush, checked finite and written."""
        rows = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        pending.clear()
        if rows:
            workdir_lib.check_finite(rows, step)  # rows hold steps step - len(rows) + 1 .. step
            writer.write_scalars(step, {k: float(np.mean([r[k] for r in rows])) for k in rows[-1]})
        return rows

    should_stop = stop.requested_anywhere  # agreed by every process
    while step < c.total_steps:
        if should_stop():  # SIGTERM (on any host) during setup, the last step or an evaluation
            break
        batch = pipeline.to_global(next(train_iter), mesh)
        with jax.set_mesh(mesh):
            metrics = cached_step(batch, rng, np.uint32(step))
        step += 1
        stop.unsaved = True
        pending.append(metrics)
        for hook in hooks:
            hook(step)
        if step % c.log_every == 0 or step == c.total_steps:
            history += flush_metrics()
        if step % c.ckpt_every == 0 or step == c.total_steps:
            # Never save NaN: the steps since the last log are checked here too (ckpt_every need not be a multiple
            # of log_every).
            workdir_lib.check_finite([{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)], step)
            save(step)
        if c.eval_every and step % c.eval_every == 0 and step < c.total_steps:
            run_evaluation(c, model, data, writer, step, workdir_path, mesh, should_stop=should_stop)
    if stop.requested:
        history += flush_metrics()
        if step > first_step and mngr.latest_step() != step:
            logging.warning("SIGTERM: saving step %d and stopping", step)
            save(step, force=True)
        else:
            logging.warning("SIGTERM: stopping at step %d (already saved)", step)

    # ----------------------------------------------------------------------------------------------------- End ----
    mngr.wait_until_finished()  # the last save is complete before the export (our SIGTERM handler stays until return)
    result: dict[str, Any] = {"step": step, "history": history, "stopped_early": stop.requested,
                              "seconds": time.perf_counter() - t_start}
    if not stop.requested:
        result["export"] = str(export(c, model, workdir_path, step))
        if c.eval_examples:
            result["eval"] = run_evaluation(c, model, data, writer, step, workdir_path, mesh,
                                            should_stop=should_stop)
    writer.flush()
    return result


def export(c: ml_collections.ConfigDict, model: nnx.Module, workdir: Path, step: int) -> Path:
    """WORKDIR/export: the stage's model as a model folder (a Wan DiT after pretraining, a UniViGU after stages 1
    and 2; returned) and, when the run started from a converted release (a folder with pipeline.json, found along
    the init chain), that release's vae/, umt5/, tokenizer/ and pipeline.json next to it, so that
    `uvigu.pipeline.load(WORKDIR/export)`, `uvigu.caption` and `uvigu.generate` use it as it is. With LoRA the
    adapters are written as export/lora.safetensors (diffusers/PEFT format) and merged into the exported weights.
    Every process calls this (each writes its shards of the model)."""
    out = workdir / "export"
    if lora.has_lora(model):
        adapters = lora.get_adapters(model)
        if jax.process_index() == 0:
            out.mkdir(parents=True, exist_ok=True)
            lora_formats.save_lora(adapters, out / "lora.safetensors", "diffusers")
        lora.remove_lora(model, merge=True)
    path = checkpoint.save_pretrained(out / checkpoint.kind_of(model).subfolder, model, overwrite=True,
                                      source={"kind": f"uvigu {c.stage}", "workdir": str(workdir), "step": step})
    release = release_folder(c)
    if release is not None:
        for part in ("vae", "umt5", "tokenizer"):
            with checkpoint.staged_folder(out / part, overwrite=True) as staging:
                if jax.process_index() == 0:
                    shutil.copytree(release / part, staging, dirs_exist_ok=True)
        if jax.process_index() == 0:
            atomic_files.write_text(out / PIPELINE_FILE, (release / PIPELINE_FILE).read_text())
    return path


PIPELINE_FILE = "pipeline.json"


def release_folder(c: ml_collections.ConfigDict) -> Path | None:
    """The converted release this run's weights come from (a folder with pipeline.json), following stage inits back
    to the Wan folder stage 1 started from; None for the toy world or a bare DiT folder."""
    kind, path = c.init.kind, c.init.path
    for _ in range(16):  # a chain of stage workdirs, each pointing at its init
        if kind == "wan":
            for folder in (Path(path), Path(path).parent):
                if (folder / PIPELINE_FILE).is_file():
                    return folder
            return None
        if kind != "stage" or not (Path(path) / RUN_CONFIG_FILE).is_file():
            return None
        init = json.loads((Path(path) / RUN_CONFIG_FILE).read_text())["config"]["init"]
        kind, path = init["kind"], init["path"]
    return None


def _restore_data_position(train_iter, folder: Path, step: int) -> None:
    """Puts the data iterator where a run that has done `step` steps is. Each process saved its grain state
    (`process_i-of-n.json`); the position is global (`pipeline.training_dataset`: batch s is the same global rows
    whatever the process count), so a checkpoint written by another number of processes resumes at `next_index` =
    `step`, and a saved state that disagrees with its step is an error, not a silent data skip."""
    saved = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    state = {"next_index": step}
    if saved.is_file():
        state = json.loads(saved.read_text())
        if state.get("next_index") != step:
            raise TrainingError(f"{saved}: data position {state} does not match checkpoint step {step}")
    else:
        logging.info("data iterator: no %s (written by another process count); resuming at batch %d", saved.name,
                     step)
    train_iter.set_state(state)


def run_evaluation(c, model, data, writer, step: int, workdir: Path, mesh=None, *,
                   should_stop=lambda: False) -> dict[str, Any]:
    """Evaluates the model on the validation and held-out test splits (see `uvigu.evaluate`; each batch split over
    `mesh`'s batch axes, on every process), writes `eval/step_N.json`, scalars, and samples."""
    from uvigu import evaluate

    logging.info("evaluation at step %d: up to %d examples per split", step, c.eval_examples)
    if data.codec is None:  # real latent shards: samples (MP4 + captions), no scorer
        release = release_folder(c) or Path((data.manifest or {}).get("model", {}).get("path", ""))
        report = evaluate.sample_real_data(c, model, data, release=release, workdir=workdir, step=step,
                                           mesh=mesh)
    else:
        report = evaluate.evaluate(c, model, data, workdir=workdir, step=step, mesh=mesh, should_stop=should_stop)
        if report.get("interrupted"):
            logging.warning("SIGTERM: evaluation at step %d interrupted; nothing written", step)
            return report
        writer.write_scalars(step, evaluate.flat_scalars(report))
    if jax.process_index() == 0:
        (workdir / "eval").mkdir(exist_ok=True)
        atomic_files.write_text(workdir / "eval" / f"step_{step}.json", json.dumps(report, indent=2) + "\n")
    return report
