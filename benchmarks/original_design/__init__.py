"""Baseline for the benchmarks: the original Deformable DETR CUDA design, re-implemented.

``load()`` compiles ``ms_deform_attn_original.cu`` and ``binding.cpp`` on first use with
``torch.utils.cpp_extension.load`` (JIT, for the local GPU's architecture only) and
``ms_deform_attn_original(ext)`` wraps it as a differentiable function with the signature of
``deformable_detr.layers.ms_deform_attn`` (float32 and float64, CUDA only).
"""
from .loader import build_dir, load, ms_deform_attn_original

__all__ = ["build_dir", "load", "ms_deform_attn_original"]
