"""What config.yaml says is what trains (issue 21): a resumed run applies each changed key or
refuses it before writing anything; a run that diverges keeps no result. Real runs, real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from conftest import run_module
from imagenet_resnet.checkpoint import load_file
from imagenet_resnet.config import load_config
from imagenet_resnet.metrics import read_metrics
from test_integrity import one_error_line, snapshot

pytestmark = pytest.mark.e2e


def train(root: Path, out: Path, *extra: str, check: bool = True):
    return run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={root}",
                      f"run.out_dir={out}", "data.batch_size=64", "schedule.epochs=1", "wandb.mode=disabled", *extra,
                      check=check)


def decayed_and_not(state: dict) -> tuple[dict, dict]:
    groups = state["optimizer"]["param_groups"]
    return max(groups, key=lambda g: g["weight_decay"]), min(groups, key=lambda g: g["weight_decay"])


@pytest.fixture(scope="module")
def one_epoch(cifar_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_policy") / "run"
    train(cifar_root, out)
    return out


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for path in run.iterdir():
        if path.is_file():
            (to / path.name).write_bytes(path.read_bytes())
    return to


def test_changed_keys_take_effect_on_resume_and_are_announced(one_epoch, cifar_root, tmp_path):
    out = copy_run(one_epoch, tmp_path / "run")
    changed = {"optim.weight_decay": ("0.0001", "0.3"), "optim.momentum": ("0.9", "0.5"),
               "optim.nesterov": ("False", "True"), "data.batch_size": ("64", "32"), "data.mixup_alpha": ("0.0", "0.2"),
               "model.ema_decay": ("0.0", "0.9"), "optim.loss": ("cross_entropy", "bce"),
               "run.precision": ("auto", "bf16"), "schedule.epochs": ("1", "2")}
    proc = train(cifar_root, out, *(f"{key}={now}" for key, (_, now) in changed.items()))
    for key, (before, now) in changed.items():
        assert f"resume: {key} {before} -> {now}\n" in proc.stdout, key
    # The batch changed by a key, not by a new world size: said so.
    assert (
        "resume: global batch 64 -> 32 = 32 x 1 process(es) x 1 accumulation step(s), from the changed keys"
        in proc.stdout
    )
    assert "processes (run.on_world_size_change" not in proc.stdout

    state = load_file(out / "last.pt")
    decayed, plain = decayed_and_not(state)
    assert (decayed["weight_decay"], decayed["momentum"], decayed["nesterov"]) == (0.3, 0.5, True)
    assert (plain["weight_decay"], plain["momentum"], plain["nesterov"]) == (0.0, 0.5, True)
    assert state["global_batch"] == 32 and "model_ema" in state
    assert "val_top1_ema" in read_metrics(out)[-1]
    saved = load_config(out / "config.yaml")
    assert state["config"] == load_file(out / "last.pt")["config"]
    assert (saved.optim.weight_decay, saved.optim.momentum, saved.optim.nesterov, saved.model.ema_decay,
            saved.optim.loss, saved.data.batch_size) == (0.3, 0.5, True, 0.9, "bce", 32)

    # Switched off again: the EMA goes, as config.yaml says.
    proc = train(cifar_root, out, "schedule.epochs=3", "model.ema_decay=0", "data.batch_size=32")
    assert "resume: model.ema_decay 0.9 -> 0.0" in proc.stdout
    assert "model_ema" not in load_file(out / "last.pt") and "val_top1_ema" not in read_metrics(out)[-1]


@pytest.mark.parametrize("key, value, before", [("optim.name", "lars", "'sgd'"), ("model.freeze", "backbone", "'none'"),
                                                ("model.zero_init_residual", "true", "False")])
def test_a_key_fixed_at_the_start_is_refused_before_anything_is_written(one_epoch, cifar_root, tmp_path, key, value,
                                                                        before):
    out = copy_run(one_epoch, tmp_path / "run")
    files = snapshot(out)
    proc = train(cifar_root, out, "schedule.epochs=2", f"{key}={value}", check=False)
    one_error_line(proc, f"{key}: checkpoint {before}, now", "Nothing was changed", "model.init_from=")
    assert snapshot(out) == files


def test_a_resumed_fine_tuning_run_keeps_its_pretrained_lr_groups(imagenet_root, tmp_path):
    """The new head makes four parameter groups (decay x pretrained); a resumed run has them too."""
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), weights)
    out = tmp_path / "tuned"
    args = ["--config", "configs/imagenet_resnet18.yaml", f"data.root={imagenet_root}", f"run.out_dir={out}",
            "data.loader=torchvision", "data.image_size=32", "data.batch_size=16", "data.workers=0",
            "schedule.warmup_epochs=0", "wandb.mode=disabled", f"model.init_from={weights}",
            "optim.pretrained_lr_scale=0.1"]
    run_module("imagenet_resnet.train", *args, "schedule.epochs=1")
    run_module("imagenet_resnet.train", *args, "schedule.epochs=2")
    state = load_file(out / "last.pt")
    scales = sorted(group["lr_scale"] for group in state["optimizer"]["param_groups"])
    assert scales == [0.1, 0.1, 1.0, 1.0] and state["position"]["epoch"] == 2
    assert "fc.weight" not in state["pretrained"] and "conv1.weight" in state["pretrained"]


def test_a_diverged_evaluation_stops_the_run_and_keeps_no_result(cifar_root, tmp_path):
    out = tmp_path / "run"
    proc = train(cifar_root, out, "optim.name=lars", "optim.base_lr=1e6", check=False)
    one_error_line(proc, "non-finite evaluation at epoch 0", "running_var", "stopped without saving",
                   "no checkpoint was written yet")
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    assert not [record for record in read_metrics(out) if "val_loss" in record]
