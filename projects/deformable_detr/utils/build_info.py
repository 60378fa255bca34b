"""What the compiled extension was built with, and what detectron2 offers."""
from __future__ import annotations

import torch

__all__ = ["build_info", "detectron2_has_compiled_ops"]


def detectron2_has_compiled_ops() -> bool:
    """False when detectron2 came from our fallback install (no ``detectron2._C`` ops)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "__deformable_detr_stub__", False)


def build_info() -> dict:
    """Report the extension's build: ``{"extension", "cpu", "cuda", "cuda_archs",
    "torch_version" (built against), "torch_runtime", "cuda_available"}``."""
    try:
        from deformable_detr import _C

        info = dict(_C.build_info())
        info["extension"] = True
    except ImportError as e:
        info = {"extension": False, "error": str(e), "cpu": False, "cuda": False,
                "cuda_archs": "", "torch_version": None}
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["detectron2_compiled_ops"] = detectron2_has_compiled_ops()
    return info
