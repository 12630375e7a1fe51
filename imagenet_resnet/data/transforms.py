"""torchvision augmentation (train) and the evaluation resize + centre crop, on uint8 CHW images.

The DALI pipeline does the same steps with DALI's operators; `predict` uses `val_transform`.

    augment = train_transform(cfg.data, size=176)       # random-resized crop, flip, timm's RandAugment
    crop = val_transform(cfg)                           # resize to size / crop fraction, centre crop
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from imagenet_resnet.config import Config, DataConfig, parse_rand_augment
from imagenet_resnet.data.datasets import SMALL_DATASETS, normalization
from imagenet_resnet.data.sizes import train_interpolation, val_crop_side, val_image_size, val_resize_side

Transform = Callable[[torch.Tensor], torch.Tensor]


def interpolation_mode(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[name]


def train_transform(data: DataConfig, size: int) -> Transform:
    """Random-resized crop (area data.crop_min_area-1, ratio 3/4-4/3) to `size`, horizontal flip,
    then timm's RandAugment on the PIL image if data.auto_augment asks (timm's order: crop, flip, RA).
    timm draws from Python's and NumPy's generators: the dataset seeds both per image."""
    from torchvision.transforms import v2

    interpolation = train_interpolation(data)
    crops = [v2.RandomResizedCrop(size, scale=(data.crop_min_area, 1.0), ratio=(3 / 4, 4 / 3),
                                  interpolation=interpolation_mode(name), antialias=True)
             for name in (("bilinear", "bicubic") if interpolation == "random" else (interpolation,))]
    steps = [crops[0] if len(crops) == 1 else RandomChoice(crops), v2.RandomHorizontalFlip()]
    if data.auto_augment:
        hparams = timm_hparams(size, normalization(data.dataset)[0], interpolation)
        steps += [v2.ToPILImage(), timm_rand_augment(data.auto_augment, hparams), v2.PILToTensor()]
    return v2.Compose(steps)


class RandomChoice:
    """One of `transforms` per image, picked with Python's generator as timm's
    RandomResizedCropAndInterpolation picks its interpolation for "random"."""

    def __init__(self, transforms: list[Transform]) -> None:
        self.transforms = transforms

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return random.choice(self.transforms)(image)


def timm_hparams(size: int, mean: tuple[float, ...], interpolation: str) -> dict:
    """The hparams timm's create_transform gives its RandAugment for a train crop of `size`: the
    mean pixel as fill, translation bound, the resize's interpolation for the geometric ops; for
    "random" none, so that each op picks bilinear or bicubic (timm's _RANDOM_INTERPOLATION)."""
    from timm.data.transforms import str_to_pil_interp

    hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(min(255, round(255 * x)) for x in mean)}
    if interpolation != "random":
        hparams["interpolation"] = str_to_pil_interp(interpolation)
    return hparams


def timm_rand_augment(config: str, hparams: dict):
    """timm's RandAugment with one repair: at magnitude 10 timm's PosterizeIncreasing keeps 0 bits,
    which Pillow >= 11 refuses (ValueError) where older Pillow returned black; black it is here."""
    from timm.data import auto_augment

    transform = parse_rand_augment(config, hparams)
    for op in transform.ops:
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    return transform


def _posterize(img, bits_to_keep: int, **kwargs):
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def val_transform(cfg: Config) -> Transform:
    """The evaluation resize and centre crop, for any image: the torchvision val loader and
    `predict` use this one. ImageNet-style data: shorter side to floor(val size / data.val_crop_fraction),
    then the centre val size square (FixRes when data.val_image_size exceeds the train size); with
    data.val_crop_first (ffcv) the centre square first, then the resize."""
    from torchvision.transforms import v2

    data = cfg.data
    size = SMALL_DATASETS[data.dataset].size if data.dataset in SMALL_DATASETS else val_image_size(data)
    interpolation = interpolation_mode(data.interpolation)
    if data.val_crop_first:
        return v2.Compose([CentreSquare(data), v2.Resize((size, size), interpolation=interpolation, antialias=True)])
    return v2.Compose([v2.Resize(val_resize_side(data), interpolation=interpolation, antialias=True),
                       v2.CenterCrop(size)])


class CentreSquare:
    """ffcv's centre crop: a square of int(fraction x shorter side), offsets rounded down."""

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        side = val_crop_side(self.data, height, width)
        return image[..., (height - side) // 2 : (height - side) // 2 + side, (width - side) // 2 :
                     (width - side) // 2 + side]
