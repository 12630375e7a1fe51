"""Datasets and loaders: CIFAR and MNIST resident on the device, image folders through torchvision or DALI.

Every loader yields `(images, labels)` already on the device, images normalised in the model's
dtype and memory format. Modules, from the bottom: `datasets` (reading files), `loader` (the
interface, normalising), `sampling` (order and seeds), `sizes` (the image size of each epoch),
`transforms` (torchvision augmentation and the evaluation crop), `mixing` (Mixup/CutMix),
`download`, one module per loader, and the choosing here; imports go from here down, never back.

    train, val, num_classes = build_loaders(cfg, dist, input_dtype=torch.float32)
    train.set_position(epoch=3, start_step=0)
    for images, labels in train: ...
"""

from __future__ import annotations

from pathlib import Path

import torch

from imagenet_resnet.config import Config, DataConfig
from imagenet_resnet.data.datasets import SMALL_DATASETS, normalization, read_samples, read_small
from imagenet_resnet.data.device_loader import DeviceLoader
from imagenet_resnet.data.download import ensure_dataset
from imagenet_resnet.data.loader import Loader, Normalizer
from imagenet_resnet.data.torchvision_loader import build_torchvision_loaders
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError


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
        ensure_dataset(Path(cfg.data.root), dataset, cfg.data.download, cfg.data.download_timeout_s)
        train_x, train_y, val_x, val_y = read_small(cfg.data.root, dataset)
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


def count_images(data: DataConfig) -> tuple[int, int]:
    """(train, val) images of data.dataset under data.root, read as the loaders will read them;
    UserError naming what is missing (the launch scripts check this before starting torchrun)."""
    root = Path(data.root)
    if root.exists() and not root.is_dir():
        raise UserError(f"config key data.root={data.root!r}: is a file; expected a folder")
    if data.dataset in SMALL_DATASETS:
        ensure_dataset(root, data.dataset, data.download, data.download_timeout_s)
    if not root.is_dir():
        raise UserError(f"config key data.root={data.root!r}: no such folder")
    if data.dataset in SMALL_DATASETS:
        train, _, val, _ = read_small(root, data.dataset)
    else:
        samples, _ = read_samples(root, data.dataset)
        train, val = samples["train"], samples["val"]
    return len(train), len(val)
