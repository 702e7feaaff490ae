"""A training workdir that cannot lose data: one run at a time, resumes only of the same run, and a resume that
survives a damaged latest checkpoint.

Layout (see `uvigu.train`): `WORKDIR/run_config.json`, `WORKDIR/checkpoints/<step>/` (Orbax), plus what this module
adds: `WORKDIR/.lock` (who holds the run's lock, a flock on the folder: pid, host, start time; removed on a clean
exit) and
`WORKDIR/checkpoints.broken/<step>/` (a checkpoint that could not be restored, moved out of Orbax's sight so that
keep-N never counts or deletes it and a later save of the same step number is not skipped; kept for inspection).

Facts it relies on:
  * `fcntl.flock` locks belong to the open file (here the workdir folder) and vanish when the process dies (kill -9
    included), so a lock that can be taken is never held by a live run; a `.lock` note found then is from a run
    that died. (flock is per host: process 0 of a multi-host run takes it.)
  * Orbax's CheckpointManager lists only folders named by a step number (and `*.orbax-checkpoint-tmp` for saves in
    flight), and it does not save a step at or below its latest one: a broken latest step must leave the folder.
  * A step is intact when its item metadata is readable and every array restores: the loop's own restore (inside
    try/except) is that check, at no extra cost when the latest step is fine.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from absl import logging

from uvigu import atomic_files

LOCK_FILE = ".lock"
RUN_CONFIG_FILE = "run_config.json"
BROKEN_DIR = "checkpoints.broken"
# The config sections that say which run a workdir holds. A resume under different values is another run: stage 2
# resuming stage 1's checkpoints (and keep-N deleting them) is the case this guards against.
IDENTITY_KEYS = ("stage", "init", "data", "seed")

T = TypeVar("T")


class WorkdirError(RuntimeError):
    """A workdir that this run must not touch (locked, another run's, no intact checkpoint); the message says why."""


class WorkdirLocked(WorkdirError):
    """Another live run holds the workdir's lock."""


# ----------------------------------------------------------------------------------------------------------------------
# The lock.
# ----------------------------------------------------------------------------------------------------------------------


def local_path(workdir: str | os.PathLike) -> Path:
    """`workdir` as an absolute local path. A URL (`gs://…`, `s3://…`) is refused rather than taken for a relative
    folder named `gs:`: everything a run writes relies on POSIX files (the flock, atomic renames, Orbax's local
    commit), so a bucket is used mounted (gcsfuse) and given by its mounted path."""
    if "://" in str(workdir):
        raise WorkdirError(f"--workdir={workdir} is a URL; uvigu writes to local paths. Mount the bucket (e.g. gcsfuse "
                           "at /mnt/bucket) and pass the mounted path")
    return Path(workdir).absolute()


def _describe_holder(text: str) -> str:
    try:
        note = json.loads(text)
        return f"pid {note['pid']} on {note['host']}, started {note['time']}"
    except (ValueError, KeyError, TypeError):
        return repr(text[:200]) if text else "unknown holder"


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path]:
    """Holds an exclusive lock on `workdir` (created if missing) for the `with` block.

    The lock is a `flock` on the workdir folder itself (no lock file to leave behind); while held, `WORKDIR/.lock`
    says who holds it (pid, host, start time) and is removed on release. Raises WorkdirLocked, naming the holder,
    while another live process holds it. A note left by a process that died holding the lock (kill -9, a crash) is
    taken over with a warning. `enabled=False` (every process but 0 of a multi-process run, which share one
    workdir) yields without locking.
    """
    workdir = Path(workdir)
    note_path = workdir / LOCK_FILE
    if not enabled:
        yield note_path
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(_read_note(note_path))
            raise WorkdirLocked(f"{workdir} is in use by another run ({holder}); refusing to run a second one on it. "
                                f"Wait for it to end, stop it, or use another --workdir") from None
        previous = _read_note(note_path)
        if previous:  # a clean exit removes the note: this one is from a run that died holding the lock
            logging.warning("taking over the stale lock of %s: %s (that process is gone; it did not exit cleanly)",
                            workdir, _describe_holder(previous))
        note = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        atomic_files.write_text(note_path, note + "\n")
        try:
            yield note_path
        finally:
            with contextlib.suppress(FileNotFoundError):
                note_path.unlink()  # "no run holds this": the next run starts without a warning
    finally:
        os.close(fd)  # releases the flock


def _read_note(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


# ----------------------------------------------------------------------------------------------------------------------
# Which run the workdir holds.
# ----------------------------------------------------------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _differences(found: Mapping[str, Any], expected: Mapping[str, Any], keys, label: str = "workdir") -> list[str]:
    """'key: <label> X vs config Y' for each leaf under `keys` (None: every key) that differs."""
    a, b = _flatten(found), _flatten(expected)
    top = lambda name: name.split(".", 1)[0]  # noqa: E731
    names = sorted(n for n in set(a) | set(b) if keys is None or top(n) in keys)
    missing = object()
    return [f"{n}: {label} {a.get(n, '<absent>')!r} vs config {b.get(n, '<absent>')!r}" for n in names
            if a.get(n, missing) != b.get(n, missing)]


def check_run_config(workdir: str | os.PathLike, description: Mapping[str, Any], config_json: Mapping[str, Any], *,
                     allow_change: bool, write: bool = True) -> None:
    """Makes sure `workdir` holds this run, writing `run_config.json` (atomically) for a new workdir.

    description: the model the checkpoints are (`train.model_description`); a different one is always refused
      (its checkpoints cannot be restored into this model).
    config_json: the run config as JSON (`json.loads(c.to_json_best_effort())`); a resume whose `IDENTITY_KEYS`
      (stage, init, data, seed) differ from the recorded ones is refused, naming each differing key, unless
      `allow_change` (`--config.allow_config_change=true`): then it goes ahead with a warning and the file records the
      new config, with the old one appended to its `previous_configs`.
    write: False on processes other than 0 (they check but leave writing to process 0).
    """
    workdir = Path(workdir)
    path = workdir / RUN_CONFIG_FILE
    description, config_json = json.loads(json.dumps(description)), json.loads(json.dumps(config_json))
    if not path.exists():
        if write:
            atomic_files.write_text(path, json.dumps({"model": description, "config": config_json}, indent=2) + "\n")
        return
    try:
        recorded = json.loads(path.read_text())
        found_model, found_config = recorded["model"], recorded["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise WorkdirError(f"{path} is unreadable ({type(e).__name__}: {e}); refusing to resume into this workdir. "
                           "Use a new --workdir") from None
    model_diffs = _differences(found_model, description, None, "checkpoint")
    if model_diffs:
        raise WorkdirError(f"{workdir} holds a checkpoint of a different model; refusing to resume or overwrite it. "
                           f"Differences: {'; '.join(model_diffs)}. Use a new --workdir.")
    diffs = _differences(found_config, config_json, IDENTITY_KEYS)
    if not diffs:
        return
    if not allow_change:
        raise WorkdirError(f"{workdir} holds another run ({path}); resuming it under this config could train the "
                           f"wrong thing and keep-N would delete its checkpoints. Differing keys: {'; '.join(diffs)}. "
                           "Use a new --workdir, or --config.allow_config_change=true to resume it deliberately.")
    logging.warning("resuming %s under a changed config (allow_config_change): %s", workdir, "; ".join(diffs))
    if write:
        previous = list(recorded.get("previous_configs", [])) + [found_config]
        atomic_files.write_text(path, json.dumps({"model": description, "config": config_json,
                                                  "previous_configs": previous}, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Intact checkpoints.
# ----------------------------------------------------------------------------------------------------------------------


def saved_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The finished steps under `checkpoints_dir` (folders named by a number; saves in flight are `*-tmp`)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def structural_problem(step_dir: str | os.PathLike) -> str | None:
    """What is visibly wrong with an Orbax step folder (None: nothing): missing or unparsable metadata, an empty
    file. Cheap; a truncated array file can still pass it (a restore finds that)."""
    step_dir = Path(step_dir)
    meta = step_dir / "_CHECKPOINT_METADATA"
    if not meta.is_file():
        return f"{meta} is missing"
    items = [p for p in step_dir.iterdir() if p.is_dir()]
    if not items:
        return f"{step_dir} holds no item"
    for f in [meta, *(p / "_METADATA" for p in items if (p / "_METADATA").exists())]:
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            return f"{f} is not valid JSON ({e})"
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size == 0:
            return f"{f} is empty"
    return None


def _restore_as_numpy(step_dir: Path) -> None:
    """Reads every array of the step's `state` item into host memory (what `intact_steps` calls a readable file)."""
    import numpy as np
    import jax
    import orbax.checkpoint as ocp

    path = (step_dir / "state").absolute()
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def intact_steps(checkpoints_dir: str | os.PathLike) -> list[int]:
    """The steps whose folder is structurally sound and whose `state` item restores in full (into host numpy: for
    inspection and tests; at scale the loop's own restore does this check, see `restore_latest_intact`)."""
    out = []
    for step in saved_steps(checkpoints_dir):
        step_dir = Path(checkpoints_dir) / str(step)
        if structural_problem(step_dir) is not None or not (step_dir / "state").is_dir():
            continue
        try:
            _restore_as_numpy(step_dir)
        except Exception:  # noqa: BLE001 (any failure to read is "not intact")
            continue
        out.append(step)
    return out


def quarantine(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Moves a broken step out of Orbax's folder into `WORKDIR/checkpoints.broken/<step>[-n]` (nothing is deleted)."""
    checkpoints_dir = Path(checkpoints_dir)
    dest_root = checkpoints_dir.parent / BROKEN_DIR
    dest_root.mkdir(exist_ok=True)
    dest, n = dest_root / str(step), 1
    while dest.exists():
        dest, n = dest_root / f"{step}-{n}", n + 1
    os.rename(checkpoints_dir / str(step), dest)
    return dest


def restore_latest_intact(checkpoints_dir: str | os.PathLike, restore: Callable[[int], T], *,
                          move_broken: bool = True) -> tuple[int, T] | None:
    """Restores the newest step that restores: `restore(step)` for the saved steps, newest first, until one
    succeeds. Each broken step is named in a warning and (with `move_broken`, on process 0 only) moved to
    `checkpoints.broken/`; afterwards reload the CheckpointManager (`mngr.reload()`), which still lists it.

    Returns (step, restore's result), or None when no step was ever saved. Raises WorkdirError, naming every broken
    step and why, when steps exist but none restores; a WorkdirError from `restore` itself (an intact step this run
    cannot take) goes straight up, moving nothing."""
    checkpoints_dir = Path(checkpoints_dir)
    broken: list[str] = []
    for step in reversed(saved_steps(checkpoints_dir)):
        problem = structural_problem(checkpoints_dir / str(step))
        if problem is None:
            try:
                return step, restore(step)
            except WorkdirError:  # `restore` found the step intact but not this run's: not broken, nothing to move
                raise
            except Exception as e:  # noqa: BLE001 (TensorStore, Orbax, grain: any other failure means "broken")
                problem = f"{type(e).__name__}: {str(e)[:500]}"
        where = checkpoints_dir / str(step)
        if move_broken:
            where = quarantine(checkpoints_dir, step)
        logging.warning("checkpoint step %d in %s is broken (%s); moved to %s, falling back to the previous kept "
                        "step", step, checkpoints_dir, problem, where)
        broken.append(f"step {step} ({problem}; now at {where})")
    if broken:
        raise WorkdirError(f"no intact checkpoint in {checkpoints_dir}: {'; '.join(broken)}. Nothing was deleted; "
                           "start a new --workdir, or init from an earlier export.")
    return None


def choose_resume_step(checkpoints_dir: str | os.PathLike) -> int | None:
    """The newest intact step by `intact_steps`' full check, with a warning naming each newer broken one; None when
    no step was saved; WorkdirError when steps exist but none is intact. (Read-only: nothing moves.)"""
    steps = saved_steps(checkpoints_dir)
    if not steps:
        return None
    good = intact_steps(checkpoints_dir)
    for step in reversed(steps):
        if step in good:
            return step
        logging.warning("checkpoint step %d in %s is broken; falling back to the previous kept step", step,
                        checkpoints_dir)
    raise WorkdirError(f"no intact checkpoint in {checkpoints_dir}: steps {steps} are all broken")


def check_finite(rows: list[Mapping[str, float]], last_step: int) -> None:
    """Raises FloatingPointError naming the first step whose loss or gradient norm is not finite. `rows` are the
    metrics of steps last_step - len(rows) + 1 .. last_step."""
    import math

    for i, r in enumerate(rows):
        if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])):
            bad = last_step - len(rows) + 1 + i
            raise FloatingPointError(f"non-finite loss or gradient norm at step {bad} (updates were skipped; "
                                     f"nothing from it was saved); its metrics {dict(r)}")
