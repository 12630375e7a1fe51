"""Public datasets on first use, as every CIFAR tutorial does: CIFAR-10/100, MNIST and Fashion-MNIST
from the URLs torchvision's dataset classes hold, checked against their checksums, into data.root.
ImageNet is never downloaded (it needs an account).

An archive is downloaded under a temporary name, checked, and extracted into a temporary folder
that is renamed into place, so an interrupted or corrupted download never leaves a folder that
looks complete; ranks of one machine take turns through a lock file and the first one fetches.

    ensure_dataset(Path("data"), "cifar10", "auto")     # data/cifar-10-batches-py, downloaded if missing
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from imagenet_resnet.data.datasets import CIFAR_FOLDERS, IDX_FILES, IDX_SUBDIRS
from imagenet_resnet.errors import UserError


def dataset_class(dataset: str):
    from torchvision import datasets

    return {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST,
            "fashion_mnist": datasets.FashionMNIST}[dataset]


def present(root: Path, dataset: str) -> bool:
    """Whether the files the readers need are there (extracted CIFAR folder; idx files, gzipped or not)."""
    if dataset in CIFAR_FOLDERS:
        return (root / CIFAR_FOLDERS[dataset]).is_dir()
    names = [name for split in IDX_FILES.values() for name in split]
    return all(any((root / sub / (name + gz)).is_file() for sub in ("", IDX_SUBDIRS[dataset]) for gz in ("", ".gz"))
               for name in names)


def ensure_dataset(root: Path, dataset: str, mode: str) -> None:
    """Download `dataset` into `root` if it is not there and data.download=auto."""
    if present(root, dataset) or mode == "never":
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be fetching it: wait, then look again
        if present(root, dataset):
            return
        if dataset in CIFAR_FOLDERS:
            cls = dataset_class(dataset)
            fetch(root, [cls.url], cls.filename, cls.tgz_md5, dataset, extract_to=CIFAR_FOLDERS[dataset])
        else:
            cls = dataset_class(dataset)
            folder = root / IDX_SUBDIRS[dataset]
            folder.mkdir(parents=True, exist_ok=True)
            for filename, md5 in cls.resources:
                fetch(folder, [mirror + filename for mirror in cls.mirrors], filename, md5, dataset)


def fetch(folder: Path, urls: list[str], filename: str, md5: str, dataset: str, extract_to: str = "") -> None:
    """`filename` from the first of `urls` that answers, checked (md5), into `folder` (extracted, if
    `extract_to` names the folder the archive holds)."""
    from urllib.error import URLError

    from torchvision.datasets.utils import check_integrity, download_url, extract_archive

    partial = folder / f".partial-{filename}"  # the suffix kept: it tells the extractor the format
    partial.unlink(missing_ok=True)  # an interrupted earlier try: torchvision would take it as downloaded
    errors = []
    for url in urls:
        try:
            download_url(url, str(folder), partial.name, md5=None)
            break
        except (URLError, OSError) as err:
            errors.append(f"{url} ({getattr(err, 'reason', err)})")
    else:
        partial.unlink(missing_ok=True)
        raise UserError(
            f"data.dataset={dataset}: not in {folder} and could not download it: {'; '.join(errors)}. "
            f"On a machine with network, fetch {urls[0]} and put "
            f"{'its extracted ' + extract_to if extract_to else filename} "
            f"in {folder} (data.download=never stops trying)"
        )
    if not check_integrity(str(partial), md5):
        partial.unlink()
        raise UserError(f"{urls[0]}: the download does not match torchvision's checksum (md5 {md5}); removed, "
                        f"nothing extracted. Run again to download it again")
    if not extract_to:
        os.replace(partial, folder / filename)
        return
    unpacked = Path(tempfile.mkdtemp(dir=folder, prefix=".extracting-"))
    try:
        extract_archive(str(partial), str(unpacked))
        if not (unpacked / extract_to).is_dir():
            raise UserError(f"{urls[0]}: the archive holds no {extract_to} folder")
        os.replace(unpacked / extract_to, folder / extract_to)  # in place only once complete
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        partial.unlink(missing_ok=True)
