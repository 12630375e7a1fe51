"""Train a model: one process, or one per GPU under torchrun.

    python -m imagenet_resnet.train --config configs/cifar10_resnet56.yaml data.root=data
    torchrun --standalone --nproc_per_node=8 -m imagenet_resnet.train \\
        --config configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=runs/rn50
    python -m imagenet_resnet.train --check-config --config configs/imagenet_resnet50.yaml schedule.epochs=30
"""

from __future__ import annotations

from imagenet_resnet.cli import parse, parser, run_main
from imagenet_resnet.trainer import run_training


def main(argv: list[str] | None = None) -> None:
    p = parser("Train a ResNet (see configs/ for recipes).")
    p.add_argument("--check-config", action="store_true",
                   help="only validate the config and overrides, then exit (launch scripts do this before torchrun)")
    args, cfg = parse(p, argv)
    if args.check_config:
        print(f"config OK: model {cfg.model.name}, data.dataset={cfg.data.dataset}, run.out_dir={cfg.run.out_dir}")
        return
    run_training(cfg)


if __name__ == "__main__":
    run_main(main)
