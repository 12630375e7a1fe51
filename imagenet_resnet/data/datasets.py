"""What the datasets are and how they are read: CIFAR and MNIST files, the prepared ImageNet
file lists, image folders, single images, class names and normalisation constants.

    train_x, train_y, val_x, val_y = read_cifar("data", "cifar10")
    samples, num_classes = read_file_lists(Path("/data/imagenet"))   # DEST of prepare-imagenet
    class_names(cfg)       # ['tench, Tinca tinca', ...]
"""

from __future__ import annotations

import gzip
import io
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from imagenet_resnet.config import Config
from imagenet_resnet.errors import UserError
from imagenet_resnet.layout import COMPLETE_MARKER, MAX_IMAGE_PIXELS
from imagenet_resnet.unpickle import load_restricted

SYNSETS = "synsets.txt"  # prepare-imagenet's class list: "<label> <wnid> <words>" per line
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
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
# The released files of each split (train, val) and the key of their labels.
CIFAR_FILES = {"cifar10": (([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]), "labels"),
               "cifar100": ((["train"], ["test"]), "fine_labels")}
CIFAR_META = {"cifar10": ("batches.meta", "label_names"), "cifar100": ("meta", "fine_label_names")}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_SUBDIRS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}  # where torchvision keeps them


def input_channels(dataset: str) -> int:
    return SMALL_DATASETS[dataset].channels if dataset in SMALL_DATASETS else 3


def normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    spec = SMALL_DATASETS.get(dataset)
    return (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)


def read_cifar(root: str | Path, dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The released pickles (Python 2: latin1) as uint8 NCHW images and int64 labels."""
    folder = Path(root) / CIFAR_FOLDERS[dataset]
    splits, label_key = CIFAR_FILES[dataset]
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: is a file; expected the extracted {CIFAR_FOLDERS[dataset]} folder")
    missing = [name for names in splits for name in names if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder}: {dataset} not found (missing {', '.join(missing)}). Put the extracted "
            f"{CIFAR_FOLDERS[dataset]} folder under data.root (data.download=auto fetches it when the folder "
            f"is absent)"
        )
    out = []
    for names in splits:
        images, labels = zip(*(cifar_batch(folder / name, dataset, label_key) for name in names))
        out += [torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))]
    return out[0], out[1], out[2], out[3]


def cifar_batch(path: Path, dataset: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One released batch file: uint8 images (N, 3, 32, 32) and their N labels, checked."""
    try:
        batch = load_restricted(path, f"{dataset} batch file")
        data, labels = batch["data"], np.asarray(batch[label_key])
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError) as err:
        raise UserError(f"{path}: not a {dataset} batch file ({err!r})") from err
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        shape = getattr(data, "shape", None)
        raise UserError(f"{path}: 'data' is not a uint8 array of N x 3072 pixels ({type(data).__name__} "
                        f"{getattr(data, 'dtype', '')} {shape if shape is not None else ''})")
    check_labels(path, len(data), labels, SMALL_DATASETS[dataset].classes)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def check_labels(path: Path, images: int, labels: np.ndarray, classes: int) -> None:
    """One whole-number label per image, each a class: a shorter list would shift every later label."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: labels are not a list of whole numbers ({labels.dtype}, shape {labels.shape})")
    if len(labels) != images:
        raise UserError(f"{path}: {len(labels)} labels for {images} images")
    outside = labels[(labels < 0) | (labels >= classes)]
    if len(outside):
        raise UserError(f"{path}: label {outside[0]} is not a class of this dataset (0 to {classes - 1}); "
                        f"{len(outside)} such label(s)")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: big-endian dims after a 4-byte magic), gzipped or not."""
    try:
        data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: unreadable ({err})") from err
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UserError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except ValueError as err:
        raise UserError(f"{path}: its header says {' x '.join(map(str, dims))} values, the file holds "
                        f"{len(data) - 4 - 4 * ndim}") from err


def read_mnist(root: str | Path, dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST / Fashion-MNIST idx files from data.root (or torchvision's <root>/MNIST/raw)."""
    out = []
    for names in IDX_FILES.values():
        images_path, labels_path = (idx_path(Path(root), name, dataset) for name in names)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3:
            raise UserError(f"{images_path}: expected images (N x rows x columns), found {images.ndim} dimension(s)")
        check_labels(labels_path, len(images), labels, SMALL_DATASETS[dataset].classes)
        out += [torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64))]
    return out[0], out[1], out[2], out[3]


def idx_path(root: Path, name: str, dataset: str) -> Path:
    candidates = [root / sub / (name + gz) for sub in ("", IDX_SUBDIRS[dataset]) for gz in ("", ".gz")]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserError(f"{root / name}[.gz]: {dataset} file not found (also looked in {root / IDX_SUBDIRS[dataset]}); "
                        f"data.download=auto fetches it")
    return path


def read_small(root: str | Path, dataset: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A dataset of SMALL_DATASETS: train images, train labels, val images, val labels."""
    return (read_cifar if dataset in CIFAR_FOLDERS else read_mnist)(root, dataset)


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
            return [str(n) for n in load_restricted(root / CIFAR_FOLDERS[dataset] / name, f"{dataset} meta file")[key]]
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError):
            return [str(i) for i in range(SMALL_DATASETS[dataset].classes)]
    if dataset == "imagenet":
        return [words or wnid for wnid, words in read_synsets(root)]
    from torchvision.datasets.folder import find_classes

    return find_classes(str(root / "train"))[0]


Samples = dict[str, list[tuple[str, int]]]  # split -> (path relative to <root>/<split>, label)


def read_list(path: Path) -> str:
    """A text file prepare-imagenet wrote (UTF-8); UserError naming it if missing or not text."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"{path}: missing or unreadable ({err.strerror}); re-run make prepare-imagenet") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); re-run make prepare-imagenet") from err


def read_synsets(root: Path) -> list[tuple[str, str]]:
    """prepare-imagenet's DEST/synsets.txt: (WNID, words) of each class, in label order."""
    synsets = root / SYNSETS
    text = read_list(synsets)
    # "<label> <wnid> <words>" per class; a line that is not one (words of an older devkit parse) is no class.
    lines = re.findall(r"^(\d+) (n\d{8})(?:$| (.*)$)", text, re.MULTILINE)
    if not lines or [int(label) for label, _, _ in lines] != list(range(len(lines))):
        raise UserError(f"{synsets}: expected lines '<label> <wnid> <words>' with labels 0, 1, 2, ...; "
                        f"re-run make prepare-imagenet")
    return [(wnid, words.strip()) for _, wnid, words in lines]


def read_file_lists(root: Path) -> tuple[Samples, int]:
    """prepare-imagenet's DEST/train.txt and val.txt, and the class count from synsets.txt's labels."""
    num_classes = len(read_synsets(root))
    synsets = root / SYNSETS
    samples = {}
    for split in ("train", "val"):
        list_path = root / f"{split}.txt"
        lines = read_list(list_path).splitlines()
        samples[split] = []
        for number, line in enumerate(lines, start=1):
            path, _, label = line.rpartition(" ")
            if not (path and label.isdigit() and int(label) < num_classes):
                raise UserError(
                    f"{list_path}: line {number} is not '<path> <label>' with a label below the "
                    f"{num_classes} classes of {synsets.name}: {line[:200]!r}; re-run make prepare-imagenet"
                )
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
    if (root / COMPLETE_MARKER).is_file():
        return
    if (root / "train").is_dir() and (root / "val").is_dir() and not (root / "train.txt").exists():
        raise UserError(f"{root}: holds train/ and val/ folders but is not a prepare-imagenet output (no "
                        f"{COMPLETE_MARKER}, no train.txt); for your own class folders use data.dataset=folder")
    raise UserError(
        f"{root}: not a finished prepare-imagenet output (no {COMPLETE_MARKER} marker). "
        f"Run: make prepare-imagenet SRC=<archives> DEST={root}. ImageNet is never downloaded here: it needs an "
        f"account at image-net.org (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz)"
    )


def read_samples(root: Path, dataset: str) -> tuple[Samples, int]:
    """The train/val files and labels of an ImageNet-style dataset, and its class count."""
    if dataset == "imagenet":
        check_prepared(root)
        return read_file_lists(root)
    return scan_folders(root)


def unreadable_image(path: Path | str, reason: str) -> UserError:
    """One bad file in a 1.2M-image set: name it, say how to check the rest and how to go on."""
    return UserError(
        f"{path}: unreadable image ({reason}). Replace the file, or check the whole dataset with "
        f"`make prepare-imagenet SRC=<archives> DEST=<data.root> VERIFY=decode`; then run the same command again, "
        f"it continues from the newest checkpoint in run.out_dir"
    )


def read_image(path: Path, channels: int = 3, data: bytes | None = None) -> torch.Tensor:
    """An image file (or its bytes) as uint8 CHW with 3 (RGB) or 1 channels. A 16-bit PNG decodes
    to 0..65535: it is scaled to 0..255, as the normalisation expects, not taken as it is."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    source = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None else str(path)
    image = decode_image(source, mode=ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY)
    return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)


def oversize(source: Path | BinaryIO) -> str | None:
    """Why the image at `source` (a path or an open file) is too large to decode (from its header
    alone), or None. A file PIL cannot identify is left to the decoder, which names the problem."""
    try:
        with Image.open(source) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError as err:
        return str(err)
    except (OSError, ValueError, SyntaxError):
        return None
    if width * height > MAX_IMAGE_PIXELS:
        return f"{width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} this project decodes"
    return None


def read_checked(path: Path) -> bytes:
    """An image file's bytes, read once for the size check and the decoder; OSError if it is too large."""
    data = path.read_bytes()
    too_large = oversize(io.BytesIO(data))
    if too_large:
        raise OSError(too_large)
    return data


def check_sizes(root: Path, samples: Samples) -> None:
    """UserError naming the first image under `root`/<split> whose header is over MAX_IMAGE_PIXELS:
    for decoders that cannot be asked to refuse one (DALI's)."""
    paths = [root / split / path for split, pairs in samples.items() for path, _ in pairs]
    with ThreadPoolExecutor(8) as pool:
        for path, reason in zip(paths, pool.map(oversize, paths)):
            if reason:
                raise unreadable_image(path, reason)


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
