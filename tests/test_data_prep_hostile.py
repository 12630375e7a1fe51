"""prepare-imagenet against hostile or unlucky archives: nothing outside DEST, clear errors, and a
re-run that finishes the job (issue 16)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from data_prep.extract import check_free_space, human_size, problem
from data_prep.generate import add_bytes, generate
from imagenet_resnet.data.datasets import read_file_lists
from imagenet_resnet.errors import UserError
from imagenet_resnet.layout import TRAIN_TAR
from test_data_prep import fingerprint, prepare, read_list

WNIDS = ["n01440764", "n01443537", "n01484850"]


def one_error_line(proc: subprocess.CompletedProcess, *named: str) -> str:
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "error:" in line]
    assert proc.returncode != 0 and "Traceback" not in output, output
    assert len(errors) == 1 and errors[0].startswith("error:"), output  # never glued to a progress line
    assert all(n in errors[0] for n in named), errors[0]
    return errors[0]


def rewrite_class_tar(src: Path, wnid: str, members: list[tuple[str, bytes]] | None = None,
                      drop: int = 0) -> list[tuple[str, bytes]]:
    """Replace the inner tar of one class in SRC's train archive; returns its original members."""
    with tarfile.open(src / TRAIN_TAR) as outer:
        classes = [(m.name, outer.extractfile(m).read()) for m in outer.getmembers()]
    inner_data = dict(classes)[f"{wnid}.tar"]
    with tarfile.open(fileobj=io.BytesIO(inner_data)) as inner:
        original = [(m.name, inner.extractfile(m).read()) for m in inner.getmembers()]
    new = members if members is not None else original[: len(original) - drop]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as inner:
        for name, data in new:
            add_bytes(inner, name, data)
    with tarfile.open(src / TRAIN_TAR, "w") as outer:
        for name, data in classes:
            add_bytes(outer, name, buf.getvalue() if name == f"{wnid}.tar" else data)
    return original


@pytest.mark.parametrize("hostile", ["../../../../victim", "/tmp/imagenet-resnet-abs-wnid", "n0144076"])
def test_a_devkit_wnid_that_is_not_n_and_8_digits_touches_nothing(hostile, tmp_path):
    victim = tmp_path / "deep" / "victim"  # what ../../../../victim reaches from DEST/.partial/val/
    victim.mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    shutil.rmtree("/tmp/imagenet-resnet-abs-wnid", ignore_errors=True)
    src = generate(tmp_path / "deep" / "src", wnids=[WNIDS[0], hostile, WNIDS[2]], train_per_class=(3, 3),
                   val_per_class=1, plant_problems=False, seed=3)
    dest = tmp_path / "deep" / "er" / "dest"
    dest.parent.mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = prepare(src, dest, "WORKERS=2")
    one_error_line(proc, "ILSVRC2012_devkit_t12.tar.gz", repr(hostile))
    assert (victim / "keep.txt").read_text() == "precious"
    assert not Path("/tmp/imagenet-resnet-abs-wnid").exists()
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and not p.startswith(str(dest))] == []


@pytest.fixture(scope="module")
def clean_archives(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("clean"), wnids=WNIDS, train_per_class=(4, 4), val_per_class=2,
                    plant_problems=False, seed=4)


def copy_of(archives: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(archives, src)
    return src


def test_line_breaks_in_names_and_words_still_give_parseable_lists(tmp_path, clean_archives):
    words = {WNIDS[1]: "tench,\nTinca tinca\u2028fish"}
    src = generate(tmp_path / "src", wnids=WNIDS, words=words, train_per_class=(4, 4), val_per_class=2,
                   plant_problems=False, seed=4)
    original = rewrite_class_tar(src, WNIDS[0], [])  # read its members, then write them back renamed
    renamed = [(f"{WNIDS[0]}_a\nb.JPEG", original[0][1]), (f"{WNIDS[0]}_c\u2028d.JPEG", original[1][1]),
               (f"{WNIDS[0]}_e\rf.JPEG", original[2][1]), (f"{WNIDS[0]}_a%0Ab.JPEG.x", original[3][1])]
    rewrite_class_tar(src, WNIDS[0], renamed)
    dest = tmp_path / "dest"
    proc = prepare(src, dest, "WORKERS=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    train = read_list(dest / "train.txt")
    assert len(train) == 12 and len((dest / "train.txt").read_text().splitlines()) == 12
    assert all((dest / "train" / path).is_file() for path, _ in train)
    names = sorted(p.name for p in (dest / "train" / WNIDS[0]).iterdir())
    assert names == sorted([f"{WNIDS[0]}_a%0Ab.JPEG", f"{WNIDS[0]}_c%2028d.JPEG", f"{WNIDS[0]}_e%0Df.JPEG",
                            f"{WNIDS[0]}_a%0Ab.JPEG.x"])
    report = (dest / "converted.txt").read_text()
    assert report.count("renamed from") == 3 and "\\n" in report and len(report.splitlines()) == 3
    synsets = (dest / "synsets.txt").read_text().splitlines()
    assert len(synsets) == 3 and synsets[1] == f"1 {WNIDS[1]} tench, Tinca tinca fish"
    assert read_file_lists(dest)[1] == 3


def test_class_count_comes_from_labels_even_in_an_older_synsets_txt(tmp_path):
    (tmp_path / "synsets.txt").write_text(f"0 {WNIDS[0]} a\n1 {WNIDS[1]} tench,\nTinca tinca\n2 {WNIDS[2]} c\n")
    (tmp_path / "train.txt").write_text(f"{WNIDS[0]}/x.JPEG 0\n{WNIDS[2]}/y.JPEG 2\n")
    (tmp_path / "val.txt").write_text(f"{WNIDS[1]}/z.JPEG 1\n")
    assert read_file_lists(tmp_path)[1] == 3
    (tmp_path / "train.txt").write_text(f"{WNIDS[0]}/x.JPEG 0\n{WNIDS[2]}/y.JPEG 3\n")
    with pytest.raises(UserError, match=r"train\.txt: line 2 .* 3 classes"):
        read_file_lists(tmp_path)
    (tmp_path / "synsets.txt").unlink()
    with pytest.raises(UserError, match=r"synsets\.txt: missing"):
        read_file_lists(tmp_path)


@pytest.mark.parametrize("member", [".", "..", f"{WNIDS[0]}/", f"{WNIDS[0]}/.."])
def test_an_inner_member_that_is_no_file_name(member, tmp_path, clean_archives):
    src = copy_of(clean_archives, tmp_path)
    original = rewrite_class_tar(src, WNIDS[0], [])
    rewrite_class_tar(src, WNIDS[0], original[:-1] + [(member, original[-1][1])])
    before = fingerprint(src)
    one_error_line(prepare(src, tmp_path / "dest", "WORKERS=2"), "ILSVRC2012_img_train.tar", f"{WNIDS[0]}.tar",
                   repr(member))
    assert fingerprint(src) == before


def test_a_class_that_failed_verification_is_redone_with_corrected_archives(tmp_path, clean_archives):
    src = copy_of(clean_archives, tmp_path)
    rewrite_class_tar(src, WNIDS[1], drop=1)  # one image short of the devkit's count
    dest = tmp_path / "dest"
    proc = prepare(src, dest, "WORKERS=2")
    assert proc.returncode != 0
    assert f"train/{WNIDS[1]}: 3 images, the devkit says 4" in proc.stderr and "extracts them again" in proc.stderr
    assert not (dest / "train" / WNIDS[1]).exists() and (dest / "train" / WNIDS[0]).is_dir()
    shutil.copy(clean_archives / TRAIN_TAR, src / TRAIN_TAR)  # the user fixes the download
    proc = prepare(src, dest, "WORKERS=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 already done, 1 to extract" in proc.stdout and len(read_list(dest / "train.txt")) == 12


def mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root in a container that allows it")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name: str, options: str) -> Path:
        where = tmp_path / name
        mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_disk_full_during_extraction_names_dest_and_file(tmp_path, tmpfs):
    # ~1 KB images pass the free-space check on bytes, but each file takes a 4 KB page on tmpfs.
    src = generate(tmp_path / "src", wnids=WNIDS, train_per_class=(60, 60), val_per_class=2, size=(16, 12),
                   plant_problems=False, seed=6)
    dest = tmpfs("small", "size=600k") / "dest"
    line = one_error_line(prepare(src, dest, "WORKERS=1"), f"DEST={dest}", "No space left on device")
    assert not list((dest / ".partial").rglob("*.JPEG")), "the failed class's partial files are removed"
    assert "GB" not in line


def test_the_free_space_check_speaks_in_units_that_fit(tmp_path, tmpfs, clean_archives):
    dest = tmpfs("tiny", "size=64k") / "dest"
    line = one_error_line(prepare(clean_archives, dest, "WORKERS=1"), "KB free", "KB needed")
    assert "0.0 GB" not in line


def test_dest_on_a_read_only_filesystem(tmp_path, tmpfs, clean_archives):
    dest = tmpfs("ro", "ro,size=1m")
    one_error_line(prepare(clean_archives, dest, "WORKERS=2"), f"DEST={dest}", "not writable")


def test_messages_for_small_sizes_and_unreadable_files(tmp_path):
    assert human_size(512) == "512 B" and human_size(1500) == "1.5 KB" and human_size(2.5e6) == "2.5 MB"
    assert human_size(150e9) == "150.0 GB"
    with pytest.raises(UserError, match=r"free, 1\.1 (EB|PB|TB|GB) needed|GB needed"):
        check_free_space(tmp_path, 10**18)
    assert problem(b"garbage") == "unreadable: not an image PIL can identify"


def test_ctrl_c_during_prepare_is_one_line_and_a_rerun_finishes(tmp_path):
    src = generate(tmp_path / "src", classes=10, train_per_class=(25, 25), val_per_class=2, size=(320, 240), seed=7)
    dest = tmp_path / "dest"
    proc = prepare(src, dest, "WORKERS=2", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (dest / ".partial").exists():  # the first class being written
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "Traceback" not in output and "KeyboardInterrupt" not in output, (
        f"{output}\n(this test process's SIGINT handler: {signal.getsignal(signal.SIGINT)})")
    assert "run the same command again" in output
    again = prepare(src, dest, "WORKERS=2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (dest / "COMPLETE").is_file()
