"""Datasets and loaders: CIFAR and MNIST resident on the device, image folders through torchvision or DALI.

Every loader yields `(images, labels)` already on the device, images normalised in the model's
dtype and memory format, and follows the same two rules:
- train: a fresh permutation per epoch from (seed, epoch), split across ranks like
  DistributedSampler (drop_last), and startable mid-epoch for exact resume; each image's
  augmentation is seeded by (seed, epoch, image index), so it does not depend on workers,
  ranks or restarts;
- val: contiguous shards from `shard_range`, no padding, no repeats: each image counted once.

    train, val, num_classes = build_loaders(cfg, dist, input_dtype=torch.float32)
    train.set_position(epoch=3, start_step=0)
    for images, labels in train: ...
"""

from __future__ import annotations

import gzip
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data_prep.layout import COMPLETE_MARKER
from imagenet_resnet.config import Config
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
VAL_CROP_FRACTION = 0.875  # val: resize shorter side to size / 0.875, centre crop (224 of 256)
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


FASHION_MNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot")


@dataclass(frozen=True)
class SmallDataset:
    """A dataset that fits on the device: normalisation, whether flips are label-preserving, shape."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    channels: int
    classes: int
    size: int  # images are size x size


SMALL_DATASETS = {
    "cifar10": SmallDataset(CIFAR_MEAN, CIFAR_STD, flip=True, channels=3, classes=10, size=32),
    "cifar100": SmallDataset(CIFAR_MEAN, CIFAR_STD, flip=True, channels=3, classes=100, size=32),
    # a flipped digit is another glyph
    "mnist": SmallDataset((0.1307,), (0.3081,), flip=False, channels=1, classes=10, size=28),
    "fashion_mnist": SmallDataset((0.2860,), (0.3530,), flip=False, channels=1, classes=10, size=28),
}
CIFAR_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_SUBDIRS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}  # where torchvision keeps them


def input_channels(dataset: str) -> int:
    return SMALL_DATASETS[dataset].channels if dataset in SMALL_DATASETS else 3


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


class TrainSampler(DistributedSampler):
    """DistributedSampler (shuffle, drop_last) that starts mid-epoch and yields (index, aug seed)."""

    def __init__(self, num_images: int, dist: DistInfo, seed: int, batch_size: int) -> None:
        super().__init__(range(num_images), dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.steps_per_epoch = self.num_samples // batch_size
        self.start = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.set_epoch(epoch)
        self.start = start_step * self.batch_size

    def indices(self) -> list[int]:
        """This rank's indices for the rest of the epoch, whole batches only."""
        return list(super().__iter__())[self.start : self.steps_per_epoch * self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(i, augmentation_seed(self.seed, self.epoch, i)) for i in self.indices()])

    def __len__(self) -> int:
        return max(0, self.steps_per_epoch * self.batch_size - self.start)


# --- CIFAR: the whole set on the device -------------------------------------------------------


def read_cifar(root: str | Path, dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released pickles (Python 2: latin1) as uint8 NCHW images and int64 labels."""
    folder = Path(root) / CIFAR_FOLDERS[dataset]
    if dataset == "cifar10":
        splits = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
        label_key = "labels"
    else:
        splits = {"train": ["train"], "val": ["test"]}
        label_key = "fine_labels"
    missing = [name for names in splits.values() for name in names if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder}: {dataset} not found (missing {', '.join(missing)}). Put the extracted "
            f"{CIFAR_FOLDERS[dataset]} folder under data.root; this machine downloads nothing."
        )
    out = []
    for names in splits.values():
        images, labels = [], []
        for name in names:
            try:
                with open(folder / name, "rb") as f:
                    batch = pickle.load(f, encoding="latin1")
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch[label_key])
            except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
                raise UserError(f"{folder / name}: not a {dataset} batch file ({err!r})") from err
        out += [torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)]
    return out[0], out[1], out[2], out[3]


def class_names(cfg: Config) -> list[str]:
    """Human names of the classes, by label: the dataset's own (CIFAR meta, synsets.txt words,
    folder names), or the label numbers where the data does not name them."""
    dataset, root = cfg.data.dataset, Path(cfg.data.root)
    if dataset == "mnist":
        return [str(i) for i in range(10)]
    if dataset == "fashion_mnist":
        return list(FASHION_MNIST_NAMES)
    if dataset in CIFAR_META:
        name, key = CIFAR_META[dataset]
        try:
            with open(root / CIFAR_FOLDERS[dataset] / name, "rb") as f:
                return [str(n) for n in pickle.load(f, encoding="latin1")[key]]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
            return [str(i) for i in range(SMALL_DATASETS[dataset].classes)]
    if dataset == "imagenet":
        lines = re.findall(r"^\d+ (n\d{8})(?: (.*))?$", (root / "synsets.txt").read_text(), re.MULTILINE)
        return [words.strip() or wnid for wnid, words in lines]
    from torchvision.datasets.folder import find_classes

    return find_classes(str(root / "train"))[0]


def val_transform(cfg: Config):
    """The evaluation resize and centre crop (torchvision v2, uint8 CHW in and out), for any
    image: the torchvision val loader and `predict` use this one."""
    from torchvision.transforms import v2

    if cfg.data.dataset in SMALL_DATASETS:
        size = SMALL_DATASETS[cfg.data.dataset].size
        return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    size = cfg.data.image_size
    return v2.Compose([v2.Resize(round(size / VAL_CROP_FRACTION), antialias=True), v2.CenterCrop(size)])


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    spec = SMALL_DATASETS.get(dataset)
    return (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: big-endian dims after a 4-byte magic), gzipped or not."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_mnist(root: str | Path, dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST / Fashion-MNIST idx files from data.root (or torchvision's <root>/MNIST/raw)."""
    out = []
    for split, names in IDX_FILES.items():
        for name in names:
            candidates = [Path(root) / sub / (name + gz) for sub in ("", IDX_SUBDIRS[dataset]) for gz in ("", ".gz")]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise UserError(f"{Path(root) / name}[.gz]: {dataset} file not found (also looked in "
                                f"{Path(root) / IDX_SUBDIRS[dataset]}); this machine downloads nothing")
            array = torch.from_numpy(read_idx(path).copy())
            out.append(array[:, None] if array.ndim == 3 else array.long())
    return out[0], out[1], out[2], out[3]


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
            self.steps_per_epoch = -(-len(self.shard) // batch_size)
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


# --- ImageNet layout: torchvision loader -----------------------------------------------------


Samples = dict[str, list[tuple[str, int]]]  # split -> (path relative to <root>/<split>, label)


def read_file_lists(root: Path) -> tuple[Samples, int]:
    """prepare-imagenet's DEST/train.txt and val.txt, and the class count from synsets.txt's labels."""
    synsets = root / "synsets.txt"
    try:
        text = synsets.read_text()
    except OSError as err:
        raise UserError(f"{synsets}: missing or unreadable ({err.strerror}); re-run make prepare-imagenet") from err
    # "<label> <wnid> <words>" per class; a line that is not one (words of an older devkit parse) is no class.
    labels = [int(m[1]) for m in re.finditer(r"^(\d+) n\d{8}(?: |$)", text, re.MULTILINE)]
    if not labels or labels != list(range(len(labels))):
        raise UserError(f"{synsets}: expected lines '<label> <wnid> <words>' with labels 0, 1, 2, ...; "
                        f"re-run make prepare-imagenet")
    num_classes = len(labels)
    samples = {}
    for split in ("train", "val"):
        list_path = root / f"{split}.txt"
        try:
            lines = list_path.read_text().splitlines()
        except OSError as err:
            raise UserError(f"{list_path}: unreadable file list ({err.strerror}); re-run make prepare-imagenet") from err
        samples[split] = []
        for number, line in enumerate(lines, start=1):
            path, _, label = line.rpartition(" ")
            if not (path and label.isdigit() and int(label) < num_classes):
                raise UserError(f"{list_path}: line {number} is not '<path> <label>' with a label below the "
                                f"{num_classes} classes of {synsets.name}: {line[:200]!r}; re-run make prepare-imagenet")
            samples[split].append((path, int(label)))
    return samples, num_classes


def scan_folders(root: Path) -> tuple[Samples, int]:
    """Any ImageFolder layout: root/train/<class>/*, root/val/<class>/*, classes named by train/."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root / split}: missing; data.dataset=folder expects train/ and val/ class folders")
    classes, class_to_idx = find_classes(str(root / "train"))
    samples = {}
    for split in ("train", "val"):
        try:
            found = make_dataset(str(root / split), class_to_idx, IMG_EXTENSIONS, allow_empty=split == "val")
        except FileNotFoundError as err:
            raise UserError(f"{root / split}: {err}") from err
        samples[split] = [(str(Path(path).relative_to(root / split)), label) for path, label in found]
    return samples, len(classes)


def check_prepared(root: Path) -> None:
    if not (root / COMPLETE_MARKER).is_file():
        raise UserError(
            f"{root}: not a finished prepare-imagenet output (no {COMPLETE_MARKER} marker). "
            f"Run: make prepare-imagenet SRC=<archives> DEST={root}"
        )


def unreadable_image(path: Path | str, reason: str) -> UserError:
    """One bad file in a 1.2M-image set: name it, say how to check the rest and how to go on."""
    return UserError(
        f"{path}: unreadable image ({reason}). Replace the file, or check the whole dataset with "
        f"`make prepare-imagenet SRC=<archives> DEST=<data.root> VERIFY=decode`; then run the same command again, "
        f"it continues from the newest checkpoint in run.out_dir"
    )


def read_image(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(str(path), mode=ImageReadMode.RGB)


def image_problem(path: Path) -> str | None:
    """Why `path` does not decode as an RGB image, or None if it does."""
    try:
        read_image(path)
    except (RuntimeError, OSError) as err:
        return decode_error_text(err)
    return None


def decode_error_text(err: Exception) -> str:
    """torchvision's message without its C++ source location ("decode_image, .../x.cpp:61, ")."""
    return re.sub(r"^\w+, \S+:\d+, ", "", str(err))


class ImageFileDataset(Dataset):
    """JPEG files decoded by torchvision.io into uint8 CHW; keys are (index, augmentation seed).

    Yields (image, label, error): a file that does not decode gives a blank image and its error
    text, which the loader raises in the main process (a worker's exception would arrive as a
    traceback of the worker instead).
    """

    def __init__(self, folder: Path, samples: list[tuple[str, int]], transform) -> None:
        self.folder, self.samples, self.transform = folder, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        index, seed = key
        path, label = self.samples[index]
        torch.manual_seed(seed)  # transforms v2 draw from the global generator of this worker
        try:
            image, error = read_image(self.folder / path), ""
        except (RuntimeError, OSError) as err:
            error = str(unreadable_image(self.folder / path, decode_error_text(err)))
            image = torch.zeros(3, 1, 1, dtype=torch.uint8)
        return self.transform(image), label, error


class HostLoader(Loader):
    """A torchvision DataLoader whose batches are moved to the device and normalised there."""

    def __init__(self, loader: DataLoader, normalize: Normalizer, device, num_images, steps_per_epoch) -> None:
        self.loader, self.normalize, self.device = loader, normalize, device
        self.num_images, self.steps_per_epoch = num_images, steps_per_epoch

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        if isinstance(self.loader.sampler, TrainSampler):
            self.loader.sampler.set_position(epoch, start_step)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, errors in self.loader:
            error = next((e for e in errors if e), None)
            if error:
                raise UserError(error)
            images = images.to(self.device, non_blocking=True)
            yield self.normalize(images), labels.to(self.device, non_blocking=True)


def build_torchvision_loaders(cfg: Config, dist: DistInfo, normalize: Normalizer,
                              samples: Samples) -> tuple[HostLoader, HostLoader]:
    from torchvision.transforms import v2

    root = Path(cfg.data.root)
    size = cfg.data.image_size
    train_samples, val_samples = samples["train"], samples["val"]
    train_tf = v2.Compose(
        [v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True), v2.RandomHorizontalFlip()]
    )
    val_tf = val_transform(cfg)
    pin = dist.device.type == "cuda"
    workers = cfg.data.workers

    def make(split, samples, transform, sampler, drop_last):
        loader = DataLoader(
            ImageFileDataset(root / split, samples, transform),
            batch_size=cfg.data.batch_size,
            sampler=sampler,
            num_workers=workers,
            pin_memory=pin,
            drop_last=drop_last,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )
        return loader

    sampler = TrainSampler(len(train_samples), dist, cfg.run.seed, cfg.data.batch_size)
    train = HostLoader(
        make("train", train_samples, train_tf, sampler, True), normalize, dist.device, len(train_samples), sampler.steps_per_epoch
    )
    shard = [(i, 0) for i in shard_range(len(val_samples), dist.rank, dist.world_size)]
    val = HostLoader(
        make("val", val_samples, val_tf, shard, False), normalize, dist.device, len(val_samples),
        -(-len(shard) // cfg.data.batch_size),
    )
    return train, val


# --- choosing ---------------------------------------------------------------------------------


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
        read = read_cifar if dataset.startswith("cifar") else read_mnist
        train_x, train_y, val_x, val_y = read(cfg.data.root, dataset)
        normalize = Normalizer.create(spec.mean, spec.std, dist.device, input_dtype, channels_last)
        args = dict(batch_size=cfg.data.batch_size, normalize=normalize, dist=dist, seed=cfg.run.seed)
        train = DeviceLoader(train_x, train_y, train=True, padding=cfg.data.crop_padding, flip=spec.flip, **args)
        val = DeviceLoader(val_x, val_y, train=False, padding=0, flip=False, **args)
        return train, val, spec.classes
    root = Path(cfg.data.root)
    if dataset == "imagenet":
        check_prepared(root)
        samples, num_classes = read_file_lists(root)
    else:
        samples, num_classes = scan_folders(root)
    normalize = Normalizer.create(*normalization(dataset), dist.device, input_dtype, channels_last)
    if kind == "dali":
        from imagenet_resnet.dali import build_dali_loaders

        return (*build_dali_loaders(cfg, dist, normalize, samples), num_classes)
    return (*build_torchvision_loaders(cfg, dist, normalize, samples), num_classes)
