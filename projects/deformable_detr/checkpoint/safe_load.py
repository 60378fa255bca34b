"""Loading checkpoint files without running pickled code: the one loader every command
and API of the project reads weights with.

``torch.load(weights_only=True)`` rebuilds tensors, containers and plain Python values
only; it refuses any other global a pickle names (``os.system``, a class with a custom
``__reduce__``, ...) before calling it. ``weights_only`` is always passed explicitly:
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` only changes calls that leave it unset, so that
variable cannot turn the check off (``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` only turns it on).
Released Deformable DETR files also hold an ``argparse.Namespace`` of training arguments,
which is allow-listed here and nothing else. detectron2 model-zoo ``.pkl`` files (dicts of
numpy arrays) are read by an unpickler that rebuilds numpy arrays and plain values only.
Safetensors files hold no code by design.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "file_kind",
    "load_pickle_weights",
    "load_safetensors_file",
    "load_torch_file",
]

#: Globals a released checkpoint may name besides what ``weights_only`` always allows.
SAFE_GLOBALS = (argparse.Namespace,)


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, unsafe or not what was expected."""


def file_kind(path: str) -> str:
    """Guess a file's container from its first bytes.

    Returns:
        "zip" (torch >= 1.6 format), "pickle" (legacy torch format or a bare pickle),
        "safetensors", or "unknown".
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        # safetensors: an 8-byte little-endian header length, then a JSON object.
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < n < os.path.getsize(path):
            return "safetensors"
    return "unknown"


#: Appended to messages about damaged files.
_DAMAGED_FIX = "download or copy it again, or use an earlier checkpoint"


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}; check the path")
    if os.path.isdir(path):
        raise CheckpointError(f"expected a checkpoint file, got a directory: {path}; name the "
                              "file in it")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty (0 bytes): {path}; the download or "
                              f"copy was interrupted: {_DAMAGED_FIX}")


def _torch_reason(msg: str) -> str:
    """The cause in a ``torch.load`` error, without torch's advice to load the file with
    ``weights_only=False`` (which would run code stored in it)."""
    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg, re.S)
    if m is not None:
        msg = m.group(1)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "weights_only" not in ln and "torch.load" not in ln]
    return lines[0] if lines else "unreadable pickle"


@contextlib.contextmanager
def _allow(globals_: Iterable[type]):
    globals_ = list(globals_)
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        with torch.serialization.safe_globals(globals_):
            yield
    else:
        if hasattr(torch.serialization, "add_safe_globals"):  # torch 2.4
            torch.serialization.add_safe_globals(globals_)
        yield


def load_torch_file(path: str, extra_safe_globals: Iterable[type] = ()) -> Any:
    """Load a ``torch.save`` file (zip or legacy format) with ``weights_only=True``.

    Only tensors, containers, plain values and ``argparse.Namespace`` (plus
    ``extra_safe_globals``) are rebuilt; anything else is refused without being run.

    Raises:
        CheckpointError: the file is missing, empty, truncated, corrupt, not a torch file,
            or names a global that is not allow-listed.
    """
    _check_readable(path)
    kind = file_kind(path)
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors file, not a torch.save file")
    if kind == "unknown":
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle); "
            "the file is corrupt or of another kind: give a file written by torch.save "
            f"(.pth) or a detectron2 model-zoo .pkl, or {_DAMAGED_FIX}"
        )
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(
                f"{path} is a truncated or corrupt zip checkpoint ({e}): {_DAMAGED_FIX}"
            ) from None
        if bad is not None:
            raise CheckpointError(f"{path} is corrupt: member {bad!r} fails its CRC check: "
                                  f"{_DAMAGED_FIX}")
    try:
        with _allow(list(SAFE_GLOBALS) + list(extra_safe_globals)):
            # Explicit, so that TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD does not apply.
            return torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises UnpicklingError, RuntimeError, EOFError, KeyError, ... on bad input.
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        m = re.search(r"(?:GLOBAL|global) ([\w.]+)", msg)
        if m is not None:
            raise CheckpointError(
                f"refused to load {path}: it asks to unpickle {m.group(1)!r}, which is not "
                "a tensor or plain value. Loading never runs code stored in a checkpoint; "
                "if you trust the file, re-save its state dict with plain tensors"
            ) from None
        if isinstance(e, EOFError) or "EOF" in msg or "truncated" in msg.lower():
            raise CheckpointError(f"{path} is truncated (unexpected end of file): "
                                  f"{_DAMAGED_FIX}") from None
        raise CheckpointError(
            f"{path} could not be read as a PyTorch checkpoint ({type(e).__name__}: "
            f"{_torch_reason(msg)}); it is corrupt or not a torch.save file: {_DAMAGED_FIX}"
        ) from None


def load_safetensors_file(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` file onto the CPU.

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file, or no safetensors.
    """
    _check_readable(path)
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"reading {path} needs the 'safetensors' package (pip install safetensors)"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 (SafetensorError and others on bad input)
        raise CheckpointError(
            f"{path} is a truncated or corrupt safetensors file ({type(e).__name__}: {e}): "
            f"{_DAMAGED_FIX}"
        ) from None


# What a detectron2/Detectron model-zoo .pkl (a dict of numpy arrays) may name.
_PICKLE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Called for every global before it is used: refusing here means nothing ran.
        if (module, name) not in _PICKLE_GLOBALS:
            raise _ForbiddenGlobal(f"it asks to unpickle {module}.{name}, which is not a numpy "
                                   "array or plain value")
        return super().find_class(module, name)


def load_pickle_weights(path: str) -> dict:
    """Read a ``.pkl`` weights file (e.g. ``ImageNetPretrained/torchvision/R-50.pkl``) that
    holds only dicts, numbers, strings and numpy arrays; anything else is refused before it
    is called. Python's own unpickler does the reading, so no torch setting applies.

    Raises:
        CheckpointError: missing, empty, corrupt or unsafe file.
    """
    _check_readable(path)
    try:
        with open(path, "rb") as f:
            data = _WeightsUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as e:
        raise CheckpointError(f"refused to load {path}: {e}. Loading never runs code stored in "
                              "a checkpoint; if you trust the file, re-save its weights as "
                              "numpy arrays or a torch state dict") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as e:
        raise CheckpointError(f"{path} is not a valid weights pickle (truncated or corrupt: "
                              f"{type(e).__name__}: {e}): {_DAMAGED_FIX}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of weights; "
                              "give a detectron2 model-zoo .pkl (a dict of numpy arrays)")
    return data
