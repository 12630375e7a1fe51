#!/usr/bin/env bash
# Train across several machines: run this same command on every node (any order).
#
#   NNODES=4 RDZV_ENDPOINT=node01:29500 RDZV_ID=rn50-try1 \
#     launch/multi_node.sh configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=/shared/runs/rn50
#
# NNODES         number of machines (required)
# RDZV_ENDPOINT  host:port of the rendezvous, reachable from every node; usually the first node (required)
# RDZV_ID        a name for this job, the same on all nodes (default: imagenet-resnet)
# NPROC          processes per node (default: the number of visible GPUs; 1 when there is none)
# MAX_RESTARTS   group restarts after a failure, each resuming from the newest checkpoint (default 3)
# PYTHON         interpreter with the package installed (default: .venv/bin/python, else python3)
# Exit status: torchrun's; 143 after SIGTERM/SIGINT, once the workers have saved a checkpoint.
# run.out_dir must be on storage every node sees: rank 0 writes checkpoints, all ranks read them.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: NNODES=N RDZV_ENDPOINT=host:port $0 CONFIG [section.key=value ...]" >&2; exit 2; }
: "${NNODES:?set NNODES, the number of machines}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port of the first node}"
CONFIG=$1; shift
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')}
# A config error ends here, once, naming the key: torchrun would restart the workers on it. The run
# folder's lease is not checked here: nodes start in any order, and rank 0 of this very job may hold it.
"$PYTHON" -m imagenet_resnet.train --check-config --no-folder-check --nproc $((NNODES * NPROC)) --config "$CONFIG" "$@" >/dev/null || exit $?
export PYTHON
exec "$(dirname "$0")/torchrun.sh" --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-imagenet-resnet}" \
  --max-restarts="${MAX_RESTARTS:-3}" -m imagenet_resnet.train --config "$CONFIG" "$@"
