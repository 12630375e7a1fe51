"""Train a model: one process, or one per GPU under torchrun.

    python -m imagenet_resnet.train --config configs/cifar10_resnet56.yaml data.root=data
    torchrun --standalone --nproc_per_node=8 -m imagenet_resnet.train \\
        --config configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=runs/rn50
"""

from __future__ import annotations

from imagenet_resnet.cli import parse, parser, run_main
from imagenet_resnet.trainer import run_training


def main(argv: list[str] | None = None) -> None:
    _, cfg = parse(parser("Train a ResNet (see configs/ for recipes)."), argv)
    run_training(cfg)


if __name__ == "__main__":
    run_main(main)
