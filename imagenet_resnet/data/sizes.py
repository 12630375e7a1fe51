"""The image sizes of each epoch: the train crop (progressive resizing) and the evaluation crop.

    train_image_size(cfg.data, epoch=3)      # 160 on FFCV's ramp from 160 to 192
    val_image_size(cfg.data)                 # data.val_image_size, or data.image_size
"""

from __future__ import annotations

import math

from imagenet_resnet.config import DataConfig
from imagenet_resnet.data.datasets import SMALL_DATASETS


def train_image_size(data: DataConfig, epoch: int) -> int:
    """The train crop of `epoch`: progressive resizing as FFCV does it (start size until the ramp's
    first epoch, then linear in the epoch, rounded to a multiple of 32 px, full size from its last)."""
    if data.dataset in SMALL_DATASETS:  # resident at their own size
        return SMALL_DATASETS[data.dataset].size
    start_size, (first, last) = data.start_image_size, data.resize_ramp_epochs
    if not start_size or epoch >= last:
        return data.image_size
    if epoch <= first:
        return start_size
    size = start_size + (data.image_size - start_size) * (epoch - first) / (last - first)
    return min(max(round(size / 32) * 32, start_size), data.image_size)


def val_image_size(data: DataConfig) -> int:
    return data.val_image_size or data.image_size


def val_resize_side(data: DataConfig) -> int:
    """The shorter side evaluation resizes an image to before its centre crop: timm's
    floor(size / crop fraction) (224 / 0.95 -> 235), the 1e-6 keeping a quotient that float
    arithmetic leaves a hair under a whole number (evaluate --pretrained's crop / resize) at it."""
    if data.dataset in SMALL_DATASETS:
        return SMALL_DATASETS[data.dataset].size
    return math.floor(val_image_size(data) / data.val_crop_fraction + 1e-6)


def val_crop_side(data: DataConfig, height: int, width: int) -> int:
    """data.val_crop_first (ffcv): the side of the centre square taken before the resize."""
    return int(data.val_crop_fraction * min(height, width))


def train_interpolation(data: DataConfig) -> str:
    """bilinear, bicubic or random: the train crop's resize (timm's --train-interpolation)."""
    return data.train_interpolation or data.interpolation
