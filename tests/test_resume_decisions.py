"""The resume policy's decisions and the checkpoint's format, as functions of (saved state, config):
no training run. The end-to-end runs of the same rules are in test_resume_policy.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from imagenet_resnet import resume
from imagenet_resnet.checkpoint import BEST, LAST, Checkpoint, Position, load_checkpoint, load_file, save
from imagenet_resnet.config import config_to_dict, load_config
from imagenet_resnet.errors import UserError

RECIPE = "configs/cifar10_resnet20.yaml"


def config(*overrides: str):
    return load_config(RECIPE, ["data.batch_size=64", *overrides])


def saved_run(*overrides: str, world_size: int = 1, global_batch: int = 64, position=(1, 30, 130),
              ema: bool = False) -> Checkpoint:
    cfg = config(*overrides)
    return Checkpoint(model={"w": torch.ones(2)}, optimizer={"state": {}, "param_groups": []},
                      position=Position(*position), train_sums=[torch.tensor([5.0, 2.0, 10.0])] * world_size,
                      best_top1=41.5, rng=[{}] * world_size, loader=[None] * world_size, config=config_to_dict(cfg),
                      num_classes=10, world_size=world_size, global_batch=global_batch, best_weights="ema",
                      scaler={"scale": 1024.0}, class_names=[str(i) for i in range(10)], init_tensors=["w"],
                      model_ema={"w": torch.zeros(2)} if ema else None, ema_buffers=[{}] * world_size if ema else None)


def test_a_checkpoint_round_trips_through_its_file_with_the_keys_older_versions_wrote(tmp_path):
    before = saved_run(ema=True)
    save(before, tmp_path)
    raw = load_file(tmp_path / LAST)
    assert raw["pretrained"] == ["w"] and "init_tensors" not in raw  # the key checkpoints have always had
    assert raw["position"] == {"epoch": 1, "step_in_epoch": 30, "global_step": 130}
    after = load_checkpoint(tmp_path / LAST)
    assert after.position == before.position and after.best_weights == "ema" and after.init_tensors == ["w"]
    assert torch.equal(after.weights("ema", tmp_path / LAST)["w"], torch.zeros(2))
    without_ema = saved_run()
    save(without_ema, tmp_path)
    with pytest.raises(UserError, match="holds no EMA weights"):
        load_checkpoint(tmp_path / LAST).weights("ema", tmp_path / LAST)


def test_best_is_the_last_file_written_linked_not_written_twice(tmp_path):
    save(saved_run(), tmp_path, best=True)
    assert os.path.samefile(tmp_path / BEST, tmp_path / LAST)  # a hard link: one serialisation, one write
    save(saved_run(position=(2, 0, 200)), tmp_path)  # a later last.pt (a new file) leaves best.pt as it was
    assert load_checkpoint(tmp_path / BEST).position.epoch == 1
    assert load_checkpoint(tmp_path / LAST).position.epoch == 2
    assert load_checkpoint(tmp_path / (LAST + ".prev")).position.epoch == 1


def test_a_changed_key_is_taken_and_a_fixed_one_refused_before_anything_is_written(tmp_path):
    saved = saved_run()
    changes = resume.config_changes(saved, config("optim.momentum=0.5", "run.out_dir=elsewhere"), 10, tmp_path)
    assert changes == {"optim.momentum": (0.9, 0.5)}  # run.out_dir is where the run lives, not what it trains
    for key, value in (("model.name", "cifar_resnet32"), ("optim.name", "lars"), ("data.dataset", "cifar100")):
        with pytest.raises(UserError, match=f"{key}: checkpoint .* now '?{value}'?.*fixed once training"):
            resume.config_changes(saved, config(f"{key}={value}"), 10, tmp_path)
    with pytest.raises(UserError, match="classes: checkpoint 10, now 100"):
        resume.config_changes(saved, config(), 100, tmp_path)


def test_a_key_added_since_the_checkpoint_compares_with_its_default(tmp_path):
    saved = saved_run()
    del saved.config["optim"]["pretrained_lr_scale"]  # written before the key existed
    assert resume.config_changes(saved, config(), 10, tmp_path) == {}
    assert resume.config_changes(saved, config("optim.pretrained_lr_scale=0.1"), 10, tmp_path) == {
        "optim.pretrained_lr_scale": (1.0, 0.1)}


@pytest.mark.parametrize(("saved_world", "saved_batch", "world", "rule", "expected"), [
    (1, 64, 1, "keep_global_batch", 1),  # same world: the config's own accumulation
    (4, 256, 2, "keep_global_batch", 2),  # half the processes: twice the micro-batches
    (4, 256, 1, "keep_global_batch", 4),
    (4, 256, 2, "scale_lr", 1),  # the per-process batch kept, the lr rescaled
])
def test_accumulation_keeps_the_global_batch_on_a_new_world_size(saved_world, saved_batch, world, rule, expected):
    saved = saved_run(world_size=saved_world, global_batch=saved_batch)
    assert resume.accumulation_steps(saved, config(f"run.on_world_size_change={rule}"), world) == expected


def test_a_global_batch_that_no_world_size_can_keep_is_refused():
    saved = saved_run(world_size=4, global_batch=256)
    with pytest.raises(UserError, match="global batch 256 is not a multiple of data.batch_size x processes = 192"):
        resume.accumulation_steps(saved, config(), 3)


def test_the_same_world_and_batch_continue_exactly_with_each_ranks_own_state():
    carry = resume.carry_over(saved_run(), config("optim.momentum=0.5"), 1, 1, 60, {"optim.momentum": (0.9, 0.5)})
    assert carry == resume.CarryOver(Position(1, 30, 130), exact=True, restore_loader=True)
    changes = {"data.batch_size": (64, 32), "data.root": ("a", "b")}
    assert not resume.carry_over(saved_run(), config(), 1, 1, 60, changes).restore_loader  # another stream
    assert resume.carry_over(saved_run(), config(), 1, 1, 60, {"data.root": ("a", "b")}).restore_loader


def test_a_new_global_batch_continues_after_the_same_images():
    # 30 steps of 256 images = 7,680 images of epoch 1; at 64 per step that is step 120 of 150.
    saved = saved_run(world_size=4, global_batch=256, position=(1, 30, 80))
    carry = resume.carry_over(saved, config("run.on_world_size_change=scale_lr"), 1, 1, 150, {})
    assert carry.position == Position(1, 120, 270) and not carry.exact
    assert "global batch 256 -> 64 = 64 x 1 process(es) x 1 accumulation step(s), from 4 -> 1 processes" in carry.note
    assert "lr 0.05;" in carry.note and "epoch 1 continues at step 120" in carry.note
    text = resume.announcement({"run.seed": (0, 1)}, carry, Path("x/last.pt"))
    assert text.splitlines() == ["resume: run.seed 0 -> 1", carry.note, "resumed from x/last.pt: epoch 1, step 120"]


def test_the_loss_scale_takes_its_new_value_and_the_rest_of_the_scaler_continues():
    saved = saved_run()
    assert resume.scaler_state(saved, config(), {}) == {"scale": 1024.0}
    changed = resume.scaler_state(saved, config("run.loss_scale=8"), {"run.loss_scale": (65536.0, 8.0)})
    assert changed == {"scale": 8.0} and saved.scaler == {"scale": 1024.0}


def test_the_folders_own_checkpoint_wins_over_run_resume(tmp_path, capsys):
    other, own = tmp_path / "other", tmp_path / "own"
    other.mkdir(), own.mkdir()
    save(saved_run(position=(3, 0, 300)), other)
    assert resume.choose_checkpoint(own, "") == (None, None)  # a new folder: a fresh start
    saved, path = resume.choose_checkpoint(own, str(other / LAST))
    assert path == other / LAST and saved.position.epoch == 3  # run.resume seeds a folder without its own
    save(saved_run(position=(1, 5, 105)), own)
    saved, path = resume.choose_checkpoint(own, str(other / LAST))
    assert path == own / LAST and saved.position.epoch == 1
    assert "run.resume=" in capsys.readouterr().out


def test_a_folder_with_a_run_but_no_last_checkpoint_is_refused_naming_best(tmp_path):
    save(saved_run(), tmp_path, best=True)
    (tmp_path / LAST).unlink()
    (tmp_path / (LAST + ".prev")).unlink(missing_ok=True)
    with pytest.raises(UserError, match=f"no {LAST} to continue.*add run.resume={tmp_path / BEST}"):
        resume.choose_checkpoint(tmp_path, "")
