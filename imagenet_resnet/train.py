"""Train a model: one process, or one per GPU under torchrun.

    python -m imagenet_resnet.train --config configs/cifar10_resnet56.yaml data.root=data
    torchrun --standalone --nproc_per_node=8 -m imagenet_resnet.train \\
        --config configs/imagenet_resnet50.yaml data.root=/data/imagenet run.out_dir=runs/rn50
    python -m imagenet_resnet.train --check-config --nproc 8 --config configs/imagenet_resnet50.yaml \\
        data.root=/data/imagenet
    # config OK: model resnet50, data.dataset=imagenet (1281167 train / 50000 val images), run.out_dir=runs/default
    # plan: global batch 1024 = 128 x 8 process(es); lr 0.4 = base_lr 0.1 x 1024/256; warmup 6255 steps ...
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from imagenet_resnet.checkpoint import LAST, Position
from imagenet_resnet.cli import parser, positive_int, run_main
from imagenet_resnet.config import Config, load_config
from imagenet_resnet.data import count_images
from imagenet_resnet.distributed import collective_timed_out, init_distributed, laggards, main_only, shutdown
from imagenet_resnet.errors import UserError
from imagenet_resnet.guards import Guards
from imagenet_resnet.lease import hold_lease
from imagenet_resnet.optim import optimizer_steps, plan_text
from imagenet_resnet.trainer import Trainer


def main(argv: list[str] | None = None) -> None:
    p = parser(__spec__.name, "Train a ResNet (see configs/ for recipes).")
    p.add_argument("--check-config", action="store_true",
                   help="check the config, the data and that no other job holds run.out_dir, print the plan (global "
                        "batch, lr, steps, images), then exit; launch scripts do this before torchrun, which would "
                        "restart the workers on such an error")
    p.add_argument("--nproc", type=positive_int, help="with --check-config: the number of processes to plan for "
                   "(default: WORLD_SIZE from torchrun's environment, else 1)")
    p.add_argument("--no-folder-check", action="store_true",
                   help="with --check-config: leave run.out_dir's lease alone (multi-node launches, where rank 0 "
                        "of the same job may hold it already)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.check_config:
        check(cfg, args.nproc or int(os.environ.get("WORLD_SIZE", 1)), folder=not args.no_folder_check)
        return
    run_training(cfg)


def check(cfg: Config, processes: int, folder: bool) -> None:
    """What can be known before asking for GPUs: the data is there, the folder is free, the plan."""
    train_images, val_images = count_images(cfg.data)
    if folder:
        with hold_lease(Path(cfg.run.out_dir), cfg.run.lease_timeout_s):  # as the run will take it, then let go
            pass
    accumulation = cfg.optim.accumulation_steps
    batches = train_images // processes // cfg.data.batch_size  # per rank, as TrainSampler deals them
    steps_per_epoch = optimizer_steps(cfg, batches, processes, accumulation, train_images)
    print(f"config OK: model {cfg.model.name}, data.dataset={cfg.data.dataset} ({train_images} train / {val_images} "
          f"val images), run.out_dir={cfg.run.out_dir}")
    print(f"plan: {plan_text(cfg, processes, accumulation, steps_per_epoch)}", flush=True)


def run_training(cfg: Config) -> list[dict[str, Any]]:
    """Train to cfg.schedule.epochs (continuing a previous run in cfg.run.out_dir); per-epoch records.

    A collective that times out (another rank hung) ends this rank with one line saying where, and
    which ranks had not got there; torchrun then restarts the group, which resumes from last.pt.
    """
    dist = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    guards = Guards(dist.device, Path(cfg.run.out_dir) / LAST)  # a SIGTERM during start-up is noted too
    trainer = None
    try:
        with contextlib.ExitStack() as held:
            held.enter_context(guards.watching_sigterm())
            lease = main_only(lambda: held.enter_context(hold_lease(Path(cfg.run.out_dir), cfg.run.lease_timeout_s)))
            trainer = Trainer(cfg, dist, lease, guards)
            return trainer.fit()
    except RuntimeError as err:
        if not collective_timed_out(err):
            raise
        pos = trainer.position if trainer else Position()
        where = f"epoch {pos.epoch} step {pos.step_in_epoch}" if trainer else "start-up"
        raise UserError(
            f"rank {dist.rank}: a collective timed out after {cfg.run.collective_timeout_s:g} s "
            f"(run.collective_timeout_s) at {where}; {laggards(dist)}. "
            f"Under torchrun's --max-restarts the group restarts and resumes from the newest checkpoint") from None
    finally:
        shutdown()


if __name__ == "__main__":
    run_main(main)
