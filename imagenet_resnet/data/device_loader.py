"""CIFAR and MNIST held whole on the device: pad + random crop + flip batched there.

    train = DeviceLoader(images, labels, 128, normalize, dist, seed=0, train=True, padding=4, flip=True)
"""

from __future__ import annotations

from typing import Iterator

import torch

from imagenet_resnet.data.loader import Loader, val_batches
from imagenet_resnet.data.sampling import TrainSampler, augmentation_seed, shard_range


class DeviceLoader(Loader):
    """A dataset held as uint8 on the device; pad + random crop + flip run batched there.

    No per-image Python work per step: one gather per batch. For CIFAR on a GPU this is what
    makes an epoch take seconds rather than a minute of DataLoader overhead.
    """

    def __init__(self, images, labels, batch_size, normalize, dist, seed, train, padding, flip) -> None:
        self.images, self.labels = images.to(dist.device), labels.to(dist.device)
        self.batch_size, self.normalize, self.train, self.padding = batch_size, normalize, train, padding
        self.flip = flip
        self.num_images = len(labels)
        self.seed = seed
        if train:
            self.sampler = TrainSampler(self.num_images, dist, seed, batch_size)
            self.steps_per_epoch = self.sampler.steps_per_epoch
        else:
            self.shard = shard_range(self.num_images, dist.rank, dist.world_size)
            self.steps_per_epoch = val_batches(len(self.shard), batch_size)
        self.set_position(0)

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        if self.train:
            self.sampler.set_position(epoch, start_step)

    def _augment(self, batch: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor):
        """Zero-pad by `padding`, crop back to size at per-image offsets, flip where drawn."""
        n, _, h, w = batch.shape
        padded = torch.nn.functional.pad(batch, [self.padding] * 4)
        rows = offsets[index, 0, None] + torch.arange(h, device=batch.device)  # (n, h)
        cols = offsets[index, 1, None] + torch.arange(w, device=batch.device)  # (n, w)
        crops = padded[torch.arange(n, device=batch.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        crops = crops.permute(0, 3, 1, 2)  # advanced indexing put channels last
        return torch.where(flips[index, None, None, None], crops.flip(3), crops)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for start in range(self.shard.start, self.shard.stop, self.batch_size):
                stop = min(start + self.batch_size, self.shard.stop)
                yield self.normalize(self.images[start:stop]), self.labels[start:stop]
            return
        # All of the epoch's random draws at once, indexed by image: independent of rank and restarts.
        g = torch.Generator().manual_seed(augmentation_seed(self.seed, self.epoch, 0))
        offsets = torch.randint(0, 2 * self.padding + 1, (self.num_images, 2), generator=g).to(self.images.device)
        flips = (torch.rand(self.num_images, generator=g) < (0.5 if self.flip else 0.0)).to(self.images.device)
        order = torch.tensor(self.sampler.indices(), dtype=torch.int64, device=self.images.device)
        for batch_index in order.split(self.batch_size):
            batch = self._augment(self.images[batch_index], batch_index, offsets, flips)
            yield self.normalize(batch), self.labels[batch_index]
