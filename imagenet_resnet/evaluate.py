"""Evaluate a checkpoint on the val set; the last line printed is one JSON object.

    python -m imagenet_resnet.evaluate --config runs/x/config.yaml --checkpoint runs/x/best.pt
    torchrun --nproc_per_node=2 -m imagenet_resnet.evaluate --config ... --checkpoint ...
    # {"val_top1": 76.1, "val_top5": 92.9, "val_images": 50000, "val_loss": 0.96}
"""

from __future__ import annotations

import json

import torch

from imagenet_resnet.checkpoint import load_file, unwrap
from imagenet_resnet.cli import existing_file, parse, parser, run_main
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import init_distributed, shutdown
from imagenet_resnet.errors import UserError
from imagenet_resnet.trainer import build_network, evaluate, use_bf16


def main(argv: list[str] | None = None) -> None:
    p = parser("Evaluate a checkpoint: top-1/top-5 over every val image exactly once.")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="a last.pt or best.pt written by training")
    args, cfg = parse(p, argv)
    dist = init_distributed(cfg.run.device)
    try:
        bf16 = use_bf16(cfg, dist.device)
        _, val_loader, num_classes = build_loaders(cfg, dist, torch.bfloat16 if bf16 else torch.float32)
        net = build_network(cfg, num_classes, dist)
        state = load_file(args.checkpoint)
        try:
            unwrap(net).load_state_dict(state["model"])
        except RuntimeError as err:
            raise UserError(f"{args.checkpoint}: does not fit model {cfg.model.name} with {num_classes} classes: {err}") from err
        result = evaluate(net, val_loader, bf16, dist.device)
        if dist.is_main:
            print(json.dumps({k: result[k] for k in ("val_top1", "val_top5", "val_images", "val_loss")}), flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    run_main(main)
