"""Write small ILSVRC2012 release archives for tests, the demo and benchmarks.

Same format as the real files: a train tar of per-class tars `<wnid>.tar` holding
`<wnid>_<n>.JPEG`; a flat val tar whose members are NOT in name order; a devkit tar.gz with
`data/meta.mat` (leaves with ILSVRC2012_IDs that do not follow sorted-wnid order, then inner
nodes) and `data/ILSVRC2012_validation_ground_truth.txt`. It plants the real set's problem
files: a CMYK JPEG and a PNG named .JPEG in train, a CMYK JPEG in val, a greyscale JPEG.
Each class has its own colour and stripe pattern, so a wrong label mapping shows up as
chance-level accuracy.

    python -m data_prep.generate --out data/demo/archives --classes 20 --train-per-class 60 --val-per-class 10
    generate_cifar(Path("data"), "cifar10", train_per_class=5000, val_per_class=1000)  # the CIFAR pickles
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.io
from PIL import Image

from imagenet_resnet.cli import command, positive_int
from imagenet_resnet.layout import DEVKIT, TRAIN_TAR, VAL_TAR

SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")


def class_image(label: int, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A colour per class plus a stripe orientation and frequency, with noise."""
    colour = np.random.default_rng(label + 7).integers(30, 226, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    angle = np.pi * (label % 6) / 6
    stripes = 45 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * (0.15 + 0.05 * (label % 3)))
    pixels = colour[None, None, :] + stripes[..., None] + rng.normal(0, 18, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode(image: Image.Image, kind: str = "rgb", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if kind == "png":
        image.save(buf, "PNG")
    elif kind == "cmyk":
        image.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind == "grey":
        image.convert("L").save(buf, "JPEG", quality=quality)
    else:
        image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_330_000_000
    tar.addfile(info, io.BytesIO(data))


def write_meta_mat(path: Path, wnids_by_id: list[str], train_counts: dict[str, int], inner_nodes: int,
                   words: dict[str, str] | None = None) -> None:
    """meta.mat as in the devkit: leaves with IDs 1..C (in ID order), then inner nodes."""
    rows = []
    for i, wnid in enumerate(wnids_by_id, start=1):
        text = (words or {}).get(wnid, f"class {wnid}, synset {i}")
        rows.append((i, wnid, text, f"gloss of {wnid}", 0, np.zeros((0,), dtype=np.uint8), 0, train_counts[wnid]))
    leaves = len(wnids_by_id)
    for j in range(inner_nodes):
        children = np.arange(1 + j, leaves + 1, max(1, inner_nodes), dtype=np.uint16)
        rows.append((leaves + 1 + j, f"n{90000000 + j:08d}", f"inner node {j}", "a parent", len(children), children,
                     1 + j % 3, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for r, row in enumerate(rows):
        synsets[r, 0] = row
    scipy.io.savemat(path, {"synsets": synsets})


def write_train_tar(path: Path, counts: dict[str, int], image: Callable[[str], Image.Image], plant_problems: bool,
                    quality: int) -> None:
    """The train release: one tar per class (in `counts`' order) inside one tar. The first class
    holds a CMYK JPEG, a PNG and a greyscale JPEG named .JPEG when `plant_problems`, as the real one does."""
    with tarfile.open(path, "w") as outer:
        for wnid, count in counts.items():
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w") as inner:
                for n in range(count):
                    kind = "rgb"
                    if plant_problems and wnid == next(iter(counts)):
                        kind = {0: "cmyk", 1: "png", 2: "grey"}.get(n, "rgb")
                    add_bytes(inner, f"{wnid}_{1000 + n}.JPEG", encode(image(wnid), kind, quality))
            add_bytes(outer, f"{wnid}.tar", inner_buf.getvalue())


def generate(out: Path, classes: int = 10, train_per_class: tuple[int, int] = (10, 14), val_per_class: int = 4,
             size: tuple[int, int] = (64, 48), seed: int = 0, plant_problems: bool = True, quality: int = 90,
             wnids: list[str] | None = None, words: dict[str, str] | None = None) -> Path:
    """Write the three archives into `out`; returns `out`. Image sizes vary +-25% around `size`.
    `wnids` and `words` (per wnid) replace the drawn ones: tests give hostile names this way."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    drawn = {f"n{x:08d}" for x in rng.choice(np.arange(1_000_000, 15_000_000), classes, replace=False)}
    wnids = sorted(wnids or drawn)
    classes = len(wnids)
    wnids_by_id = list(rng.permutation(wnids))  # ILSVRC2012_ID order differs from sorted order
    if wnids_by_id == wnids and classes > 1:
        wnids_by_id = wnids_by_id[1:] + wnids_by_id[:1]
    label = {w: i for i, w in enumerate(wnids)}

    def image(wnid: str) -> Image.Image:
        w, h = (int(s * rng.uniform(0.75, 1.25)) for s in size)
        return class_image(label[wnid], rng, w, h)

    train_counts = {w: int(rng.integers(train_per_class[0], train_per_class[1] + 1)) for w in wnids}
    write_train_tar(out / TRAIN_TAR, train_counts, image, plant_problems, quality)
    val_wnids = list(rng.permutation([w for w in wnids for _ in range(val_per_class)]))
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(val_wnids) + 1)]
    with tarfile.open(out / VAL_TAR, "w") as val_tar:
        for i in rng.permutation(len(names)):  # the real tar is not in name order either
            kind = "cmyk" if plant_problems and i == len(names) // 2 else "rgb"
            add_bytes(val_tar, names[i], encode(image(val_wnids[i]), kind, quality))
    id_of = {w: i for i, w in enumerate(wnids_by_id, start=1)}
    mat = io.BytesIO()
    write_meta_mat(mat, wnids_by_id, train_counts, inner_nodes=max(2, classes // 4), words=words)
    truth = "".join(f"{id_of[w]}\n" for w in val_wnids).encode()
    with tarfile.open(out / DEVKIT, "w:gz") as devkit:
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add_bytes(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
        add_bytes(devkit, "ILSVRC2012_devkit_t12/readme.txt", b"generated by data_prep.generate\n")
    return out


def cifar_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 NCHW images: a colour and stripe orientation per class, plus noise."""
    n = len(labels)
    palette = np.random.default_rng(1234).integers(30, 226, size=(labels.max() + 1, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.empty((n, 3, size, size), dtype=np.float32)
    for i, c in enumerate(labels):
        stripes = np.sin((xx if c % 2 else yy) * (0.5 + 0.25 * (c % 4))) * 40
        images[i] = palette[c][:, None, None] + stripes[None] + rng.normal(0, 20, (3, size, size))
    return np.clip(images, 0, 255).astype(np.uint8)


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def generate_cifar(root: Path, dataset: str = "cifar10", train_per_class: int = 50, val_per_class: int = 10,
               seed: int = 0) -> Path:
    """Write cifar-10-batches-py/ (5 data batches + test_batch) or cifar-100-python/ (train, test)."""
    classes = 10 if dataset == "cifar10" else 100
    rng = np.random.default_rng(seed)
    folder = Path(root) / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)

    def split(per_class: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.permutation(np.repeat(np.arange(classes), per_class))
        return cifar_images(labels, 32, rng).reshape(len(labels), -1), labels.tolist()

    def dump(name: str, data: np.ndarray, labels: list[int]) -> None:
        key = "labels" if dataset == "cifar10" else "fine_labels"
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"data": data, key: labels, "filenames": [f"{i}.png" for i in range(len(labels))]}, f, protocol=2
            )

    train_x, train_y = split(train_per_class)
    val_x, val_y = split(val_per_class)
    if dataset == "cifar10":
        for i, part in enumerate(np.array_split(np.arange(len(train_y)), 5)):
            dump(f"data_batch_{i + 1}", train_x[part], [train_y[j] for j in part])
        dump("test_batch", val_x, val_y)
        meta = ("batches.meta", {"label_names": list(CIFAR10_NAMES), "num_cases_per_batch": len(train_y) // 5})
    else:
        dump("train", train_x, train_y)
        dump("test", val_x, val_y)
        meta = ("meta", {"fine_label_names": [f"fine_{i}" for i in range(classes)],
                         "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    with open(folder / meta[0], "wb") as f:  # the class names, as the release has them
        pickle.dump(meta[1], f, protocol=2)
    return Path(root)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format of MNIST: 0x00 0x00 0x08 ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def generate_mnist(
    root: Path, train_per_class: int = 50, val_per_class: int = 10, gz: bool = True, seed: int = 0
) -> Path:
    """train-images-idx3-ubyte[.gz] and friends: 28x28 greyscale, a pattern per class."""
    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for prefix, per_class in (("train", train_per_class), ("t10k", val_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = cifar_images(labels, 28, rng).mean(axis=1)  # one channel
        suffix = ".gz" if gz and prefix == "train" else ""  # both forms occur in the wild
        write_idx(Path(root) / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(Path(root) / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return Path(root)


def main() -> None:
    p = command(__spec__.name, "Write small ILSVRC2012-format archives.")
    p.add_argument("--out", type=Path, required=True, help="folder for the train tar, the val tar and the devkit")
    p.add_argument(
        "--classes", type=positive_int, default=10, help="classes (real WNIDs, the first in the devkit's order)"
    )
    p.add_argument("--train-per-class", type=positive_int, nargs=2, default=(10, 14), metavar=("MIN", "MAX"),
                   help="train images per class, drawn between MIN and MAX")
    p.add_argument("--val-per-class", type=positive_int, default=4, help="val images per class")
    p.add_argument(
        "--size", type=positive_int, nargs=2, default=(64, 48), metavar=("W", "H"), help="image size in pixels"
    )
    p.add_argument("--quality", type=positive_int, default=90, help="JPEG quality, 1..100")
    p.add_argument("--seed", type=int, default=0, help="random seed of the images and counts")
    a = p.parse_args()
    if a.train_per_class[0] > a.train_per_class[1] or a.quality > 100:
        p.error("--train-per-class MIN MAX needs MIN <= MAX; --quality is 1..100")
    generate(a.out, a.classes, tuple(a.train_per_class), a.val_per_class, tuple(a.size), a.seed, quality=a.quality)
    print(f"wrote {TRAIN_TAR}, {VAL_TAR}, {DEVKIT} ({a.classes} classes) to {a.out}")


if __name__ == "__main__":
    main()
