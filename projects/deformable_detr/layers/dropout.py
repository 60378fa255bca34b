"""Dropout with a fused one-pass CPU kernel for training.

PyTorch's CPU dropout draws a float mask with ``bernoulli_``, scales it and multiplies (three
passes, a 4-byte mask kept for the backward); the compiled ``deformable_detr::dropout_forward``
draws Philox random numbers, writes the output and a 1-byte mask in one pass, and
``deformable_detr::dropout_backward`` is one more. Same distribution and scaling as
``F.dropout`` (kept elements ``x * (1 / (1 - p))``, dropped ones ``x * 0``), but not the same
random numbers. Seeds come from PyTorch's default CPU generator, so ``torch.manual_seed``
makes runs reproducible; the result does not depend on the number of threads.

Elsewhere (CUDA, where PyTorch's dropout is already one kernel; other dtypes; no compiled op)
:class:`Dropout` is ``nn.Dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_op import has_compiled_op

__all__ = ["Dropout", "fused_dropout", "has_fused_dropout"]

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# The extension is imported (or found missing) with ms_deform_attn_op: known at import.
_HAS_OP = has_compiled_op("cpu") and hasattr(torch.ops.deformable_detr, "dropout_forward")


def has_fused_dropout() -> bool:
    """Whether the compiled CPU dropout ops exist (an extension built with them)."""
    return _HAS_OP


def _scale(p: float) -> float:
    return 0.0 if p == 1.0 else 1.0 / (1.0 - p)


class _FusedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        out, mask = torch.ops.deformable_detr.dropout_forward(x, p)
        ctx.save_for_backward(mask)
        ctx.scale = _scale(p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph: a differentiable form for higher-order gradients.
            return grad * mask * ctx.scale, None
        return torch.ops.deformable_detr.dropout_backward(grad, mask, ctx.scale), None


def fused_dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``, fused on the CPU where the compiled op exists.

    Args:
        x: any shape; float32, float64, float16 or bfloat16 for the fused path.

    Returns:
        x's shape (contiguous on the fused path); ``x`` itself when not training or p == 0.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if (training and p > 0 and x.device.type == "cpu" and x.dtype in _DTYPES
            and has_fused_dropout()):
        return _FusedDropout.apply(x, p)
    return F.dropout(x, p, training)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the fused CPU kernel in training (see the module docstring).

    Input: any shape. Output: the same shape; the input object itself in eval mode.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        if inplace:
            raise ValueError("deformable_detr.layers.Dropout does not support inplace=True")
        super().__init__(p, inplace=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fused_dropout(input, self.p, self.training)


def _register_fake() -> None:
    @torch.library.register_fake("deformable_detr::dropout_forward")
    def _(x, p, seed=None):
        x = x.contiguous()
        return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("deformable_detr::dropout_backward")
    def _(grad, mask, scale):
        return torch.empty_like(grad.contiguous())


if has_fused_dropout():
    _register_fake()
