"""NVIDIA DALI loaders for the prepared ImageNet layout; imported only when data.loader=dali.

JPEG decoding runs on the GPU (nvJPEG, and the hardware decoder on A100/H100) with the
random-resized crop fused into the decode; on a machine without a GPU the same pipeline runs
on the CPU (device_id=None), which is how the tests exercise it.

Each train epoch builds a pipeline over exactly this rank's files, in the order TrainSampler gives
(the order the torchvision loader uses too): sharding, shuffling, the mid-epoch start after a
resume and the labels (from DEST/train.txt) are then the same whichever loader runs, and a
val shard holds each image once, with no padding to trim. The per-epoch pipeline also takes the
epoch's train size (progressive resizing); timm's RandAugment runs in it (`dali_augment`). The val
pipeline is built once per run and restarted for each evaluation.

    train, val = build_dali_loaders(cfg, dist, normalize, samples)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from imagenet_resnet.config import Config
from imagenet_resnet.data.datasets import Samples, check_sizes, image_problem, normalization, unreadable_image
from imagenet_resnet.data.loader import Loader, Normalizer, loader_workers, val_batches
from imagenet_resnet.data.sampling import TrainSampler, augmentation_seed, shard_range
from imagenet_resnet.data.sizes import train_image_size, train_interpolation, val_image_size, val_resize_side
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError

try:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as err:  # pragma: no cover - depends on the machine
    raise UserError(
        "data.loader=dali but NVIDIA DALI is not installed: pip install 'imagenet-resnet[dali]' "
        "(nvidia-dali-cuda130), or use data.loader=torchvision"
    ) from err
from imagenet_resnet.data.dali_augment import Policy, rand_augment, timm_policy

# DALI's own auto_aug still calls its experimental aliases; the notice is for DALI, not for users.
warnings.filterwarnings("ignore", message=".*fn.experimental", category=DeprecationWarning)

PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the step loop: its default, kept by its ResNet-50 example
PREFETCH_BATCHES = PREFETCH_DEPTH + 2  # what may be in flight when a file fails: the failing batch, the queue, a margin


@pipeline_def(enable_conditionals=True)  # rand_augment chooses its operations per sample with conditionals
def imagenet_pipeline(file_root: str, files: list[str], labels: list[int], train: bool, size: int, gpu: bool,
                      policy: Policy | None, interpolation: str = "bilinear", min_area: float = 0.08,
                      resize_side: int = 0, crop_first: float = 0.0):
    """Decode + (random-resized crop, flip, RandAugment | resize-shorter + centre crop), uint8 HWC out.
    train: `interpolation` may be "random" (per image, as timm's "random"); val: the shorter side to
    `resize_side` then the centre crop, or with `crop_first` (a fraction) ffcv's centre square
    first (data.val_crop_first)."""
    jpegs, label = fn.readers.file(file_root=file_root, files=files, labels=labels, random_shuffle=False,
                                   pad_last_batch=True, name="Reader")
    decoder = "mixed" if gpu else "cpu"
    # nvJPEG's buffers sized once for the largest ImageNet image, no reallocation while training:
    # the values of DALI's ResNet-50 example (docs/examples/use_cases/pytorch/resnet50/main.py).
    buffers = {"device_memory_padding": 211025920, "host_memory_padding": 140544512} if gpu else {}
    if train:
        images = fn.decoders.image_random_crop(jpegs, device=decoder, output_type=types.RGB,
                                               random_aspect_ratio=[3 / 4, 4 / 3], random_area=[min_area, 1.0],
                                               num_attempts=100, hw_decoder_load=0.65, **buffers)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp_type(interpolation))
        # timm's order: crop, flip, RandAugment (a flip after it would mirror ShearY's fill wedge)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
        if policy is not None:
            images = rand_augment(images, policy, size)
    else:
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, hw_decoder_load=0.65, **buffers)
        if crop_first:
            images = centre_square(images, crop_first)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=interp_type(interpolation))
        else:
            images = fn.resize(images, resize_shorter=resize_side, interp_type=interp_type(interpolation))
    images = fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout="HWC", crop=(size, size))
    return images, label.gpu() if gpu else label


def interp_type(interpolation: str):
    """DALI's interpolation for a resize; "random": bilinear or bicubic per sample (a coin)."""
    if interpolation == "random":
        coin = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.INT32)
        return fn.cast(coin * (int(types.INTERP_CUBIC) - int(types.INTERP_LINEAR)) + int(types.INTERP_LINEAR),
                       dtype=types.INTERP_TYPE)
    return types.INTERP_CUBIC if interpolation == "bicubic" else types.INTERP_LINEAR


def centre_square(images, fraction: float):
    """ffcv's centre crop (get_center_crop): side int(fraction x shorter side), offsets rounded down."""
    shape = images.shape(dtype=types.INT32)
    height, width = shape[0], shape[1]
    side = fn.cast(dmath.min(height, width) * fraction, dtype=types.INT32)
    return fn.slice(images, fn.stack((height - side) // 2, (width - side) // 2), fn.stack(side, side), axes=[0, 1])


class DaliLoader(Loader):
    """One split through DALI; yields normalised images and labels on the device.

    The train pipeline keeps DALI checkpointing on (no cost, per DALI's docs): `state()` is its
    reader position and random state, so a run resumed mid-epoch gets the very crops and flips
    it would have had. Without one (a resume on another world size), the rest of the epoch
    has the same files in the same order, with fresh random crops.
    """

    def __init__(self, cfg: Config, dist: DistInfo, normalize: Normalizer, split: str,
                 samples: list[tuple[str, int]]) -> None:
        self.root = str(Path(cfg.data.root) / split)
        self.samples, self.normalize, self.dist = samples, normalize, dist
        self.batch_size, self.threads, self.data = (
            cfg.data.batch_size,
            max(1, loader_workers(cfg.data.workers)),
            cfg.data,
        )
        self.seed = cfg.run.seed
        self.train = split == "train"
        self.num_images = len(samples)
        if self.train:
            self.sampler = TrainSampler(len(samples), dist, cfg.run.seed, cfg.data.batch_size,
                                        cfg.data.repeated_augmentation, cfg.data.repeated_augmentation_round)
            self.steps_per_epoch = self.sampler.steps_per_epoch
        else:
            self.shard = list(shard_range(len(samples), dist.rank, dist.world_size))
            self.steps_per_epoch = val_batches(len(self.shard), self.batch_size)
        self.epoch = 0
        self.origin = 0  # the step this epoch's pipeline starts from: its files, seed and checkpoints
        self.done = 0  # batches yielded since origin
        self.restored: dict[str, Any] | None = None  # a state() from a checkpoint, until used
        self.checkpoint: bytes | None = None  # DALI's checkpoint to build the next pipeline from
        self.batches: DALIGenericIterator | None = None  # the live train iterator
        self.evaluation: DALIGenericIterator | None = None  # the val pipeline's, built once per run

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        state, self.restored = self.restored, None
        if state and (state["epoch"], state["origin"] + state["done"]) == (epoch, start_step):
            self.origin, self.done, self.checkpoint = state["origin"], state["done"], state["dali"]
        else:
            self.origin, self.done, self.checkpoint = start_step, 0, None
        self.epoch = epoch
        if self.train:
            self.sampler.set_position(epoch, self.origin)

    def state(self) -> dict[str, Any] | None:
        if self.batches is None:
            return None
        return {"epoch": self.epoch, "origin": self.origin, "done": self.done, "dali": self.batches.checkpoints()[0]}

    def restore(self, state: Any) -> None:
        self.restored = state

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.sampler.indices() if self.train else self.shard
        if not indices:
            return
        files = [self.samples[i][0] for i in indices]
        if self.train:
            batches = self._iterator(files, [self.samples[i][1] for i in indices])
            self.batches, self.checkpoint = batches, None
        else:
            batches = self._evaluation_batches(files)
        yielded = 0
        try:
            while True:
                try:
                    out = next(batches)
                except StopIteration:
                    return
                except RuntimeError as err:  # DALI names the operator, not the file
                    raise self._bad_file(files, yielded * self.batch_size) or err from None
                images, labels = out[0]["images"], out[0]["labels"]
                images = images.to(self.dist.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC memory, NCHW view
                yielded += 1
                if self.train:
                    self.done += 1
                yield self.normalize(images), labels.view(-1).long().to(self.dist.device, non_blocking=True)
        finally:
            if self.train:
                self.batches = None
            del batches

    def _iterator(self, files: list[str], labels: list[int]) -> DALIGenericIterator:
        return DALIGenericIterator([self._pipeline(files, labels)], ["images", "labels"], reader_name="Reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def _evaluation_batches(self, files: list[str]) -> DALIGenericIterator:
        """The val pipeline, built at the first evaluation and restarted for each later one (its
        files, sizes and order never change; the reader pads its last batch, so every pass starts
        at the shard's first image)."""
        if self.evaluation is None:
            self.evaluation = self._iterator(files, [self.samples[i][1] for i in self.shard])
        else:
            self.evaluation.reset()
        return self.evaluation

    def _pipeline(self, files: list[str], labels: list[int]):
        """This epoch's DALI pipeline over `files`, built."""
        gpu = self.dist.device.type == "cuda"
        size = train_image_size(self.data, self.epoch) if self.train else val_image_size(self.data)
        augment = self.train and self.data.auto_augment
        pipe = imagenet_pipeline(
            file_root=self.root, files=files, labels=labels, train=self.train, gpu=gpu, size=size,
            policy=timm_policy(self.data.auto_augment, size, normalization(self.data.dataset)[0]) if augment else None,
            interpolation=train_interpolation(self.data) if self.train else self.data.interpolation,
            min_area=self.data.crop_min_area, resize_side=val_resize_side(self.data),
            crop_first=self.data.val_crop_fraction if self.data.val_crop_first else 0.0,
            batch_size=self.batch_size, num_threads=self.threads, device_id=self.dist.local_rank if gpu else None,
            seed=augmentation_seed(self.seed, self.epoch, self.dist.rank * 1_000_000 + self.origin) % 2**31,
            enable_checkpointing=self.train, checkpoint=self.checkpoint, prefetch_queue_depth=PREFETCH_DEPTH,
        )
        pipe.build()
        return pipe

    def _bad_file(self, files: list[str], first: int) -> UserError | None:
        """The file that broke the pipeline: the first that does not decode in the batches DALI
        had in flight (the failing one and its prefetch queue); None if they all do."""
        for name in files[first : first + PREFETCH_BATCHES * self.batch_size]:
            problem = image_problem(Path(self.root) / name)
            if problem:
                return unreadable_image(Path(self.root) / name, problem)
        return None


def build_dali_loaders(
    cfg: Config, dist: DistInfo, normalize: Normalizer, samples: Samples
) -> tuple[DaliLoader, DaliLoader]:
    if cfg.data.dataset == "folder":  # prepare-imagenet checked its images' sizes; a folder's are checked here
        check_sizes(Path(cfg.data.root), samples)
    return (DaliLoader(cfg, dist, normalize, "train", samples["train"]),
            DaliLoader(cfg, dist, normalize, "val", samples["val"]))
