"""Checkpoints that survive a kill at any moment, and the state that makes resume exact.

`save_atomic` writes a temporary file, fsyncs it, moves the old file aside as `<name>.prev`
and renames the new one into place: at every instant one complete checkpoint exists, and a
write that fails (disk full, folder gone) leaves the previous one as it was.
`load_latest` takes the newest readable one, warns when it had to fall back, and refuses
(rather than start over) when there are checkpoints but none can be read.

Every load is `torch.load(weights_only=True)`: a checkpoint holds tensors and plain Python
values only (RNG states included), so a file that would run code when unpickled is refused.
Checkpoints written before that rule (NumPy RNG state inside) are converted once by `upgrade`,
which also runs no code from the file:

    save_atomic(state, out_dir / "last.pt")
    state, path = load_latest(out_dir)          # (None, None) when nothing was saved yet
    restore_rng(state["rng"][rank])
    python -m imagenet_resnet.checkpoint upgrade runs/x/last.pt   # an older checkpoint, in place
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imagenet_resnet.cli import command, existing_file, run_main
from imagenet_resnet.errors import UserError

LAST = "last.pt"
BEST = "best.pt"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: io.BytesIO, mode: int = 0o666) -> None:
    """Create `path` (it must not exist) with `data`, fsynced; `mode` is filtered by the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Clean-up after a failed write, which must not raise over the error being reported (a
    read-only filesystem refuses even to unlink a file that is not there)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file, fsync, keep the previous file as .prev, rename into place.

    A failed write removes the temporary file and raises UserError naming the folder and the
    cause; `path` is then still the previous, complete checkpoint.
    """
    tmp = path.with_name(path.name + ".tmp")
    data = io.BytesIO()
    torch.save(state, data)  # in memory first: a failed write then raises OSError with its cause
    try:
        tmp.unlink(missing_ok=True)  # a leftover of a write that was killed
        _write_synced(tmp, data)
        if path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        cause = err.strerror or str(err)
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise UserError(f"{path.parent}: could not write checkpoint {path.name} ({cause}); {kept}") from err


# What a resume reads; a file without them is not one of this project's checkpoints.
REQUIRED_KEYS = ("model", "optimizer", "position", "train_sums", "best_top1", "rng", "loader", "config",
                 "num_classes", "world_size", "global_batch")


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


def _numpy_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _old_rng_globals() -> list[Any]:
    """What an older checkpoint's NumPy RNG state (a uint32 array) unpickles with, and nothing else.
    NumPy 1.x wrote `numpy.core`, 2.x writes `numpy._core`: the same function under both names."""
    reconstruct = _numpy_reconstruct()
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
    return state


def load_file(path: Path) -> dict[str, Any]:
    """A checkpoint file; UserError naming it if it is missing, truncated, unsafe or not ours."""
    return _check_ours(safe_load(path), path)


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


def upgrade(path: Path) -> None:
    """Rewrite a checkpoint of an older imagenet_resnet (a NumPy array in its RNG states) so that
    weights-only loading accepts it. It is loaded weights-only too, with exactly the NumPy globals
    such an array needs allowed: a file that needs anything else is refused and runs nothing."""
    try:
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: not a checkpoint (PyTorch writes a zip archive; this is not one); nothing was changed")
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
    _check_ours(state, path)
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
        new.unlink(missing_ok=True)
        _write_synced(new, data)
        os.chmod(new, path.stat().st_mode & 0o7777)  # the original's mode, not the umask's
        os.replace(path, kept)
        os.replace(new, path)
    except OSError as err:
        _remove(new)
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
