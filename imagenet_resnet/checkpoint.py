"""Checkpoints that survive a kill at any moment, and the state that makes resume exact.

`save_atomic` writes a temporary file, fsyncs it, moves the old file aside as `<name>.prev`
and renames the new one into place: at every instant one complete checkpoint exists.
`load_latest` takes the newest readable one, warns when it had to fall back, and refuses
(rather than start over) when there are checkpoints but none can be read.

    save_atomic(state, out_dir / "last.pt")
    state, path = load_latest(out_dir)          # (None, None) when nothing was saved yet
    restore_rng(state["rng"][rank])
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagenet_resnet.errors import UserError

LAST = "last.pt"
BEST = "best.pt"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync, keep the previous file as .prev, rename into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.exists():
        os.replace(path, path.with_name(path.name + ".prev"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# What a resume reads; a file without them is not one of this project's checkpoints.
REQUIRED_KEYS = ("model", "optimizer", "position", "train_sums", "best_top1", "rng", "loader", "config",
                 "num_classes", "world_size", "global_batch")


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file; UserError naming it if it is missing, truncated or not ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise UserError(f"{path}: checkpoint not found") from err
    except Exception as err:  # truncated zip, pickle garbage, ...: all mean "unusable"
        raise UserError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from err
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise UserError(f"{path}: not a checkpoint written by imagenet_resnet training (missing: {', '.join(missing)})")
    return state


def load_latest(out_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest readable of last.pt and last.pt.prev, warning about a corrupt one; (None, None)
    when neither exists. Raises UserError when they exist but none reads: a fresh start would
    overwrite the run."""
    found = [path for path in (out_dir / LAST, out_dir / (LAST + ".prev")) if path.exists()]
    problems = []
    for path in found:
        try:
            return load_file(path), path
        except UserError as err:
            problems.append(str(err))
            fallback = "; trying the previous checkpoint" if path != found[-1] else ""
            print(f"warning: {err}{fallback}", file=sys.stderr, flush=True)
    if problems:
        raise UserError(f"{out_dir}: no readable checkpoint ({'; '.join(problems)})")
    return None, None


def capture_rng() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (their state_dict keys differ)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
