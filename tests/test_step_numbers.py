"""The numbers of an optimizer step against their definitions (issue 33): the schedule's value at its
ends and middle against the formula, and an accumulated step's update against one big-batch step's
on the same images."""

from __future__ import annotations

import math

import pytest
import torch

from imagenet_resnet.config import ScheduleConfig, load_config
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.optim import Schedule
from imagenet_resnet.trainer import Trainer

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


@pytest.mark.parametrize("end", [0.0, 0.1])
def test_the_cosine_schedule_at_its_ends_and_middle_is_the_formula(end):
    schedule = Schedule.from_config(ScheduleConfig(epochs=10, kind="cosine", end_lr_factor=end), 10, 256)
    for step in (0, 25, 50, 75, 100):
        assert schedule.factor(step) == pytest.approx(end + (1 - end) * 0.5 * (1 + math.cos(math.pi * step / 100)))
    assert schedule.factor(0) == 1.0 and schedule.factor(50) == pytest.approx((1 + end) / 2)
    assert schedule.factor(100) == pytest.approx(end)


@pytest.mark.parametrize("end", [0.0, 0.2])
def test_the_linear_schedule_at_its_ends_and_middle_is_the_formula(end):
    schedule = Schedule.from_config(ScheduleConfig(epochs=4, kind="linear", end_lr_factor=end), 25, 256)
    assert [schedule.factor(step) for step in (0, 50, 100)] == pytest.approx([1.0, (1 + end) / 2, end])


def trainer(cifar_root, out, *keys: str) -> Trainer:
    cfg = load_config("configs/cifar10_resnet20.yaml", [f"data.root={cifar_root}", f"run.out_dir={out}",
                                                        "wandb.mode=disabled", "schedule.warmup_epochs=0", *keys])
    made = Trainer(cfg, CPU)
    made.model.eval()  # BatchNorm on its running statistics: each image's gradient is its own
    return made


def test_an_accumulated_step_updates_as_one_step_on_the_whole_batch(cifar_root, tmp_path):
    big = trainer(cifar_root, tmp_path / "big", "data.batch_size=32")
    accumulated = trainer(cifar_root, tmp_path / "acc", "data.batch_size=16", "optim.accumulation_steps=2")
    accumulated.net.load_state_dict(big.net.state_dict())
    assert (big.global_batch, big.steps_per_epoch) == (accumulated.global_batch, accumulated.steps_per_epoch)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(32, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    big.train_step(iter([(images, labels)]), 0, 0)
    accumulated.train_step(iter([(images[:16], labels[:16]), (images[16:], labels[16:])]), 0, 0)
    before = trainer(cifar_root, tmp_path / "before", "data.batch_size=32").net.state_dict()
    moved = 0.0
    for (name, got), want in zip(accumulated.net.named_parameters(), big.net.parameters()):
        assert torch.allclose(got, want, atol=1e-6), name
        moved = max(moved, (want - before[name]).abs().max().item())
    assert moved > 1e-3  # the step did move the weights
