"""Classify images with a trained checkpoint: the top classes with names and probabilities.

Images go through evaluation's resize, centre crop and normalisation, in batches, on a GPU
when there is one. One line per image; `--json` prints one JSON object per line instead.

    python -m imagenet_resnet.predict --checkpoint runs/x/best.pt photo.jpg more_photos/
    # photo.jpg: goldfish 91.2%, tench 3.1%, ...
    python -m imagenet_resnet.predict --checkpoint runs/x/best.pt more_photos/ --json --weights ema
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from imagenet_resnet.cli import existing_file, positive_int, run_main
from imagenet_resnet.data import decode_error_text
from imagenet_resnet.distributed import pick_device
from imagenet_resnet.errors import UserError
from imagenet_resnet.inference import WEIGHTS, load_trained


def find_images(inputs: list[str]) -> list[Path]:
    """Files as given, and the image files (by extension) under folders, in sorted order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise UserError(f"{path}: no image files in this folder (looked for {', '.join(IMG_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def read_image(path: Path, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
    except (RuntimeError, OSError) as err:
        raise UserError(f"{path}: not an image this tool can read ({decode_error_text(err)})") from err


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Top classes of images by a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="a best.pt or last.pt written by training")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for them")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument("--top", type=positive_int, default=5, help="classes per image (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--weights", choices=tuple(WEIGHTS), default="model", help="ema: the averaged weights, if trained with them")
    args = p.parse_args(argv)
    files = find_images(args.inputs)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    device = pick_device(args.device)
    trained = load_trained(args.checkpoint, args.weights)
    net = trained.net.to(device)
    top = min(args.top, len(trained.names))
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        batch = trained.preprocess([read_image(path, trained.channels) for path in chunk], device)
        with torch.no_grad():
            probabilities, labels = net(batch).float().softmax(dim=1).topk(top, dim=1)
        for path, probs, labs in zip(chunk, probabilities.tolist(), labels.tolist()):
            if args.json:
                print(json.dumps({"file": str(path), "top": [{"label": label, "name": trained.names[label],
                                  "probability": prob} for prob, label in zip(probs, labs)]}), flush=True)
            else:
                print(f"{path}: " + ", ".join(f"{trained.names[label]} {prob:.1%}" for prob, label in zip(probs, labs)),
                      flush=True)


if __name__ == "__main__":
    run_main(main)
