"""Finish a prepared ImageNet folder: file lists, torchvision's meta.bin, verification, manifest.

Labels are wnid indices in sorted order, the ones ImageFolder and DALI derive from the folders.
Verification compares every class's file count with the devkit (train: num_train_images,
val: its ground truth); with --decode every image is also fully decoded, in parallel. Only when
all is right are manifest.json and, last of all, the COMPLETE marker written.

    python -m data_prep.finish --dest DEST --src SRC [--decode] [--workers 16]
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from data_prep import devkit as devkit_mod
from data_prep.extract import ignore_sigint
from imagenet_resnet.cli import command, positive_int, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic
from imagenet_resnet.layout import COMPLETE_MARKER, DEVKIT, MANIFEST, TRAIN_TAR, VAL_TAR


def source_stamp(src: Path) -> dict[str, list[int]]:
    """Size and mtime of each archive: a finished DEST made from these same files is up to date."""
    return {
        name: [(src / name).stat().st_size, int((src / name).stat().st_mtime)] for name in (TRAIN_TAR, VAL_TAR, DEVKIT)
    }


def is_up_to_date(dest: Path, src: Path) -> bool:
    try:
        return (dest / COMPLETE_MARKER).is_file() and json.loads((dest / MANIFEST).read_text())[
            "sources"
        ] == source_stamp(src)
    except (OSError, ValueError, KeyError):
        return False


def list_split(dest: Path, split: str, label_of: dict[str, int]) -> list[tuple[str, int]]:
    files = []
    for wnid in sorted(label_of):
        folder = dest / split / wnid
        if folder.is_dir():
            files += [(f"{wnid}/{name}", label_of[wnid]) for name in sorted(os.listdir(folder))]
    return files


def write_file_lists(dest: Path, kit: devkit_mod.Devkit) -> dict[str, list[tuple[str, int]]]:
    """DEST/train.txt and val.txt in DALI's file_list format, and torchvision's meta.bin."""
    import torch

    label_of = kit.label_of()
    lists = {split: list_split(dest, split, label_of) for split in ("train", "val")}
    for split, files in lists.items():
        write_atomic(dest / f"{split}.txt", "".join(f"{path} {label}\n" for path, label in files))
    wnid_to_classes = {s.wnid: tuple(s.words.split(", ")) for s in kit.synsets}
    val_wnids = [kit.val_wnids[name] for name in sorted(kit.val_wnids)]
    torch.save((wnid_to_classes, val_wnids), dest / "meta.bin")  # torchvision.datasets.ImageNet(DEST)
    return lists


Problem = tuple[str, str | None, str]  # split, the class folder it condemns (None: no single one), message


def count_problems(kit: devkit_mod.Devkit, lists: dict[str, list[tuple[str, int]]]) -> list[Problem]:
    expected = {"train": {s.wnid: s.num_train_images for s in kit.synsets}, "val": Counter(kit.val_wnids.values())}
    problems = []
    for split, files in lists.items():
        found = Counter(path.split("/")[0] for path, _ in files)
        for wnid in sorted(expected[split]):
            if found[wnid] != expected[split][wnid]:
                problems.append(
                    (split, wnid, f"{split}/{wnid}: {found[wnid]} images, the devkit says {expected[split][wnid]}")
                )
        total, want = sum(found.values()), sum(expected[split].values())
        if total != want:
            problems.append((split, None, f"{split}: {total} images in all, expected {want}"))
    return problems


def decode_error(path: Path) -> str | None:
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return f"{path}: {im.format} {im.mode}, not an RGB/greyscale JPEG"
            im.load()
    except OSError as err:
        return f"{path}: does not decode ({err})"
    return None


def decode_all(dest: Path, lists: dict[str, list[tuple[str, int]]], workers: int) -> list[Problem]:
    files = [(split, path) for split, items in lists.items() for path, _ in items]
    with ProcessPoolExecutor(workers, initializer=ignore_sigint) as pool:
        errors = pool.map(decode_error, [dest / split / path for split, path in files], chunksize=256)
        return [(split, path.split("/")[0], e) for (split, path), e in zip(files, errors) if e]


def set_aside(dest: Path, problems: list[Problem]) -> list[str]:
    """Remove the class folders that failed, so the next run extracts them again (a class folder
    that exists counts as done); returns them as split/wnid."""
    condemned = sorted({(split, wnid) for split, wnid, _ in problems if wnid})
    for split, wnid in condemned:
        shutil.rmtree(dest / split / wnid, ignore_errors=True)
        (dest / ".prep" / split / f"{wnid}.json").unlink(missing_ok=True)
    return [f"{split}/{wnid}" for split, wnid in condemned]


def failed(dest: Path, problems: list[Problem]) -> UserError:
    """The verification's problems, the failed class folders set aside for the next run to extract again."""
    messages = [message for _, _, message in problems]
    shown = "\n  ".join(messages[:20]) + (f"\n  ... and {len(messages) - 20} more" if len(messages) > 20 else "")
    redo = set_aside(dest, problems)
    again = (f"Removed {len(redo)} class folder(s) ({', '.join(redo[:5])}{' ...' if len(redo) > 5 else ''}); "
             f"the next run extracts them again from the archives." if redo else "")
    return UserError(f"{dest}: verification failed, {len(messages)} problem(s):\n  {shown}\n" + again)


def finish(dest: Path, src: Path, decode: bool, workers: int) -> None:
    kit = devkit_mod.load(dest)
    lists = write_file_lists(dest, kit)
    records = {split: [json.loads(p.read_text()) for p in sorted((dest / ".prep" / split).glob("*.json"))]
               for split in ("train", "val")}
    converted = [c for rs in records.values() for r in rs for c in r["converted"]]
    problems = count_problems(kit, lists) + [(split, r["wnid"], f"{split}/{u}") for split, rs in records.items()
                                             for r in rs for u in r["unreadable"]]
    if decode:
        print(f"verify: decoding all {sum(map(len, lists.values()))} images with {workers} processes", flush=True)
        problems += decode_all(dest, lists, workers)
    if problems:
        raise failed(dest, problems)
    write_atomic(dest / "converted.txt", "".join(c + "\n" for c in converted))
    manifest = {
        "sources": source_stamp(src),
        "classes": len(kit.synsets),
        "images": {split: len(files) for split, files in lists.items()},
        "per_class": {s.wnid: {"label": i, "train": s.num_train_images,
                               "val": sum(1 for w in kit.val_wnids.values() if w == s.wnid)}
                      for i, s in enumerate(kit.synsets)},
        "converted": converted,
        "decoded": decode,
    }
    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=1))
    write_atomic(dest / COMPLETE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%S\n"))
    print(
        f"verified: {manifest['images']['train']} train and {manifest['images']['val']} val images in "
        f"{len(kit.synsets)} classes; {len(converted)} file(s) re-encoded or renamed (list: {dest / 'converted.txt'})",
        flush=True,
    )
    for line in converted:
        print(f"  converted {line}", flush=True)


def main() -> None:
    p = command(__spec__.name, "File lists, verification and the completion marker.")
    p.add_argument("--dest", type=Path, required=True, help="the prepared dataset's folder")
    p.add_argument("--src", type=Path, required=True, help="the folder of the ILSVRC2012 archives (read only)")
    p.add_argument("--decode", action="store_true", help="also decode every image (slow, parallel)")
    p.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="parallel verification processes")
    p.add_argument("--check-up-to-date", action="store_true", help="exit 0 if DEST is complete for SRC, else 1")
    a = p.parse_args()
    if a.check_up_to_date:
        sys.exit(0 if is_up_to_date(a.dest, a.src) else 1)
    finish(a.dest, a.src, a.decode, a.workers)


if __name__ == "__main__":
    run_main(main)
