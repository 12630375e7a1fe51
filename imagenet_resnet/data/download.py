"""Public datasets on first use, as every CIFAR tutorial does: CIFAR-10/100, MNIST and Fashion-MNIST
from the URLs torchvision's dataset classes hold, checked against their checksums, into data.root.
ImageNet is never downloaded (it needs an account).

An archive is downloaded under a temporary name, checked, and extracted into a temporary folder
that is renamed into place, so an interrupted or corrupted download never leaves a folder that
looks complete; ranks of one machine take turns through a lock file and the first one fetches.
A server that stops answering ends the download after data.download_timeout_s; an archive is
extracted with tarfile's `data` filter (nothing outside data.root, no links out, no devices, no
setuid bits) and at most MAX_EXTRACTED_BYTES.

    ensure_dataset(Path("data"), "cifar10", "auto")     # data/cifar-10-batches-py, downloaded if missing
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from urllib.error import URLError

from torchvision import datasets
from tqdm import tqdm

from imagenet_resnet.data.datasets import CIFAR_FOLDERS, IDX_FILES, IDX_SUBDIRS
from imagenet_resnet.errors import UserError

DATASET_CLASSES = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "mnist": datasets.MNIST,
                   "fashion_mnist": datasets.FashionMNIST}
MAX_EXTRACTED_BYTES = 2**30  # CIFAR-10/100 unpack to about 180 MB each
# Errors that mean the disk, not the network: the partial file is removed and the folder named.
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES)


def present(root: Path, dataset: str) -> bool:
    """Whether the files the readers need are there (extracted CIFAR folder; idx files, gzipped or not)."""
    if dataset in CIFAR_FOLDERS:
        return (root / CIFAR_FOLDERS[dataset]).is_dir()
    names = [name for split in IDX_FILES.values() for name in split]
    return all(any((root / sub / (name + gz)).is_file() for sub in ("", IDX_SUBDIRS[dataset]) for gz in ("", ".gz"))
               for name in names)


def ensure_dataset(root: Path, dataset: str, mode: str, timeout_s: float = 60.0) -> None:
    """Download `dataset` into `root` if it is not there and data.download=auto."""
    if present(root, dataset) or mode == "never":
        return
    target = root / CIFAR_FOLDERS.get(dataset, IDX_SUBDIRS.get(dataset, ""))
    for path in (root, target):
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: is a file; expected a folder (data.root holds the dataset's folder)")
    root.mkdir(parents=True, exist_ok=True)
    with open_lock(root / ".download.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank may be fetching it: wait, then look again
        if present(root, dataset):
            return
        cls = DATASET_CLASSES[dataset]
        if dataset in CIFAR_FOLDERS:
            fetch(root, [cls.url], cls.filename, cls.tgz_md5, dataset, timeout_s, extract_to=CIFAR_FOLDERS[dataset])
            return
        folder = root / IDX_SUBDIRS[dataset]
        folder.mkdir(parents=True, exist_ok=True)
        for filename, md5 in cls.resources:
            fetch(folder, [mirror + filename for mirror in cls.mirrors], filename, md5, dataset, timeout_s)


def open_lock(path: Path):
    """The lock file, opened without following a link and without truncating: a link planted there
    is replaced by a file of our own, its target left as it was."""
    for _ in range(2):
        try:
            return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise UserError(f"{path}: cannot open the download lock ({err.strerror})") from err
            path.unlink()
    raise UserError(f"{path}: keeps being replaced by a link; nothing was downloaded")


def fetch(folder: Path, urls: list[str], filename: str, md5: str, dataset: str, timeout_s: float,
          extract_to: str = "") -> None:
    """`filename` from the first of `urls` that answers, checked (md5), into `folder` (extracted, if
    `extract_to` names the folder the archive holds)."""
    partial = folder / f".partial-{filename}"
    errors = []
    for url in urls:
        try:
            got = download(url, partial, timeout_s)
            break
        except (URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
            errors.append(f"{url} ({getattr(err, 'reason', None) or type(err).__name__}: {err})")
    else:
        where = f"its extracted {extract_to}" if extract_to else filename
        raise UserError(f"data.dataset={dataset}: not in {folder} and could not download it: {'; '.join(errors)}. "
                        f"On a machine with network, fetch {urls[0]} and put {where} in {folder} "
                        f"(data.download=never stops trying)")
    try:
        if got != md5:
            raise UserError(f"{url}: the download does not match torchvision's checksum (md5 {md5}); removed, "
                            f"nothing extracted. Run again to download it again")
        if not extract_to:
            os.replace(partial, folder / filename)
            return
        extract(partial, folder, extract_to, url)
    finally:
        partial.unlink(missing_ok=True)


def download(url: str, partial: Path, timeout_s: float) -> str:
    """`url` into `partial` (a new file), with a progress bar on a terminal; its md5. A server that
    stops answering for timeout_s raises TimeoutError; a full disk, UserError naming the folder."""
    partial.unlink(missing_ok=True)  # an interrupted earlier try, or a link planted there
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        size = int(response.headers.get("Content-Length") or 0) or None
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=Path(url).name, disable=not sys.stderr.isatty())
        try:
            received = 0
            with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as out:
                while chunk := response.read(2**20):
                    digest.update(chunk)
                    write_chunk(out, chunk, partial)
                    received += len(chunk)
                    bar.update(len(chunk))
            if size and received < size:  # the server closed the connection early
                raise http.client.IncompleteRead(b"", size - received)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
    return digest.hexdigest()


def write_chunk(out, chunk: bytes, partial: Path) -> None:
    try:
        out.write(chunk)
    except OSError as err:
        if err.errno in DISK_ERRNOS:
            raise UserError(f"{partial.parent}: cannot write the download there ({err.strerror}); free space or "
                            f"choose another data.root. Nothing was kept") from err
        raise


def extract(archive: Path, folder: Path, extract_to: str, url: str) -> None:
    """The archive's `extract_to` folder into `folder`, only once it is complete and safe."""
    if not hasattr(tarfile, "data_filter"):  # Python 3.10.12, 3.11.4 and newer have it
        raise UserError(f"Python {sys.version.split()[0]} has no tarfile data filter to extract {url} safely; "
                        f"use Python >= 3.11.4 (or 3.10.12), or extract it yourself into {folder}")
    unpacked = Path(tempfile.mkdtemp(dir=folder, prefix=".extracting-"))
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            total = sum(m.size for m in members)
            if total > MAX_EXTRACTED_BYTES:
                raise UserError(f"{url}: would unpack to {total:,} bytes, more than {MAX_EXTRACTED_BYTES:,}; "
                                f"nothing extracted")
            tar.extractall(unpacked, filter="data")
        inside = unpacked / extract_to
        if inside.is_symlink() or not inside.is_dir():
            raise UserError(f"{url}: the archive holds no {extract_to} folder")
        os.replace(inside, folder / extract_to)  # in place only once complete
    except tarfile.FilterError as err:
        raise UserError(f"{url}: refused a member of the archive ({err}); nothing extracted") from err
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f"{url}: not a readable archive ({err}); nothing extracted") from err
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
