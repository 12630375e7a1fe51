"""Which images a rank gets in which order, and the seeds of their augmentation.

- train: a fresh permutation per epoch from (seed, epoch), split across ranks like
  DistributedSampler (drop_last) or, with repeated augmentation, like timm's RepeatAugSampler,
  and startable mid-epoch for exact resume; each image's augmentation is seeded by (seed, epoch,
  image index, copy), so it does not depend on workers, ranks or restarts;
- val: contiguous shards from `shard_range`, no padding, no repeats: each image counted once.

    sampler = TrainSampler(num_images, dist, seed=0, batch_size=256, repeats=3)
    sampler.set_position(epoch=3, start_step=100, size=176)
    seed_all(augmentation_seed(seed, epoch, index))
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from imagenet_resnet.distributed import DistInfo


def shard_range(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of n items; shares differ by at most one, none repeats."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) & 0x7FFF_FFFF_FFFF


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A training step's seed from (seed, rank, global step, micro-batch): its random draws are then
    the same in a resumed run, whatever the loaders drew from the global generators meanwhile."""
    return (((seed * 1_000_003 + rank) * 1_000_003 + step) * 64 + micro) & 0x7FFF_FFFF_FFFF


def seed_all(value: int) -> None:
    """Seed torch's, NumPy's and Python's global generators from one value: the draws made under
    it (an image's augmentation, a step's Mixup and stochastic depth) then do not depend on what
    ran before."""
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


class TrainSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that starts mid-epoch; yields (index, aug seed, size).

    With repeats > 1, repeated augmentation as timm's RepeatAugSampler (and torchvision's RASampler)
    draws it: the epoch's permutation with each image repeated `repeats` times in a row, padded
    from its start to a multiple of the world size, dealt round-robin to the ranks, and each rank
    keeps its first floor(num_images // round * round / world_size) (timm's selected_round, 256 by
    default; ceil(num_images / world_size) when round is 0 or above num_images). An epoch has about
    the dataset's length; consecutive copies go to consecutive ranks (the same rank in a single
    process), each with its own seed.
    """

    def __init__(self, num_images: int, dist: DistInfo, seed: int, batch_size: int, repeats: int = 0,
                 round_to: int = 256) -> None:
        super().__init__(range(num_images), dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True)
        self.repeats = max(1, repeats)
        if self.repeats > 1:
            world = dist.world_size
            if round_to and num_images >= round_to:
                selected = math.floor(num_images // round_to * round_to / world)
            else:
                selected = math.ceil(num_images / world)
            self.num_samples = min(selected, math.ceil(num_images * self.repeats / world))
        self.batch_size = batch_size
        self.steps_per_epoch = self.num_samples // batch_size
        self.start = 0
        self.size = 0  # the epoch's train crop, carried in each key to the worker processes

    def set_position(self, epoch: int, start_step: int = 0, size: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start_step * self.batch_size
        self.size = size

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (indices, copies) for the whole of `epoch`, whole batches only: array work, so
        an ImageNet epoch's order takes milliseconds (the epoch's first batch waits for it)."""
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.dataset), generator=generator).numpy()
        world, mine = self.num_replicas, self.steps_per_epoch * self.batch_size
        if self.repeats == 1:  # DistributedSampler's drop_last split
            return order[: self.total_size][self.rank : self.total_size : world][:mine], np.zeros(mine, np.int64)
        indices, copies = np.repeat(order, self.repeats), np.tile(np.arange(self.repeats), len(order))
        total = -(-len(indices) // world) * world
        dealt = np.arange(self.rank, total, world)[: self.num_samples] % len(indices)  # padded from its start
        return indices[dealt][:mine], copies[dealt][:mine]

    def indices(self) -> list[int]:
        """This rank's indices for the rest of the epoch, whole batches only."""
        return self.order(self.epoch)[0][self.start :].tolist()

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        indices, copies = self.order(self.epoch)
        n, seed, epoch, size = len(self.dataset), self.seed, self.epoch, self.size
        for i, copy in zip(indices[self.start :].tolist(), copies[self.start :].tolist()):
            yield i, augmentation_seed(seed, epoch, i + copy * n), size

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.batch_size - self.start)
