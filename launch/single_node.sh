#!/usr/bin/env bash
# Train on one machine with every GPU it has (or NPROC CPU processes on gloo).
#
#   launch/single_node.sh configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=runs/rn50
#
# NPROC         processes (default: the number of visible GPUs; 2 when there is none)
# MAX_RESTARTS  torchrun restarts the group this often after a worker dies (default 3); each
#               restart resumes from the newest checkpoint in run.out_dir
# PYTHON        interpreter with the package installed (default: .venv/bin/python, else python3)
# Exit status: torchrun's; 143 after SIGTERM/SIGINT, once the workers have saved a checkpoint.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG [section.key=value ...]" >&2; exit 2; }
CONFIG=$1; shift
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
# A config error or a run folder held by another job ends here, once: torchrun would restart the workers on it.
"$PYTHON" -m imagenet_resnet.train --check-config --nproc "$NPROC" --config "$CONFIG" "$@" >/dev/null || exit $?
export PYTHON
exec "$(dirname "$0")/torchrun.sh" --standalone --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  -m imagenet_resnet.train --config "$CONFIG" "$@"
