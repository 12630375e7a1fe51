"""Train a model: one process, or one per GPU under torchrun.

    python -m imagenet_resnet.train --config configs/cifar10_resnet56.yaml data.root=data
    torchrun --standalone --nproc_per_node=8 -m imagenet_resnet.train \\
        --config configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=runs/rn50
    python -m imagenet_resnet.train --check-config --config configs/imagenet_resnet50.yaml schedule.epochs=30
"""

from __future__ import annotations

from pathlib import Path

from imagenet_resnet.cli import parse, parser, run_main
from imagenet_resnet.lease import hold_lease
from imagenet_resnet.trainer import run_training


def main(argv: list[str] | None = None) -> None:
    p = parser("Train a ResNet (see configs/ for recipes).")
    p.add_argument("--check-config", action="store_true",
                   help="only validate the config and overrides and that no other job holds run.out_dir, then exit "
                        "(launch scripts do this before torchrun, which would restart the workers on such an error)")
    p.add_argument("--no-folder-check", action="store_true",
                   help="with --check-config: leave run.out_dir's lease alone (multi-node launches, where rank 0 "
                        "of the same job may hold it already)")
    args, cfg = parse(p, argv)
    if args.check_config:
        if not args.no_folder_check:
            with hold_lease(Path(cfg.run.out_dir), cfg.run.lease_timeout_s):  # as the run will take it, then let go
                pass
        print(f"config OK: model {cfg.model.name}, data.dataset={cfg.data.dataset}, run.out_dir={cfg.run.out_dir}")
        return
    run_training(cfg)


if __name__ == "__main__":
    run_main(main)
