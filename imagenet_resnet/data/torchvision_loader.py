"""Image folders through a torchvision DataLoader: JPEG decode and augmentation in worker
processes, batches normalised on the device.

    train, val = build_torchvision_loaders(cfg, dist, normalize, samples)
"""

from __future__ import annotations

import multiprocessing
import signal
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from imagenet_resnet.config import Config
from imagenet_resnet.data.datasets import Samples, decode_error_text, read_checked, read_image, unreadable_image
from imagenet_resnet.data.loader import Loader, Normalizer, loader_workers, val_batches
from imagenet_resnet.data.sampling import TrainSampler, seed_all, shard_range
from imagenet_resnet.data.sizes import train_image_size
from imagenet_resnet.data.transforms import train_transform, val_transform
from imagenet_resnet.distributed import STARTUP_TIMEOUT_S, DistInfo
from imagenet_resnet.errors import UserError


class ImageFileDataset(Dataset):
    """JPEG files decoded by torchvision.io into uint8 CHW; keys are (index, augmentation seed, size),
    `transform_for(size)` the augmentation at that size.

    Yields (image, label, error): a file that does not decode gives a blank image and its error
    text, which the loader raises in the main process (a worker's exception would arrive as a
    traceback of the worker instead).
    """

    def __init__(self, folder: Path, samples: list[tuple[str, int]], transform_for: Callable[[int], Callable],
                 workers: int = 0) -> None:
        self.folder, self.samples, self.transform_for = folder, samples, transform_for
        # Images each worker has finished: a loader that is slow but decoding is not a stuck one.
        self.progress = multiprocessing.RawArray("Q", max(workers, 1))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int, str]:
        index, seed, size = key
        path, label = self.samples[index]
        # transforms v2 draw from torch's global generator of this worker, timm's RandAugment from Python's and NumPy's
        seed_all(seed)
        try:
            image, error = read_image(self.folder / path, data=read_checked(self.folder / path)), ""
        except (RuntimeError, OSError) as err:
            error = str(unreadable_image(self.folder / path, decode_error_text(err)))
            image = torch.zeros(3, 1, 1, dtype=torch.uint8)
        worker = get_worker_info()
        self.progress[worker.id if worker else 0] += 1
        return self.transform_for(size)(image), label, error


class HostLoader(Loader):
    """A torchvision DataLoader whose batches are moved to the device and normalised there, one
    batch ahead (on CUDA on a side stream: `ahead_on_device`)."""

    def __init__(self, loader: DataLoader, normalize: Normalizer, device, num_images, steps_per_epoch,
                 size_for: Callable[[int], int] = lambda epoch: 0, split: str = "train") -> None:
        self.loader, self.normalize, self.device = loader, normalize, device
        self.num_images, self.steps_per_epoch, self.size_for, self.split = num_images, steps_per_epoch, size_for, split
        self.set_position(0)

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step
        if isinstance(self.loader.sampler, TrainSampler):
            self.loader.sampler.set_position(epoch, start_step, self.size_for(epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return ahead_on_device(self._host_batches(), self.device, self.normalize)

    def _host_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batch, batches = self.start, iter(self.loader)
        while (got := self._next(batches, batch)) is not None:
            images, labels, errors = got
            error = next((e for e in errors if e), None)
            if error:
                raise UserError(error)
            batch += 1
            yield images, labels

    def _next(self, batches: Iterator, batch: int) -> Any:
        """The next batch, or None at the end. The loader's timeout fires after run.collective_timeout_s
        without a batch; the wait goes on while the workers finish images (a batch of large images
        is slow, not stuck) and until the first batch while they start, and ends when they do neither."""
        done, waited = sum(self.loader.dataset.progress), 0.0
        while True:
            try:
                return next(batches)
            except StopIteration:
                return None
            except RuntimeError as err:
                if "DataLoader timed out" not in str(err):
                    raise
                waited += self.loader.timeout
                now = sum(self.loader.dataset.progress)
                if now == done and (now > 0 or waited >= STARTUP_TIMEOUT_S):
                    raise self._stalled(batch) from None
                done = now

    def _stalled(self, batch: int) -> UserError:
        """A worker delivered nothing for the loader's timeout (a read stuck on a network file system,
        a frozen process). Its workers are killed, SIGKILL reaching even a stopped one: otherwise the
        exit would wait on them forever. PyTorch's SIGCHLD handler goes first: it would report each
        death as a worker failure, with a traceback."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in multiprocessing.active_children():
            child.kill()
        where = f"epoch {self.epoch} batch {batch}" if self.split == "train" else "evaluation"
        return UserError(f"the {self.split} data loader finished no image for {self.loader.timeout:g} s "
                         f"(run.collective_timeout_s) at {where}: a loader worker is stuck (a stalled read from "
                         f"{self.loader.dataset.folder}?). Under torchrun's --max-restarts the group restarts "
                         f"from the newest checkpoint")


def ahead_on_device(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                    normalize: Normalizer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Host batches -> normalised batches on `device`, one batch ahead: the next batch is copied
    (from pinned memory) and normalised before the current one is handed over, on CUDA on a side
    stream, so the copy runs while the current batch trains (DLE's and timm's prefetchers); the
    training stream waits for it only when it takes it. Elsewhere the same order, in line."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    ready = None
    for images, labels in batches:
        with torch.cuda.stream(side):  # None: no stream, no CUDA
            upload = normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        if ready is not None:
            yield ready
        if side is not None:
            compute = torch.cuda.current_stream(device)
            compute.wait_stream(side)
            for tensor in upload:
                tensor.record_stream(compute)  # made on the side stream, used on this one: freed after its use
        ready = upload
    if ready is not None:
        yield ready


STOP_GRACE_S = 30  # torchrun's and Slurm's default time between SIGTERM and SIGKILL


def defer_stop_signals(worker_id: int) -> None:
    """Loader workers outlive a SIGTERM/SIGINT by STOP_GRACE_S. torchrun, Slurm and Kubernetes signal
    a rank's whole process group (or every process of the job): workers that died of it at once would
    crash the rank before it can save its stop checkpoint. The rank shuts its workers down when it
    exits; one that nobody shuts down ends when the grace runs out (SIGALRM's default action)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: signal.alarm(STOP_GRACE_S))


def build_torchvision_loaders(cfg: Config, dist: DistInfo, normalize: Normalizer,
                              samples: Samples) -> tuple[HostLoader, HostLoader]:
    root = Path(cfg.data.root)
    train_samples, val_samples = samples["train"], samples["val"]
    train_tf = {}  # per size, built in each worker when first needed

    def train_for(size: int) -> Callable:
        if size not in train_tf:
            train_tf[size] = train_transform(cfg.data, size)
        return train_tf[size]

    val_tf = val_transform(cfg)
    pin = dist.device.type == "cuda"
    workers = loader_workers(cfg.data.workers)

    def make(split, samples, transform, sampler, drop_last):
        loader = DataLoader(
            ImageFileDataset(root / split, samples, transform, workers),
            batch_size=cfg.data.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            drop_last=drop_last,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=defer_stop_signals,
            timeout=cfg.run.collective_timeout_s if workers > 0 else 0,  # a stuck worker ends the rank
        )
        return loader

    sampler = TrainSampler(len(train_samples), dist, cfg.run.seed, cfg.data.batch_size, cfg.data.repeated_augmentation,
                           cfg.data.repeated_augmentation_round)
    train = HostLoader(make("train", train_samples, train_for, sampler, True), normalize, dist.device,
                       len(train_samples), sampler.steps_per_epoch, lambda epoch: train_image_size(cfg.data, epoch),
                       "train")
    shard = [(i, 0, 0) for i in shard_range(len(val_samples), dist.rank, dist.world_size)]
    val = HostLoader(make("val", val_samples, lambda size: val_tf, shard, False), normalize, dist.device,
                     len(val_samples), val_batches(len(shard), cfg.data.batch_size), split="val")
    return train, val
