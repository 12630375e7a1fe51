"""Pickles read without running code: only the globals a known file format needs are built.

CIFAR-10/100's released batches are Python 2 pickles of dicts holding lists, strings and one
NumPy array; a file that names any other global (`os.system`, a class with `__reduce__`) is
refused before anything of it runs. Checkpoints go through torch's weights-only loader, which
allows exactly NumPy's array globals below for older RNG states.

    batch = load_restricted(path, what="cifar10 batch file")   # UserError naming path and global
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from imagenet_resnet.errors import UserError


def numpy_reconstruct() -> Any:
    """NumPy's array-unpickling function: NumPy 1.x names it `numpy.core`, 2.x `numpy._core`."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What protocol 2 writes Python 3 bytes as (`_codecs.encode(text, "latin1")`), and no other codec."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


# The globals of a pickled ndarray (under NumPy 1.x and 2.x names) and of bytes at protocol 2.
ARRAY_GLOBALS = {
    "numpy.core.multiarray._reconstruct": numpy_reconstruct(),
    "numpy._core.multiarray._reconstruct": numpy_reconstruct(),
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "_codecs.encode": _latin1_bytes,
}


class _Restricted(pickle.Unpickler):
    def __init__(self, file, path: Path, what: str) -> None:
        super().__init__(file, encoding="latin1")  # Python 2 strings, as the released files hold them
        self.path, self.what = path, what

    def find_class(self, module: str, name: str) -> Any:
        found = ARRAY_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise UserError(f"{self.path}: refused: unpickling this {self.what} would call {module}.{name}, which "
                            f"the released files never hold; nothing from it was run")
        return found


def load_restricted(path: Path, what: str) -> Any:
    """The pickle at `path`, built from plain values and NumPy arrays only; UserError naming the
    file and the global for anything else. OSError and unpickling errors of a damaged file pass."""
    with open(path, "rb") as f:
        return _Restricted(f, path, what).load()
