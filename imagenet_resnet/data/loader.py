"""What every loader is: the `Loader` interface the trainer drives, normalisation on the device,
the val batch count and the number of worker processes.

    normalize = Normalizer.create(mean, std, device, torch.bfloat16, channels_last=True)
    images = normalize(uint8_batch)
    val_batches(len(shard), batch_size)          # the last batch partial, none empty
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch


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


def val_batches(images: int, batch_size: int) -> int:
    """Batches that hold `images` val images once each: full ones, then a partial last one."""
    return -(-images // batch_size)


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
