"""What users of the seed projects also do, through the same code paths: CIFAR ResNet-18, ResNeXt,
MNIST, any image folder, fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from conftest import run_module
from data_prep.generate import class_image, generate_cifar, generate_mnist
from imagenet_resnet.checkpoint import load_file
from imagenet_resnet.config import load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.metrics import read_metrics
from imagenet_resnet.models import build_model
from imagenet_resnet.optim import param_groups

CPU = torch.device("cpu")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, millions", [("cifar_resnet18", 11.17), ("resnext50_32x4d", 25.03),
                                            ("seresnext50_32x4d", 27.56)])
def test_more_models_parameter_counts(name, millions):
    classes = 10 if name.startswith("cifar") else 1000
    assert round(n_params(build_model(name, classes)) / 1e6, 2) == millions


def test_cifar_resnet18_keeps_32px_resolution_in_the_stem():
    model = build_model("cifar_resnet18", 10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "seresnet18"])
def test_one_channel_input(name):
    assert build_model(name, 10, in_chans=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mnist_idx_files_train_through_the_same_trainer(tmp_path):
    root = generate_mnist(tmp_path / "mnist", train_per_class=60, val_per_class=7)
    assert (root / "train-images-idx3-ubyte.gz").is_file() and (root / "t10k-images-idx3-ubyte").is_file()
    out = tmp_path / "run"
    run_module(
        "imagenet_resnet.train",
        "--config",
        "configs/mnist_resnet20.yaml",
        f"data.root={root}",
        f"run.out_dir={out}",
        "schedule.epochs=3",
        "data.batch_size=32",
        "optim.base_lr=0.8",
        "wandb.mode=disabled",
    )
    records = read_metrics(out)
    assert records[-1]["val_images"] == 70 and records[-1]["val_top1"] > 50  # chance: 10%


def test_missing_mnist_names_the_file(tmp_path):
    proc = run_module("imagenet_resnet.train", "--config", "configs/fashion_mnist_resnet20.yaml",
                      f"data.root={tmp_path}", "wandb.mode=disabled", check=False)
    assert proc.returncode == 2 and "train-images-idx3-ubyte" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    """A user's own data: train/<class>/ and val/<class>/ with PNG and JPEG files, no file lists."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 5)):
        for label, name in enumerate(("cat", "dog", "emu")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                image = class_image(label, rng, 40, 36)
                image.save(root / split / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
def test_folder_dataset_through_both_loaders(folder_root, kind):
    cfg = load_config(None, [f"data.root={folder_root}", "data.dataset=folder", f"data.loader={kind}",
                             "data.image_size=32", "data.batch_size=4", "data.workers=1"])
    train, val, num_classes = build_loaders(cfg, DistInfo(0, 0, 1, CPU), torch.float32)
    labels = torch.cat([y for _, y in val]).tolist()
    assert num_classes == 3 and labels == sorted(labels) and len(labels) == 15
    assert sum(len(y) for _, y in train) == 36


def test_fine_tune_from_a_checkpoint_with_another_class_count(cifar_root, tmp_path):
    base = tmp_path / "base"
    run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}",
               f"run.out_dir={base}", "schedule.epochs=1", "data.batch_size=32", "wandb.mode=disabled")
    c100 = generate_cifar(tmp_path / "c100", "cifar100", train_per_class=3, val_per_class=1)
    before = load_file(base / "last.pt")["model"]

    def fine_tune(freeze: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"ft_{freeze.replace(':', '')}"
        proc = run_module("imagenet_resnet.train", "--config", "configs/cifar100_resnet20.yaml", f"data.root={c100}",
                          f"run.out_dir={out}", "schedule.epochs=1", "data.batch_size=32", f"model.freeze={freeze}",
                          f"model.init_from={base / 'last.pt'}", "optim.pretrained_lr_scale=0.1", "wandb.mode=disabled")
        assert f"weights from {base / 'last.pt'}, freeze={freeze}" in proc.stdout
        return load_file(out / "last.pt")["model"]

    names = [n for n, _ in build_model("cifar_resnet20", 100).named_parameters()]
    after = fine_tune("backbone")
    assert after["fc.weight"].shape == (100, 64)
    assert [n for n in names if not n.startswith("fc.") and not torch.equal(before[n], after[n])] == []
    after = fine_tune("up_to_stage:2")
    changed = {n.split(".")[0] for n in names if not n.startswith("fc.") and not torch.equal(before[n], after[n])}
    assert changed == {"layer3"}


def test_fine_tune_from_a_torchvision_state_dict_and_clear_mismatch(folder_root, tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # as downloaded from torchvision
    common = ["--config", "configs/imagenet_resnet18.yaml", f"data.root={folder_root}", "data.dataset=folder",
              "data.loader=torchvision", "data.image_size=32", "data.batch_size=8", "data.workers=1",
              "schedule.epochs=1", "schedule.warmup_epochs=0", "wandb.mode=disabled"]
    proc = run_module("imagenet_resnet.train", *common, f"model.init_from={weights}", "model.freeze=backbone",
                      f"run.out_dir={tmp_path / 'ok'}")
    assert "3 classes; weights from" in proc.stdout
    assert read_metrics(tmp_path / "ok")[-1]["val_images"] == 15
    bad = run_module("imagenet_resnet.train", *common, f"model.init_from={weights}", "model.name=cifar_resnet20",
                     f"run.out_dir={tmp_path / 'bad'}", check=False)
    assert bad.returncode == 2 and "does not fit this model" in bad.stderr
    assert "missing (" in bad.stderr and "shape differs (" in bad.stderr and "Traceback" not in bad.stderr
    assert "conv1.weight (64, 3, 7, 7) vs (16, 3, 3, 3)" in bad.stderr


def test_pretrained_parameters_get_the_scaled_lr():
    model = build_model("cifar_resnet20", 10)
    pretrained = {n for n, _ in model.named_parameters() if not n.startswith("fc.")}
    groups = param_groups(model, 1e-4, pretrained, pretrained_lr_scale=0.1)
    fc = {id(model.fc.weight), id(model.fc.bias)}
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert group["lr_scale"] == (1.0 if ids <= fc else 0.1) and (ids <= fc or not ids & fc)
