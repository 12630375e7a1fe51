"""Small datasets in the real released formats, with classes a network can learn quickly.

    make_cifar(tmp_path, "cifar10", train_per_class=50, val_per_class=10)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def class_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 NCHW images: a colour and stripe orientation per class, plus noise."""
    n = len(labels)
    palette = np.random.default_rng(1234).integers(30, 226, size=(labels.max() + 1, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i, c in enumerate(labels):
        stripes = np.sin((xx if c % 2 else yy) * (0.5 + 0.25 * (c % 4))) * 40
        images[i] = palette[c][:, None, None] + stripes[None] + rng.normal(0, 20, (3, size, size))
    return np.clip(images, 0, 255).astype(np.uint8)


def make_cifar(root: Path, dataset: str = "cifar10", train_per_class: int = 50, val_per_class: int = 10,
               seed: int = 0) -> Path:
    """Write cifar-10-batches-py/ (5 data batches + test_batch) or cifar-100-python/ (train, test)."""
    classes = 10 if dataset == "cifar10" else 100
    rng = np.random.default_rng(seed)
    folder = Path(root) / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def split(per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.repeat(np.arange(classes), per_class))
        return class_images(labels, 32, rng).reshape(len(labels), -1), labels.tolist()

    def dump(name: str, data: np.ndarray, labels: list[int]) -> None:
        key = "labels" if dataset == "cifar10" else "fine_labels"
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, key: labels, "filenames": [f"{i}.png" for i in range(len(labels))]}, f, protocol=2)

    train_x, train_y = split(train_per_class)
    val_x, val_y = split(val_per_class)
    if dataset == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(len(train_y)), 5)):
            dump(f"data_batch_{i + 1}", train_x[part], [train_y[j] for j in part])
        dump("test_batch", val_x, val_y)
    else:
        dump("train", train_x, train_y)
        dump("test", val_x, val_y)
    return Path(root)
