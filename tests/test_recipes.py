"""The recipe extras (issue 13): each key changes what it should, against the formula or a hand
computation, and a run with all of them stopped at a random moment resumes exactly."""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_module
from data_prep.generate import generate_cifar
from imagenet_resnet.checkpoint import load_file
from imagenet_resnet.config import DataConfig, OptimConfig, ScheduleConfig, load_config
from imagenet_resnet.data import build_loaders
from imagenet_resnet.data.sizes import train_image_size
from imagenet_resnet.distributed import DistInfo
from imagenet_resnet.evaluation import evaluate
from imagenet_resnet.metrics import read_metrics
from imagenet_resnet.models import build_model
from imagenet_resnet.optim import Schedule, build_optimizer
from test_fault_tolerance import EXACT_KEYS, finish, kill_when, start, wait_for
from test_fault_tolerance import stopped as stopped_run

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


# --- optimizers: the update against its formula ----------------------------------------------


def one_step(name: str, **optim) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A Linear + BatchNorm net after one step of `name` from fixed gradients: (net, before, grads)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    opt = build_optimizer(net, OptimConfig(name=name, momentum=0.0, weight_decay=0.1, **optim), lr=0.5)
    grads = {}
    for k, p in net.named_parameters():
        p.grad = torch.randn_like(p)
        grads[k] = p.grad.clone()
    opt.step()
    return net, before, grads


def test_lars_scales_decayed_weights_by_the_trust_ratio_and_leaves_norms_and_biases_plain():
    net, before, grads = one_step("lars", lars_trust_coeff=0.02)
    after = dict(net.named_parameters())
    w, g = before["0.weight"], grads["0.weight"]
    trust = 0.02 * w.norm() / (g.norm() + 0.1 * w.norm())  # You et al. 2017, as MLPerf's reference computes it
    assert torch.allclose(after["0.weight"], w - 0.5 * trust * (g + 0.1 * w), atol=1e-6)
    for plain in ("0.bias", "1.weight", "1.bias"):  # no decay, no trust ratio
        assert torch.allclose(after[plain], before[plain] - 0.5 * grads[plain], atol=1e-6)


def test_lars_with_momentum_is_mxnets_form_with_its_momentum_correction():
    """NVIDIA's MXNet LARS (MLPerf v1.0 common/fit.py) keeps the lr inside the momentum buffer,
    v = m (lr_t / lr_t-1) v + lr_t trust (g + wd w), w -= v; timm's keeps it outside. With fit.py's
    momentum correction the two are the same update over a warmup and a poly decay; without it
    they are not (the correction is what makes the recipe's header true)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
    eta, wd, m = 0.02, 0.1, 0.9
    opt = build_optimizer(net, OptimConfig(name="lars", momentum=m, weight_decay=wd, lars_trust_coeff=eta), lr=1.0)
    lrs = [1.0 * (t + 1) / 20 for t in range(20)] + [1.0 * (1 - t / 180) ** 2 + 1e-4 for t in range(180)]
    start = {k: v.detach().double().clone() for k, v in net.named_parameters()}
    mxnet = {corrected: (dict(start), {k: torch.zeros_like(v) for k, v in start.items()}) for corrected in (1, 0)}
    for t, lr in enumerate(lrs):
        grads = {k: torch.randn_like(p) for k, p in net.named_parameters()}
        for k, p in net.named_parameters():
            p.grad = grads[k].clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        for corrected, (weights, velocity) in mxnet.items():
            ratio = lr / lrs[t - 1] if t and corrected else 1.0
            for k, w in weights.items():
                g = grads[k].double()
                update = g + wd * w if k == "0.weight" else g  # BN and biases: plain SGD with momentum
                trust = eta * w.norm() / (g.norm() + wd * w.norm()) if k == "0.weight" else 1.0
                velocity[k] = m * ratio * velocity[k] + lr * trust * update
                weights[k] = w - velocity[k]
    ours = {k: p.detach().double() for k, p in net.named_parameters()}
    gap = {c: max(float((ours[k] - w).abs().max()) for k, w in mxnet[c][0].items()) for c in (1, 0)}
    assert gap[1] < 1e-7 and gap[0] > 1e-2, gap


def test_lamb_adapts_only_decayed_weights():
    net, before, grads = one_step("lamb")
    after = dict(net.named_parameters())
    clip = max(1.0, math.sqrt(sum(float(g.norm() ** 2) for g in grads.values())))  # LAMB's global grad-norm clip
    for plain in ("0.bias", "1.weight", "1.bias"):  # first Adam step: g / |g| per element, lr 0.5, no trust ratio
        g = grads[plain] / clip
        assert torch.allclose(after[plain], before[plain] - 0.5 * g / (g.abs() + 1e-6), atol=1e-5)
    w, g = before["0.weight"], grads["0.weight"] / clip
    update = g / (g.abs() + 1e-6) + 0.1 * w
    assert torch.allclose(after["0.weight"], w - 0.5 * (w.norm() / update.norm()) * update, atol=1e-5)


def test_linear_and_poly_schedules():
    linear = Schedule.from_config(
        ScheduleConfig(epochs=10, kind="linear", warmup_epochs=2, warmup_start_factor=1e-4), 10, 256
    )
    assert linear.factor(0) == pytest.approx(1e-4) and linear.factor(20) == 1.0
    assert linear.factor(60) == pytest.approx(0.5) and linear.factor(100) == 0.0  # FFCV: straight down to zero
    poly = Schedule.from_config(ScheduleConfig(epochs=10, kind="poly", poly_power=2.0, warmup_epochs=2), 10, 256)
    assert poly.factor(10) == pytest.approx(0.5) and poly.factor(60) == pytest.approx(0.25)  # (1 - 0.5)^2


def test_mlperf_end_lr_and_goyal_warmup_against_their_formulas():
    """MLPerf's poly: (lr0 - end_lr) * (1 - p)^2 + end_lr, p over the steps after warmup; Goyal et
    al.'s gradual warmup: from 0.1 (base_lr) linearly to 0.1 x global/256 over the warmup steps."""
    peak, end_lr, total, warmup = 10.5, 1e-4, 370, 20
    cfg = ScheduleConfig(epochs=37, kind="poly", poly_power=2.0, warmup_epochs=2, end_lr_factor=end_lr / peak)
    poly = Schedule.from_config(cfg, steps_per_epoch=10, global_batch=3264)
    for step in (20, 100, 250, 369, 370):
        p = (step - warmup) / (total - warmup)
        assert peak * poly.factor(step) == pytest.approx((peak - end_lr) * (1 - p) ** 2 + end_lr, rel=1e-9)
    assert peak * poly.factor(total) == pytest.approx(end_lr)
    for kind in ("cosine", "linear"):
        last = Schedule.from_config(ScheduleConfig(epochs=10, kind=kind, end_lr_factor=0.01), 10, 256).factor(100)
        assert last == pytest.approx(0.01)
    goyal = Schedule.from_config(ScheduleConfig(epochs=90, warmup_epochs=5, warmup_from_base_lr=True),
                                 steps_per_epoch=100, global_batch=8192)
    base_lr, lr = 0.1, 0.1 * 8192 / 256
    for step in (0, 250, 499, 500):
        assert lr * goyal.factor(step) == pytest.approx(base_lr + (lr - base_lr) * min(step, 500) / 500)
    small = Schedule.from_config(ScheduleConfig(epochs=90, warmup_epochs=5, warmup_from_base_lr=True), 100, 128)
    assert small.factor(0) == 1.0  # a batch below 256: the scaled lr is below base_lr, no warmup to do


@pytest.mark.parametrize("warmup_epochs", [5, 0])
def test_per_epoch_cosine_without_warmup_prefix_is_timms_cosine_scheduler(warmup_epochs):
    """RSB's schedule: timm's CosineLRScheduler(t_initial=epochs, warmup_prefix=False) stepped once
    per epoch (t_in_epochs), warmup from warmup_lr, ending at min_lr; every step of an epoch gets
    that epoch's lr."""
    from timm.scheduler import CosineLRScheduler

    lr, warmup_lr, min_lr, epochs, steps = 5e-3, 1e-4, 1e-6, 30, 7
    model = torch.nn.Linear(2, 2)
    timms = CosineLRScheduler(torch.optim.SGD(model.parameters(), lr=lr), t_initial=epochs, lr_min=min_lr,
                              warmup_lr_init=warmup_lr, warmup_t=warmup_epochs)
    cfg = ScheduleConfig(epochs=epochs, kind="cosine", warmup_epochs=warmup_epochs, warmup_start_factor=warmup_lr / lr,
                         end_lr_factor=min_lr / lr, warmup_prefix=False, per_epoch=True)
    ours = Schedule.from_config(cfg, steps_per_epoch=steps, global_batch=256)
    for epoch in range(epochs):
        expected = timms._get_lr(epoch)[0]
        assert [lr * ours.factor(epoch * steps + i) for i in range(steps)] == pytest.approx([expected] * steps,
                                                                                           rel=1e-9)
    per_step = Schedule.from_config(dataclasses.replace(cfg, per_epoch=False), steps_per_epoch=steps,
                                    global_batch=256)
    assert per_step.factor(3 * steps + 3) != ours.factor(3 * steps + 3)


def test_train_size_follows_ffcv_progressive_resizing():
    data = DataConfig(dataset="imagenet", image_size=192, start_image_size=160, resize_ramp_epochs=[65, 76])

    def ffcv(epoch: int) -> int:  # ffcv-imagenet's get_resolution, written out again
        if epoch <= 65:
            return 160
        if epoch >= 76:
            return 192
        return int(np.round(np.interp([epoch], [65, 76], [160, 192])[0] / 32)) * 32

    assert [train_image_size(data, e) for e in range(88)] == [ffcv(e) for e in range(88)]
    assert train_image_size(DataConfig(dataset="imagenet", image_size=176), 3) == 176  # off: always image_size


def test_bce_and_mixing_targets():
    from imagenet_resnet.data.mixing import build_mixing
    from imagenet_resnet.optim import build_loss

    logits, labels = torch.randn(4, 5), torch.tensor([0, 3, 1, 3])
    bce = build_loss(OptimConfig(loss="bce", label_smoothing=0.1), soft_targets=False)
    target = torch.full((4, 5), 0.1 / 5).scatter_(1, labels[:, None], 1 - 0.1 + 0.1 / 5)
    assert bce(logits, labels).item() == pytest.approx(
        nn.functional.binary_cross_entropy_with_logits(logits, target).item()
    )
    np.random.seed(0)
    cfg = load_config(None, ["data.mixup_alpha=0.2", "optim.label_smoothing=0.1", "data.batch_size=4"])
    images = torch.randn(4, 3, 8, 8)
    mixed, soft = build_mixing(cfg, 5)(images.clone(), labels)
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5  # smoothing folded into each side's one-hot
    lam = (soft[0, 0].item() - off) / (on - off)  # image 0 (label 0) mixed with image 3 (label 3)
    assert torch.allclose(soft, lam * target + (1 - lam) * target.flip(0), atol=1e-6)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-5)
    assert build_mixing(load_config(None, []), 5) is None  # 0 = off


# --- what the data keys change ----------------------------------------------------------------


def loaders(root: Path, loader: str, *overrides: str):
    cfg = load_config("configs/imagenet_resnet18.yaml", [f"data.root={root}", f"data.loader={loader}", "data.workers=1",
                                                          "data.batch_size=4", "data.image_size=64", *overrides])
    return build_loaders(cfg, CPU, torch.float32)


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_train_and_val_sizes_per_epoch_and_randaugment(imagenet_root, loader):
    train, val, _ = loaders(imagenet_root, loader, "data.start_image_size=32", "data.resize_ramp_epochs=[1,2]",
                            "data.val_image_size=96", "data.val_crop_fraction=0.95")
    sizes = []
    for epoch in range(3):
        train.set_position(epoch)
        sizes.append(next(iter(train))[0].shape[-1])
    assert sizes == [32, 32, 64] and next(iter(val))[0].shape[-2:] == (96, 96)
    plain, _, _ = loaders(imagenet_root, loader)
    augmented, _, _ = loaders(imagenet_root, loader, "data.auto_augment=rand-m9-mstd0.5-inc1")
    for each in (plain, augmented):
        each.set_position(0)
    first, second = next(iter(plain)), next(iter(augmented))
    assert torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])  # same images, augmented


@torch.no_grad()
def test_flip_tta_is_the_mean_of_two_evaluations():
    torch.manual_seed(0)
    net = build_model("resnet18", 5).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6) % 5
    tta = evaluate(net, [(images, labels)], None, torch.device("cpu"), flip_tta=True)
    mean = (net(images) + net(images.flip(3))) / 2
    assert tta["val_loss"] == pytest.approx(nn.functional.cross_entropy(mean, labels).item(), rel=1e-6)
    assert evaluate(net, [(images, labels)], None, torch.device("cpu"))["val_loss"] == pytest.approx(
        nn.functional.cross_entropy(net(images), labels).item(), rel=1e-6)


def test_drop_path_builds_timms_resnet_with_torchvisions_keys():
    import torchvision
    from timm.layers import DropPath

    net = build_model("resnet50", 10, drop_path=0.05)
    assert max(m.drop_prob for m in net.modules() if isinstance(m, DropPath)) == pytest.approx(0.05)
    assert set(net.state_dict()) == set(torchvision.models.resnet50(num_classes=10).state_dict())  # same names
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


# --- EMA and fp16, through the trainer --------------------------------------------------------


def test_ema_is_the_average_of_the_weights_after_each_step(cifar_root, tmp_path):
    start_weights = tmp_path / "w0.pt"
    torch.save(build_model("cifar_resnet20", 10).state_dict(), start_weights)
    out = tmp_path / "run"
    run_module("imagenet_resnet.train", "--config", "configs/cifar10_resnet20.yaml", f"data.root={cifar_root}",
               f"run.out_dir={out}", "schedule.epochs=1", "data.batch_size=300", "run.checkpoint_every_steps=1",
               f"model.init_from={start_weights}", "model.ema_decay=0.75", "wandb.mode=disabled")
    w0 = torch.load(start_weights, weights_only=True)
    step1, step2 = load_file(out / "last.pt.prev"), load_file(out / "last.pt")  # after steps 1 and 2
    assert (step1["position"]["global_step"], step2["position"]["global_step"]) == (1, 2)
    for name, param in build_model("cifar_resnet20", 10).named_parameters():
        ema1 = 0.75 * w0[name] + 0.25 * step1["model"][name]
        ema2 = 0.75 * ema1 + 0.25 * step2["model"][name]
        assert torch.allclose(step1["model_ema"][name], ema1, atol=1e-6)
        assert torch.allclose(step2["model_ema"][name], ema2, atol=1e-6)
    records = read_metrics(out)
    assert {"val_top1_ema", "val_top5_ema"} <= records[0].keys()
    best = load_file(out / "best.pt")
    assert best["best_weights"] in ("model", "ema") and "model_ema" in best
    evaluated = run_module("imagenet_resnet.evaluate", "--config", str(out / "config.yaml"), "--checkpoint",
                           str(out / "best.pt"), "--weights", "ema").stdout.splitlines()[-1]
    assert '"weights": "ema"' in evaluated and f'"val_top1": {records[0]["val_top1_ema"]}' in evaluated


def test_fp16_skips_overflowing_steps_and_resumes_with_its_scaler(tmp_path):
    root = generate_cifar(tmp_path / "cifar", "cifar10", train_per_class=2, val_per_class=1)  # fp16 is slow on a CPU
    args = [
        "-m",
        "imagenet_resnet.train",
        "--config",
        "configs/cifar10_resnet20.yaml",
        f"data.root={root}",
        "data.batch_size=10",
        "schedule.epochs=2",
        "run.precision=fp16",
        "run.loss_scale=1e9",  # fp16 grads overflow
        "run.log_every_steps=1",
        "wandb.mode=disabled",
    ]
    finish(start([sys.executable, *args, f"run.out_dir={tmp_path / 'straight'}"]))
    stopped = start([sys.executable, *args, f"run.out_dir={tmp_path / 'resumed'}"])
    wait_for(stopped, "epoch 1 step 1/")
    stopped.send_signal(signal.SIGTERM)
    assert "stopped by SIGTERM at epoch 1" in stopped_run(stopped)
    state = load_file(tmp_path / "resumed" / "last.pt")
    assert state["position"]["epoch"] == 1 and state["position"]["step_in_epoch"] >= 1  # stopped inside epoch 1
    assert state["scaler"]["scale"] < 1e9  # overflowing steps were skipped and the scale lowered, not a NaN stop
    finish(start([sys.executable, *args, f"run.out_dir={tmp_path / 'resumed'}"]))
    assert exact(read_metrics(tmp_path / "resumed")) == exact(read_metrics(tmp_path / "straight"))


# --- everything at once, killed and restarted -------------------------------------------------

ALL_EXTRAS = [
    "model.name=resnet18",
    "model.ema_decay=0.9",
    "model.drop_path=0.1",
    "optim.name=lamb",
    "optim.loss=bce",
    "optim.bce_target_threshold=0.2",
    "optim.base_lr=0.004",
    "optim.weight_decay=0.02",
    "data.mixup_alpha=0.2",
    "data.cutmix_alpha=1.0",
    "data.auto_augment=rand-m9-mstd0.5-inc1",
    "data.repeated_augmentation=3",
    "data.interpolation=bicubic",
    "data.train_interpolation=random",
    "data.repeated_augmentation_round=32",
    "data.crop_min_area=0.05",
    "model.blurpool=true",
    "data.start_image_size=16",
    "data.image_size=32",
    "data.resize_ramp_epochs=[0,1]",
    "data.val_image_size=48",
    "data.val_crop_fraction=0.95",
    "data.val_flip_tta=true",
    "data.val_crop_first=true",
    "schedule.kind=cosine",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0.5",
    "schedule.warmup_prefix=false",
    "schedule.warmup_from_base_lr=false",
    "schedule.warmup_start_factor=0.1",  # per epoch, epoch 0 trains at the warmup start
    "schedule.per_epoch=true",
    "data.workers=1",
    "run.log_every_steps=1",
    "run.checkpoint_every_steps=3",
    "run.eval_every_epochs=2",  # epoch 0 not evaluated, epoch 1 (the last) evaluated
    "wandb.mode=disabled",
]


def exact(records: list[dict]) -> list[dict]:
    keys = EXACT_KEYS + ("val_top1_ema", "val_top5_ema", "val_loss_ema", "train_image_size", "evaluated")
    return [{k: r[k] for k in keys if k in r} for r in records]


def extras_cmd(nproc: int, root: Path, out: Path, loader: str) -> list[str]:
    args = ["--config", "configs/imagenet_resnet18.yaml", f"data.root={root}", f"data.loader={loader}",
            f"data.batch_size={8 // nproc}", f"run.out_dir={out}", *ALL_EXTRAS]
    if nproc == 1:
        return [sys.executable, "-m", "imagenet_resnet.train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "imagenet_resnet.train", *args]


@pytest.fixture(scope="module")
def extras_reference(imagenet_root, tmp_path_factory):
    """The uninterrupted run's exact metrics, per (loader, processes), computed once per module."""
    done: dict[tuple[str, int], list[dict]] = {}

    def reference(loader: str, nproc: int) -> list[dict]:
        if (loader, nproc) not in done:
            out = tmp_path_factory.mktemp("reference")
            finish(start(extras_cmd(nproc, imagenet_root, out, loader)))
            done[loader, nproc] = exact(read_metrics(out))
        return done[loader, nproc]

    return reference


@pytest.mark.e2e
@pytest.mark.parametrize("loader, nproc", [("torchvision", 2), ("dali", 1)], ids=["torchvision-2proc", "dali-1proc"])
def test_all_extras_killed_mid_epoch_resume_exactly(imagenet_root, tmp_path, extras_reference, loader, nproc):
    """Each loader and each process count once (the full product took the suite two more minutes):
    sharding with 2 ranks through the torchvision loader, DALI's saved stream state in one."""
    expected = extras_reference(loader, nproc)
    assert [r["train_image_size"] for r in expected] == [16, 32] and "val_top1_ema" in expected[1]
    assert "val_top1" not in expected[0]
    out = tmp_path / "run"
    rng = random.Random(f"{loader}{nproc}")
    kill_when(start(extras_cmd(nproc, imagenet_root, out, loader)), f"epoch {rng.choice([0, 1])} step 4/",
              rng.uniform(0.0, 1.0))
    finish(start(extras_cmd(nproc, imagenet_root, out, loader)))
    assert exact(read_metrics(out)) == expected


@pytest.mark.e2e
def test_killed_while_a_checkpoint_is_written_in_the_background_resumes_exactly(imagenet_root, tmp_path,
                                                                               extras_reference):
    """SIGKILL the moment rank 0's writer thread has a checkpoint half on disk (its temporary file
    exists), after a complete one: the restart resumes from that one and ends exactly as an
    uninterrupted run."""
    out = tmp_path / "run"
    proc = start(extras_cmd(2, imagenet_root, out, "torchvision"))
    wait_for(proc, "epoch 0 step 4/")  # the step-3 checkpoint was submitted
    partial = out / "last.pt.tmp"
    while proc.poll() is None and not ((out / "last.pt").exists() and partial.exists()):
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists() and load_file(out / "last.pt")  # killed mid-write; the previous file whole
    finish(start(extras_cmd(2, imagenet_root, out, "torchvision")))
    assert exact(read_metrics(out)) == extras_reference("torchvision", 2)
