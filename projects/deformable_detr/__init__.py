"""Deformable DETR (Zhu et al., ICLR 2021) as a detectron2 project.

Importing the package registers the meta-architecture ``DeformableDETR`` in detectron2's
``META_ARCH_REGISTRY``.
"""
from . import modeling  # noqa: F401  (registers the meta-architecture)
from .config import add_deformable_detr_config
from .utils.build_info import build_info

__all__ = ["add_deformable_detr_config", "build_info"]
