"""Entry point: `python -m uvigu.main --config=configs/stage1.py[:variant] --workdir=runs/stage1`.

Multi-host (TPU pods, several GPU hosts): pass `--jax_distributed` (coordinator auto-detected on Cloud TPU / SLURM,
or given with `--coordinator_address --num_processes --process_id`); every host runs the same command.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file, e.g. configs/stage1.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, evaluations and samples go.")
_DISTRIBUTED = flags.DEFINE_bool("jax_distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host, optional).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host, optional).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host, optional).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _DISTRIBUTED.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info("JAX process %d / %d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    from uvigu import train  # after jax.distributed: nothing may touch the backend before it

    try:
        result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except train.TrainingError as e:  # a run that cannot start as configured: the message says what to do
        logging.error("%s", e)
        sys.exit(f"error: {e}")
    summary = {k: result[k] for k in ("step", "stopped_early", "seconds", "export") if k in result}
    logging.info("done: %s", json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
