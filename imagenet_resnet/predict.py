"""Classify images with a trained checkpoint: the top classes with names and probabilities.

Images go through evaluation's resize, centre crop and normalisation, in batches, on a GPU
when there is one. One line per image; `--json` prints one JSON object per line instead.
Each image is cropped as soon as it is decoded, so memory follows the largest image, not the
batch; a large JPEG is decoded at a reduced scale (libjpeg's DCT scaling) that still covers
evaluation's resize, and an image of more than --max-pixels is refused.

    python -m imagenet_resnet.predict --checkpoint runs/x/best.pt photo.jpg more_photos/
    # photo.jpg: goldfish 91.2%, tench 3.1%, ...
    python -m imagenet_resnet.predict --checkpoint runs/x/best.pt more_photos/ --json --weights ema
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagenet_resnet.checkpoint import WEIGHTS
from imagenet_resnet.cli import command, existing_file, positive_int, run_main
from imagenet_resnet.data.datasets import decode_error_text, read_image
from imagenet_resnet.data.sizes import val_resize_side
from imagenet_resnet.distributed import pick_device
from imagenet_resnet.errors import UserError
from imagenet_resnet.inference import load_trained
from imagenet_resnet.layout import MAX_IMAGE_PIXELS


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


def shown(path: Path) -> str:
    """A file name as text, also one whose bytes are not UTF-8 (escaped, e.g. \\xff)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_image(path: Path, channels: int, min_side: int, max_pixels: int) -> torch.Tensor:
    """uint8 CHW. A JPEG at least twice as large as needed is decoded at 1/2, 1/4 or 1/8 scale,
    keeping its shorter side >= min_side; UserError for what does not decode or is too large."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
            scale = 1
            while image.format == "JPEG" and scale < 8 and min(width, height) // (2 * scale) >= min_side:
                scale *= 2
            if (width // scale) * (height // scale) > max_pixels:
                raise UserError(f"{shown(path)}: {width}x{height} pixels is more than --max-pixels {max_pixels:,}; "
                                f"shrink the image or raise --max-pixels")
            if scale > 1:
                image.draft("RGB" if channels == 3 else "L", (width // scale, height // scale))
                pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
                return torch.from_numpy(pixels.copy()).view(*pixels.shape[:2], channels).permute(2, 0, 1)
        return read_image(path, channels, data)
    except (RuntimeError, OSError, SyntaxError, ValueError) as err:  # PIL and torchvision's ways of saying no
        reason = (
            decode_error_text(err) if isinstance(err, RuntimeError) else (getattr(err, "strerror", None) or str(err))
        )
        raise UserError(f"{shown(path)}: not an image this tool can read ({reason})") from err


def main(argv: list[str] | None = None) -> None:
    p = command(__spec__.name, "Top classes of images by a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="a best.pt or last.pt written by training")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders searched for them")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line")
    p.add_argument("--top", type=positive_int, default=5, help="classes per image")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_IMAGE_PIXELS,
                   help="refuse an image larger than this many pixels after reduced-size JPEG decoding")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: a GPU when there is one")
    p.add_argument(
        "--weights", choices=tuple(WEIGHTS), default="model", help="ema: the averaged weights, if trained with them"
    )
    args = p.parse_args(argv)
    files = find_images(args.inputs)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    device = pick_device(args.device)
    trained = load_trained(args.checkpoint, args.weights)
    net = trained.net.to(device)
    top = min(args.top, len(trained.names))
    min_side = val_resize_side(trained.cfg.data)
    Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check would refuse before reduced decoding; --max-pixels holds
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        # A generator: each image is cropped before the next one is decoded.
        batch = trained.preprocess((load_image(path, trained.channels, min_side, args.max_pixels) for path in chunk),
                                   device)
        with torch.no_grad():
            probabilities, labels = net(batch).float().softmax(dim=1).topk(top, dim=1)
        for path, probs, labs in zip(chunk, probabilities.tolist(), labels.tolist()):
            print(answer(shown(path), trained.names, probs, labs, args.json), flush=True)


def answer(name: str, names: list[str], probs: list[float], labels: list[int], as_json: bool) -> str:
    """One image's line: its top classes with their probabilities, as text or one JSON object."""
    if as_json:
        return json.dumps({"file": name, "top": [{"label": label, "name": names[label], "probability": prob}
                                                  for prob, label in zip(probs, labels)]})
    return f"{name}: " + ", ".join(f"{names[label]} {prob:.1%}" for prob, label in zip(probs, labels))


if __name__ == "__main__":
    run_main(main)
