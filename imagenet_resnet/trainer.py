"""The training loop: build loaders, model and optimizer; then per epoch train, evaluate, log, save.

Runs as one process or under torchrun. Rank 0 alone writes files and wandb (`self.log`).
The step loop does not synchronise with the host: losses and counts accumulate on the
device and are read at log steps, checkpoints and epoch ends.

    records = run_training(load_config("configs/cifar10_resnet20.yaml", ["schedule.epochs=2"]))
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from imagenet_resnet.checkpoint import BEST, LAST, capture_rng, load_file, load_latest, restore_rng, save_atomic, unwrap
from imagenet_resnet.config import Config, config_to_dict, flatten, save_config
from imagenet_resnet.data import (
    Loader,
    build_loaders,
    class_names,
    input_channels,
    loader_workers,
    resolve_loader,
    train_image_size,
)
from imagenet_resnet.data.mixing import build_mixing
from imagenet_resnet.distributed import (
    DistInfo,
    GradientWait,
    all_gather_objects,
    all_reduce_sum,
    average_buffers,
    broadcast_object,
    collective_timed_out,
    init_distributed,
    laggards,
    main_only,
    report_progress,
    shutdown,
)
from imagenet_resnet.errors import UserError
from imagenet_resnet.finetune import apply_freeze, load_pretrained
from imagenet_resnet.lease import Lease, hold_lease
from imagenet_resnet.metrics import RunLog, read_metrics, topk_correct
from imagenet_resnet.models import build_model
from imagenet_resnet.optim import Schedule, build_loss, build_optimizer, scaled_lr, set_lr

# Resuming with a changed config key (README, "Resume policy"): these are refused, since what they
# choose is fixed once training has started (the network, its first weights, which parameters train,
# the optimizer's state); every other key takes effect from the first resumed step, announced.
FIXED_AT_START = ("model.name", "model.zero_init_residual", "model.blurpool", "model.init_from", "model.freeze",
                  "data.dataset", "optim.name")
NOT_COMPARED = ("run.out_dir", "run.resume")  # where the run lives and came from, not what it trains
# Keys that leave the train loader's stream as it was: its saved mid-epoch state still applies.
SAME_STREAM = ("data.root", "data.workers")
# The exit status after a SIGTERM stop with its checkpoint written: 128 + SIGTERM, as a shell reports it.
STOPPED_EXIT = 143
# Ranks agree on a SIGTERM this often (one tiny all-reduce): well inside torchrun's and Slurm's grace time.
STOP_CHECK_EVERY_STEPS = 10


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of run.precision (auto: bf16 on CUDA, fp32 on the CPU); None for fp32."""
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def seed_step(seed: int, rank: int, step: int, micro: int) -> None:
    """Seed every generator from (seed, rank, global step, micro-batch): the step's random draws
    (Mixup/CutMix in NumPy, stochastic depth in torch) are then the same in a resumed run, whatever
    the loaders drew from the global generators meanwhile."""
    value = (((seed * 1_000_003 + rank) * 1_000_003 + step) * 64 + micro) & 0x7FFF_FFFF_FFFF
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def build_network(cfg: Config, num_classes: int, dist: DistInfo) -> nn.Module:
    """The model on its device, in channels_last on CUDA, SyncBN if asked; not yet wrapped."""
    net = build_model(cfg.model.name, num_classes, cfg.model.zero_init_residual, input_channels(cfg.data.dataset),
                      drop_path=cfg.model.drop_path, blurpool=cfg.model.blurpool)
    if cfg.model.sync_bn and dist.is_distributed:
        if dist.device.type != "cuda":
            raise UserError("config key model.sync_bn=true: PyTorch's SyncBatchNorm runs on CUDA only")
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = cfg.run.channels_last and dist.device.type == "cuda"
    return net.to(dist.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


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
    return (f"global batch {global_batch} = {cfg.data.batch_size} x {processes} process(es)"
            + (f" x {accumulation} accumulation" if accumulation > 1 else "")
            + f"; lr {scaled_lr(cfg.optim.base_lr, global_batch):g} = base_lr {cfg.optim.base_lr:g} x {global_batch}/256; "
            f"warmup {schedule.warmup_steps} steps ({cfg.schedule.warmup_epochs:g} epochs); "
            f"{steps_per_epoch} steps/epoch x {cfg.schedule.epochs} epochs = {schedule.total_steps} steps")


@torch.no_grad()
def evaluate(net: nn.Module, loader: Loader, dtype: torch.dtype | None, device: torch.device, flip_tta: bool = False,
             suffix: str = "") -> dict[str, float]:
    """Loss, top-1 and top-5 (percent) over every val image once, summed over ranks; with
    flip_tta the logits are the mean of the image's and its mirror's. Keys end with `suffix`.

    `net` must be the bare module, not the DDP wrapper: ranks may hold different numbers of
    batches, and DDP's forward would wait for a collective on the rank that has finished.
    """
    net.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, images
    for images, labels in loader:
        if labels.numel() == 0:  # DALI's PARTIAL policy can yield an empty last batch
            continue
        with autocast(device, dtype):
            logits = net(images).float()
            if flip_tta:
                logits = (logits + net(images.flip(3)).float()) / 2
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[0] += loss
        sums[1:3] += topk_correct(logits, labels)
        sums[3] += labels.numel()
    loss_sum, top1, top5, images = all_reduce_sum(sums).tolist()
    count = max(images, 1)
    return {f"val_loss{suffix}": loss_sum / count, f"val_top1{suffix}": 100 * top1 / count,
            f"val_top5{suffix}": 100 * top5 / count, f"val_images{suffix}": int(images)}


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # steps of it already done
    global_step: int = 0


class StopRequested(Exception):
    """SIGTERM arrived (preemption): a checkpoint was written; exit cleanly."""


class Trainer:
    def __init__(self, cfg: Config, dist: DistInfo, lease: Lease | None = None) -> None:
        self.cfg, self.dist, self.lease = cfg, dist, lease  # lease: rank 0's hold on out_dir
        self.out_dir = Path(cfg.run.out_dir)
        self.amp = amp_dtype(cfg, dist.device)
        torch.manual_seed(cfg.run.seed + dist.rank)
        self.train_loader, self.val_loader, self.num_classes = build_loaders(cfg, dist, self.amp or torch.float32)
        self.class_names = class_names(cfg) if dist.is_main else []  # saved for predict and export
        self.net = build_network(cfg, self.num_classes, dist)
        state, path = self._find_checkpoint()
        self.changes = self._config_changes(state, path) if state is not None else {}
        self.pretrained = self._pretrained_names(state)  # their lr is scaled by optim.pretrained_lr_scale
        apply_freeze(self.net, cfg.model.freeze)
        self.accum = self._accumulation_steps(state)
        self.global_batch = cfg.data.batch_size * dist.world_size * self.accum
        self.steps_per_epoch = optimizer_steps(cfg, self.train_loader.steps_per_epoch, dist.world_size, self.accum,
                                               self.train_loader.num_images)
        self.peak_lr = scaled_lr(cfg.optim.base_lr, self.global_batch)
        self.optimizer = build_optimizer(self.net, cfg.optim, self.peak_lr, self.pretrained)
        self.schedule = Schedule.from_config(cfg.schedule, self.steps_per_epoch, self.global_batch)
        self.mixing = build_mixing(cfg, self.num_classes)
        self.criterion = build_loss(cfg.optim, soft_targets=self.mixing is not None)
        # fp16 needs loss scaling; a step whose gradients overflow is skipped and the scale lowered.
        self.scaler = torch.amp.GradScaler(dist.device.type, cfg.run.loss_scale, enabled=self.amp == torch.float16)
        self.position = Position()
        self.train_sums = self._zero_sums()
        self.best_top1, self.best_weights = 0.0, "model"
        if state is not None:
            self._restore(state, path)
        wrapped = self.net
        self.gradient_wait = None  # stragglers: who waits for whom in DDP's all-reduce
        if dist.is_distributed:
            self.gradient_wait = GradientWait(self.net, dist.device)
            wrapped = DistributedDataParallel(self.net, device_ids=[dist.device] if dist.device.type == "cuda" else None)
        # torch.compile goes around DDP, as PyTorch documents: DDPOptimizer then splits the graph at
        # DDP's bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward
        # (a compiled module inside DDP fires DDP's hooks only after its whole backward). Evaluation
        # runs the bare module (ranks hold different numbers of val batches), compiled on its own.
        self.model = torch.compile(wrapped, mode=cfg.run.compile_mode) if cfg.run.compile else wrapped
        self.eval_net = torch.compile(self.net, mode=cfg.run.compile_mode) if cfg.run.compile else self.net
        self.ema = self._build_ema(state)  # after DDP has given every rank rank 0's weights
        self.stop_requested = False
        self.finished = self.position.epoch >= cfg.schedule.epochs
        self.log = self._start_log(resumed=state is not None) if dist.is_main and not self.finished else None

    # --- setup ------------------------------------------------------------------------------

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.float64, device=self.dist.device)  # loss sum, top1, images

    def _start_log(self, resumed: bool) -> RunLog:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        print(
            f"model {self.cfg.model.name} ({sum(p.numel() for p in self.net.parameters()):,} parameters), "
            f"{self.dist.world_size} process(es) on {self.dist.device.type}, "
            f"{str(self.amp or torch.float32).removeprefix('torch.')}; {self.train_loader.num_images} train / "
            f"{self.val_loader.num_images} val images, {self.num_classes} classes"
            + (f"; weights from {self.cfg.model.init_from}, freeze={self.cfg.model.freeze}" if self.cfg.model.init_from else "")
            + (f"; data.loader={loader}, {loader_workers(self.cfg.data.workers)} worker(s) per process"
               if (loader := resolve_loader(self.cfg, self.dist.device)) != "device" else ""),
            flush=True,
        )
        print(plan_text(self.cfg, self.dist.world_size, self.accum, self.steps_per_epoch), flush=True)
        return RunLog(self.cfg, self.out_dir, self.position.epoch, resumed)

    def _find_checkpoint(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The checkpoint to continue from (rank 0 chooses, so all load the same file), or none."""
        state, path = main_only(self._choose_checkpoint) or (None, None)
        path = broadcast_object(path)
        if path is None:
            return None, None
        if state is None:  # ranks other than 0
            state = load_file(path)
        return state, path

    def _pretrained_names(self, state: dict[str, Any] | None) -> set[str]:
        """Fine-tuning: the tensors model.init_from loaded, at a fresh start (loading them) or as the
        checkpoint recorded them (a resumed run has its own weights)."""
        if state is not None and "pretrained" in state:
            return set(state["pretrained"])
        if not self.cfg.model.init_from:
            return set()
        return load_pretrained(self.net, self.cfg.model.init_from)  # a resumed run's weights then replace these

    def _choose_checkpoint(self) -> tuple[dict[str, Any] | None, Path | None]:
        """out_dir's own newest checkpoint; run.resume only seeds a folder that has none, so a
        restarted or requeued command continues its own progress instead of going back to it."""
        resume = self.cfg.run.resume
        try:
            state, own = load_latest(self.out_dir)
        except UserError as err:
            if not resume:
                raise UserError(f"{err}. Nothing was changed. {self._how_to_continue()}") from err
            state, own = None, None
            print(f"warning: continuing from run.resume={resume} instead", file=sys.stderr, flush=True)
        if own is not None:
            if resume:
                print(f"run.resume={resume} not used: {self.out_dir} has its own newer checkpoint {own}", flush=True)
            return state, own
        if resume:
            return load_file(Path(resume)), Path(resume)
        if (self.out_dir / BEST).exists() or read_metrics(self.out_dir):
            raise UserError(f"{self.out_dir}: holds a run (metrics.jsonl or best.pt) but no {LAST} to continue "
                            f"it from. Nothing was changed. {self._how_to_continue()}")
        return None, None

    def _how_to_continue(self) -> str:
        best = self.out_dir / BEST
        start_over = "use a new run.out_dir (or move this folder away) to start over."
        return f"To continue from {best}, add run.resume={best}; or {start_over}" if best.exists() else start_over.capitalize()

    def _build_ema(self, state: dict[str, Any] | None):
        """timm's ModelEmaV3 of the weights, continued from the checkpoint's if it has one (else
        started from the current weights: EMA switched on when resuming begins there)."""
        if not self.cfg.model.ema_decay:
            return None
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(unwrap(self.net), decay=self.cfg.model.ema_decay)
        if state is not None and "model_ema" in state:
            ema.module.load_state_dict(state["model_ema"])
            if state["world_size"] == self.dist.world_size:  # this rank's own buffers, as if never stopped
                ema.module.load_state_dict(state["ema_buffers"][self.dist.rank], strict=False)
        return ema

    def _accumulation_steps(self, state: dict[str, Any] | None) -> int:
        """optim.accumulation_steps, or what keeps a resumed run's global batch on a new world size."""
        per_step = self.cfg.data.batch_size * self.dist.world_size
        same_world = state is None or state["world_size"] == self.dist.world_size
        if same_world or self.cfg.run.on_world_size_change == "scale_lr":
            return self.cfg.optim.accumulation_steps
        if state["global_batch"] % per_step:
            raise UserError(
                f"resume on {self.dist.world_size} processes with run.on_world_size_change=keep_global_batch: the "
                f"global batch {state['global_batch']} is not a multiple of data.batch_size x processes = {per_step}; "
                f"choose another data.batch_size or run.on_world_size_change=scale_lr"
            )
        return state["global_batch"] // per_step

    def _restore(self, state: dict[str, Any], path: Path) -> None:
        unwrap(self.net).load_state_dict(state["model"])
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])  # moments and steps, and the saved settings ...
        for group, own in zip(self.optimizer.param_groups, settings):
            group.update(own)  # ... which this config's (weight decay, momentum, trust coefficient, ...) replace
        self.best_top1, self.best_weights = state["best_top1"], state.get("best_weights", "model")
        if state.get("scaler"):
            scaler = dict(state["scaler"])
            if "run.loss_scale" in self.changes:
                scaler["scale"] = self.cfg.run.loss_scale
            self.scaler.load_state_dict(scaler)
        if self.dist.is_main:
            for key, (before, now) in self.changes.items():
                print(f"resume: {key} {before} -> {now}", flush=True)
        pos = state["position"]
        same_world = state["world_size"] == self.dist.world_size
        if same_world and state["global_batch"] == self.global_batch:
            self.position = Position(**pos)
            self.train_sums = state["train_sums"][self.dist.rank].to(self.dist.device)
            restore_rng(state["rng"][self.dist.rank])
            if not any(key.startswith("data.") and key not in SAME_STREAM for key in self.changes):
                self.train_loader.restore(state["loader"][self.dist.rank])
        else:
            # Keep the count of images already seen this epoch: the same prefix of the epoch's permutation.
            done = pos["step_in_epoch"] * state["global_batch"] // self.global_batch
            self.position = Position(pos["epoch"], done, pos["epoch"] * self.steps_per_epoch + done)
            if self.dist.is_main:  # the partial epoch's sums, all on one rank: the totals stay right
                self.train_sums = sum(state["train_sums"]).to(self.dist.device)
                why = (f"{state['world_size']} -> {self.dist.world_size} processes (run.on_world_size_change="
                       f"{self.cfg.run.on_world_size_change})" if not same_world else "the changed keys above")
                print(
                    f"resume: global batch {state['global_batch']} -> {self.global_batch} = {self.cfg.data.batch_size} x "
                    f"{self.dist.world_size} process(es) x {self.accum} accumulation step(s), from {why}; "
                    f"lr {self.peak_lr:g}; epoch {pos['epoch']} continues at step {done}",
                    flush=True,
                )
        # The lr of the last step taken, on this run's global batch (the saved one may be another's):
        # what the epoch's record reports if the checkpoint was written after its last step.
        set_lr(self.optimizer, self.peak_lr * self.schedule.factor(max(self.position.global_step - 1, 0)))
        if self.dist.is_main:
            print(f"resumed from {path}: epoch {self.position.epoch}, step {self.position.step_in_epoch}", flush=True)

    def _config_changes(self, state: dict[str, Any], path: Path) -> dict[str, tuple[Any, Any]]:
        """{dotted key: (checkpoint's value, this config's)} for every key that differs; UserError,
        before anything is written, if one of them cannot change in a run that has started."""
        saved = flatten(config_to_dict(Config())) | flatten(state["config"])  # keys added since: their defaults
        changes = {key: (saved[key], now) for key, now in flatten(config_to_dict(self.cfg)).items()
                   if key not in NOT_COMPARED and saved[key] != now}
        refused = [f"{key}: checkpoint {changes[key][0]!r}, now {changes[key][1]!r}" for key in FIXED_AT_START
                   if key in changes]
        if state["num_classes"] != self.num_classes:
            refused.append(f"classes: checkpoint {state['num_classes']}, now {self.num_classes}")
        if refused:
            raise UserError(
                f"{path}: cannot continue this run with {'; '.join(refused)} (fixed once training has started). "
                f"Nothing was changed. Keep the checkpoint's value, or start a new run from its weights: a new "
                f"run.out_dir with model.init_from={path}")
        return changes

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, best: bool = False) -> None:
        """Collective: every rank contributes its RNG, partial sums, loader state and EMA buffers; rank 0 writes."""
        rng = all_gather_objects(capture_rng())
        sums = all_gather_objects(self.train_sums.cpu())
        loader = all_gather_objects(self.train_loader.state())
        # Each rank's EMA follows its own BatchNorm statistics (averaged only for evaluation).
        ema_buffers = all_gather_objects({k: v.cpu() for k, v in self.ema.module.named_buffers()}) if self.ema else None

        def write() -> None:
            if self.lease:
                self.lease.check()
            state = {
                "model": unwrap(self.net).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "position": vars(self.position).copy(),
                "train_sums": sums,
                "best_top1": self.best_top1,
                "best_weights": self.best_weights,  # which of model / model_ema scored best_top1
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "loader": loader,
                "config": config_to_dict(self.cfg),
                "num_classes": self.num_classes,
                "class_names": self.class_names,
                "world_size": self.dist.world_size,
                "global_batch": self.global_batch,
                "pretrained": sorted(self.pretrained),
            }
            if self.ema:
                state["model_ema"], state["ema_buffers"] = self.ema.module.state_dict(), ema_buffers
            save_atomic(state, self.out_dir / LAST)
            if best:
                save_atomic(state, self.out_dir / BEST)

        main_only(write)  # a failed write stops every rank, with one message

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        if self.finished:
            if self.dist.is_main:
                print(f"{self.out_dir}: finished, {self.position.epoch} epochs done (schedule.epochs="
                      f"{self.cfg.schedule.epochs}); raise schedule.epochs to train longer", flush=True)
            return []
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        records = []
        try:
            for epoch in range(self.position.epoch, self.cfg.schedule.epochs):
                train_stats = self.train_epoch(epoch)
                report_progress(self.dist, (self.position.global_step, 1), f"epoch {epoch} evaluation")
                average_buffers(self.net)
                val_stats = self.evaluate()
                self._check_finite_eval(val_stats, epoch)
                record = {"epoch": epoch, **train_stats, **val_stats}
                records.append(record)
                top1, weights = max((val_stats["val_top1"], "model"), (val_stats.get("val_top1_ema", -1.0), "ema"))
                is_best = top1 > self.best_top1
                if is_best:
                    self.best_top1, self.best_weights = top1, weights
                main_only(lambda: self._record(record))
                self.position = Position(epoch + 1, 0, self.position.global_step)
                self.train_sums = self._zero_sums()
                self.save(best=is_best)
        except StopRequested:
            if self.dist.is_main:
                print(f"stopped by SIGTERM at epoch {self.position.epoch} step {self.position.step_in_epoch}; "
                      f"checkpoint saved, rerun the same command to continue", flush=True)
            raise SystemExit(STOPPED_EXIT) from None  # stopped, not finished: a scheduler must not count it done
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.log:
                self.log.close()
        return records

    def _record(self, record: dict[str, Any]) -> None:
        """Rank 0: the epoch's line in metrics.jsonl and wandb, if the run folder is still this job's."""
        if self.lease:
            self.lease.check()
        if self.log:
            self.log.epoch(self.position.global_step, record)

    def evaluate(self) -> dict[str, float]:
        """The model on the val set, and its EMA (keys *_ema) when there is one."""
        tta, device = self.cfg.data.val_flip_tta, self.dist.device
        stats = evaluate(self.eval_net, self.val_loader, self.amp, device, tta)
        if self.ema:
            average_buffers(self.ema.module)  # each rank's EMA of its own BN statistics
            stats |= evaluate(self.ema.module, self.val_loader, self.amp, device, tta, suffix="_ema")
        return stats

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.run.checkpoint_every_steps
        return every > 0 and step % every == 0 and step < self.steps_per_epoch

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        start = self.position.step_in_epoch
        self.train_loader.set_position(epoch, start * self.accum)
        log_every = max(1, self.cfg.run.log_every_steps)
        show_bar = self.dist.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch}", disable=not show_bar, leave=False)
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.dist.device)  # first non-finite step
        wait_s, epoch_start = 0.0, time.perf_counter()
        batches: Iterable = iter(self.train_loader)
        for step in range(start, self.steps_per_epoch):
            set_lr(self.optimizer, self.peak_lr * self.schedule.factor(self.position.global_step))
            for micro in range(self.accum):
                fetch_start = time.perf_counter()
                images, labels = next(batches)
                wait_s += time.perf_counter() - fetch_start
                seed_step(self.cfg.run.seed, self.dist.rank, self.position.global_step, micro)
                inputs, targets = self.mixing(images, labels) if self.mixing else (images, labels)
                last_micro = micro == self.accum - 1
                # DDP all-reduces gradients on the last micro-batch only.
                skip_sync = self.model.no_sync() if self.dist.is_distributed and not last_micro else contextlib.nullcontext()
                with skip_sync:
                    with autocast(self.dist.device, self.amp):
                        logits = self.model(inputs)
                        loss = self.criterion(logits, targets)
                    self.scaler.scale(loss / self.accum).backward()
                if last_micro and self.gradient_wait:
                    self.gradient_wait.step_done()
                loss = loss.detach().double()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                # In-place adds of host scalars: no host-to-device copy in the step loop.
                self.train_sums[0] += loss * labels.numel()
                self.train_sums[1] += topk_correct(logits, labels, (1,))[0]
                self.train_sums[2] += labels.numel()
            self.scaler.step(self.optimizer)  # without fp16: optimizer.step()
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema:
                self.ema.update(unwrap(self.net))
            self.position = Position(epoch, step + 1, self.position.global_step + 1)
            bar.update(1)
            done = step + 1
            log_due = done % log_every == 0 or done == self.steps_per_epoch
            if log_due or done % STOP_CHECK_EVERY_STEPS == 0 or self._checkpoint_due(done):
                report_progress(self.dist, (self.position.global_step, 0), f"epoch {epoch} step {done}")
                self._check_finite(first_bad, epoch)
                if log_due:
                    self._log_step(epoch, done, loss, show_bar)
                if self._stop_agreed():
                    self.save()
                    raise StopRequested
                if self._checkpoint_due(done):
                    self.save()
        bar.close()
        elapsed = time.perf_counter() - epoch_start
        loss_sum, top1, images = all_reduce_sum(self.train_sums.clone()).tolist()
        steps_run = max(1, self.steps_per_epoch - start)
        return {
            "train_image_size": train_image_size(self.cfg.data, epoch),
            "train_loss": loss_sum / images,
            "train_top1": 100 * top1 / images,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_sec": steps_run * self.global_batch / elapsed,
            "epoch_time_s": elapsed,
            **self._rank_times(elapsed, wait_s, steps_run),
        }

    def _rank_times(self, elapsed: float, data_wait_s: float, steps: int) -> dict[str, float]:
        """Stragglers, per epoch: each rank's own step time (wall time minus its wait for the others
        in the gradient all-reduce) and data-wait share; the slowest and fastest rank's, so a slow
        node shows in metrics.jsonl and wandb before it hangs a run. data_wait_fraction: the mean."""
        own = (elapsed - (self.gradient_wait.take() if self.gradient_wait else 0.0)) / steps
        ranks = all_gather_objects((own, data_wait_s / elapsed))
        slowest = max(range(len(ranks)), key=lambda rank: ranks[rank][0])
        fastest = min(range(len(ranks)), key=lambda rank: ranks[rank][0])
        return {"data_wait_fraction": sum(share for _, share in ranks) / len(ranks),
                "rank_step_s_slowest": ranks[slowest][0], "rank_step_s_fastest": ranks[fastest][0],
                "rank_slowest": slowest, "rank_fastest": fastest,
                "rank_data_wait_slowest": ranks[slowest][1], "rank_data_wait_fastest": ranks[fastest][1]}

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        local = int(first_bad.item())
        if all_reduce_sum(torch.tensor([float(local >= 0)], device=self.dist.device)).item():
            self._stop_diverged(f"non-finite training loss at epoch {epoch}, "
                                + (f"step {local}" if local >= 0 else "a step on another rank"))

    def _check_finite_eval(self, stats: dict[str, float], epoch: int) -> None:
        """A diverged model evaluates to NaN or carries inf BatchNorm statistics: no result to keep.
        Every rank sees the same (all-reduced loss, rank-averaged buffers), so all stop together."""
        bad = [f"{key} {stats[key]}" for key in ("val_loss", "val_loss_ema") if key in stats and not math.isfinite(stats[key])]
        nets = [("", unwrap(self.net))] + ([("EMA ", self.ema.module)] if self.ema else [])
        buffers = [f"{which}{name}" for which, net in nets for name, buf in net.named_buffers()
                   if buf.is_floating_point() and not torch.isfinite(buf).all()]
        if buffers:
            bad.append(f"{len(buffers)} non-finite buffers ({', '.join(buffers[:3])}{', ...' if len(buffers) > 3 else ''})")
        if bad:
            self._stop_diverged(f"non-finite evaluation at epoch {epoch}: {'; '.join(bad)}")

    def _stop_diverged(self, what: str) -> None:
        last = self.out_dir / LAST
        saved = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        raise UserError(f"{what}; stopped without saving, {saved}. Lower optim.base_lr or lengthen "
                        f"schedule.warmup_epochs.")

    def _stop_agreed(self) -> bool:
        flag = all_reduce_sum(torch.tensor([float(self.stop_requested)], device=self.dist.device))
        return flag.item() > 0

    def _log_step(self, epoch: int, done: int, loss: torch.Tensor, show_bar: bool) -> None:
        if not self.log:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.step(self.position.global_step, {"loss": loss.item(), "lr": lr})
        if not show_bar:
            print(f"epoch {epoch} step {done}/{self.steps_per_epoch} loss {loss.item():.4f} lr {lr:.4g}", flush=True)


def run_training(cfg: Config) -> list[dict[str, Any]]:
    """Train to cfg.schedule.epochs (continuing a previous run in cfg.run.out_dir); per-epoch records.

    A collective that times out (another rank hung) ends this rank with one line saying where, and
    which ranks had not got there; torchrun then restarts the group, which resumes from last.pt.
    """
    dist = init_distributed(cfg.run.device, cfg.run.collective_timeout_s)
    trainer = None
    try:
        with contextlib.ExitStack() as held:
            lease = main_only(lambda: held.enter_context(hold_lease(Path(cfg.run.out_dir), cfg.run.lease_timeout_s)))
            trainer = Trainer(cfg, dist, lease)
            return trainer.fit()
    except RuntimeError as err:
        if not collective_timed_out(err):
            raise
        pos = trainer.position if trainer else Position()
        where = f"epoch {pos.epoch} step {pos.step_in_epoch}" if trainer else "start-up"
        raise UserError(
            f"rank {dist.rank}: a collective timed out after {cfg.run.collective_timeout_s:g} s "
            f"(run.collective_timeout_s) at {where}; {laggards(dist)}. "
            f"Under torchrun's --max-restarts the group restarts and resumes from the newest checkpoint") from None
    finally:
        shutdown()
