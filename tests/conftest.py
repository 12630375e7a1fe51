"""Shared fixtures: generated datasets in the real formats, and a runner for the real CLIs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import pytest
from filelock import FileLock

from data_prep.generate import generate, generate_cifar

REPO = Path(__file__).resolve().parents[1]


def cli_env(gpu: bool = False) -> dict[str, str]:
    """The environment of a command under test: on the CPU unless `gpu` (the exact-equality
    tests rely on the CPU's deterministic kernels, also on a machine that has a GPU)."""
    extra = os.environ.get("PYTHONPATH", "") if os.environ.get("PYTHONPATH", "").startswith(str(REPO)) else ""
    env = dict(os.environ, PYTHONPATH=extra or str(REPO), WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_module(module: str, *args: str, timeout: int = 600, check: bool = True, gpu: bool = False,
               env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh process, as a user would run it (`env` adds variables)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**cli_env(gpu), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def resumed_after(make_loader: Callable[[], Any], epoch: int, steps: int) -> list:
    """The rest of `epoch` from a new loader given the state() of one stopped after `steps` batches,
    as a run resumed from a mid-epoch checkpoint gets it."""
    interrupted = make_loader()
    interrupted.set_position(epoch)
    batches = iter(interrupted)
    for _ in range(steps):
        next(batches)
    resumed = make_loader()
    resumed.restore(interrupted.state())
    resumed.set_position(epoch, start_step=steps)
    return list(resumed)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` once per test run, shared by every pytest-xdist worker: the first to get here
    builds it under a lock, the others wait and reuse it. Tests must not change what it holds."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, above each worker's own
    with FileLock(shared / f"{name}.lock"):
        done = shared / f"{name}.path"
        if not done.exists():
            done.write_text(str(build(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared)))))
        return Path(done.read_text())


def prepare(src: Path, dest: Path) -> Path:
    """make prepare-imagenet's script on generated archives."""
    proc = subprocess.run(["bash", "data_prep/prepare_imagenet.sh", str(src), str(dest)], cwd=REPO,
                          env=dict(cli_env(), PYTHON=sys.executable, WORKERS="2"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dest


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "cifar",
                      lambda folder: generate_cifar(folder, "cifar10", train_per_class=60, val_per_class=11))


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    """A prepared ImageNet-layout folder: 7 classes, 21 val images (odd, so shards are uneven)."""
    def build(folder: Path) -> Path:
        src = generate(folder / "archives", classes=7, train_per_class=(14, 18), val_per_class=3, size=(48, 40),
                       seed=5)
        return prepare(src, folder / "prepared" / "imagenet")

    return built_once(tmp_path_factory, "imagenet", build)


@pytest.fixture
def vfat(tmp_path) -> Path:
    """A real FAT filesystem (no hard links; a FUSE daemon that a test can freeze), mounted with
    fusefat; skipped where it cannot mount."""
    if not (shutil.which("mkfs.vfat") and shutil.which("fusefat") and Path("/dev/fuse").exists()):
        pytest.skip("needs dosfstools and fusefat (apt-get install dosfstools fusefat)")
    image, mount = tmp_path / "fat.img", tmp_path / "fat"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 2**20)
    subprocess.run(["mkfs.vfat", str(image)], check=True, capture_output=True)
    if subprocess.run(["fusefat", "-o", "rw+", str(image), str(mount)], capture_output=True).returncode:
        pytest.skip("fusefat could not mount here")
    yield mount
    subprocess.run(["fusermount", "-u", str(mount)], capture_output=True)
