#!/usr/bin/env bash
# torchrun, passing SIGTERM/SIGINT on (preemption, `docker stop`, `kill`, Ctrl-C): torchrun signals
# the workers, each saves a checkpoint at the next step boundary (none before training has started)
# and exits with status 143. This
# script then exits 143 (128 + SIGTERM: stopped, not finished; run the same command to continue),
# otherwise with torchrun's status. The other launch scripts run torchrun through it.
#
#   PYTHON=.venv/bin/python launch/torchrun.sh --standalone --nproc_per_node=2 -m imagenet_resnet.train ...
set -uo pipefail
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
"$PYTHON" -m torch.distributed.run "$@" &
pid=$!
stopped=""
trap 'stopped=1; kill -TERM "$pid" 2>/dev/null || true' TERM INT
status=0
wait "$pid" || status=$?
while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done  # a trapped signal interrupts wait
if [[ -n $stopped ]]; then
  echo "launch: stopped by a signal (torchrun's status $status); the workers' last lines above say what they saved: run the same command to continue" >&2
  exit 143
fi
exit "$status"
