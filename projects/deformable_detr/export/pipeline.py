"""From a config to a verified exported file: what ``tools/export_model.py`` runs."""
from __future__ import annotations

import os
from typing import Any

from detectron2.config import CfgNode

from ..engine.predictor import check_output_dir, load_model
from .attention import ATTENTION_MODES
from .exporter import (
    DEFAULT_OPSET,
    FORMATS,
    export_model,
    min_image_size,
    usage,
    verify_export,
)
from .onnx_predictor import predictor_metadata

__all__ = ["export_from_config"]


def _check_onnx_packages(runtime: bool) -> None:
    """A RuntimeError naming the install command when a package of the export extra is
    missing (torch's exporter would fail only after tracing)."""
    missing = []
    for name in ("onnx", "onnxscript") + (("onnxruntime",) if runtime else ()):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"--format onnx needs {', '.join(missing)}: pip install "
                           "--no-build-isolation -e '.[export]' (or pip install onnx "
                           "onnxruntime onnxscript)")


def export_from_config(cfg: CfgNode, output_dir: str, *, format: str,
                       attention: str = "portable", opset: int = DEFAULT_OPSET,
                       allow_random_weights: bool = False, verify: bool = True
                       ) -> dict[str, Any]:
    """Build the model of ``cfg``, load ``MODEL.WEIGHTS`` (the project's safe loader),
    export it to ``output_dir`` and check the file (:func:`verify_export`).

    Everything that can be checked without the model (format, attention, output folder) is
    checked first.

    Returns:
        dict with "path", "bytes", "usage" (how to run it), "min_image_size" and, with
        ``verify``, "check" and "max_abs_diff".

    Raises:
        ValueError: bad format, attention or output folder; weights refused
            (``CheckpointError``); FileNotFoundError: missing weights file; RuntimeError:
            no compiled op for a format that keeps it, or weights that cannot be fetched.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if format == "onnx":
        _check_onnx_packages(runtime=verify and attention == "portable")
    check_output_dir(output_dir)
    model = load_model(cfg, allow_random_weights=allow_random_weights)
    lo = min_image_size(model)
    meta = dict(predictor_metadata(cfg), format=format, min_image_size=lo)
    path = export_model(model, output_dir, format=format, attention=attention, opset=opset,
                        metadata=meta)
    result = {"path": path, "bytes": os.path.getsize(path), "min_image_size": lo,
              "usage": usage(path, format=format, attention=attention, min_size=lo)}
    if verify:
        result.update(verify_export(path, model, format=format, attention=attention))
    return result
