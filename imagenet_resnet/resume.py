"""The resume policy: pure decisions from (the saved checkpoint, today's config), made before
anything is written. What config.yaml says is what trains: a changed key takes effect from the
first resumed step, announced, or is refused with the reason (README, "Resume policy").

    saved, path = find_checkpoint(out_dir, cfg.run.resume)            # rank 0 chooses, all load it
    changes = config_changes(saved, cfg, num_classes, path)           # {key: (saved, now)}; refusals raise
    accum = accumulation_steps(saved, cfg, world_size)
    carry = carry_over(saved, cfg, world_size, accum, steps_per_epoch, changes)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagenet_resnet.checkpoint import BEST, LAST, Checkpoint, Position, load_checkpoint, load_latest
from imagenet_resnet.config import Config, config_to_dict, flatten
from imagenet_resnet.distributed import broadcast_object, main_only
from imagenet_resnet.errors import UserError
from imagenet_resnet.metrics import read_metrics
from imagenet_resnet.optim import scaled_lr

# Refused on resume, since what they choose is fixed once training has started (the network, its
# first weights, which parameters train, the optimizer's state).
FIXED_AT_START = ("model.name", "model.zero_init_residual", "model.blurpool", "model.init_from", "model.freeze",
                  "data.dataset", "optim.name")
NOT_COMPARED = ("run.out_dir", "run.resume")  # where the run lives and came from, not what it trains
# Keys that leave the train loader's stream as it was: its saved mid-epoch state still applies.
SAME_STREAM = ("data.root", "data.workers")


def find_checkpoint(out_dir: Path, resume: str) -> tuple[Checkpoint | None, Path | None]:
    """Collective: the checkpoint to continue from (rank 0 chooses, so all load the same file), or none."""
    saved, path = main_only(lambda: choose_checkpoint(out_dir, resume)) or (None, None)
    path = broadcast_object(path)
    if path is not None and saved is None:  # ranks other than 0
        saved = load_checkpoint(path)
    return saved, path


def choose_checkpoint(out_dir: Path, resume: str) -> tuple[Checkpoint | None, Path | None]:
    """out_dir's own newest checkpoint; run.resume only seeds a folder that has none, so a
    restarted or requeued command continues its own progress instead of going back to it."""
    try:
        saved, own = load_latest(out_dir)
    except UserError as err:
        if not resume:
            raise UserError(f"{err}. Nothing was changed. {how_to_continue(out_dir)}") from err
        saved, own = None, None
        print(f"warning: continuing from run.resume={resume} instead", file=sys.stderr, flush=True)
    if own is not None:
        if resume:
            print(f"run.resume={resume} not used: {out_dir} has its own newer checkpoint {own}", flush=True)
        return saved, own
    if resume:
        return load_checkpoint(Path(resume)), Path(resume)
    if (out_dir / BEST).exists() or read_metrics(out_dir):
        raise UserError(f"{out_dir}: holds a run (metrics.jsonl or best.pt) but no {LAST} to continue "
                        f"it from. Nothing was changed. {how_to_continue(out_dir)}")
    return None, None


def how_to_continue(out_dir: Path) -> str:
    best = out_dir / BEST
    start_over = "use a new run.out_dir (or move this folder away) to start over."
    return (
        f"To continue from {best}, add run.resume={best}; or {start_over}" if best.exists() else start_over.capitalize()
    )


def config_changes(saved: Checkpoint, cfg: Config, num_classes: int, path: Path) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, this config's)} for every key that differs; UserError if
    one of them cannot change in a run that has started."""
    before = flatten(config_to_dict(Config())) | flatten(saved.config)  # keys added since: their defaults
    changes = {key: (before[key], now) for key, now in flatten(config_to_dict(cfg)).items()
               if key not in NOT_COMPARED and before[key] != now}
    refused = [f"{key}: checkpoint {changes[key][0]!r}, now {changes[key][1]!r}" for key in FIXED_AT_START
               if key in changes]
    if saved.num_classes != num_classes:
        refused.append(f"classes: checkpoint {saved.num_classes}, now {num_classes}")
    if "run.seed" in changes and saved.position.step_in_epoch > 0:  # the epoch's order comes from the seed
        refused.append(f"run.seed: checkpoint {changes['run.seed'][0]}, now {changes['run.seed'][1]} in the middle "
                       f"of epoch {saved.position.epoch} (its order would repeat some images and skip others; a new "
                       f"seed can start at an epoch's beginning)")
    if refused:
        raise UserError(
            f"{path}: cannot continue this run with {'; '.join(refused)} (fixed once training has started). "
            f"Nothing was changed. Keep the checkpoint's value, or start a new run from its weights: a new "
            f"run.out_dir with model.init_from={path}")
    return changes


def accumulation_steps(saved: Checkpoint | None, cfg: Config, world_size: int) -> int:
    """optim.accumulation_steps, or what keeps a resumed run's global batch on a new world size."""
    per_step = cfg.data.batch_size * world_size
    if saved is None or saved.world_size == world_size or cfg.run.on_world_size_change == "scale_lr":
        return cfg.optim.accumulation_steps
    if saved.global_batch % per_step:
        raise UserError(
            f"resume on {world_size} processes with run.on_world_size_change=keep_global_batch: the "
            f"global batch {saved.global_batch} is not a multiple of data.batch_size x processes = {per_step}; "
            f"choose another data.batch_size or run.on_world_size_change=scale_lr")
    return saved.global_batch // per_step


@dataclass
class CarryOver:
    """Where a resumed run continues, and what of the saved per-rank state it takes."""

    position: Position
    exact: bool  # same processes and global batch: each rank takes its own sums and RNG state
    restore_loader: bool  # and its loader's mid-epoch state (the stream is the same)
    note: str = ""  # otherwise rank 0 takes all partial sums, and says why the batch changed


def carry_over(saved: Checkpoint, cfg: Config, world_size: int, accum: int, steps_per_epoch: int,
               changes: dict[str, tuple[Any, Any]]) -> CarryOver:
    global_batch = cfg.data.batch_size * world_size * accum
    same_world = saved.world_size == world_size
    if same_world and saved.global_batch == global_batch:
        same_stream = not any(key.startswith("data.") and key not in SAME_STREAM for key in changes)
        return CarryOver(saved.position, exact=True, restore_loader=same_stream)
    # Keep the count of images already seen this epoch: the same prefix of the epoch's permutation.
    pos = saved.position
    done = pos.step_in_epoch * saved.global_batch // global_batch
    why = (f"{saved.world_size} -> {world_size} processes (run.on_world_size_change={cfg.run.on_world_size_change})"
           if not same_world else "the changed keys above")
    note = (f"resume: global batch {saved.global_batch} -> {global_batch} = {cfg.data.batch_size} x "
            f"{world_size} process(es) x {accum} accumulation step(s), from {why}; "
            f"lr {scaled_lr(cfg.optim.base_lr, global_batch):g}; epoch {pos.epoch} continues at step {done}")
    return CarryOver(Position(pos.epoch, done, pos.epoch * steps_per_epoch + done), exact=False,
                     restore_loader=False, note=note)


def announcement(changes: dict[str, tuple[Any, Any]], carry: CarryOver, path: Path) -> str:
    """What rank 0 prints on resume: each changed key, a changed global batch, where it continues."""
    lines = [f"resume: {key} {before} -> {now}" for key, (before, now) in changes.items()]
    lines += [carry.note] if carry.note else []
    where = carry.position
    return "\n".join(lines + [f"resumed from {path}: epoch {where.epoch}, step {where.step_in_epoch}"])


def scaler_state(saved: Checkpoint, cfg: Config, changes: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """The gradient scaler's saved state, with run.loss_scale's new value if it changed."""
    scaler = dict(saved.scaler)
    if "run.loss_scale" in changes:
        scaler["scale"] = cfg.run.loss_scale
    return scaler
