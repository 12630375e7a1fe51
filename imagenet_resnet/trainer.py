"""The training loop: build loaders, model and optimizer; then per epoch train, evaluate, log, save.

Runs as one process or under torchrun. Rank 0 alone writes files and wandb (`self.log`, `save`).
The step loop does not synchronise with the host: losses and counts accumulate on the device
and are read at the agreement points (log steps, stop checks, checkpoints) and epoch ends.
What a resumed run takes from its checkpoint is decided in `resume`; why a run stops early, in
`guards`; who waits for whom, in `stragglers`.

    cfg = load_config("configs/cifar10_resnet20.yaml", ["schedule.epochs=2"])
    records = Trainer(cfg, init_distributed("cpu")).fit()      # train.run_training adds the lease
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from imagenet_resnet import checkpoint, resume
from imagenet_resnet.checkpoint import LAST, Checkpoint, CheckpointWriter, Position, capture_rng, restore_rng, unwrap
from imagenet_resnet.config import Config, config_to_dict, save_config
from imagenet_resnet.data import build_loaders, resolve_loader
from imagenet_resnet.data.datasets import class_names
from imagenet_resnet.data.loader import loader_workers
from imagenet_resnet.data.mixing import build_mixing
from imagenet_resnet.data.sampling import seed_all, step_seed
from imagenet_resnet.data.sizes import train_image_size
from imagenet_resnet.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    average_buffers,
    main_only,
    report_progress,
    set_collective_timeout,
)
from imagenet_resnet.evaluation import evaluate
from imagenet_resnet.finetune import apply_freeze, load_init_tensors
from imagenet_resnet.guards import STOP_CHECK_EVERY_STEPS, STOPPED_EXIT, Guards, StopRequested
from imagenet_resnet.lease import Lease
from imagenet_resnet.metrics import RunLog, topk_correct
from imagenet_resnet.network import amp_dtype, autocast, build_ema, build_network, restore_own_buffers, wrap_model
from imagenet_resnet.optim import Schedule, build_loss, build_optimizer, optimizer_steps, plan_text, scaled_lr, set_lr
from imagenet_resnet.stragglers import GradientWait, rank_times


class Trainer:
    def __init__(self, cfg: Config, dist: DistInfo, lease: Lease | None = None, guards: Guards | None = None) -> None:
        self.cfg, self.dist, self.lease = cfg, dist, lease  # lease: rank 0's hold on out_dir
        self.out_dir = Path(cfg.run.out_dir)
        self.amp = amp_dtype(cfg, dist.device)
        # cuDNN times its convolution algorithms once per input shape and keeps the fastest (DLE,
        # timm and ffcv all set this; train shapes change only with progressive resizing).
        torch.backends.cudnn.benchmark = dist.device.type == "cuda"
        torch.manual_seed(cfg.run.seed + dist.rank)
        self.train_loader, self.val_loader, self.num_classes = build_loaders(cfg, dist, self.amp or torch.float32)
        self.class_names = class_names(cfg) if dist.is_main else []  # saved for predict and export
        self.net = build_network(cfg, self.num_classes, dist.device, dist.is_distributed)
        saved, path = resume.find_checkpoint(self.out_dir, cfg.run.resume)
        self.changes = resume.config_changes(saved, cfg, self.num_classes, path) if saved else {}
        self.init_tensors = load_init_tensors(self.net, cfg.model.init_from, saved)  # lr x optim.pretrained_lr_scale
        apply_freeze(self.net, cfg.model.freeze)
        self._build_optimization(saved)
        self.position, self.train_sums = Position(), self._zero_sums()
        self.data_wait_s, self.show_bar = 0.0, False  # seconds waiting for batches this epoch; tqdm or log lines
        self.best_top1, self.best_weights = 0.0, "model"
        if saved is not None:
            self._restore(saved, path)
        self.gradient_wait = GradientWait(self.net, dist.device) if dist.is_distributed else None  # stragglers
        self.model, self.eval_net = wrap_model(self.net, dist, cfg.run)
        if saved is not None:
            restore_own_buffers(unwrap(self.net), saved.model_buffers, saved, dist)
        self.ema = build_ema(self.net, cfg.model.ema_decay, saved, dist)  # after DDP gave all rank 0's weights
        self.guards = guards or Guards(dist.device, self.out_dir / LAST)
        self.writer = CheckpointWriter()  # rank 0's: saves are written while training goes on
        self.finished, self.first_epoch = self.position.epoch >= cfg.schedule.epochs, self.position.epoch
        self.log = self._start_log(resumed=saved is not None) if dist.is_main and not self.finished else None

    # --- setup ------------------------------------------------------------------------------

    def _zero_sums(self) -> torch.Tensor:
        return torch.zeros(3, dtype=torch.float64, device=self.dist.device)  # loss sum, top1, images

    def _build_optimization(self, saved: Checkpoint | None) -> None:
        """Global batch, steps, lr schedule, optimizer, loss, Mixup/CutMix and the fp16 scaler."""
        cfg, world = self.cfg, self.dist.world_size
        self.accum = resume.accumulation_steps(saved, cfg, world)
        self.global_batch = cfg.data.batch_size * world * self.accum
        self.steps_per_epoch = optimizer_steps(cfg, self.train_loader.steps_per_epoch, world, self.accum,
                                               self.train_loader.num_images)
        self.peak_lr = scaled_lr(cfg.optim.base_lr, self.global_batch)
        self.optimizer = build_optimizer(self.net, cfg.optim, self.peak_lr, self.init_tensors)
        self.schedule = Schedule.from_config(cfg.schedule, self.steps_per_epoch, self.global_batch)
        self.mixing = build_mixing(cfg, self.num_classes)
        self.criterion = build_loss(cfg.optim, soft_targets=self.mixing is not None)
        # fp16 needs loss scaling; a step whose gradients overflow is skipped and the scale lowered.
        self.scaler = torch.amp.GradScaler(self.dist.device.type, cfg.run.loss_scale,
                                           enabled=self.amp == torch.float16)

    def _restore(self, saved: Checkpoint, path: Path) -> None:
        unwrap(self.net).load_state_dict(saved.model)
        checkpoint.restore_optimizer(self.optimizer, saved.optimizer)
        self.best_top1, self.best_weights = saved.best_top1, saved.best_weights
        if saved.scaler:
            self.scaler.load_state_dict(resume.scaler_state(saved, self.cfg, self.changes))
        carry = resume.carry_over(saved, self.cfg, self.dist.world_size, self.accum, self.steps_per_epoch, self.changes)
        self.position = carry.position
        if carry.exact:
            self.train_sums = saved.train_sums[self.dist.rank].to(self.dist.device)
            restore_rng(saved.rng[self.dist.rank])
            if carry.restore_loader:
                self.train_loader.restore(saved.loader[self.dist.rank])
        elif self.dist.is_main:  # the partial epoch's sums, all on one rank: the totals stay right
            self.train_sums = sum(saved.train_sums).to(self.dist.device)
        # The lr of the last step taken, on this run's global batch (the saved one may be another's):
        # what the epoch's record reports if the checkpoint was written after its last step.
        set_lr(self.optimizer, self.peak_lr * self.schedule.factor(max(self.position.global_step - 1, 0)))
        if self.dist.is_main:
            print(resume.announcement(self.changes, carry, path), flush=True)

    def _start_log(self, resumed: bool) -> RunLog:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")
        cfg, loader = self.cfg, resolve_loader(self.cfg, self.dist.device)
        print(f"model {cfg.model.name} ({sum(p.numel() for p in self.net.parameters()):,} parameters), "
              f"{self.dist.world_size} process(es) on {self.dist.device.type}, "
              f"{str(self.amp or torch.float32).removeprefix('torch.')}; {self.train_loader.num_images} train / "
              f"{self.val_loader.num_images} val images, {self.num_classes} classes"
              + (f"; weights from {cfg.model.init_from}, freeze={cfg.model.freeze}" if cfg.model.init_from else "")
              + (f"; data.loader={loader}, {loader_workers(cfg.data.workers)} worker(s) per process"
                 if loader != "device" else ""), flush=True)
        print(plan_text(cfg, self.dist.world_size, self.accum, self.steps_per_epoch), flush=True)
        return RunLog(cfg, self.out_dir, self.position.epoch, resumed)

    # --- checkpoints ------------------------------------------------------------------------

    def save(self, best: bool = False) -> None:
        """Collective: every rank contributes its RNG, partial sums, loader state and EMA buffers; rank 0 writes."""
        rng = all_gather_objects(capture_rng())
        sums = all_gather_objects(self.train_sums.cpu())
        loader = all_gather_objects(self.train_loader.state())
        # Each rank's model and EMA follow its own BatchNorm statistics (DDP does not broadcast them;
        # they are averaged only at epoch ends): kept per rank.
        ema_buffers = buffers_by_rank(self.ema.module) if self.ema else None
        model_buffers = buffers_by_rank(unwrap(self.net)) if self.dist.is_distributed else None

        def write() -> None:
            if self.lease:
                self.lease.check()
            state = Checkpoint(
                model=unwrap(self.net).state_dict(), optimizer=self.optimizer.state_dict(),
                position=Position(**vars(self.position)), train_sums=sums, best_top1=self.best_top1, rng=rng,
                loader=loader, config=config_to_dict(self.cfg), num_classes=self.num_classes,
                world_size=self.dist.world_size, global_batch=self.global_batch, best_weights=self.best_weights,
                scaler=self.scaler.state_dict(), class_names=self.class_names, init_tensors=sorted(self.init_tensors),
                model_ema=self.ema.module.state_dict() if self.ema else None, ema_buffers=ema_buffers,
                model_buffers=model_buffers)
            self.writer.submit(state, self.out_dir, best)  # copied to host memory now, written meanwhile

        main_only(write)  # a failed write (this one's or the previous) stops every rank, with one message

    def finish_writes(self) -> None:
        """Collective: the checkpoint in flight is on disk (before a stop exits, and at the end)."""
        main_only(self.writer.wait)

    # --- the loop ---------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        if self.finished:
            main_only(lambda: print(f"{self.out_dir}: finished, {self.position.epoch} epochs done (schedule.epochs="
                                    f"{self.cfg.schedule.epochs}); raise schedule.epochs to train longer", flush=True))
            return []
        try:
            with self.guards.watching_sigterm():
                if self.guards.agree(self.position.epoch):  # during start-up: nothing done, nothing to save
                    raise StopRequested("before the first step; nothing needed saving")
                records = [self._run_epoch(epoch) for epoch in range(self.position.epoch, self.cfg.schedule.epochs)]
                self.finish_writes()
                return records
        except StopRequested as stop:
            if self.dist.is_main:
                print(f"stopped by SIGTERM at epoch {self.position.epoch} step {self.position.step_in_epoch}; "
                      f"{stop or 'checkpoint saved'}, rerun the same command to continue", flush=True)
            raise SystemExit(STOPPED_EXIT) from None  # stopped, not finished: a scheduler must not count it done
        finally:
            if self.log:
                self.log.close()

    def _run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train, evaluate if due (BatchNorm statistics averaged over ranks first), log, save."""
        train_stats = self.train_epoch(epoch)
        average_buffers(self.net)
        evaluated = self._evaluation_due(epoch)
        val_stats = self.evaluate() if evaluated else {}
        self.guards.check_evaluation(val_stats, self._nets(), epoch)
        record = {"epoch": epoch, **train_stats, "evaluated": evaluated, **val_stats}
        is_best = False
        if evaluated:
            top1, weights = max((val_stats["val_top1"], "model"), (val_stats.get("val_top1_ema", -1.0), "ema"))
            is_best = top1 > self.best_top1
            if is_best:
                self.best_top1, self.best_weights = top1, weights
        main_only(lambda: self._record(record))
        self.position = Position(epoch + 1, 0, self.position.global_step)
        self.train_sums = self._zero_sums()
        self.save(best=is_best)
        return record

    def _evaluation_due(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.run.eval_every_epochs == 0 or epoch == self.cfg.schedule.epochs - 1

    def _nets(self) -> list[tuple[str, torch.nn.Module]]:
        return [("", unwrap(self.net))] + ([("EMA ", self.ema.module)] if self.ema else [])

    def _record(self, record: dict[str, Any]) -> None:
        """Rank 0: the epoch's line in metrics.jsonl and wandb, if the run folder is still this job's."""
        if self.lease:
            self.lease.check()
        if self.log:
            self.log.epoch(self.position.global_step, record)

    def evaluate(self) -> dict[str, float]:
        """The model on the val set, and its EMA (keys *_ema) when there is one."""
        report_progress(self.dist, (self.position.global_step, 1), f"epoch {self.position.epoch} evaluation")
        tta, device = self.cfg.data.val_flip_tta, self.dist.device
        pad = self.cfg.data.batch_size if self.cfg.run.compile else 0  # the compiled graph: one batch shape
        stats = evaluate(self.eval_net, self.val_loader, self.amp, device, tta, pad_to=pad)
        if self.ema:
            average_buffers(self.ema.module)  # each rank's EMA of its own BN statistics
            stats |= evaluate(self.ema.module, self.val_loader, self.amp, device, tta, suffix="_ema")
        return stats

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        start = self.position.step_in_epoch
        self.train_loader.set_position(epoch, start * self.accum)
        self.guards.start_epoch()
        self.show_bar = self.dist.is_main and sys.stderr.isatty()
        bar = tqdm(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch}", disable=not self.show_bar,
                   leave=False)
        self.data_wait_s, epoch_start = 0.0, time.perf_counter()
        batches = iter(self.train_loader)
        for step in range(start, self.steps_per_epoch):
            loss = self.train_step(batches, epoch, step)
            if step == start and epoch == self.first_epoch:  # start-up is over: collectives get the short timeout
                set_collective_timeout(self.dist)
            bar.update(1)
            self._agreement_point(epoch, step + 1, loss)
        bar.close()
        return self._epoch_stats(epoch, time.perf_counter() - epoch_start, max(1, self.steps_per_epoch - start))

    def train_step(self, batches: Iterator, epoch: int, step: int) -> torch.Tensor:
        """One optimizer step over `accum` micro-batches; the last micro-batch's loss (on the device)."""
        set_lr(self.optimizer, self.peak_lr * self.schedule.factor(self.position.global_step))
        for micro in range(self.accum):
            loss = self._micro_step(batches, step, micro)
        self.scaler.step(self.optimizer)  # without fp16: optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(unwrap(self.net))
        self.position = Position(epoch, step + 1, self.position.global_step + 1)
        return loss

    def _micro_step(self, batches: Iterator, step: int, micro: int) -> torch.Tensor:
        fetch_start = time.perf_counter()
        images, labels = next(batches)
        self.data_wait_s += time.perf_counter() - fetch_start
        # The step's own random draws (Mixup/CutMix, stochastic depth) are then the same after a resume.
        seed_all(step_seed(self.cfg.run.seed, self.dist.rank, self.position.global_step, micro))
        inputs, targets = self.mixing(images, labels) if self.mixing else (images, labels)
        last_micro = micro == self.accum - 1
        # DDP all-reduces gradients on the last micro-batch only.
        skip_sync = self.model.no_sync() if self.dist.is_distributed and not last_micro else contextlib.nullcontext()
        if last_micro and self.gradient_wait:
            self.gradient_wait.arm()
        with skip_sync:
            with autocast(self.dist.device, self.amp):
                logits = self.model(inputs)
                loss = self.criterion(logits, targets)
            self.scaler.scale(loss / self.accum).backward()
        if last_micro and self.gradient_wait:
            self.gradient_wait.step_done()
        loss = loss.detach().double()
        self.guards.note_loss(loss, step)
        # In-place adds of host scalars: no host-to-device copy in the step loop.
        self.train_sums[0] += loss * labels.numel()
        self.train_sums[1] += topk_correct(logits, labels, (1,))[0]
        self.train_sums[2] += labels.numel()
        return loss

    def _agreement_point(self, epoch: int, done: int, loss: torch.Tensor) -> None:
        """Every few steps, all ranks together: progress, the guards, the step log, SIGTERM, mid-epoch saves."""
        log_due = done % max(1, self.cfg.run.log_every_steps) == 0 or done == self.steps_per_epoch
        if not (log_due or done % STOP_CHECK_EVERY_STEPS == 0 or self._checkpoint_due(done)):
            return
        report_progress(self.dist, (self.position.global_step, 0), f"epoch {epoch} step {done}")
        stop = self.guards.agree(epoch, self.writer.failure() if self.dist.is_main else None)
        if log_due:
            self._log_step(epoch, done, loss)
        if stop:
            self.save()
            self.finish_writes()
            raise StopRequested
        if self._checkpoint_due(done):
            self.save()

    def _checkpoint_due(self, step: int) -> bool:
        every = self.cfg.run.checkpoint_every_steps
        return every > 0 and step % every == 0 and step < self.steps_per_epoch

    def _log_step(self, epoch: int, done: int, loss: torch.Tensor) -> None:
        if not self.log:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.step(self.position.global_step, {"loss": loss.item(), "lr": lr})
        if not self.show_bar:
            print(f"epoch {epoch} step {done}/{self.steps_per_epoch} loss {loss.item():.4f} lr {lr:.4g}", flush=True)

    def _epoch_stats(self, epoch: int, elapsed: float, steps_run: int) -> dict[str, float]:
        loss_sum, top1, images = all_reduce_sum(self.train_sums.clone()).tolist()
        return {"train_image_size": train_image_size(self.cfg.data, epoch), "train_loss": loss_sum / images,
                "train_top1": 100 * top1 / images, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_sec": steps_run * self.global_batch / elapsed, "epoch_time_s": elapsed,
                **rank_times(elapsed, self.data_wait_s, steps_run, self.gradient_wait)}


def buffers_by_rank(module: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Collective: every rank's buffers (BatchNorm statistics), on the host, in rank order."""
    return all_gather_objects({name: buffer.cpu() for name, buffer in module.named_buffers()})
