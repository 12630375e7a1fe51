"""The rules every loader follows: which images a rank gets in which order, their augmentation
seeds, the per-epoch train size, and normalisation on the device.

- train: a fresh permutation per epoch from (seed, epoch), split across ranks like
  DistributedSampler (drop_last) or, with repeated augmentation, like timm's RepeatAugSampler,
  and startable mid-epoch for exact resume; each image's augmentation is seeded by (seed, epoch,
  image index, copy), so it does not depend on workers, ranks or restarts;
- val: contiguous shards from `shard_range`, no padding, no repeats: each image counted once.

    sampler = TrainSampler(num_images, dist, seed=0, batch_size=256, repeats=3)
    sampler.set_position(epoch=3, start_step=100, size=train_image_size(cfg.data, 3))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch.utils.data import DistributedSampler

from imagenet_resnet.config import DataConfig
from imagenet_resnet.distributed import DistInfo

class Loader(Protocol):
    num_images: int  # images in this split over all ranks (val: each counted once)
    steps_per_epoch: int  # batches this rank yields in a full epoch

    def set_position(self, epoch: int, start_step: int = 0) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state(self) -> Any:
        """What an exact mid-epoch resume needs beyond (epoch, step); None where those suffice
        (per-image augmentation seeds). DALI's own random state is the exception."""
        return None

    def restore(self, state: Any) -> None:
        """Take a `state()` saved in a checkpoint; it applies if set_position is then where it was taken."""


def shard_range(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of n items; shares differ by at most one, none repeats."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) & 0x7FFF_FFFF_FFFF


@dataclass
class Normalizer:
    """uint8 NCHW batch on the device -> normalised float in the model's dtype and layout."""

    mean: torch.Tensor
    std: torch.Tensor
    dtype: torch.dtype
    channels_last: bool

    @classmethod
    def create(cls, mean, std, device, dtype, channels_last) -> Normalizer:
        shape = (1, len(mean), 1, 1)
        scale = torch.tensor(std, device=device).view(shape) * 255
        return cls(torch.tensor(mean, device=device).view(shape) * 255, scale, dtype, channels_last)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return ((images.float() - self.mean) / self.std).to(self.dtype)


def loader_workers(workers: str) -> int:
    """data.workers as a count: auto is min(8, the cores this process may use / processes on this node
    (torchrun's LOCAL_WORLD_SIZE)), at least 1."""
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def train_image_size(data: DataConfig, epoch: int) -> int:
    """The train crop of `epoch`: progressive resizing as FFCV does it (start size until the ramp's
    first epoch, then linear in the epoch, rounded to a multiple of 32 px, full size from its last)."""
    start_size, (first, last) = data.start_image_size, data.resize_ramp_epochs
    if not start_size or epoch >= last:
        return data.image_size
    if epoch <= first:
        return start_size
    size = start_size + (data.image_size - start_size) * (epoch - first) / (last - first)
    return min(max(round(size / 32) * 32, start_size), data.image_size)


def val_image_size(data: DataConfig) -> int:
    return data.val_image_size or data.image_size


class TrainSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that starts mid-epoch; yields (index, aug seed, size).

    With repeats > 1, repeated augmentation as timm's RepeatAugSampler (and torchvision's RASampler)
    draws it: the epoch's permutation with each image repeated `repeats` times in a row, padded
    from its start to a multiple of the world size, dealt round-robin to the ranks, and each rank
    keeps its first num_images // world_size. An epoch has the dataset's length; consecutive copies
    go to consecutive ranks (the same rank in a single process), each with its own seed.
    """

    def __init__(self, num_images: int, dist: DistInfo, seed: int, batch_size: int, repeats: int = 0) -> None:
        super().__init__(range(num_images), dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True)
        self.repeats = max(1, repeats)
        if self.repeats > 1:
            self.num_samples = num_images // dist.world_size
        self.batch_size = batch_size
        self.steps_per_epoch = self.num_samples // batch_size
        self.start = 0
        self.size = 0  # the epoch's train crop, carried in each key to the worker processes

    def set_position(self, epoch: int, start_step: int = 0, size: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start_step * self.batch_size
        self.size = size

    def _epoch(self) -> list[tuple[int, int]]:
        """This rank's (index, copy) pairs for the whole epoch."""
        if self.repeats == 1:
            return [(i, 0) for i in super().__iter__()]
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        copies = [(i, copy) for i in order for copy in range(self.repeats)]
        total = -(-len(copies) // self.num_replicas) * self.num_replicas
        copies += copies[: total - len(copies)]
        return copies[self.rank : total : self.num_replicas][: self.num_samples]

    def _mine(self) -> list[tuple[int, int]]:
        return self._epoch()[self.start : self.steps_per_epoch * self.batch_size]

    def indices(self) -> list[int]:
        """This rank's indices for the rest of the epoch, whole batches only."""
        return [i for i, _ in self._mine()]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        n = len(self.dataset)
        return iter([(i, augmentation_seed(self.seed, self.epoch, i + copy * n), self.size) for i, copy in self._mine()])

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.batch_size - self.start)
