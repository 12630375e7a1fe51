"""Published ImageNet-1k weights, evaluated as their publishers evaluate them: the cheapest test of a
prepared ImageNet. If torchvision's ResNet-50 does not score its 76.13 on your val set, the set (or
its labels, or the evaluation) is wrong, and a week of training on it would show it only as a few
missing points.

A SOURCE names the weights: `torchvision:resnet50.IMAGENET1K_V1` (any torchvision classification
weights) or `timm:resnet50.a1_in1k` (any timm ImageNet-1k model). They come from torch hub's cache
(TORCH_HOME) or Hugging Face's (HF_HOME), or download there with a progress bar; offline, one line
says what to fetch and where it goes. Each is evaluated with its own published transform, on PIL
images as the publishers' scripts do: torchvision's `weights.transforms()`; timm's
`resolve_data_config(use_test_size=True)` + `create_transform`, as timm's validate.py; beside the
published figures: torchvision's `weights.meta`, timm's from TIMM_PUBLISHED below.

Labels go by WNID: a prepared set's label k is its k-th sorted WNID, the weights' output i the
i-th of the 1000 (n01440764 first, timm's ImageNetInfo), so a prepared subset is scored right.

    published = load_published("torchvision:resnet50.IMAGENET1K_V1")
    batches = published_batches(published, Path("/data/imagenet"), device, workers=8)  # for evaluation.evaluate
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub.constants import HF_HUB_CACHE
from PIL import Image
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from imagenet_resnet.checkpoint import read_weights
from imagenet_resnet.data.datasets import SYNSETS, read_checked, read_samples, read_synsets, unreadable_image
from imagenet_resnet.errors import UserError

IMAGENET_CLASSES = 1000

# timm's own figures for the weights this project's recipes compare with (top-1, top-5 on the 50,000
# val images, at each model's test size and crop): huggingface/pytorch-image-models,
# results/results-imagenet.csv at commit 0173a139a2c6. Other timm weights evaluate without one.
TIMM_PUBLISHED = {
    "resnet50.a1_in1k": (81.214, 95.102),  # 288 px, crop 1.0, bicubic
    "resnet50.a2_in1k": (80.772, 94.988),
    "resnet50.tv2_in1k": (80.850, 95.434),  # 224 px, crop 0.965, bilinear
    "seresnet50.ra2_in1k": (81.284, 95.652),  # 288 px, crop 0.95, bicubic
    "seresnet50.a1_in1k": (81.102, 95.120),
    "resnext50_32x4d.a1_in1k": (81.466, 95.174),
}


@dataclass
class Published:
    source: str
    net: nn.Module
    transform: Callable  # a PIL image -> the normalised float CHW tensor the weights expect
    top1: float | None  # the publisher's figures on the 50,000 ImageNet-1k val images (None: not known here)
    top5: float | None
    resize: int  # the transform's shorter side and centre crop, and its interpolation: for DALI
    crop: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def is_source(text: str) -> bool:
    return text.startswith(("torchvision:", "timm:"))


def load_published(source: str, progress: bool = True, weights_file: Path | None = None) -> Published:
    """The weights SOURCE names, or (weights_file) that file's weights in SOURCE's network with its
    transform and figures: for a machine that cannot reach the caches' servers."""
    library, _, name = source.partition(":")
    if library == "timm" and name:
        return _timm(source, name, weights_file)
    if library != "torchvision" or "." not in name:
        raise UserError(f"{source}: expected torchvision:<model>.<weights> or timm:<model>.<tag>, e.g. "
                        f"torchvision:resnet50.IMAGENET1K_V1 or timm:resnet50.a1_in1k")
    import torchvision

    arch, weights_name = name.split(".", 1)
    try:
        weights = torchvision.models.get_model_weights(arch)[weights_name]
    except (ValueError, KeyError) as err:
        known = (
            ", ".join(w.name for w in torchvision.models.get_model_weights(arch))
            if arch in torchvision.models.list_models()
            else ""
        )
        raise UserError(f"{source}: torchvision has no such weights"
                        + (f"; {arch} has {known}" if known else "")) from err
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K")
    if metrics is None or weights.meta.get("num_params") is None:
        raise UserError(f"{source}: not ImageNet-1k classification weights")
    net = torchvision.models.get_model(arch, weights=None)
    _load(net, weights_file, lambda: _hub_state_dict(source, weights.url, progress), source)
    transform = weights.transforms()
    return Published(source, net.eval(), transform, metrics["acc@1"], metrics["acc@5"], transform.resize_size[0],
                     transform.crop_size[0], transform.interpolation.value, tuple(transform.mean), tuple(transform.std))


def _hub_state_dict(source: str, url: str, progress: bool) -> dict[str, torch.Tensor]:
    """torch hub's copy of `url` (downloaded, hash-checked, on first use), loaded weights-only."""
    from urllib.error import URLError

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    check_cached_hash(source, cached)
    try:
        return torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True, weights_only=True,
                                                  map_location="cpu")
    except (URLError, OSError) as err:
        if cached.is_file():
            raise UserError(f"{source}: {cached} does not load ({err}); delete it to download again") from err
        reason = getattr(err, "reason", err)
        raise UserError(f"{source}: not in torch hub's cache and could not download {url} ({reason}); "
                        f"fetch it on a machine with network and put it at {cached} (or set TORCH_HOME)") from err
    except pickle.UnpicklingError as err:  # weights_only refused what the pickle would call
        raise UserError(f"{source}: {cached}: refused: {first_line(err)}; nothing from it was run. "
                        f"Delete it to download the published file again") from err
    except (RuntimeError, EOFError) as err:  # a hash that does not match, a truncated or foreign file
        raise UserError(f"{source}: {cached}: {first_line(err)}; delete it to download again") from err


def check_cached_hash(source: str, cached: Path) -> None:
    """torch hub checks the hash in a file's name on download only: a file put in its cache by hand
    (or damaged there) is checked here before it is used as the published weights."""
    prefix = torch.hub.HASH_REGEX.search(cached.name)
    if not cached.is_file() or not prefix or not prefix.group(1):
        return
    digest = hashlib.sha256()
    with open(cached, "rb") as f:
        while block := f.read(2**22):
            digest.update(block)
    if not digest.hexdigest().startswith(prefix.group(1)):
        raise UserError(f"{source}: {cached} is not the published file (its sha256 does not start with "
                        f"{prefix.group(1)}, as its name says); nothing from it was used. Delete it to download "
                        f"it again")


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _load(net: nn.Module, weights_file: Path | None, fetch: Callable[[], dict], source: str = "") -> None:
    if weights_file is None:
        try:
            net.load_state_dict(fetch())
        except RuntimeError as err:  # a cached file with other tensors than the network's
            raise UserError(f"{source}: the cached weights do not fit its network ({first_line(err)[:200]}); "
                            f"delete them from {torch.hub.get_dir()} to download them again") from err
        return
    try:
        net.load_state_dict(read_weights(weights_file))
    except RuntimeError as err:
        raise UserError(f"{weights_file}: does not fit --arch's network ({str(err).splitlines()[0]})") from err


def _timm(source: str, name: str, weights_file: Path | None = None) -> Published:
    """timm's model with its Hugging Face weights (cache, or download with progress), evaluated at its
    test size and crop as timm's validate.py does."""
    import math

    import timm
    from timm.data import create_transform, resolve_data_config

    if not timm.is_model(name.split(".")[0]):
        raise UserError(f"{source}: timm has no model {name.split('.')[0]!r}")
    try:
        net = timm.create_model(name, pretrained=weights_file is None)
    except (pickle.UnpicklingError, RuntimeError) as err:
        if "weights_only" not in str(err):
            raise UserError(_timm_unavailable(source, name, err)) from err
        # a cached pytorch_model.bin whose pickle would call more than tensors need (timm loads weights-only)
        raise UserError(f"{source}: refused timm's cached weights: {first_line(err)[:200]}; nothing from them was "
                        f"run. Delete {HF_HUB_CACHE}/models--timm--{name} to download them again") from err
    except (OSError, ValueError, EOFError, SafetensorError) as err:  # offline, not cached, no such tag, damaged
        raise UserError(_timm_unavailable(source, name, err)) from err
    if weights_file is not None:
        _load(net, weights_file, dict)
    if net.num_classes != IMAGENET_CLASSES:
        raise UserError(f"{source}: {net.num_classes} outputs, not ImageNet-1k's 1000")
    data = resolve_data_config({}, model=net, use_test_size=True)
    crop = data["input_size"][-1]
    top1, top5 = TIMM_PUBLISHED.get(name, (None, None))
    return Published(source, net.eval(), create_transform(**data), top1, top5, math.floor(crop / data["crop_pct"]),
                     crop, data["interpolation"], tuple(data["mean"]), tuple(data["std"]))


def _timm_unavailable(source: str, name: str, err: BaseException) -> str:
    return (f"{source}: could not load timm's weights ({type(err).__name__}: {first_line(err)[:200]}); on a "
            f"machine with network run python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and "
            f"copy {HF_HUB_CACHE}/models--timm--{name} here")


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WNIDs in the published output order (sorted; n01440764 first)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


def output_index(root: Path) -> list[int]:
    """For each label of the prepared set (its synsets.txt), the weights' output of that WNID."""
    wnids = [wnid for wnid, _ in read_synsets(root)]
    order = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    outside = [wnid for wnid in wnids if wnid not in order]
    if outside:
        raise UserError(f"{root / SYNSETS}: {len(outside)} class(es) not among ImageNet-1k's 1000 "
                        f"({', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}): published ImageNet-1k "
                        f"weights cannot score them")
    return [order[wnid] for wnid in wnids]


class PILImages(Dataset):
    """(path, label) pairs opened with PIL as RGB and passed through the weights' own transform.

    Yields (image, label, error): a file that does not decode, or is over the pixel bound, gives a
    blank image and its error text, which `published_batches` raises in the main process (a
    worker's exception would arrive as a traceback of the worker instead).
    """

    def __init__(self, folder: Path, samples: list[tuple[str, int]], transform: Callable, crop: int) -> None:
        self.folder, self.samples, self.transform, self.crop = folder, samples, transform, crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        path, label = self.samples[index]
        try:
            with Image.open(io.BytesIO(read_checked(self.folder / path))) as image:
                return self.transform(image.convert("RGB")), label, ""
        except (OSError, ValueError, SyntaxError) as err:
            return torch.zeros(3, self.crop, self.crop), label, str(unreadable_image(self.folder / path, str(err)))


def published_batches(published: Published, root: Path, device: torch.device, workers: int, batch_size: int = 64):
    """Every prepared val image through the weights' own transform, its label as the weights'
    output index: (images, labels) batches on `device`, for `evaluation.evaluate`."""
    samples, _ = read_samples(root, "imagenet")
    outputs = torch.tensor(output_index(root), device=device)
    images = PILImages(root / "val", samples["val"], published.transform, published.crop)
    for batch, labels, errors in DataLoader(images, batch_size=batch_size, num_workers=workers):
        if any(errors):
            raise UserError(next(error for error in errors if error))
        yield batch.to(device), outputs[labels.to(device)]


def diagnosis(top1: float, images: int, published_top1: float, classes: int, tolerance: float = 0.1) -> str | None:
    """What a top-1 off the published figure most likely means (None when it matches), for a prepared
    set of `classes` classes: all 1000 must hold ImageNet's 50,000 val images."""
    if top1 < 2 * 100 / classes:
        return (f"top-1 {top1:.2f}% is chance level for {classes} classes: the val labels do not belong to the "
                f"images (labels by ILSVRC2012_ID instead of sorted WNID, or a shuffled val list); re-run "
                f"make prepare-imagenet")
    if classes == IMAGENET_CLASSES and images != 50_000:
        return (f"the prepared val set has {images:,} images, not 50,000: the preparation is incomplete "
                f"(re-run make prepare-imagenet; it resumes and verifies)")
    if abs(top1 - published_top1) <= tolerance:
        return None
    if top1 < published_top1:
        return (f"top-1 {top1:.2f}% is {published_top1 - top1:.2f} points below the published {published_top1}: "
                f"the labels are right but the images differ (a different resize, interpolation or normalisation, "
                f"re-encoded or damaged JPEGs, or a few classes mislabelled)")
    return (f"top-1 {top1:.2f}% is above the published {published_top1}"
            + (f" on a subset of {classes} classes (the figure is for all 1000)" if classes != IMAGENET_CLASSES
               else ": are these val images part of the weights' training data?"))
