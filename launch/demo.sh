#!/usr/bin/env bash
# `make demo`: the whole system on a built-in default, no download.
#  1. generate small ILSVRC2012-format archives (data_prep.generate: 24 learnable classes, problem files planted)
#  2. make prepare-imagenet on them, exactly as on the real archives
#  3. train ResNet-18 with torchrun on all local GPUs, or 2 CPU processes (gloo) without one
#  4. evaluate, plot, and print where everything is
#
# DEMO_DIR  where the generated archives and prepared folder go (default: data/demo)
# RUN_DIR   the run folder (default: runs/demo; removed and redone on each demo)
# NPROC     processes (default: number of GPUs, or 2)
# Extra arguments are config overrides, e.g. `make demo ARGS="schedule.epochs=3"`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEMO_DIR=${DEMO_DIR:-data/demo}
RUN_DIR=${RUN_DIR:-runs/demo}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
start=$SECONDS
say() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - start)); }

say "1/4 generating ILSVRC2012-format archives in $DEMO_DIR/archives"
if [[ ! -f $DEMO_DIR/archives/ILSVRC2012_devkit_t12.tar.gz ]]; then
  "$PYTHON" -m data_prep.generate --out "$DEMO_DIR/archives" --classes 24 --train-per-class 40 50 \
    --val-per-class 10 --size 80 64 --seed 0
else
  echo "reusing $DEMO_DIR/archives"
fi

say "2/4 make prepare-imagenet SRC=$DEMO_DIR/archives DEST=$DEMO_DIR/imagenet"
make --no-print-directory prepare-imagenet SRC="$DEMO_DIR/archives" DEST="$DEMO_DIR/imagenet"

say "3/4 training ResNet-18 with torchrun, $NPROC process(es)"
rm -rf "$RUN_DIR"
NPROC=$NPROC PYTHON=$PYTHON bash launch/single_node.sh configs/demo_resnet18.yaml \
  data.root="$DEMO_DIR/imagenet" run.out_dir="$RUN_DIR" "$@"

say "4/4 evaluating $RUN_DIR/best.pt and plotting"
result=$("$PYTHON" -m imagenet_resnet.evaluate --config "$RUN_DIR/config.yaml" --checkpoint "$RUN_DIR/best.pt" | tail -n 1)
echo "evaluate: $result"
"$PYTHON" -m imagenet_resnet.plot "$RUN_DIR"
classes=$(wc -l < "$DEMO_DIR/imagenet/synsets.txt")
cat <<EOF

Demo done in $((SECONDS - start)) s. Chance is $(( 100 / classes ))% top-1 on these $classes classes.
  run folder   $RUN_DIR  (config.yaml, metrics.jsonl, last.pt, best.pt, curves.png, wandb/)
  data         $DEMO_DIR/imagenet  (train/, val/, train.txt, val.txt, manifest.json)

The real thing:
  make prepare-imagenet SRC=/archives DEST=/data/imagenet
  launch/single_node.sh configs/imagenet_resnet50.yaml data.root=/data/imagenet     # 8 GPUs, one node
  CONFIG=configs/imagenet_resnet50.yaml sbatch --nodes=4 launch/slurm.sbatch data.root=/data/imagenet
  python -m imagenet_resnet.train --config configs/cifar10_resnet56.yaml data.root=data   # CIFAR, one GPU
EOF
