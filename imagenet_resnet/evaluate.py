"""Evaluate a checkpoint on the val set; the last line printed is one JSON object.

The checkpoint's own config (data, model, evaluation settings) applies, with `key=value`
overrides on top; `--config FILE` uses a recipe instead.

    python -m imagenet_resnet.evaluate --checkpoint runs/x/best.pt
    python -m imagenet_resnet.evaluate --checkpoint runs/x/best.pt data.root=/other/copy/of/imagenet
    torchrun --nproc_per_node=2 -m imagenet_resnet.evaluate --checkpoint runs/x/best.pt
    # {"weights": "model", "val_top1": 76.1, "val_top5": 92.9, "val_images": 50000, "val_loss": 0.96}

`--weights ema` evaluates the EMA weights of a run trained with model.ema_decay; by default the
weights that scored best_top1 when the checkpoint was written (best.pt: the better of the two).
"""

from __future__ import annotations

import json

import torch

from imagenet_resnet.checkpoint import load_file, unwrap
from imagenet_resnet.cli import existing_file, parser, run_main
from imagenet_resnet.config import load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import init_distributed, shutdown
from imagenet_resnet.errors import UserError
from imagenet_resnet.inference import WEIGHTS, weights_of
from imagenet_resnet.trainer import amp_dtype, build_network, evaluate


def main(argv: list[str] | None = None) -> None:
    p = parser(__spec__.name, "Evaluate a checkpoint: top-1/top-5 over every val image exactly once.",
               config_help="YAML recipe to use instead of the checkpoint's own config (default: the checkpoint's)")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="a last.pt or best.pt written by training")
    p.add_argument("--weights", choices=tuple(WEIGHTS), help="model or ema (default: those that scored best)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides) if args.config else None  # a bad key: named before anything loads
    state = load_file(args.checkpoint)
    cfg = cfg or load_config(None, args.overrides, state["config"], str(args.checkpoint))
    dist = init_distributed(cfg.run.device)
    try:
        dtype = amp_dtype(cfg, dist.device)
        _, val_loader, num_classes = build_loaders(cfg, dist, dtype or torch.float32)
        net = build_network(cfg, num_classes, dist)
        weights = args.weights or state.get("best_weights", "model")
        try:
            unwrap(net).load_state_dict(weights_of(state, weights, args.checkpoint))
        except RuntimeError as err:
            raise UserError(f"{args.checkpoint}: does not fit model {cfg.model.name} with {num_classes} classes: {err}") from err
        result = evaluate(net, val_loader, dtype, dist.device, cfg.data.val_flip_tta)
        if dist.is_main:
            print(json.dumps({"weights": weights, **{k: result[k] for k in ("val_top1", "val_top5", "val_images",
                                                                             "val_loss")}}), flush=True)
    finally:
        shutdown()


if __name__ == "__main__":
    run_main(main)
