"""torchvision augmentation (train) and the evaluation resize + centre crop, on uint8 CHW images.

The DALI pipeline does the same steps with DALI's operators; `predict` uses `val_transform`.

    augment = train_transform(cfg.data, size=176)       # random-resized crop, flip, RandAugment
    crop = val_transform(cfg)                           # resize to size / crop fraction, centre crop
"""

from __future__ import annotations

from typing import Callable

import torch

from imagenet_resnet.config import Config, DataConfig
from imagenet_resnet.data.datasets import SMALL_DATASETS
from imagenet_resnet.data.sampling import val_image_size

RANDAUGMENT_BINS = 31  # magnitudes 0..30, as DALI's auto_aug and torchvision count them

Transform = Callable[[torch.Tensor], torch.Tensor]


def train_transform(data: DataConfig, size: int) -> Transform:
    """Random-resized crop (scale 0.08-1, ratio 3/4-4/3) to `size`, horizontal flip, then RandAugment
    (data.randaugment_n operations at magnitude data.randaugment_m) if asked."""
    from torchvision.transforms import v2

    steps = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
             v2.RandomHorizontalFlip()]
    if data.randaugment_n:
        steps.append(v2.RandAugment(num_ops=data.randaugment_n, magnitude=data.randaugment_m,
                                    num_magnitude_bins=RANDAUGMENT_BINS))
    return v2.Compose(steps)


def val_transform(cfg: Config) -> Transform:
    """The evaluation resize and centre crop, for any image: the torchvision val loader and
    `predict` use this one. ImageNet-style data: shorter side to val size / data.val_crop_fraction,
    then the centre val size square (FixRes when data.val_image_size exceeds the train size)."""
    from torchvision.transforms import v2

    size = SMALL_DATASETS[cfg.data.dataset].size if cfg.data.dataset in SMALL_DATASETS else val_image_size(cfg.data)
    return v2.Compose([v2.Resize(val_resize_side(cfg), antialias=True), v2.CenterCrop(size)])


def val_resize_side(cfg: Config) -> int:
    """The shorter side evaluation resizes an image to, before its centre crop."""
    if cfg.data.dataset in SMALL_DATASETS:
        return SMALL_DATASETS[cfg.data.dataset].size
    return round(val_image_size(cfg.data) / cfg.data.val_crop_fraction)
