"""Extract an ILSVRC2012 train or val tar into DEST/<split>/<wnid>/, in parallel, resumably.

The archive is indexed once (tar headers only); each class is a unit of work that a worker
process reads straight from the archive at its offset, so inner tars are never written to
disk and read back. A unit is written under DEST/.partial/ and renamed into place when
complete: a class folder that exists is finished, and a re-run skips it. Files that not
every decoder reads (CMYK JPEGs, PNGs named .JPEG) are detected by content and re-encoded as
RGB JPEG; the list is kept in DEST/.prep/<split>/<wnid>.json. The archive is only read.

    python -m data_prep.extract --split train --archive SRC/ILSVRC2012_img_train.tar --dest DEST --workers 16
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import unicodedata
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_prep import devkit as devkit_mod
from imagenet_resnet.cli import command, existing_file, positive_int, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic
from imagenet_resnet.layout import MAX_IMAGE_PIXELS

WNID_TAR = re.compile(r"^(n\d{8})\.tar$")
UNSAFE_CATEGORIES = ("Cc", "Zl", "Zp")  # control characters, line and paragraph separators


@dataclass(frozen=True)
class Unit:
    """One class of one split: the archive members to read, as (name, data offset, size)."""

    split: str
    wnid: str
    members: tuple[tuple[str, int, int], ...]
    nested: bool  # train: the one member is the class's own tar

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.members)


def index_archive(path: Path) -> list[tarfile.TarInfo]:
    """Member headers of a tar, checked against the file's length (a cut download is caught here)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f"{path}: truncated or not a tar archive ({err})") from err
    length = path.stat().st_size
    cut = [m.name for m in members if m.offset_data + m.size > length]
    if cut:
        raise UserError(f"{path}: truncated: member {cut[0]} runs past the end of the file ({length} bytes)")
    if not members:
        raise UserError(f"{path}: holds no files")
    return members


def train_units(path: Path, wnids: set[str]) -> list[Unit]:
    units = []
    for m in index_archive(path):
        match = WNID_TAR.match(m.name)
        if not match:
            raise UserError(f"{path}: unexpected member {m.name!r}; the train archive holds <wnid>.tar files")
        if match[1] not in wnids:
            raise UserError(f"{path}: class {match[1]} is not in the devkit; do the archives belong together?")
        units.append(Unit("train", match[1], ((m.name, m.offset_data, m.size),), nested=True))
    return units


def val_units(path: Path, val_wnids: dict[str, str]) -> list[Unit]:
    members = index_archive(path)
    names = {m.name for m in members}
    unknown = sorted(names - val_wnids.keys())
    if unknown or len(names) != len(val_wnids):
        raise UserError(
            f"{path}: holds {len(names)} images but the devkit's ground truth lists {len(val_wnids)}"
            + (f"; {unknown[0]} has no ground truth" if unknown else "")
            + ": the devkit does not match this val set"
        )
    by_class: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    for m in members:
        by_class[val_wnids[m.name]].append((m.name, m.offset_data, m.size))
    return [Unit("val", wnid, tuple(sorted(ms, key=lambda t: t[1])), nested=False) for wnid, ms in by_class.items()]


def problem(data: bytes) -> str | None:
    """Why a file needs re-encoding (not a JPEG, or not RGB/greyscale), or None."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:  # checked before anything decodes it
                return (f"unreadable: {im.width} x {im.height} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                        f"the loaders decode")
            if im.format != "JPEG":
                return f"{im.format} named .JPEG"
            if im.mode not in ("RGB", "L"):
                return f"{im.mode} JPEG"
    except UnidentifiedImageError:
        return "unreadable: not an image PIL can identify"
    except (OSError, Image.DecompressionBombError) as err:
        return f"unreadable: {err}"
    return None


def plain_name(member: str, where: str) -> tuple[str, str | None]:
    """The file name to write for an inner tar member, and why it differs from the member's own.

    A path never leaves the class folder (only the last part is kept), and a line break or another
    control character, which would break the one-line-per-file lists, is written as %XX."""
    name = member.rsplit("/", 1)[-1]
    if name in ("", ".", ".."):
        raise UserError(f"{where}: holds a file member named {member!r}, which is no file name")
    safe = "".join(f"%{ord(c):02X}" if unicodedata.category(c) in UNSAFE_CATEGORIES else c for c in name)
    return safe, (f"renamed from {member!r}: control character or line break in the name" if safe != name else None)


def to_rgb_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _files(archive, unit: Unit):
    """(file name, why it was renamed or None, bytes) of a unit, read from the open archive at the
    members' offsets. Val names were checked against the devkit's list (VAL_NAME) already."""
    for name, offset, size in unit.members:
        archive.seek(offset)
        data = archive.read(size)
        if len(data) != size:
            raise UserError(f"{archive.name}: truncated inside {name}")
        if not unit.nested:
            yield name, None, data
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as inner:
                for m in inner.getmembers():
                    if m.isfile():
                        yield *plain_name(m.name, f"{archive.name}: class tar {name}"), inner.extractfile(m).read()
        except (tarfile.TarError, EOFError) as err:
            raise UserError(f"{archive.name}: class tar {name} is corrupt ({err})") from err


def human_size(num_bytes: float) -> str:
    if num_bytes < 1000:
        return f"{num_bytes:.0f} B"
    for unit in ("KB", "MB", "GB"):
        num_bytes /= 1000
        if num_bytes < 1000 or unit == "GB":
            break
    return f"{num_bytes:.1f} {unit}"


def extract_unit(archive_path: Path, unit: Unit, dest: Path) -> dict:
    """Write one class under .partial/, record it, rename it into place. Runs in a worker."""
    partial = dest / ".partial" / unit.split / unit.wnid
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    converted, unreadable, count = [], [], 0
    try:
        with open(archive_path, "rb") as archive:
            for name, renamed, data in _files(archive, unit):
                reason = problem(data)
                if reason and reason.startswith("unreadable"):
                    unreadable.append(f"{unit.wnid}/{name}: {reason}")
                elif reason:
                    data = to_rgb_jpeg(data)
                    converted.append(f"{unit.split}/{unit.wnid}/{name}: {reason}")
                if renamed:
                    converted.append(f"{unit.split}/{unit.wnid}/{name}: {renamed}")
                (partial / name).write_bytes(data)
                count += 1
        record = {"wnid": unit.wnid, "files": count, "converted": converted, "unreadable": unreadable}
        write_atomic(dest / ".prep" / unit.split / f"{unit.wnid}.json", json.dumps(record))
        os.rename(partial, dest / unit.split / unit.wnid)  # the commit point: a class folder is complete
    except OSError as err:  # disk full, quota, read-only: free what this unit took, name the place
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"DEST={dest}: cannot write {err.filename or partial} ({err.strerror}); "
                        f"free space or choose another DEST, then run the same command again") from err
    return record


def check_free_space(dest: Path, needed: int) -> None:
    free = shutil.disk_usage(dest).free
    if free < needed * 1.05:
        raise UserError(f"{dest}: {human_size(free)} free, {human_size(needed * 1.05)} needed for the rest")


def extract(split: str, archive: Path, dest: Path, workers: int) -> None:
    kit = devkit_mod.load(dest)
    units = (
        train_units(archive, {s.wnid for s in kit.synsets}) if split == "train" else val_units(archive, kit.val_wnids)
    )
    (dest / split).mkdir(parents=True, exist_ok=True)
    (dest / ".prep" / split).mkdir(parents=True, exist_ok=True)
    todo = [u for u in units if not (dest / split / u.wnid).is_dir()]
    check_free_space(dest, sum(u.size for u in todo))
    print(f"{split}: {len(units)} classes in {archive.name}, {len(units) - len(todo)} already done, "
          f"{len(todo)} to extract with {workers} processes", flush=True)
    if not todo:
        return
    interactive = sys.stderr.isatty()
    done = 0
    # The bar is closed (its line ended) before any error is printed.
    with tqdm(total=sum(u.size for u in todo), unit="B", unit_scale=True, desc=split,
              mininterval=0.5 if interactive else 15, file=sys.stderr) as bar, \
            ProcessPoolExecutor(max_workers=workers, initializer=ignore_sigint) as pool:
        pending = {pool.submit(extract_unit, archive, u, dest): u for u in todo}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    unit = pending.pop(future)
                    future.result()  # re-raises a worker's error here
                    done += 1
                    bar.update(unit.size)
                    bar.set_postfix_str(f"{done}/{len(todo)} classes", refresh=False)
        except BaseException:  # Ctrl-C or an error: classes in progress finish, the rest wait for a re-run
            for future in pending:
                future.cancel()
            raise


def ignore_sigint() -> None:
    """Workers leave Ctrl-C to the main process, which reports it once (not one traceback each)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def main() -> None:
    p = command(__spec__.name, "Extract one split of ILSVRC2012 into DEST/<split>/<wnid>/.")
    p.add_argument("--split", choices=("train", "val"), required=True, help="which archive this is")
    p.add_argument(
        "--archive", type=existing_file, required=True, help="ILSVRC2012_img_train.tar or _val.tar (read only)"
    )
    p.add_argument("--dest", type=Path, required=True, help="the prepared dataset's folder")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="parallel extraction processes")
    a = p.parse_args()
    extract(a.split, a.archive, a.dest, a.workers)


if __name__ == "__main__":
    run_main(main)
