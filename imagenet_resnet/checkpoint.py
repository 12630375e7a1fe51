"""The checkpoint: its keys (this module alone reads and writes them), and files that survive a
kill at any moment.

`Checkpoint` is the saved state as fields: training builds one and hands it to a
`CheckpointWriter` (or `save`s it); resume, evaluate, predict, export and `upgrade` read one back
through `load_checkpoint`. `save` writes a temporary file, fsyncs it, moves the old file aside as
`<name>.prev` and renames the new one into place: at every instant one complete checkpoint
exists, and a write that fails (disk full, folder gone) leaves the previous one as it was.
best.pt is a hard link to the last.pt just written, not a second serialisation.
`CheckpointWriter` copies the state to host memory and writes it on a thread of its own, so
training goes on while it is serialised and written.
`load_latest` takes the newest readable one, warns when it had to fall back, and refuses
(rather than start over) when there are checkpoints but none can be read.

Every load is `torch.load(weights_only=True)`: a checkpoint holds tensors and plain Python
values only (RNG states included), so a file that would run code when unpickled is refused.
Checkpoints written before that rule (NumPy RNG state inside) are converted once by `upgrade`,
which also runs no code from the file:

    save(checkpoint, out_dir, best=True)               # last.pt and best.pt, each a complete file
    writer.submit(checkpoint, out_dir, best=True)      # the same in the background; writer.wait() ends it
    saved, path = load_latest(out_dir)                # (None, None) when nothing was saved yet
    restore_rng(saved.rng[rank])
    python -m imagenet_resnet.checkpoint upgrade runs/x/last.pt   # an older checkpoint, in place
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import re
import sys
import threading
import zipfile
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import safetensors.torch
import torch

from imagenet_resnet.cli import command, existing_file, run_main
from imagenet_resnet.errors import UserError
from imagenet_resnet.files import link_atomic, replacing, write_atomic, write_synced
from imagenet_resnet.unpickle import numpy_reconstruct

LAST = "last.pt"
BEST = "best.pt"
WEIGHTS = ("model", "ema")  # what --weights chooses: the trained weights or their EMA


@dataclass
class Position:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # steps of it already done
    global_step: int = 0


@dataclass
class Checkpoint:
    """What a checkpoint holds. Per-rank lists (rng, loader, train_sums, ema_buffers, model_buffers)
    are in rank order; `init_tensors` names the tensors model.init_from loaded (their lr is scaled)."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    position: Position
    train_sums: list[torch.Tensor]  # each rank's (loss sum, top-1 count, images) of the epoch so far
    best_top1: float
    rng: list[dict[str, Any]]
    loader: list[Any]
    config: dict[str, Any]
    num_classes: int
    world_size: int
    global_batch: int
    best_weights: str = "model"  # which of model / ema scored best_top1
    scaler: dict[str, Any] | None = None
    class_names: list[str] = field(default_factory=list)
    init_tensors: list[str] | None = None
    model_ema: dict[str, torch.Tensor] | None = None
    ema_buffers: list[dict[str, torch.Tensor]] | None = None
    model_buffers: list[dict[str, torch.Tensor]] | None = None  # each rank's BatchNorm statistics

    # Keys as written since the first version; `init_tensors` is stored as "pretrained".
    _KEY_OF = {"init_tensors": "pretrained"}

    def to_state(self) -> dict[str, Any]:
        state = {self._KEY_OF.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        state["position"] = vars(self.position).copy()
        return {key: value for key, value in state.items() if value is not None}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Checkpoint:
        values = {f.name: state[cls._KEY_OF.get(f.name, f.name)] for f in fields(cls)
                  if cls._KEY_OF.get(f.name, f.name) in state}
        return cls(**{**values, "position": Position(**state["position"])})

    def weights(self, which: str, path: Path) -> dict[str, torch.Tensor]:
        """The model's or (which="ema") the EMA's state_dict; UserError if it has no EMA."""
        if which == "ema" and self.model_ema is None:
            raise UserError(f"{path}: holds no EMA weights (trained with model.ema_decay=0); use --weights model")
        return self.model_ema if which == "ema" else self.model


def save(checkpoint: Checkpoint, out_dir: Path, best: bool = False) -> None:
    """last.pt and, if `best`, best.pt (each keeping its previous file as .prev): one serialisation."""
    write_state(checkpoint.to_state(), out_dir, best)


def write_state(state: dict[str, Any], out_dir: Path, best: bool) -> None:
    data = io.BytesIO()
    torch.save(state, data)  # in memory first: a failed write then raises OSError with its cause
    write_checkpoint(data, out_dir / LAST)
    if best:
        link_checkpoint(out_dir / BEST, out_dir / LAST)


def to_host(value: Any) -> Any:
    """`value` with every tensor copied to host memory: a snapshot that training cannot change."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_host(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(item) for item in value)
    return value


class CheckpointWriter:
    """Writes checkpoints on a background thread while training goes on (timm's and DLE's savers
    block every rank instead). `submit` copies the state to host memory, at the agreement point,
    and returns; a write still in flight is finished first. `wait` finishes the current one (before
    a stop, and at the end); it and `submit` raise the UserError of a write that failed, and
    `failure` tells without waiting. The thread is not a daemon: a process that ends for any
    other reason still completes the file it was writing, and a SIGKILL mid-write leaves the
    previous checkpoint (writes are atomic).
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: UserError | None = None

    def submit(self, checkpoint: Checkpoint, out_dir: Path, best: bool) -> None:
        self.wait()
        state = to_host(checkpoint.to_state())
        self.thread = threading.Thread(target=self._write, args=(state, out_dir, best), name="checkpoint-writer")
        self.thread.start()

    def _write(self, state: dict[str, Any], out_dir: Path, best: bool) -> None:
        try:
            write_state(state, out_dir, best)
        except UserError as err:
            self.error = err

    def failure(self) -> UserError | None:
        """The error of a write that has failed, without waiting for one in flight."""
        return self.error if self.thread is not None and not self.thread.is_alive() else None

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error


def load_checkpoint(path: Path) -> Checkpoint:
    return Checkpoint.from_state(load_file(path))


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved moments and step counts; the settings (lr scale, weight decay, momentum, trust
    coefficient, ...) stay those of this config's parameter groups."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .pt/.pth file (our checkpoint, a plain or wrapped state_dict) or .safetensors.

    .pt files load with weights_only=True, as torchvision and timm load theirs: a downloaded file
    whose pickle would run code is refused.
    """
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load_file(str(path))
        except Exception as err:  # unreadable in any of its ways: name the file
            raise UserError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    else:
        state = safe_load(path, "weights file")
    for key in ("model", "state_dict"):  # our checkpoints; timm/lightning-style wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: holds no state_dict of tensors")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def write_checkpoint(data: io.BytesIO, path: Path) -> None:
    """Write to a temporary file, fsync, keep the previous file as .prev, rename into place.

    A failed write removes the temporary file and raises UserError naming the folder and the
    cause; `path` is then still the previous, complete checkpoint.
    """
    with _failure_named(path):
        write_atomic(path, data.getbuffer(), previous=".prev")


def link_checkpoint(path: Path, source: Path) -> None:
    """`path` (best.pt) becomes the file `source` (last.pt) is, the previous one kept as .prev."""
    with _failure_named(path):
        link_atomic(path, source, previous=".prev")


@contextlib.contextmanager
def _failure_named(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        cause = err.strerror or str(err)
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise UserError(f"{path.parent}: could not write checkpoint {path.name} ({cause}); {kept}") from err


# What a resume reads; a file without them is not one of this project's checkpoints.
REQUIRED_KEYS = tuple(f.name for f in fields(Checkpoint) if f.default is MISSING and f.default_factory is MISSING)


def safe_load(path: Path, what: str = "checkpoint") -> Any:
    """torch.load with weights_only=True; UserError naming the file if it is missing, unreadable,
    or would need code from the pickle to load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise UserError(f"{path}: {what} not found") from err
    except pickle.UnpicklingError as err:
        raise UserError(_refusal(path, what)) from err
    except Exception as err:  # truncated zip, garbage, ...: all mean "unusable"
        raise UserError(f"{path}: unreadable {what} ({type(err).__name__}: {str(err).splitlines()[0]})") from err


def _old_rng_globals() -> list[Any]:
    """What an older checkpoint's NumPy RNG state (a uint32 array) unpickles with, and nothing else.
    NumPy 1.x wrote `numpy.core`, 2.x writes `numpy._core`: the same function under both names."""
    reconstruct = numpy_reconstruct()
    return [(reconstruct, "numpy._core.multiarray._reconstruct"), (reconstruct, "numpy.core.multiarray._reconstruct"),
            np.ndarray, np.dtype, np.dtypes.UInt32DType]


OLD_RNG_GLOBALS = frozenset(("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                             "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"))


def unsafe_globals(path: Path) -> list[str]:
    """The globals unpickling `path` would call beyond weights_only's own ([] if it cannot tell)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not even a zip: an old-style or broken pickle
        return []


def _refusal(path: Path, what: str) -> str:
    """Why a pickle was refused, and the way on for this project's older checkpoints."""
    needs = unsafe_globals(path)
    text = f"{path}: refused to load this {what}: unpickling it would call {', '.join(needs) or 'code it names'}"
    if needs and set(needs) <= OLD_RNG_GLOBALS:
        return (f"{text}. It looks like a checkpoint from an older imagenet_resnet (NumPy RNG state); convert it "
                f"once (no code from it is run): python -m imagenet_resnet.checkpoint upgrade {path}")
    return f"{text}, and only tensors and plain values are loaded (weights_only=True); nothing from it was run"


def _check_ours(state: Any, path: Path) -> dict[str, Any]:
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise UserError(f"{path}: not a checkpoint written by imagenet_resnet training (missing: {', '.join(missing)})")
    kinds = {"model": dict, "optimizer": dict, "position": dict, "config": dict, "rng": list, "loader": list,
             "train_sums": list, "num_classes": int, "world_size": int, "global_batch": int}
    wrong = [key for key, kind in kinds.items() if not isinstance(state[key], kind)]
    if not wrong and not all(isinstance(section, dict) for section in state["config"].values()):
        wrong = ["config sections"]
    if wrong:
        raise UserError(f"{path}: not a checkpoint written by imagenet_resnet training ({', '.join(wrong)} "
                        f"of the wrong kind)")
    return state


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file; UserError naming it if it is missing, truncated, unsafe or not ours."""
    return _check_ours(safe_load(path), path)


def load_latest(out_dir: Path) -> tuple[Checkpoint | None, Path | None]:
    """The newest readable of last.pt and last.pt.prev, warning about a corrupt one; (None, None)
    when neither exists. Raises UserError when they exist but none reads: a fresh start would
    overwrite the run."""
    found = [path for path in (out_dir / LAST, out_dir / (LAST + ".prev")) if path.exists()]
    problems = []
    for path in found:
        try:
            return load_checkpoint(path), path
        except UserError as err:
            problems.append(str(err))
            fallback = "; trying the previous checkpoint" if path != found[-1] else ""
            print(f"warning: {err}{fallback}", file=sys.stderr, flush=True)
    if problems:
        raise UserError(f"{out_dir}: no readable checkpoint ({'; '.join(problems)})")
    return None, None


def capture_rng() -> dict[str, Any]:
    """Every generator's state as tensors and plain values (what weights_only loading accepts)."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _numpy_state(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def restore_rng(rng: dict[str, Any]) -> None:
    random.setstate(rng["python"])
    state = rng["numpy"]
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (their state_dict keys differ)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _load_older(path: Path) -> dict[str, Any]:
    """A checkpoint loaded weights-only with the older RNG state's NumPy globals allowed, and nothing else."""
    try:
        if not zipfile.is_zipfile(path):
            raise UserError(
                f"{path}: not a checkpoint (PyTorch writes a zip archive; this is not one); nothing was changed"
            )
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from err
    needs = unsafe_globals(path)
    if set(needs) - OLD_RNG_GLOBALS:
        raise UserError(f"{path}: refused: unpickling it would call {', '.join(sorted(set(needs) - OLD_RNG_GLOBALS))}, "
                        f"which no imagenet_resnet checkpoint holds; nothing from it was run and it is unchanged")
    try:
        with torch.serialization.safe_globals(_old_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path}: refused: {str(err).splitlines()[0]}; nothing from it was run") from err
    except Exception as err:  # a text file, a truncated zip, unreadable: one line
        cause = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        raise UserError(f"{path}: not a checkpoint this tool can read ({type(err).__name__}: {cause})") from err
    return _check_ours(state, path)


def upgrade(path: Path) -> None:
    """Rewrite a checkpoint of an older imagenet_resnet (a NumPy array in its RNG states) so that
    weights-only loading accepts it. It is loaded weights-only too, with exactly the NumPy globals
    such an array needs allowed: a file that needs anything else is refused and runs nothing."""
    state = _load_older(path)
    old = [rng for rng in state["rng"] if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple)]
    if not old:
        print(f"{path}: already loads with weights_only=True; left as it is", flush=True)
        return
    for rng in old:
        rng["numpy"] = _numpy_state(rng["numpy"])
    kept, new = path.with_name(path.name + ".orig"), path.with_name(path.name + ".upgraded.tmp")
    if os.path.lexists(kept):
        raise UserError(f"{path}: {kept} exists; move it away (upgrade keeps the original there), nothing was changed")
    data = io.BytesIO()
    torch.save(state, data)
    try:
        with replacing(path, tmp=new, previous=".orig", mode=path.stat().st_mode & 0o7777) as partial:
            write_synced(partial, data.getbuffer())  # the original's mode, not the umask's
    except OSError as err:
        if kept.exists() and not path.exists():
            os.replace(kept, path)
        raise UserError(f"{path}: could not write the upgraded checkpoint ({err.strerror or err}); "
                        f"the file is unchanged") from err
    load_file(path)  # proves it now loads the safe way
    print(f"upgraded {path} (the original is kept as {kept})", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = command(__spec__.name, "Convert an older checkpoint so it loads with weights_only=True.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upgrade", help="rewrite FILE in place, the original kept as FILE.orig")
    up.add_argument("files", nargs="+", type=existing_file, metavar="FILE", help="checkpoints to convert")
    for path in p.parse_args(argv).files:
        upgrade(path)


if __name__ == "__main__":
    run_main(main)
