"""`make prepare-imagenet` on generated ILSVRC2012-format archives, as a user runs it."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, cli_env
from data_prep.generate import generate
from imagenet_resnet.layout import DEVKIT, TRAIN_TAR, VAL_TAR


def prepare(src: Path, dest: Path, *extra: str, wait: bool = True):
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "prepare-imagenet", f"SRC={src}", f"DEST={dest}", *extra]
    if not wait:
        # As from a terminal: SIGINT at its default, whatever this test process inherited (an ignored
        # signal stays ignored across exec, and the whole prepare would then ignore a Ctrl-C).
        return subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)


def fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.md5(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("src"), classes=7, train_per_class=(8, 12), val_per_class=3, seed=1)


@pytest.fixture(scope="module")
def prepared(archives, tmp_path_factory):
    before = fingerprint(archives)
    dest = tmp_path_factory.mktemp("out") / "imagenet"
    proc = prepare(archives, dest, "WORKERS=2", "VERIFY=decode")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fingerprint(archives) == before, "SRC must never change"
    return dest, proc


def read_list(path: Path) -> list[tuple[str, int]]:
    return [(p, int(label)) for p, label in (line.rsplit(" ", 1) for line in path.read_text().splitlines())]


def test_layout_file_lists_and_labels(prepared):
    dest, _ = prepared
    wnids = sorted(p.name for p in (dest / "train").iterdir())
    assert len(wnids) == 7 and sorted(p.name for p in (dest / "val").iterdir()) == wnids
    for split in ("train", "val"):
        files = read_list(dest / f"{split}.txt")
        on_disk = sorted(f"{w}/{f.name}" for w in wnids for f in (dest / split / w).iterdir())
        assert sorted(p for p, _ in files) == on_disk
        assert all(label == wnids.index(p.split("/")[0]) for p, label in files)  # sorted-wnid index
    synsets = [line.split(" ", 2) for line in (dest / "synsets.txt").read_text().splitlines()]
    assert [(int(i), w) for i, w, _ in synsets] == list(enumerate(wnids))
    assert all(name.split("/")[1].startswith(name.split("/")[0] + "_") for name, _ in read_list(dest / "train.txt"))
    assert (dest / "COMPLETE").is_file() and not (dest / ".partial").exists()


def test_labels_agree_with_imagefolder_and_torchvision_imagenet(prepared):
    from torchvision.datasets import ImageFolder, ImageNet

    dest, _ = prepared
    folder = ImageFolder(str(dest / "val"))
    ours = dict(read_list(dest / "val.txt"))
    for path, label in folder.samples:
        assert ours[os.path.relpath(path, dest / "val")] == label
    assert len(ImageNet(str(dest), split="val")) == 21  # meta.bin lets torchvision load DEST directly


def test_val_classes_match_torchvisions_independent_parse(prepared, archives, tmp_path, monkeypatch):
    import torchvision.datasets.imagenet as tv_imagenet

    monkeypatch.setattr(tv_imagenet, "_verify_archive", lambda *args, **kwargs: None)  # md5 of the real files
    for name in (DEVKIT, VAL_TAR):
        shutil.copy(archives / name, tmp_path / name)
    tv_imagenet.parse_devkit_archive(str(tmp_path))
    tv_imagenet.parse_val_archive(str(tmp_path))
    theirs = {f.name: f.parent.name for f in (tmp_path / "val").glob("*/*.JPEG")}
    dest, _ = prepared
    ours = {f.name: f.parent.name for f in (dest / "val").glob("*/*.JPEG")}
    assert len(ours) == 21 and ours == theirs


def test_problem_files_are_detected_by_content_and_reencoded(prepared):
    dest, proc = prepared
    converted = (dest / "converted.txt").read_text().splitlines()
    assert len(converted) == 3
    assert sum("CMYK JPEG" in c for c in converted) == 2 and sum("PNG named .JPEG" in c for c in converted) == 1
    assert "converted" in proc.stdout
    for line in converted:
        with Image.open(dest / line.split(":")[0]) as im:
            assert (im.format, im.mode) == ("JPEG", "RGB")
    modes = {Image.open(p).mode for p in (dest / "train").glob("*/*.JPEG")}
    assert modes == {"RGB", "L"}  # greyscale JPEGs decode everywhere and are left alone


def test_manifest_counts_and_rerun_is_a_quick_noop(prepared, archives):
    import json

    dest, _ = prepared
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["images"]["val"] == 21 and manifest["classes"] == 7 and manifest["decoded"] is True
    assert sum(c["train"] for c in manifest["per_class"].values()) == manifest["images"]["train"]
    stamp = (dest / "COMPLETE").stat().st_mtime_ns
    proc = prepare(archives, dest)
    assert proc.returncode == 0 and "already prepared" in proc.stdout
    assert (dest / "COMPLETE").stat().st_mtime_ns == stamp


def test_resume_after_kill(tmp_path):
    # Enough classes that the kill, once 2 are done, always lands before the last (also on a loaded machine).
    src = generate(tmp_path / "src", classes=30, train_per_class=(25, 30), val_per_class=2, size=(320, 240), seed=2)
    dest = tmp_path / "dest"
    proc = prepare(src, dest, "WORKERS=1", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((dest / "train").glob("n*"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list((dest / "train").glob("n*")))
    assert 2 <= done_before < 30 and not (dest / "COMPLETE").exists()
    second = prepare(src, dest, "WORKERS=2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{done_before} already done" in second.stdout or f"{done_before + 1} already done" in second.stdout
    assert len(read_list(dest / "train.txt")) == sum(len(list(d.iterdir())) for d in (dest / "train").iterdir())
    assert (dest / "COMPLETE").is_file() and not (dest / ".partial").exists()


def truncated_copy(archives: Path, tmp: Path, name: str, keep_fraction: float) -> Path:
    src = tmp / "src"
    src.mkdir()
    for n in (TRAIN_TAR, VAL_TAR, DEVKIT):
        shutil.copy(archives / n, src / n)
    data = (archives / name).read_bytes()
    (src / name).write_bytes(data[: int(len(data) * keep_fraction)])
    return src


@pytest.mark.parametrize(
    "case, named, expect",
    [
        ("missing", TRAIN_TAR, "missing"),
        ("truncated", TRAIN_TAR, "truncated"),
        ("garbage", VAL_TAR, "not a tar"),
        ("devkit_mismatch", VAL_TAR, "devkit does not match"),
        ("dest_is_file", "dest", "not a folder"),
    ],
)
def test_bad_input_is_one_clear_message(case, named, expect, archives, tmp_path):
    dest = tmp_path / "dest"
    if case == "missing":
        src = truncated_copy(archives, tmp_path, TRAIN_TAR, 1.0)
        (src / TRAIN_TAR).unlink()
    elif case == "truncated":
        src = truncated_copy(archives, tmp_path, TRAIN_TAR, 0.6)
    elif case == "garbage":
        src = truncated_copy(archives, tmp_path, VAL_TAR, 1.0)
        (src / VAL_TAR).write_bytes(b"\x00garbage" * 1000)
    elif case == "devkit_mismatch":
        src = truncated_copy(archives, tmp_path, VAL_TAR, 1.0)
        other = generate(tmp_path / "other", classes=7, val_per_class=4, seed=1)
        shutil.copy(other / DEVKIT, src / DEVKIT)
    else:
        src = archives
        dest.write_text("a file")
    before = fingerprint(src)
    proc = prepare(src, dest, "WORKERS=2")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and named in errors[0] and expect in errors[0], output
    assert "Traceback" not in output
    assert fingerprint(src) == before
    assert not (dest / "COMPLETE").exists() if dest.is_dir() else True


def test_corrupt_class_tar_inside_train_archive(archives, tmp_path):
    src = truncated_copy(archives, tmp_path, TRAIN_TAR, 1.0)
    with tarfile.open(archives / TRAIN_TAR) as outer:
        members = [(m, outer.extractfile(m).read()) for m in outer.getmembers()]
    with tarfile.open(src / TRAIN_TAR, "w") as outer:
        for i, (m, data) in enumerate(members):
            if i == 2:
                data = b"\x01" * len(data)  # same size, not a tar
            outer.addfile(m, io.BytesIO(data))
    proc = prepare(src, tmp_path / "dest", "WORKERS=2")
    assert proc.returncode != 0 and f"class tar {members[2][0].name} is corrupt" in proc.stderr
