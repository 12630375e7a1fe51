"""What can be checked of the Dockerfile without a Docker engine, and the package's install."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cli_env


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(REPO / ".venv/bin/hadolint")
    proc = subprocess.run([hadolint, "--failure-threshold", "warning", str(REPO / "Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_what_the_commands_need():
    text = (REPO / "Dockerfile").read_text()
    assert text.splitlines()[[i for i, line in enumerate(text.splitlines()) if line.startswith("FROM")][0]].startswith(
        "FROM nvcr.io/nvidia/pytorch:")
    for folder in ("imagenet_resnet", "data_prep", "configs", "launch"):
        assert re.search(rf"^COPY {folder} ", text, re.M), folder
    assert "--gpus all --ipc=host" in text


def test_the_dockerfiles_pip_step_installs_a_working_package(tmp_path):
    """The image's RUN step, here: keep the present torch/torchvision, install the package, import it."""
    keep = tmp_path / "keep.txt"
    script = ("import torch, torchvision; print(f'torch=={torch.__version__}'); "
              "print(f'torchvision=={torchvision.__version__}')")
    keep.write_text(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--constraint", str(keep),
                           "--target", str(target), str(REPO)], capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (target / "imagenet_resnet" / "trainer.py").is_file() and (target / "data_prep" / "extract.py").is_file()
    env = dict(cli_env(), PYTHONPATH=str(target))
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import imagenet_resnet.train, data_prep.extract, imagenet_resnet, sys;print(imagenet_resnet.__file__)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert check.returncode == 0 and str(target) in check.stdout, check.stderr


@pytest.mark.parametrize("target", ["help"])
def test_make_help_lists_the_targets(target):
    out = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", target], capture_output=True, text=True
    ).stdout
    for name in ("demo", "test", "bench", "prepare-imagenet"):
        assert f"make {name}" in out
