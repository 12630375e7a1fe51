"""Datasets and loaders: CIFAR and MNIST resident on the device, image folders through torchvision or DALI.

Every loader yields `(images, labels)` already on the device, images normalised in the model's
dtype and memory format, and follows the rules of `sampling`. Modules: `datasets` (reading),
`sampling` (order, seeds, sizes, normalising), `transforms` (torchvision augmentation and the
evaluation crop), `mixing` (Mixup/CutMix on the device batch), one module per loader, and the
choosing here; imports go from here down, never back.

    train, val, num_classes = build_loaders(cfg, dist, input_dtype=torch.float32)
    train.set_position(epoch=3, start_step=0)
    for images, labels in train: ...
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagenet_resnet.config import Config
from imagenet_resnet.data.datasets import (
    SMALL_DATASETS,
    class_names,
    count_images,
    decode_error_text,
    input_channels,
    normalization,
    read_cifar,
    read_file_lists,
    read_image,
    read_mnist,
    read_samples,
)
from imagenet_resnet.data.device_loader import DeviceLoader
from imagenet_resnet.data.download import ensure_dataset
from imagenet_resnet.data.sampling import Loader, Normalizer, TrainSampler, loader_workers, shard_range, train_image_size
from imagenet_resnet.data.torchvision_loader import build_torchvision_loaders
from imagenet_resnet.data.transforms import val_resize_side, val_transform
from imagenet_resnet.distributed import DistInfo

__all__ = ["DeviceLoader", "Loader", "Normalizer", "TrainSampler", "build_loaders", "class_names", "count_images",
           "decode_error_text",
           "input_channels", "loader_workers", "normalization", "read_cifar", "read_image", "read_file_lists", "resolve_loader", "shard_range",
           "train_image_size", "val_resize_side", "val_transform"]

def resolve_loader(cfg: Config, device: torch.device) -> str:
    if cfg.data.loader != "auto":
        return cfg.data.loader
    if cfg.data.dataset in SMALL_DATASETS:
        return "device"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "torchvision"
    return "dali" if device.type == "cuda" else "torchvision"


def build_loaders(cfg: Config, dist: DistInfo, input_dtype: torch.dtype) -> tuple[Loader, Loader, int]:
    """Train loader, val loader and the number of classes for `cfg.data`."""
    kind = resolve_loader(cfg, dist.device)
    channels_last = cfg.run.channels_last and dist.device.type == "cuda"
    dataset = cfg.data.dataset
    if dataset in SMALL_DATASETS:
        spec = SMALL_DATASETS[dataset]  # config.py has checked data.loader against data.dataset
        ensure_dataset(Path(cfg.data.root), dataset, cfg.data.download)
        read = read_cifar if dataset.startswith("cifar") else read_mnist
        train_x, train_y, val_x, val_y = read(cfg.data.root, dataset)
        normalize = Normalizer.create(spec.mean, spec.std, dist.device, input_dtype, channels_last)
        args = dict(batch_size=cfg.data.batch_size, normalize=normalize, dist=dist, seed=cfg.run.seed)
        train = DeviceLoader(train_x, train_y, train=True, padding=cfg.data.crop_padding, flip=spec.flip, **args)
        val = DeviceLoader(val_x, val_y, train=False, padding=0, flip=False, **args)
        return train, val, spec.classes
    samples, num_classes = read_samples(Path(cfg.data.root), dataset)
    normalize = Normalizer.create(*normalization(dataset), dist.device, input_dtype, channels_last)
    if kind == "dali":
        from imagenet_resnet.data.dali_loader import build_dali_loaders  # only here: DALI may be absent

        return (*build_dali_loaders(cfg, dist, normalize, samples), num_classes)
    return (*build_torchvision_loaders(cfg, dist, normalize, samples), num_classes)
