#!/usr/bin/env bash
# Stage 1 (Knowledge Recall) on a Cloud TPU VM pod slice: the same `python -m uvigu.main` on every host.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a DST=/mnt/shared/wan2.1-1.3b SHARDS=/mnt/shared/shards \
#   WORKDIR=/mnt/shared/runs/stage1 experiments/tpu/launch_stage1.sh [--dry-run] [-- EXTRA_FLAGS...]
#
# Every host of the slice gets the identical command through
# `gcloud compute tpus tpu-vm ssh --worker=all --command=...`; `--jax_distributed` makes each process join the
# others (on Cloud TPU the coordinator, process count and process id are detected), then one global mesh spans every
# chip of the slice. See experiments/tpu/README.md for the setup (checkout + venv on every host, shared folders).
#
# Settings (environment variables):
#   TPU_NAME   the TPU VM (pod slice) name                                              required
#   ZONE       its zone                                                                 required
#   PROJECT    the GCP project                                   default: gcloud's configured project
#   DST        a converted Wan2.1 folder (python -m tools.convert_wan_weights --src RELEASE --dst DST): the
#              weights stage 1 starts from. Read by every host: a shared path (NFS / Filestore, or a bucket
#              mounted with gcsfuse), or a copy at the same path on each host                required
#   SHARDS     latent shards from `python -m uvigu.data.preprocess --out SHARDS`; each process reads its own
#              contiguous block of every global batch, so every host must see all shards  required
#   WORKDIR    checkpoints, TensorBoard, samples and the final export. It must be ONE folder every host writes
#              to (Orbax writes each host's parameter shards into the same checkpoint): a shared filesystem
#              path. The code uses local paths: a gs:// URL is refused, mount the bucket with gcsfuse instead
#                                                                                      required
#   VARIANT    the config variant of configs/stage1.py (the architecture preset)       default: wan2.1-1.3b
#   REPO_DIR   the uvigu checkout on every host (same path everywhere)                 default: ~/uvigu
#   PYTHON     the Python on the hosts that has uvigu and jax[tpu]      default: REPO_DIR/.venv/bin/python
#   LOG        each host's log file (on that host)                                     default: ~/uvigu_stage1.log
#
# Flags:
#   --dry-run  print the gcloud command instead of running it
#   -- ARGS    passed on to `python -m uvigu.main` unchanged (e.g. --config.data.global_batch_size=128)
set -euo pipefail

usage() { sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
extra=()
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "launch_stage1.sh: unknown argument '$1' (flags for uvigu.main go after --)" >&2; exit 2 ;;
  esac
done

missing=()
for name in TPU_NAME ZONE DST SHARDS WORKDIR; do
  [[ -n "${!name:-}" ]] || missing+=("$name")
done
if ((${#missing[@]})); then
  echo "launch_stage1.sh: set ${missing[*]} (see the header of $0)" >&2
  exit 2
fi
for name in DST SHARDS WORKDIR; do
  if [[ "${!name}" == *://* ]]; then
    echo "launch_stage1.sh: $name=${!name} is a URL; uvigu reads and writes local paths: mount the bucket" \
         "on every host (gcsfuse) and give the mounted path" >&2
    exit 2
  fi
done

VARIANT="${VARIANT:-wan2.1-1.3b}"
REPO_DIR="${REPO_DIR:-~/uvigu}"
PYTHON="${PYTHON:-$REPO_DIR/.venv/bin/python}"
LOG="${LOG:-~/uvigu_stage1.log}"

# The training command, one flag per line:
train=(
  "$PYTHON" -m uvigu.main
  # The run config: configs/stage1.py at the variant's architecture (bf16 compute, fp32 master weights and Adam
  # state, remat by name, the paper's stage-1 lr 2e-4, β 0.9 / 0.95, 40K steps, condition dropout).
  "--config=configs/stage1.py:$VARIANT"
  # Where this run lives; rerunning the same command resumes from its latest checkpoint.
  "--workdir=$WORKDIR"
  # jax.distributed.initialize() before anything touches the TPU: every host joins one job, so jax.devices()
  # lists all chips of the slice and the mesh below spans them.
  --jax_distributed
  # The converted Wan2.1 folder the UniViGU model is initialised from (video side pretrained, text side new).
  "--config.init.path=$DST"
  # The latent shards (ArrayRecord + manifest) written by uvigu.data.preprocess.
  "--config.data.path=$SHARDS"
  # Mesh: every chip on the fsdp axis (-1 = all remaining devices): parameters, gradients and optimiser state
  # sharded over the whole slice, the batch split over the same chips (data=1, tensor=1, context=1 by default).
  --config.mesh.fsdp=-1
)
train+=("${extra[@]}")

# Quote a word for the remote shell, leaving a leading ~/ unquoted so each host expands its own home.
q() { if [[ "$1" == "~/"* ]]; then printf '~/%q' "${1#\~/}"; else printf '%q' "$1"; fi; }
remote="cd $(q "$REPO_DIR") && nohup"
for word in "${train[@]}"; do remote+=" $(q "$word")"; done
# nohup, stdin closed, in the background: the SSH session returns and a dropped connection cannot stop a run of
# days; each host writes its own log.
remote+=" > $(q "$LOG") 2>&1 < /dev/null &"

gcloud_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all "--command=$remote")
[[ -n "${PROJECT:-}" ]] && gcloud_cmd+=("--project=$PROJECT")

if ((dry_run)); then
  printf '%q ' "${gcloud_cmd[@]}"
  echo
  exit 0
fi
"${gcloud_cmd[@]}"
echo "started on every host of $TPU_NAME; follow one with:" >&2
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f $LOG'" >&2
