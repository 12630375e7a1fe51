"""Optimizers (SGD, and LARS / LAMB from timm.optim) with decay-free norm/bias parameters, the
loss, the linear scaling rule, and warmup + step/cosine/linear/poly decay.

The schedule is a pure function of the global step, so resuming needs nothing but the step.

    lr = scaled_lr(0.1, global_batch=1024)                 # 0.4
    opt = build_optimizer(model, cfg.optim, lr)   # (..., init_tensors=names) for fine-tuning
    criterion = build_loss(cfg.optim, soft_targets=False)
    sched = Schedule.from_config(cfg.schedule, steps_per_epoch=5005, global_batch=256)
    set_lr(opt, lr * sched.factor(step))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from imagenet_resnet.config import Config, OptimConfig, ScheduleConfig
from imagenet_resnet.errors import UserError

# Norm layers are matched by module type: a name test like `'bn' in name` misses e.g. torchvision's
# downsample.1 BatchNorm and timm's renamed layers.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule (Goyal et al. 2017): base_lr is per 256 images."""
    return base_lr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float, init_tensors: set[str] = frozenset(),
                 pretrained_lr_scale: float = 1.0) -> list[dict]:
    """Decayed weights apart from norm-layer parameters and biases; loaded ones at a scaled lr.

    `init_tensors` names the parameters model.init_from loaded (as in model.named_parameters()):
    they get lr x optim.pretrained_lr_scale.
    Frozen parameters (requires_grad False) are left out. Empty groups are dropped.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            no_decay = isinstance(module, NORM_TYPES) or param is getattr(module, "bias", None)
            loaded = f"{module_name}.{name}".lstrip(".") in init_tensors
            groups.setdefault((no_decay, loaded), []).append(param)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_scale": pretrained_lr_scale if loaded else 1.0}
            for (no_decay, loaded), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    init_tensors: set[str] = frozenset()) -> torch.optim.Optimizer:
    """optim.name's optimizer. LARS and LAMB adapt only the groups with weight decay (timm's
    always_adapt=False): norm layers and biases get neither decay nor a trust ratio, as in
    MLPerf's LARS reference and RSB's LAMB."""
    groups = param_groups(model, cfg.weight_decay, init_tensors, cfg.pretrained_lr_scale)
    if cfg.name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, trust_coeff=cfg.lars_trust_coeff)
    if cfg.name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr)  # timm's defaults, as RSB trained: betas (0.9, 0.999), grad norm clip 1.0
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        fused=on_cuda,  # one kernel for the whole update on the GPU
        foreach=None if on_cuda else True,
    )


def build_loss(cfg: OptimConfig, soft_targets: bool) -> nn.Module:
    """Cross-entropy or timm's BinaryCrossEntropy (RSB). With Mixup/CutMix the targets come soft,
    label smoothing already folded in."""
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    smoothing = 0.0 if soft_targets else cfg.label_smoothing
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=cfg.bce_target_threshold or None)
    return SoftTargetCrossEntropy() if soft_targets else nn.CrossEntropyLoss(label_smoothing=smoothing)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@dataclass(frozen=True)
class Schedule:
    """lr multiplier per global step: warmup, then step decay at fractions of the run, cosine,
    linear to zero (FFCV) or polynomial (1 - progress)^poly_power (MLPerf LARS).

    Args:
        total_steps: steps in the whole run (epochs x steps per epoch).
        warmup_steps: steps of warmup at the start.
        kind: "step", "cosine", "linear" or "poly".
        milestones: fractions of total_steps where a step schedule multiplies by gamma.
        gamma: step decay factor.
        warmup_kind: "linear" ramps from warmup_start_factor to 1; "constant" holds it.
        warmup_start_factor: multiplier at step 0.
        poly_power: exponent of the "poly" decay.
        end_factor: where cosine, linear and poly decay end (MLPerf's end lr), as a multiplier.
        warmup_prefix: the decay's progress counts from the end of warmup; False: from step 0, the
            warmup overlapping the decay's start (timm's schedulers with warmup_prefix=False).
        epoch_steps: > 0: the factor changes only at multiples of it, i.e. once per epoch (timm's
            t_in_epochs, scheduler.step(epoch) after each epoch); 0: at every step.
    """

    total_steps: int
    warmup_steps: int
    kind: str = "step"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_kind: str = "linear"
    warmup_start_factor: float = 0.0
    poly_power: float = 2.0
    end_factor: float = 0.0
    warmup_prefix: bool = True
    epoch_steps: int = 0

    @classmethod
    def from_config(cls, cfg: ScheduleConfig, steps_per_epoch: int, global_batch: int) -> Schedule:
        """warmup_from_base_lr starts at base_lr, i.e. at 256 / global_batch of the linearly scaled peak."""
        start = min(1.0, 256 / global_batch) if cfg.warmup_from_base_lr else cfg.warmup_start_factor
        return cls(
            total_steps=cfg.epochs * steps_per_epoch,
            warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
            kind=cfg.kind,
            milestones=tuple(cfg.milestones),
            gamma=cfg.gamma,
            warmup_kind=cfg.warmup_kind,
            warmup_start_factor=start,
            poly_power=cfg.poly_power,
            end_factor=cfg.end_lr_factor,
            warmup_prefix=cfg.warmup_prefix,
            epoch_steps=steps_per_epoch if cfg.per_epoch else 0,
        )

    def factor(self, step: int) -> float:
        if self.epoch_steps:
            step -= step % self.epoch_steps
        if step < self.warmup_steps:
            if self.warmup_kind == "constant":
                return self.warmup_start_factor
            return self.warmup_start_factor + (1 - self.warmup_start_factor) * step / self.warmup_steps
        start = self.warmup_steps if self.warmup_prefix else 0
        progress = min(1.0, (step - start) / max(1, self.total_steps - start))
        end = self.end_factor
        if self.kind == "cosine":
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return end + (1 - end) * (1 - progress)
        if self.kind == "poly":  # MLPerf: (lr - end_lr) * (1 - progress)^power + end_lr
            return end + (1 - end) * (1 - progress) ** self.poly_power
        passed = sum(step >= round(m * self.total_steps) for m in self.milestones)
        return self.gamma**passed


def optimizer_steps(cfg: Config, batches_per_epoch: int, processes: int, accumulation: int, train_images: int) -> int:
    """Optimizer steps per epoch; UserError if the global batch leaves not one full step."""
    steps = batches_per_epoch // accumulation
    if steps < 1:
        raise UserError(f"config key data.batch_size={cfg.data.batch_size}: x {processes} processes x {accumulation} "
                        f"accumulation steps is more than the {train_images} training images: no full step per epoch")
    return steps


def plan_text(cfg: Config, processes: int, accumulation: int, steps_per_epoch: int) -> str:
    """Global batch, lr by the linear rule, and the schedule's steps: what a run will do."""
    global_batch = cfg.data.batch_size * processes * accumulation
    schedule = Schedule.from_config(cfg.schedule, steps_per_epoch, global_batch)
    warmup = f"warmup {schedule.warmup_steps} steps ({cfg.schedule.warmup_epochs:g} epochs)"
    if cfg.schedule.warmup_from_base_lr and global_batch <= 256 and schedule.warmup_steps:
        # Goyal's warmup rises from base_lr (the lr of 256 images) to the peak: no rise when the peak is lower.
        warmup = (f"no warmup: schedule.warmup_from_base_lr starts at base_lr, and a global batch of {global_batch} "
                  f"<= 256 puts the peak at or below it, so the lr is the peak from the first step")
    return (f"global batch {global_batch} = {cfg.data.batch_size} x {processes} process(es)"
            + (f" x {accumulation} accumulation" if accumulation > 1 else "")
            + f"; lr {scaled_lr(cfg.optim.base_lr, global_batch):g} = base_lr {cfg.optim.base_lr:g} x "
            f"{global_batch}/256; {warmup}; "
            f"{steps_per_epoch} steps/epoch x {cfg.schedule.epochs} epochs = {schedule.total_steps} steps"
            + ("; model.sync_bn has no effect in one process" if cfg.model.sync_bn and processes == 1 else ""))
