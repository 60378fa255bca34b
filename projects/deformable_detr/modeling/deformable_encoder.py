"""The deformable transformer encoder: post-norm layers of multi-scale deformable attention.

Shapes: N batch, S = sum of H_l * W_l over the L levels, C channels.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Dropout, MSDeformAttn
from .grids import pixel_centres

__all__ = [
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "encoder_reference_points",
]


class DeformableTransformerEncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then a ReLU FFN; each followed by a
    residual and a LayerNorm (post-norm)."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 attn_impl: str = "auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_impl=attn_impl)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None, *, spatial_shapes_list=None):
        """
        Args:
            src, pos: [N, S, C].
            reference_points: [N, S, L, 2], (x, y) scaled by the valid ratios.
            spatial_shapes: int64 [L, 2] (H, W); level_start_index: int64 [L].
            padding_mask: bool [N, S], True at padded positions.
            spatial_shapes_list: the (H, W) of ``spatial_shapes`` as ints, or None.

        Returns:
            [N, S, C].
        """
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                              level_start_index, padding_mask,
                              spatial_shapes_list=spatial_shapes_list)
        # Without a graph, in place into the layers' fresh outputs: two fewer [N, S, C] and
        # one fewer [N, S, d_ffn] allocations. With one, autograd would copy in-place results
        # of views (a linear layer's 3-d output is one) in the backward.
        inplace = not torch.is_grad_enabled()
        src2 = self.dropout1(src2)
        src = self.norm1(src2.add_(src) if inplace else src + src2)
        src2 = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=inplace)))
        src2 = self.dropout3(src2)
        return self.norm2(src2.add_(src) if inplace else src + src2)


def encoder_reference_points(spatial_shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Every position's pixel centre as the reference point for every level.

    A position (i, j) of level l is ``((j + 0.5) / valid_W_l, (i + 0.5) / valid_H_l)``, i.e.
    normalised by the level's valid (unpadded) size, then scaled by each level's valid
    ratios into that level's padded coordinates.

    Args:
        spatial_shapes: [L, 2] (H, W) per level: a sequence of int pairs, or a tensor (read
            on the host: a device wait for a CUDA tensor).
        valid_ratios: [N, L, 2] (w, h) fractions of each level that are not padding.

    Returns:
        float32 [N, S, L, 2] (x, y).
    """
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    reference_points = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        ref_y, ref_x = pixel_centres(h, w, valid_ratios.device)
        # valid_ratio * size (not the integer valid count) as the published model.
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        reference_points.append(torch.stack((ref_x, ref_y), -1))
    reference_points = torch.cat(reference_points, 1)
    return reference_points[:, :, None] * valid_ratios[:, None]


class DeformableTransformerEncoder(nn.Module):
    """A stack of ``num_layers`` copies of ``encoder_layer``; no final norm."""

    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos,
                padding_mask=None, *, spatial_shapes_list=None):
        """
        Args:
            src, pos: [N, S, C] flattened levels and their position (+ level) embeddings.
            spatial_shapes: int64 [L, 2]; level_start_index: int64 [L].
            valid_ratios: [N, L, 2] (w, h).
            padding_mask: bool [N, S].
            spatial_shapes_list: the (H, W) of ``spatial_shapes`` as ints; without it the
                shapes tensor is read on the host (a device wait on CUDA).

        Returns:
            memory [N, S, C].
        """
        output = src
        reference_points = encoder_reference_points(
            spatial_shapes if spatial_shapes_list is None else spatial_shapes_list, valid_ratios)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index,
                           padding_mask, spatial_shapes_list=spatial_shapes_list)
        return output
