"""Evaluate a checkpoint on the val set; the last line printed is one JSON object.

The checkpoint's own config (data, model, evaluation settings) applies, with `key=value`
overrides on top; `--config FILE` uses a recipe instead.

    python -m imagenet_resnet.evaluate --checkpoint runs/x/best.pt
    python -m imagenet_resnet.evaluate --checkpoint runs/x/best.pt data.root=/other/copy/of/imagenet
    torchrun --nproc_per_node=2 -m imagenet_resnet.evaluate --checkpoint runs/x/best.pt
    # {"weights": "model", "val_top1": 76.1, "val_top5": 92.9, "val_images": 50000, "val_loss": 0.96}

`--weights ema` evaluates the EMA weights of a run trained with model.ema_decay; by default the
weights that scored best_top1 when the checkpoint was written (best.pt: the better of the two).

`--pretrained SOURCE` evaluates published weights on a prepared ImageNet instead, with their own
transform, beside their published figures (imagenet_resnet.pretrained); `--check` (make
check-imagenet) says PASS when top-1 is within 0.1 of the published figure over all 50,000 images
and otherwise what is most likely wrong with the prepared set, exit status 1:

    python -m imagenet_resnet.evaluate --pretrained torchvision:resnet50.IMAGENET1K_V1 data.root=/data/imagenet
    python -m imagenet_resnet.evaluate --pretrained torchvision:resnet50.IMAGENET1K_V1 --check data.root=/data/imagenet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from imagenet_resnet.checkpoint import WEIGHTS, load_checkpoint
from imagenet_resnet.cli import existing_file, parser, run_main
from imagenet_resnet.config import Config, config_to_dict, load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.data.datasets import check_prepared, normalization
from imagenet_resnet.data.loader import loader_workers
from imagenet_resnet.distributed import DistInfo, init_distributed, pick_device, shutdown
from imagenet_resnet.errors import UserError
from imagenet_resnet.evaluation import evaluate
from imagenet_resnet.network import amp_dtype, build_network, load_weights
from imagenet_resnet.published import Published, diagnosis, is_source, load_published, output_index, published_batches


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if (args.checkpoint is None) == (args.pretrained is None):
        p.error("give --checkpoint FILE or --pretrained SOURCE")
    if args.check and not args.pretrained:
        p.error("--check needs --pretrained SOURCE")
    if not args.pretrained:
        evaluate_checkpoint(args.checkpoint, args.weights, args.config, args.overrides)
        return
    if not is_source(args.pretrained) and not args.arch:
        p.error(f"--pretrained {args.pretrained}: not a SOURCE name (torchvision:..., timm:...); "
                f"a weights file needs --arch SOURCE")
    try:
        weights_file = None if is_source(args.pretrained) else existing_file(args.pretrained)
    except argparse.ArgumentTypeError as err:
        p.error(f"--pretrained {err}")
    cfg = load_config(args.config, ["data.dataset=imagenet", *args.overrides])
    evaluate_pretrained(args.arch or args.pretrained, cfg, args.check, weights_file)


def _parser() -> argparse.ArgumentParser:
    p = parser(__spec__.name,
               "Evaluate a checkpoint, or published weights (--pretrained): top-1/top-5 over every val image once.",
               config_help="YAML recipe to use instead of the checkpoint's own config (default: the checkpoint's)")
    p.add_argument("--checkpoint", type=existing_file, help="a last.pt or best.pt written by training")
    p.add_argument("--weights", choices=tuple(WEIGHTS), help="model or ema (default: those that scored best)")
    p.add_argument("--pretrained", metavar="SOURCE",
                   help="published weights instead of a checkpoint, e.g. torchvision:resnet50.IMAGENET1K_V1, "
                        "timm:resnet50.a1_in1k; or a weights file with --arch")
    p.add_argument("--arch", metavar="SOURCE", help="with --pretrained FILE: the SOURCE whose network, transform and "
                                                    "published figures the file's weights go with")
    p.add_argument("--check", action="store_true",
                   help="with --pretrained: PASS within 0.1 of the published top-1 over 50,000 images, "
                        "else a diagnosis and exit 1")
    return p


def evaluate_checkpoint(path: Path, weights: str | None, recipe: str | None, overrides: list[str]) -> None:
    """A checkpoint on the val set, with its own config (or `recipe`) and `overrides`; one JSON line."""
    cfg = load_config(recipe, overrides) if recipe else None  # a bad key: named before anything loads
    saved = load_checkpoint(path)
    cfg = cfg or load_config(None, overrides, saved.config, str(path))
    dist = init_distributed(cfg.run.device)
    try:
        dtype = amp_dtype(cfg, dist.device)
        _, val_loader, num_classes = build_loaders(cfg, dist, dtype or torch.float32)
        net = build_network(cfg, num_classes, dist.device, dist.is_distributed)
        weights = weights or saved.best_weights
        load_weights(net, saved.weights(weights, path), path, cfg.model.name, num_classes)
        result = evaluate(net, val_loader, dtype, dist.device, cfg.data.val_flip_tta)
        if dist.is_main:
            keys = ("val_top1", "val_top5", "val_images", "val_loss")
            print(json.dumps({"weights": weights, **{k: result[k] for k in keys}}), flush=True)
    finally:
        shutdown()


def evaluate_pretrained(source: str, cfg: Config, check: bool, weights_file: Path | None = None) -> None:
    """Published weights on cfg.data.root with their own transform (torchvision's PIL pipeline), or
    through this project's DALI val pipeline at the same sizes with data.loader=dali."""
    root, device = Path(cfg.data.root), pick_device(cfg.run.device)
    check_prepared(root)
    published = load_published(source, weights_file=weights_file)
    loader = "dali" if cfg.data.loader == "dali" and not check else "torchvision"
    if loader == "dali":
        result = dali_published(published, cfg, device)
    else:
        batches = published_batches(published, root, device, loader_workers(cfg.data.workers), cfg.data.batch_size)
        result = evaluate(published.net.to(device), batches, None, device)
    how = (f"{loader} loader: resize {published.resize} {published.interpolation}, centre crop {published.crop}"
           + (" (PIL, the weights' own transform)" if loader == "torchvision" else " (DALI)"))
    print(f"{source} on {result['val_images']:,} val images, {how}: top-1 {result['val_top1']:.3f} (published "
          f"{published.top1 or 'not known here'}), top-5 {result['val_top5']:.3f} (published "
          f"{published.top5 or 'not known here'})", flush=True)
    verdict = None
    if check and published.top1 is None:
        raise UserError(
            f"--check {source}: no published figure to check against; use torchvision:resnet50.IMAGENET1K_V1"
        )
    if check:
        verdict = diagnosis(result["val_top1"], result["val_images"], published.top1, len(output_index(root)))
        try:
            dali = dali_published(published, cfg, device)
            print(
                f"DALI loader at the same sizes: top-1 {dali['val_top1']:.3f} "
                f"({dali['val_top1'] - result['val_top1']:+.3f} "
                f"against the torchvision loader: what DALI's resize costs in evaluation)",
                flush=True,
            )
        except UserError as err:  # DALI not installed: the torchvision figure is the check
            print(f"DALI loader: not evaluated ({err})", flush=True)
        print(f"FAIL: {verdict}" if verdict else f"PASS: top-1 within 0.1 of the published {published.top1} over "
              f"all {result['val_images']:,} images", flush=True)
    print(json.dumps({"pretrained": source, "loader": loader, **result, "published_top1": published.top1,
                      "published_top5": published.top5}), flush=True)
    if verdict:
        raise SystemExit(1)


def dali_published(published: Published, cfg: Config, device: torch.device) -> dict[str, float]:
    """The weights through this project's DALI val pipeline, resized and cropped as their transform does."""
    if published.interpolation not in ("bilinear", "bicubic") or not all(
            abs(a - b) < 1e-3 for a, b in zip(published.mean + published.std, sum(normalization("imagenet"), ()))):
        raise UserError(f"{published.source}: its transform ({published.interpolation}, mean {published.mean}) has no "
                        f"DALI equivalent here; use data.loader=torchvision")
    overrides = ["data.loader=dali", f"data.image_size={published.crop}", f"data.val_image_size={published.crop}",
                 f"data.val_crop_fraction={published.crop / published.resize}",
                 f"data.interpolation={published.interpolation}"]
    cfg = load_config(None, overrides, config_to_dict(cfg), "--pretrained")
    dist = DistInfo(0, 0, 1, device)
    _, val, _ = build_loaders(cfg, dist, torch.float32)
    outputs = torch.tensor(output_index(Path(cfg.data.root)), device=device)
    return evaluate(published.net.to(device), ((images, outputs[labels]) for images, labels in val), None, device)


if __name__ == "__main__":
    run_main(main)
