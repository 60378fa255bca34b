"""detectron2's checkpointer, loading files without running code stored in them."""
from __future__ import annotations

import pickle

from detectron2.checkpoint import DetectionCheckpointer

from ..checkpoint.safe_load import CheckpointError, load_torch_file

__all__ = ["SafeDetectionCheckpointer", "load_pickle_weights"]

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
        if (module, name) not in _PICKLE_GLOBALS:
            raise _ForbiddenGlobal(f"it asks to unpickle {module}.{name}, which is not a numpy "
                                   "array or plain value")
        return super().find_class(module, name)


def load_pickle_weights(path: str) -> dict:
    """Read a ``.pkl`` weights file (e.g. ``ImageNetPretrained/torchvision/R-50.pkl``) that
    holds only dicts, numbers, strings and numpy arrays; anything else is refused before it
    is called.

    Raises:
        CheckpointError: missing, corrupt or unsafe file.
    """
    try:
        with open(path, "rb") as f:
            data = _WeightsUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except _ForbiddenGlobal as e:
        raise CheckpointError(f"refused to load {path}: {e}. Loading never runs code stored in "
                              "a checkpoint") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError) as e:
        raise CheckpointError(f"{path} is not a valid weights pickle (truncated or corrupt: "
                              f"{type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of weights")
    return data


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` whose file loading runs no pickled code.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` (tensors, containers,
    plain values), ``.pkl`` files with an unpickler that rebuilds numpy arrays and plain
    values only. Everything else (model-zoo name matching, resuming, DDP handling) is
    detectron2's. Missing, corrupt or unsafe files raise :class:`CheckpointError`.
    """

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = load_pickle_weights(filename)
            if "model" in data and "__author__" in data:
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            # Caffe2 / Detectron1 model zoo, as detectron2 reads it.
            if "blobs" in data:
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        loaded = load_torch_file(filename)
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{filename} holds a {type(loaded).__name__}, not a dict")
        if "model" not in loaded:
            loaded = {"model": loaded}
        return loaded
