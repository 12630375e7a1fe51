"""No progress thrown away, the environment's privacy choices kept, and one clear line where a
traceback used to be: the trainer's side of issue 16, with real processes, real torchrun and real
wandb in offline mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env, run_module
from imagenet_resnet.metrics import read_metrics

pytestmark = pytest.mark.e2e


def train(root: Path, out: Path, *extra: str, check: bool = True, env: dict[str, str] | None = None):
    return run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={root}",
                      f"run.out_dir={out}", "data.batch_size=64", "schedule.epochs=1", "wandb.mode=disabled", *extra,
                      check=check, env=env)


def one_error_line(proc: subprocess.CompletedProcess, *named: str) -> str:
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    assert all(n in errors[0] for n in named), errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_run_resume_only_seeds_a_folder_without_its_own_checkpoint(cifar_root, tmp_path):
    seed, out = tmp_path / "seed", tmp_path / "run"
    train(cifar_root, seed)
    resume = f"run.resume={seed / 'last.pt'}"
    assert f"resumed from {seed / 'last.pt'}: epoch 1" in train(cifar_root, out, resume, "schedule.epochs=2").stdout
    again = train(cifar_root, out, resume, "schedule.epochs=3").stdout  # what a requeue or torchrun restart runs
    assert "not used" in again and f"resumed from {out / 'last.pt'}: epoch 2" in again
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2]


def test_unreadable_checkpoints_stop_the_run_and_touch_nothing(cifar_root, tmp_path):
    out = tmp_path / "run"
    train(cifar_root, out, "schedule.epochs=2")
    for name in ("last.pt", "last.pt.prev"):  # a new file at each name: best.pt may share last.pt's
        (out / name).unlink()
        (out / name).write_bytes(b"torn")
    before = snapshot(out)
    line = one_error_line(train(cifar_root, out, "schedule.epochs=3", check=False), str(out),
                          "no readable checkpoint", f"run.resume={out / 'best.pt'}", "new run.out_dir")
    assert snapshot(out) == before, line
    for name in ("last.pt", "last.pt.prev"):  # gone altogether: the run's history still forbids a fresh start
        (out / name).unlink()
    one_error_line(train(cifar_root, out, "schedule.epochs=3", check=False), "holds a run")
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    proc = train(cifar_root, out, "schedule.epochs=3", f"run.resume={out / 'best.pt'}")  # what the message says
    assert f"resumed from {out / 'best.pt'}" in proc.stdout
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2]


def test_a_torn_last_metrics_line_is_dropped_and_a_bad_middle_line_named(cifar_root, tmp_path):
    out = tmp_path / "run"
    train(cifar_root, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "train_lo')  # an append cut short
    plotted = run_module("imagenet_resnet.plot", str(out))
    assert "line 2 is incomplete" in plotted.stderr and (out / "curves.png").is_file()
    train(cifar_root, out, "schedule.epochs=2")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    (out / "metrics.jsonl").write_text("not json\n" + "\n".join(lines) + "\n")
    one_error_line(run_module("imagenet_resnet.plot", str(out), check=False), "metrics.jsonl: line 1")


FAKE_KEY = {"WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}  # nothing listens on port 9


@pytest.mark.parametrize("env, mode", [({"WANDB_MODE": "disabled"}, "disabled"),
                                       ({"WANDB_DISABLED": "true"}, "disabled"),
                                       ({"WANDB_MODE": "offline", **FAKE_KEY}, "offline")])
def test_the_environment_decides_wandbs_mode(env, mode, cifar_root, tmp_path):
    out = tmp_path / "run"
    proc = train(cifar_root, out, "wandb.mode=online", env={**env, "HOME": str(tmp_path)})
    assert f"from the environment: {mode} (wandb.mode=online overridden)" in proc.stdout
    assert "could not start online" not in proc.stderr  # never tried the network
    runs = list(out.glob("wandb/offline-run-*"))
    assert (len(runs) == 1) == (mode == "offline") and (mode != "disabled" or not (out / "wandb").exists())


def test_wandb_that_cannot_reach_its_server_logs_offline_and_training_goes_on(cifar_root, tmp_path):
    out = tmp_path / "run"
    proc = train(
        cifar_root, out, "wandb.mode=online", "wandb.init_timeout_s=2", env={**FAKE_KEY, "HOME": str(tmp_path)}
    )
    assert "wandb could not start online" in proc.stderr and "logging offline" in proc.stderr
    assert len(list(out.glob("wandb/offline-run-*"))) == 1 and [r["epoch"] for r in read_metrics(out)] == [0]


def test_wandb_credentials_are_found_where_wandb_looks(tmp_path):
    """A .netrc entry for wandb's own default host (not a host this project hard-codes) means online."""
    def host_and_mode() -> list[str]:
        check = ("import wandb; from urllib.parse import urlparse; from imagenet_resnet.metrics import wandb_mode; "
                 "print(urlparse(wandb.Settings().base_url).hostname, wandb_mode('online'))")
        proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**cli_env(), "HOME": str(tmp_path), "WANDB_SILENT": "true"})
        return proc.stdout.split()[-2:]

    host, mode = host_and_mode()
    assert mode == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {'b' * 40}\n")
    netrc.chmod(0o600)
    assert host_and_mode() == [host, "online"]


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_a_bad_image_names_the_file_and_the_fixed_run_continues_exactly(loader, imagenet_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(imagenet_root, root)

    def run(out: Path, check: bool = True):
        return run_module("imagenet_resnet.train", "--config", "configs/imagenet_resnet18.yaml", f"data.root={root}",
                          f"data.loader={loader}", "data.image_size=32", "data.batch_size=8", "data.workers=1",
                          "schedule.epochs=2", "schedule.warmup_epochs=0", "run.checkpoint_every_steps=2",
                          "wandb.mode=disabled", f"run.out_dir={out}", check=check)

    run(tmp_path / "reference")
    name = (root / "train.txt").read_text().splitlines()[5].rsplit(" ", 1)[0]
    good = (root / "train" / name).read_bytes()
    (root / "train" / name).write_bytes(good[:40] + b"\x00" * 100)  # torn and overwritten: garbage
    out = tmp_path / "run"
    line = one_error_line(run(out, check=False), str(root / "train" / name), "unreadable image", "VERIFY=decode")
    saved = torch.load(out / "last.pt", weights_only=True)["position"] if (out / "last.pt").exists() else None
    (root / "train" / name).write_bytes(good)  # the user replaces the file, runs the same command
    proc = run(out)
    if saved:
        assert f"resumed from {out / 'last.pt'}: epoch {saved['epoch']}, step {saved['step_in_epoch']}" in proc.stdout
    keys = ("epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_images")
    assert [[r[k] for k in keys] for r in read_metrics(out)] == [[r[k] for k in keys]
                                                                 for r in read_metrics(tmp_path / "reference")], line


def test_a_resume_file_that_is_not_a_training_checkpoint(cifar_root, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({"model": {}, "position": {}}, weights)
    one_error_line(train(cifar_root, tmp_path / "run", f"run.resume={weights}", check=False), str(weights),
                   "not a checkpoint written by imagenet_resnet training", "config")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_nan_stop_before_any_checkpoint_names_none(cifar_root, tmp_path):
    line = one_error_line(train(cifar_root, tmp_path / "run", "optim.base_lr=1e12", check=False), "non-finite")
    assert "no checkpoint was written yet" in line and "last.pt" not in line


def test_finished_run_says_so_in_one_line(cifar_root, tmp_path):
    train(cifar_root, tmp_path / "run")
    proc = train(cifar_root, tmp_path / "run")
    assert proc.stdout.strip().splitlines()[-1].endswith("raise schedule.epochs to train longer")
    assert "model cifar_resnet20" not in proc.stdout


def test_a_typo_under_the_launch_script_ends_the_job_at_once(cifar_root, tmp_path):
    proc = subprocess.run(["bash", "launch/single_node.sh", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}",
                           "data.bach_size=16"], cwd=REPO, env={**cli_env(), "NPROC": "2", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "ChildFailedError" not in output and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "override 'data.bach_size=16'" in errors[0] and ".yaml" not in errors[0], output
