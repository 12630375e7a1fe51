"""The CIFAR path end to end in real processes: learn, write the run folder, resume, evaluate."""

import json

import pytest
import torch

from conftest import run_module
from imagenet_resnet.metrics import read_metrics

ARGS = ["--config", "configs/cifar10_resnet20.yaml", "data.batch_size=32", "optim.base_lr=0.8",
        "run.log_every_steps=5"]


def wandb_run_bytes(out_dir) -> bytes:
    """The offline run file wandb wrote; its protobuf records hold the logged keys verbatim."""
    (run_file,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_file.read_bytes()


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_module(
        "imagenet_resnet.train",
        *ARGS,
        f"data.root={cifar_root}",
        f"run.out_dir={out}",
        "schedule.epochs=4",
        "run.eval_every_epochs=3",  # evaluated after epochs 2 and 3 (the last)
        "wandb.mode=offline",
        "wandb.group=seeds-of-rn20",
        "wandb.tags=[baseline,cifar]",
        "wandb.notes=first try at batch 32",
    )
    return out, proc


def best_top1(out) -> float:
    """best.pt's score: the best evaluated epoch so far (the resume test may have added one)."""
    return max(r.get("val_top1", 0) for r in read_metrics(out))


def test_resnet20_learns_well_above_chance(trained):
    out, _ = trained
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert records[-1]["val_top1"] > 30  # chance is 10%; 4 epochs at a high lr land anywhere from 40 to 60
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_evaluation_every_third_epoch_and_the_last_and_best_only_from_those(trained):
    out, _ = trained
    records = read_metrics(out)
    assert [r["evaluated"] for r in records] == [False, False, True, True]
    assert not any(k.startswith("val_") for r in records[:2] for k in r)
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["position"]["epoch"] in (3, 4)  # written after epoch 2 or 3, the evaluated ones
    assert best["best_top1"] == max(r["val_top1"] for r in records[2:])


def test_run_folder_holds_config_metrics_and_checkpoints(trained):
    out, proc = trained
    record = read_metrics(out)[-1]
    for key in ("epoch", "train_loss", "val_top1", "val_top5", "val_images", "lr", "images_per_sec"):
        assert key in record
    assert record["val_images"] == 110
    assert "cifar_resnet20" in (out / "config.yaml").read_text()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["position"] == {"epoch": 4, "step_in_epoch": 0, "global_step": 4 * 18}
    assert (out / "best.pt").exists()
    assert "lr 0.1 = base_lr 0.8 x 32/256" in proc.stdout  # the linear rule, printed at start


def test_wandb_offline_run_recorded_epochs_and_steps(trained):
    out, _ = trained
    recorded = wandb_run_bytes(out)
    for key in ("epoch/val_top1", "epoch/val_top5", "epoch/images_per_sec", "train/loss", "train/lr", "cifar_resnet20"):
        assert key.encode() in recorded


def test_same_command_resumes_and_logs_each_epoch_once(trained, cifar_root):
    out, _ = trained
    proc = run_module("imagenet_resnet.train", *ARGS, f"data.root={cifar_root}", f"run.out_dir={out}",
                      "schedule.epochs=5", "wandb.mode=offline")
    assert "resumed from" in proc.stdout and "epoch 4, step 0" in proc.stdout
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2, 3, 4]
    runs = list(out.glob("wandb/offline-run-*"))
    assert len(runs) == 2 and len({p.name.split("-")[-1] for p in runs}) == 1  # the same run id, continued


def test_evaluate_prints_json_last_line(trained, cifar_root):
    out, _ = trained
    proc = run_module("imagenet_resnet.evaluate", "--config", str(out / "config.yaml"), "--checkpoint",
                      str(out / "best.pt"), f"data.root={cifar_root}", "wandb.mode=disabled")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["val_images"] == 110
    assert result["val_top1"] == pytest.approx(best_top1(out))


def test_evaluate_uses_the_checkpoints_own_config_and_names_the_files_in_a_folder(trained, tmp_path):
    out, _ = trained
    proc = run_module("imagenet_resnet.evaluate", "--checkpoint", str(out / "best.pt"), cwd=tmp_path)  # no data/ here
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["val_images"] == 110  # the checkpoint's data.root, dataset and model
    assert result["val_top1"] == pytest.approx(best_top1(out))
    proc = run_module("imagenet_resnet.evaluate", "--checkpoint", str(out / "best.pt"), "data.root=/nonexistent",
                      "data.download=never", check=False)  # overrides go on top of it
    assert proc.returncode == 2 and "/nonexistent" in proc.stderr
    proc = run_module("imagenet_resnet.evaluate", "--checkpoint", str(out), check=False)
    assert proc.returncode == 2 and f"e.g. {out / 'best.pt'} or {out / 'last.pt'}" in proc.stderr


def test_wandb_keeps_the_group_tags_and_notes(trained):
    recorded = b"".join(path.read_bytes() for path in trained[0].glob("wandb/offline-run-*/run-*.wandb"))
    for value in (b"seeds-of-rn20", b"baseline", b"cifar", b"first try at batch 32"):
        assert value in recorded


def test_checkpoint_from_another_model_is_refused(trained, cifar_root):
    out, _ = trained
    proc = run_module("imagenet_resnet.train", *ARGS, f"data.root={cifar_root}", f"run.out_dir={out}",
                      "model.name=cifar_resnet32", "schedule.epochs=6", "wandb.mode=disabled", check=False)
    assert proc.returncode == 2
    assert "model.name: checkpoint 'cifar_resnet20', now 'cifar_resnet32'" in proc.stderr
