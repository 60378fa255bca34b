"""Frozen batch norms folded into the convolutions before them.

detectron2's backbones apply ``FrozenBatchNorm2d`` after each ``Conv2d`` as a separate pass
over the feature map (``F.batch_norm`` at inference, ``x * scale + bias`` in training). A
frozen norm is an affine map per output channel, so it can be applied to the convolution's
weights instead: ``conv(x, w * scale) + (bias - mean * scale)``. That is the same function
(to float32 rounding) with one pass less over every feature map, forward and backward, and no
stored norm input in training. The weights, buffers and state-dict keys stay as they are: the
folded weight is computed from them at every call (one pass over the weights), so
loading a checkpoint, fine-tuning the convolution or exporting the model needs no step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

__all__ = ["Conv2dFoldedFrozenBN", "fold_frozen_batchnorm"]


class Conv2dFoldedFrozenBN(Conv2d):
    """A detectron2 ``Conv2d`` whose ``norm`` is a ``FrozenBatchNorm2d``, computed as one
    convolution with the norm folded into its weight and bias (same parameters, buffers and
    state-dict keys as the ``Conv2d`` it was made from)."""

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's weight [O, I/groups, kh, kw] scaled per output channel, and the
        bias [O] that together compute ``norm(conv(x))``."""
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        bias = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            bias = bias + self.bias * scale
        # Scaling keeps the weight's memory format (channels-last stays channels-last).
        return self.weight * scale.reshape(-1, 1, 1, 1), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded_weight_and_bias()
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            x = self.activation(x)
        return x


def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Make every detectron2 ``Conv2d`` in ``module`` whose norm is a ``FrozenBatchNorm2d`` a
    :class:`Conv2dFoldedFrozenBN` (in place: the same module objects, parameters and buffers);
    other modules are left alone. Returns ``module``.

    Call it after the backbone's norms are frozen (detectron2's ``freeze()`` or
    ``FrozenBatchNorm2d.convert_frozen_batchnorm`` replace norm modules, which a later call
    would need to see).
    """
    for m in module.modules():
        if type(m) is Conv2d and isinstance(m.norm, FrozenBatchNorm2d):
            m.__class__ = Conv2dFoldedFrozenBN
    return module
