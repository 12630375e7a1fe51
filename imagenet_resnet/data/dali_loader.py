"""NVIDIA DALI loaders for the prepared ImageNet layout; imported only when data.loader=dali.

JPEG decoding runs on the GPU (nvJPEG, and the hardware decoder on A100/H100) with the
random-resized crop fused into the decode; on a machine without a GPU the same pipeline runs
on the CPU (device_id=None), which is how the tests exercise it.

The train pipeline is built once per image size (progressive resizing builds one per size) and
takes each batch's files from `EpochFiles`, in the order TrainSampler gives (the order the
torchvision loader uses too): sharding, shuffling, the mid-epoch start after a resume and the
labels (from DEST/train.txt) are then the same whichever loader runs. DALI reads and decodes
the files in its own threads; timm's RandAugment runs in it (`dali_augment`). The val pipeline
is built once per run and restarted for each evaluation; a val shard holds each image once,
with no padding to trim.

    train, val = build_dali_loaders(cfg, dist, normalize, samples)
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
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

# crop_mirror_normalize writes these input dtypes itself; DALI has no bfloat16 (the default on CUDA).
DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}
PREFETCH_DEPTH = 2  # batches DALI prepares ahead of the step loop: its default, kept by its ResNet-50 example
PREFETCH_BATCHES = PREFETCH_DEPTH + 2  # what may be in flight when a file fails: the failing batch, the queue, a margin


class EpochFiles:
    """A train pipeline's external source: each batch's file paths and labels in TrainSampler's
    order. DALI passes its BatchInfo: the pipeline's epochs counted from the one it was built at
    (`first`, an (epoch, step)), and the batch within that epoch. A pipeline restored from a DALI
    checkpoint resumes that count, so the same `first` gives the same batches."""

    def __init__(self, paths: list[str], labels: np.ndarray, sampler: TrainSampler, first: tuple[int, int]) -> None:
        self.paths, self.labels = paths, labels  # every train file's path, and its label as an (n, 1) array
        self.sampler, self.first, self.batch_size = sampler, first, sampler.batch_size
        self.cached: tuple[int, np.ndarray] | None = None  # (epoch, its order): computed once per epoch

    def position(self, epoch_idx: int, iteration: int) -> tuple[int, int]:
        """DALI's (epoch_idx, iteration) as the run's (epoch, step)."""
        return self.first[0] + epoch_idx, iteration + (self.first[1] if epoch_idx == 0 else 0)

    def order(self, epoch: int) -> np.ndarray:
        if self.cached is None or self.cached[0] != epoch:
            self.cached = (epoch, self.sampler.order(epoch)[0])
        return self.cached[1]

    def indices(self, epoch: int, step: int, batches: int = 1) -> np.ndarray:
        """The train indices of `batches` batches from (epoch, step)."""
        return self.order(epoch)[step * self.batch_size : (step + batches) * self.batch_size]

    def files(self, epoch: int, step: int, batches: int = 1) -> list[str]:
        return [self.paths[i] for i in self.indices(epoch, step, batches)]

    def __call__(self, info: Any) -> tuple[list[np.ndarray], np.ndarray]:
        epoch, step = self.position(info.epoch_idx, info.iteration)
        if step >= self.sampler.steps_per_epoch:
            raise StopIteration  # DALI ends the epoch; reset() starts the next
        indices = self.indices(epoch, step)
        return [np.frombuffer(self.paths[i].encode(), dtype=np.uint8) for i in indices], self.labels[indices]


@pipeline_def(enable_conditionals=True)  # rand_augment chooses its operations per sample with conditionals
def imagenet_pipeline(file_root: str, files: list[str], labels: list[int], train: bool, size: int, gpu: bool,
                      policy: Policy | None, interpolation: str = "bilinear", min_area: float = 0.08,
                      resize_side: int = 0, crop_first: float = 0.0, source: EpochFiles | None = None,
                      normalize: Normalizer | None = None):
    """Decode + (random-resized crop, flip, RandAugment | resize-shorter + centre crop), then
    `output_args(normalize)`'s output. The files: `source`'s batches if given (training), else
    DALI's reader over `files`.
    train: `interpolation` may be "random" (per image, as timm's "random"); val: the shorter side to
    `resize_side` then the centre crop, or with `crop_first` (a fraction) ffcv's centre square
    first (data.val_crop_first)."""
    if source is None:
        jpegs, label = fn.readers.file(file_root=file_root, files=files, labels=labels, random_shuffle=False,
                                       pad_last_batch=True, name="Reader")
    else:
        paths, label = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=2)
        jpegs = fn.io.file.read(paths)
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
    images = fn.crop_mirror_normalize(images, crop=(size, size), **output_args(normalize))
    return images, label.gpu() if gpu else label


def output_args(normalize: Normalizer | None) -> dict[str, Any]:
    """crop_mirror_normalize's output: normalised, in the model's dtype and layout, where DALI has
    that dtype (float32, float16): nothing left for the training stream (DLE's pipelines do this).
    Else (bfloat16, or no normaliser) uint8 HWC for the loader's one-op Normalizer: reading 1 byte
    per value, less than a cast from a float output of DALI's would read."""
    if normalize is None or normalize.dtype not in DALI_DTYPES:
        return {"dtype": types.UINT8, "output_layout": "HWC"}
    return {"dtype": DALI_DTYPES[normalize.dtype], "output_layout": "HWC" if normalize.channels_last else "CHW",
            "mean": list(normalize.mean), "std": list(normalize.std)}


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
    position, random state and where it was built, so a run resumed mid-epoch or at an epoch's
    end gets the very crops and flips it would have had. Without one (a resume on another world
    size), the rest of the epoch has the same files in the same order, with fresh random crops.
    A train pipeline lives across epochs: at an epoch's last batch it is reset, and the next
    epoch's first batches are decoded while the step loop finishes and evaluates.
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
        self.paths = [f"{self.root}/{name}" for name, _ in samples]
        if self.train:
            self.sampler = TrainSampler(len(samples), dist, cfg.run.seed, cfg.data.batch_size,
                                        cfg.data.repeated_augmentation, cfg.data.repeated_augmentation_round)
            self.steps_per_epoch = self.sampler.steps_per_epoch
            self.labels = np.asarray([label for _, label in samples], dtype=np.int32).reshape(-1, 1)
        else:
            self.shard = list(shard_range(len(samples), dist.rank, dist.world_size))
            self.steps_per_epoch = val_batches(len(self.shard), self.batch_size)
        self.wanted = (0, 0)  # the (epoch, step) the next __iter__ starts at
        self.restored: dict[str, Any] | None = None  # a state() from a checkpoint, until a pipeline is built
        self.batches: DALIGenericIterator | None = None  # the train pipeline's iterator, kept across epochs
        self.source: EpochFiles | None = None  # its files
        self.next = (0, 0)  # the (epoch, step) of its next batch
        self.size = 0  # its image size
        self.evaluation: DALIGenericIterator | None = None  # the val pipeline's, built once per run

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.wanted = (epoch, start_step)

    def state(self) -> dict[str, Any] | None:
        if self.batches is None:
            return self.restored
        return {"first": self.source.first, "next": self.next, "size": self.size,
                "dali": self.batches.checkpoints()[0]}

    def restore(self, state: Any) -> None:
        self.restored = state

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            if self.shard:
                yield from self._yield(self._evaluation_batches(), self._val_files)
            return
        epoch, start = self.wanted
        if start >= self.steps_per_epoch:
            return
        batches, step = self._train_batches(epoch, start), start
        in_flight = lambda done: self.source.files(epoch, start + done, PREFETCH_BATCHES)  # noqa: E731
        for images, labels in self._yield(batches, in_flight):
            step += 1
            self.next, last = (epoch, step), step == self.steps_per_epoch
            if last:
                self._next_epoch(batches)
            yield images, labels
            if last:
                return

    def _yield(self, batches: DALIGenericIterator, in_flight) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The pipeline's batches on the device, normalised; a file that breaks it named
        (`in_flight(done)`: the paths of the batches DALI may hold after `done` were yielded)."""
        done = 0
        while True:
            try:
                out = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:  # DALI names the operator, not the file
                raise self._bad_file(in_flight(done)) or err from None
            images, labels = out[0]["images"].to(self.dist.device, non_blocking=True), out[0]["labels"]
            if images.dtype == torch.uint8 or self.normalize.channels_last:
                images = images.permute(0, 3, 1, 2)  # NHWC memory, NCHW view
            if images.dtype == torch.uint8:
                images = self.normalize(images)
            done += 1
            yield images, labels.view(-1).long().to(self.dist.device, non_blocking=True)

    def _train_batches(self, epoch: int, step: int) -> DALIGenericIterator:
        """The live pipeline if it is at (epoch, step) at this epoch's size; else one built there, from
        the restored DALI checkpoint if it was taken there."""
        size = train_image_size(self.data, epoch)
        if self.batches is not None and (self.next, self.size) == ((epoch, step), size):
            return self.batches
        restored, self.restored = self.restored or {}, None
        first, checkpoint = (epoch, step), None
        if (tuple(restored.get("next", ())), restored.get("size")) == ((epoch, step), size):
            first, checkpoint = tuple(restored["first"]), restored["dali"]
        self.batches = None  # the old pipeline goes before the new one takes its memory
        self.source = EpochFiles(self.paths, self.labels, self.sampler, first)
        self.batches = self._iterator(self._pipeline(size, first, checkpoint))
        self.next, self.size = (epoch, step), size
        return self.batches

    def _next_epoch(self, batches: DALIGenericIterator) -> None:
        """After an epoch's last batch: DALI ends the epoch, and reset() starts the next one's."""
        try:
            next(batches)
        except StopIteration:
            batches.reset()
            self.next = (self.next[0] + 1, 0)
        else:
            raise RuntimeError("DALI's train pipeline gave more batches than the sampler deals")

    def _iterator(self, pipe) -> DALIGenericIterator:
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name=None if self.train else "Reader",
                                   last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)

    def _evaluation_batches(self) -> DALIGenericIterator:
        """The val pipeline, built at the first evaluation and restarted for each later one (its
        files, sizes and order never change; the reader pads its last batch, so every pass starts
        at the shard's first image)."""
        if self.evaluation is None:
            self.evaluation = self._iterator(self._pipeline(val_image_size(self.data)))
        else:
            self.evaluation.reset()
        return self.evaluation

    def _val_files(self, done: int) -> list[str]:
        """The val paths DALI may hold after `done` batches were yielded."""
        shard = self.shard[done * self.batch_size : (done + PREFETCH_BATCHES) * self.batch_size]
        return [self.paths[i] for i in shard]

    def _pipeline(self, size: int, first: tuple[int, int] = (0, 0), checkpoint: bytes | None = None):
        """A built DALI pipeline: train at `size` from (epoch, step) `first` (or a checkpoint taken
        in a pipeline built there), or val."""
        gpu = self.dist.device.type == "cuda"
        augment = self.train and self.data.auto_augment
        # train: the files from EpochFiles; val: DALI's reader over this rank's shard
        files = {"files": [], "labels": [], "source": self.source} if self.train else {
            "files": [self.samples[i][0] for i in self.shard], "labels": [self.samples[i][1] for i in self.shard]}
        pipe = imagenet_pipeline(
            file_root=self.root, **files, train=self.train, gpu=gpu, size=size,
            policy=timm_policy(self.data.auto_augment, size, normalization(self.data.dataset)[0]) if augment else None,
            interpolation=train_interpolation(self.data) if self.train else self.data.interpolation,
            min_area=self.data.crop_min_area, resize_side=val_resize_side(self.data),
            crop_first=self.data.val_crop_fraction if self.data.val_crop_first else 0.0,
            batch_size=self.batch_size, num_threads=self.threads, device_id=self.dist.local_rank if gpu else None,
            seed=augmentation_seed(self.seed, first[0], self.dist.rank * 1_000_000 + first[1]) % 2**31,
            enable_checkpointing=self.train, checkpoint=checkpoint, prefetch_queue_depth=PREFETCH_DEPTH,
            normalize=self.normalize,
        )
        pipe.build()
        return pipe

    def _bad_file(self, paths: list[str]) -> UserError | None:
        """The file that broke the pipeline: the first that does not decode in the batches DALI
        had in flight (the failing one and its prefetch queue); None if they all do."""
        for path in paths:
            problem = image_problem(Path(path))
            if problem:
                return unreadable_image(Path(path), problem)
        return None


def build_dali_loaders(
    cfg: Config, dist: DistInfo, normalize: Normalizer, samples: Samples
) -> tuple[DaliLoader, DaliLoader]:
    if cfg.data.dataset == "folder":  # prepare-imagenet checked its images' sizes; a folder's are checked here
        check_sizes(Path(cfg.data.root), samples)
    return (DaliLoader(cfg, dist, normalize, "train", samples["train"]),
            DaliLoader(cfg, dist, normalize, "val", samples["val"]))
