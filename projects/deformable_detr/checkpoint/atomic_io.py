"""Writing checkpoint files so that a crash or kill never leaves a half-written one.

Each file is written to ``<file>.tmp`` next to it, flushed to disk, and renamed over the
target with ``os.replace`` (atomic on POSIX and Windows within one file system): readers see
the previous complete file or the new complete file, never a mix. A ``.tmp`` left by a kill
is incomplete and can be deleted; the next save of that name overwrites it.
"""
from __future__ import annotations

import contextlib
import os
from typing import IO, Any, Callable

import torch

__all__ = ["TMP_SUFFIX", "atomic_torch_save", "atomic_write_text"]

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable (a power loss could otherwise undo it); not every
    # platform or file system can open a directory, which only loses that durability.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: str, mode: str, write: Callable[[IO], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = path + TMP_SUFFIX
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file renamed into place."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    _atomic_write(path, "w", lambda f: f.write(text))
