"""Files written whole or not at all: every file this project writes goes through here.

A file is written under a temporary name beside it, fsynced, and renamed over the old one, so
a crash or a full disk leaves the previous file (or none), never half of a new one; a link at
the path is replaced, never written through.

    write_atomic(out_dir / "config.yaml", text)
    write_atomic(out_dir / "last.pt", data, previous=".prev")      # the old file kept as last.pt.prev
    link_atomic(out_dir / "best.pt", out_dir / "last.pt", previous=".prev")  # the same file, no second write
    with replacing(out) as tmp:                                      # a writer that needs a path
        torch.onnx.export(net, example, tmp)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


def write_synced(path: Path, data: bytes | memoryview | str, mode: int = 0o666) -> None:
    """Create `path` (it must not exist) holding `data`, fsynced; `mode` is filtered by the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where the filesystem cannot sync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_quietly(path: Path) -> None:
    """Clean-up after a failed write, which must not raise over the error being reported (a
    read-only filesystem refuses even to unlink a file that is not there)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: Path, *, tmp: Path | None = None, previous: str = "", mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; on success it is renamed
    over `path` (the old file kept as `path` + `previous` if given, `mode` set if given). On any
    error the temporary file is removed and the error raised: `path` is as it was."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    remove_quietly(tmp)  # a leftover of a write that was killed
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        if previous and os.path.lexists(path):
            os.replace(path, path.with_name(path.name + previous))
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException:
        remove_quietly(tmp)
        raise


def write_atomic(path: Path, data: bytes | memoryview | str, *, tmp: Path | None = None, previous: str = "",
                 mode: int | None = None) -> None:
    """`path` holds `data` afterwards, or (on OSError) what it held before."""
    with replacing(path, tmp=tmp, previous=previous, mode=mode) as partial:
        write_synced(partial, data)


def link_atomic(path: Path, source: Path, *, previous: str = "") -> None:
    """`path` becomes a hard link to the complete file `source` (a copy, fsynced, where the
    filesystem has no hard links: FAT, some network mounts), replacing it as write_atomic does.
    `source` must only ever be replaced by rename, never written in place."""
    with replacing(path, previous=previous) as partial:
        try:
            os.link(source, partial)
        except OSError:  # no hard links here: nothing was created, copy instead
            shutil.copyfile(source, partial)
            with open(partial, "rb+") as f:
                os.fsync(f.fileno())
