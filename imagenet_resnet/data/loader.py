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
    """uint8 NCHW batch on the device -> (x - mean) / std in the model's dtype and layout, in one op:
    x * scale + shift (addcmul) written into an output allocated in that dtype and layout. On CUDA
    that is one kernel reading 1 byte per value and writing 2 (bf16), where the four-op form
    (to float, subtract, divide, cast) made four passes and about 9 times the memory traffic.
    `mean` and `std` are in 0-255 levels (DALI's crop_mirror_normalize takes them so)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dtype: torch.dtype
    channels_last: bool
    scale: torch.Tensor  # 1 / std, (1, C, 1, 1) float32
    shift: torch.Tensor  # -mean / std

    @classmethod
    def create(cls, mean, std, device, dtype, channels_last) -> Normalizer:
        levels_mean, levels_std = tuple(255 * m for m in mean), tuple(255 * s for s in std)
        shape = (1, len(mean), 1, 1)
        std_t = torch.tensor(levels_std, device=device).view(shape)
        return cls(levels_mean, levels_std, dtype, channels_last, 1 / std_t,
                   -torch.tensor(levels_mean, device=device).view(shape) / std_t)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(images.shape, dtype=self.dtype, device=images.device, memory_format=layout)
        return torch.addcmul(self.shift, images, self.scale, out=out)


def loader_workers(workers: str) -> int:
    """data.workers as a count: auto is min(8, the cores this process may use / processes on this node
    (torchrun's LOCAL_WORLD_SIZE)), at least 1."""
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
