"""Read the ILSVRC2012 devkit: the 1000 leaf synsets and the val ground truth, by wnid.

ILSVRC2012_IDs (1..1000, ID 1 is n02119789) are not the labels ImageFolder and DALI use: those
are the indices of the wnids in sorted order. Everything downstream uses `label_of` below.

    python -m data_prep.devkit --devkit SRC/ILSVRC2012_devkit_t12.tar.gz --dest DEST
    # DEST/synsets.txt: "<label> <wnid> <words>" per class; DEST/.prep/devkit.json
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import scipy.io

from imagenet_resnet.cli import command, existing_file, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import write_atomic

META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = "ILSVRC2012_val_{:08d}.JPEG"
WNID = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class Synset:
    ilsvrc_id: int
    wnid: str
    words: str
    num_train_images: int


@dataclass(frozen=True)
class Devkit:
    synsets: list[Synset]  # leaves, sorted by wnid: position = label
    val_wnids: dict[str, str]  # val file name -> wnid

    def label_of(self) -> dict[str, int]:
        return {s.wnid: i for i, s in enumerate(self.synsets)}


def _member(tar: tarfile.TarFile, suffix: str, path: Path) -> bytes:
    for info in tar.getmembers():
        if info.isfile() and info.name.endswith(suffix):
            return tar.extractfile(info).read()
    raise UserError(f"{path}: no {suffix} inside; is this ILSVRC2012_devkit_t12.tar.gz?")


def read_devkit(path: Path) -> Devkit:
    try:
        with tarfile.open(path, "r:*") as tar:
            meta = _member(tar, META, path)
            truth = _member(tar, GROUND_TRUTH, path).decode().split()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{path}: unreadable devkit archive ({err})") from err
    try:
        records = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        leaves = [
            # words become one line of synsets.txt whatever whitespace or line breaks they hold
            Synset(
                int(r["ILSVRC2012_ID"]), str(r["WNID"]), " ".join(str(r["words"]).split()), int(r["num_train_images"])
            )
            for r in records
            if int(r["num_children"]) == 0
        ]
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{path}: {META} is not the devkit's synsets table ({err})") from err
    for s in leaves:  # a WNID becomes a folder name under DEST: nothing but n + 8 digits may pass
        if not WNID.fullmatch(s.wnid):
            raise UserError(f"{path}: {META} gives class {s.ilsvrc_id} the WNID {s.wnid!r}, not n + 8 digits; "
                            f"refusing to use it as a folder name")
    if len({s.wnid for s in leaves}) != len(leaves):
        raise UserError(f"{path}: {META} lists a WNID twice among its leaf synsets")
    by_id = {s.ilsvrc_id: s.wnid for s in leaves}
    try:
        val_wnids = {VAL_NAME.format(i): by_id[int(v)] for i, v in enumerate(truth, start=1)}
    except (KeyError, ValueError) as err:
        raise UserError(f"{path}: {GROUND_TRUTH} names ILSVRC2012_ID {err} that no leaf synset has") from err
    return Devkit(sorted(leaves, key=lambda s: s.wnid), val_wnids)


def save(devkit: Devkit, dest: Path) -> None:
    try:
        (dest / ".prep").mkdir(parents=True, exist_ok=True)
        lines = "".join(f"{i} {s.wnid} {s.words}\n" for i, s in enumerate(devkit.synsets))
        write_atomic(dest / "synsets.txt", lines)
        write_atomic(dest / ".prep" / "devkit.json",
                     json.dumps({"synsets": [asdict(s) for s in devkit.synsets], "val_wnids": devkit.val_wnids}))
    except OSError as err:
        raise UserError(f"DEST={dest}: cannot write there ({err.strerror}: {err.filename})") from err


def load(dest: Path) -> Devkit:
    raw = json.loads((dest / ".prep" / "devkit.json").read_text())
    return Devkit([Synset(**s) for s in raw["synsets"]], raw["val_wnids"])



def main() -> None:
    p = command(__spec__.name, "Parse the devkit into DEST/synsets.txt and DEST/.prep/devkit.json.")
    p.add_argument("--devkit", type=existing_file, required=True, help="ILSVRC2012_devkit_t12.tar.gz")
    p.add_argument("--dest", type=Path, required=True, help="the prepared dataset's folder")
    a = p.parse_args()
    devkit = read_devkit(a.devkit)
    save(devkit, a.dest)
    print(f"devkit: {len(devkit.synsets)} classes, {len(devkit.val_wnids)} val labels", flush=True)


if __name__ == "__main__":
    run_main(main)
