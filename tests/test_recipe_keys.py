"""No recipe key is ignored (issue 33): for each key under data., optim. and schedule., a run that
changes only that key sees a different train batch, update or evaluation than the same run without
the change. Each run is the real Trainer on a prepared ImageNet-layout folder (CIFAR for its own keys)."""

from __future__ import annotations

import pytest
import torch

from imagenet_resnet.checkpoint import Position
from imagenet_resnet.config import Config, config_to_dict, load_config
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.trainer import Trainer

pytestmark = pytest.mark.e2e

CPU = DistInfo(0, 0, 1, torch.device("cpu"))
BASE = ("data.batch_size=8", "data.image_size=32", "data.workers=0", "data.loader=torchvision", "schedule.epochs=4",
        "schedule.kind=cosine", "schedule.warmup_epochs=0", "schedule.warmup_from_base_lr=false", "run.device=cpu",
        "wandb.mode=disabled", "model.zero_init_residual=false", "run.log_every_steps=1000")
STEP = ("schedule.kind=step", "schedule.milestones=[0.25]")
WARMUP = ("schedule.warmup_epochs=3",)
LARS = ("optim.name=lars",)
BCE = ("optim.loss=bce", "optim.label_smoothing=0.1")
RAMP = ("data.start_image_size=16", "data.resize_ramp_epochs=[1,3]")

# (key, changed value, what else both runs set, what must differ)
CASES = [
    ("data.batch_size", "6", (), "batch"),
    ("data.image_size", "64", (), "batch"),
    ("data.start_image_size", "16", ("data.resize_ramp_epochs=[1,3]",), "batch"),
    ("data.resize_ramp_epochs", "[0,1]", RAMP, "batch"),
    ("data.val_image_size", "48", (), "evaluation"),
    ("data.val_crop_fraction", "0.5", (), "evaluation"),
    ("data.val_flip_tta", "true", (), "evaluation"),
    ("data.val_crop_first", "true", (), "evaluation"),
    ("data.mixup_alpha", "0.5", (), "update"),
    ("data.cutmix_alpha", "1.0", (), "update"),
    ("data.auto_augment", "rand-m9-mstd0.5", (), "batch"),
    ("data.interpolation", "bicubic", (), "batch"),
    ("data.train_interpolation", "bicubic", (), "batch"),
    ("data.crop_min_area", "0.9", (), "batch"),
    ("data.repeated_augmentation", "3", (), "batch"),
    ("data.repeated_augmentation_round", "64", ("data.repeated_augmentation=3",), "update"),  # fewer steps
    ("data.loader", "dali", (), "batch"),
    ("data.crop_padding", "0", ("cifar",), "batch"),
    ("optim.name", "lamb", (), "update"),
    ("optim.base_lr", "0.3", (), "update"),
    ("optim.momentum", "0.5", (), "update"),
    ("optim.nesterov", "true", (), "update"),
    ("optim.weight_decay", "0.01", (), "update"),
    ("optim.label_smoothing", "0.2", (), "update"),
    ("optim.loss", "bce", (), "update"),
    ("optim.bce_target_threshold", "0.2", BCE, "update"),
    ("optim.lars_trust_coeff", "0.02", LARS, "update"),
    ("optim.accumulation_steps", "2", (), "update"),
    ("optim.pretrained_lr_scale", "0.1", ("init_from",), "update"),
    ("schedule.epochs", "8", (), "update"),
    ("schedule.kind", "linear", (), "update"),
    ("schedule.poly_power", "1.0", ("schedule.kind=poly",), "update"),
    ("schedule.milestones", "[0.5]", STEP, "update"),
    ("schedule.gamma", "0.5", STEP, "update"),
    ("schedule.warmup_epochs", "3", (), "update"),
    ("schedule.warmup_kind", "constant", WARMUP, "update"),
    ("schedule.warmup_start_factor", "0.5", WARMUP, "update"),
    ("schedule.warmup_from_base_lr", "true", WARMUP, "update"),
    ("schedule.end_lr_factor", "0.5", (), "update"),
    ("schedule.warmup_prefix", "false", ("schedule.warmup_epochs=1",), "update"),
    ("schedule.per_epoch", "true", (), "update"),
]
# Keys that choose where the data is, how it is fetched or how many processes read it: the same
# numbers whatever their value (the loaders' exact-resume tests hold them to that).
NO_NUMBERS = {"data.dataset", "data.root", "data.download", "data.download_timeout_s", "data.workers"}


def test_every_recipe_key_has_a_case():
    sections = config_to_dict(Config())
    keys = {f"{section}.{key}" for section in ("data", "optim", "schedule") for key in sections[section]}
    assert keys - NO_NUMBERS == {key for key, *_ in CASES}


def observe(cfg: Config) -> dict[str, torch.Tensor]:
    """The first train batch of epoch 1, the weights after two steps from the middle of the run,
    and the evaluation's loss."""
    trainer = Trainer(cfg, CPU)
    trainer.train_loader.set_position(1, 0)
    batch = next(iter(trainer.train_loader))[0]
    trainer.position = Position(1, 0, trainer.steps_per_epoch + 1)
    trainer.train_loader.set_position(1, 0)
    batches = iter(trainer.train_loader)
    for step in range(2):
        trainer.train_step(batches, 1, step)
    weights = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
    return {"batch": batch, "update": weights, "evaluation": torch.tensor(trainer.evaluate()["val_loss"])}


@pytest.fixture(scope="module")
def runs(imagenet_root, cifar_root, tmp_path_factory):
    weights = tmp_path_factory.mktemp("init") / "weights.pt"
    seen: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def run(extra: tuple[str, ...], change: tuple[str, ...] = (), fresh: bool = False) -> dict[str, torch.Tensor]:
        keys = tuple(k for k in extra if k not in ("cifar", "init_from"))
        if "cifar" in extra:
            recipe, keys = "configs/cifar10_resnet20.yaml", (f"data.root={cifar_root}", "data.batch_size=32",
                                                             "wandb.mode=disabled", *keys)
        else:
            recipe, keys = "configs/imagenet_resnet18.yaml", (f"data.root={imagenet_root}", *BASE, *keys)
        if "init_from" in extra:
            if not weights.exists():
                torch.save(Trainer(load_config(recipe, list(keys)), CPU).net.state_dict(), weights)
            keys += (f"model.init_from={weights}",)
        out = tmp_path_factory.mktemp("run")
        key = keys + change
        if key not in seen or fresh:
            seen[key] = observe(load_config(recipe, [*keys, *change, f"run.out_dir={out}"]))
        return seen[key]

    return run


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.equal(a, b)


def test_the_same_run_twice_sees_the_same_numbers(runs):
    first = runs(())
    again = runs((), fresh=True)
    assert not any(differs(first[k], again[k]) for k in first)  # so a difference below is the key's


@pytest.mark.parametrize(("key", "value", "extra", "observable"), CASES, ids=[case[0] for case in CASES])
def test_changing_only_this_key_changes_what_it_sets(runs, key, value, extra, observable):
    base, changed = runs(extra), runs(extra, (f"{key}={value}",))
    assert differs(base[observable], changed[observable]), f"{key}={value} left the {observable} as it was"
