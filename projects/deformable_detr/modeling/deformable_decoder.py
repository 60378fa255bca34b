"""The deformable transformer decoder, with optional iterative box refinement.

Shapes: N batch, Q queries, S flattened encoder positions, L levels, C channels.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import Dropout, MSDeformAttn
from .box_ops import refine_boxes

__all__ = ["DeformableTransformerDecoder", "DeformableTransformerDecoderLayer"]


class DeformableTransformerDecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the encoder memory,
    then a ReLU FFN; each followed by a residual and a LayerNorm (post-norm).

    The norms keep the published names: ``norm2`` follows self-attention, ``norm1``
    cross-attention and ``norm3`` the FFN. Self-attention is ``nn.MultiheadAttention``
    (q, k, v packed in ``in_proj_weight``) as in the released checkpoints.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 attn_impl: str = "auto"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, attn_impl=attn_impl)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes,
                level_start_index, src_padding_mask=None, *, spatial_shapes_list=None):
        """
        Args:
            tgt, query_pos: [N, Q, C].
            reference_points: [N, Q, L, 2] points (x, y) or [N, Q, L, 4] boxes (cx, cy, w, h),
                already scaled by the valid ratios.
            src: [N, S, C] encoder memory; src_spatial_shapes int64 [L, 2];
                level_start_index int64 [L]; src_padding_mask bool [N, S].
            spatial_shapes_list: the (H, W) of ``src_spatial_shapes`` as ints, or None.

        Returns:
            [N, Q, C].
        """
        q = k = tgt + query_pos
        # nn.MultiheadAttention is sequence-first here, as in the published model.
        tgt2 = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1))[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2.transpose(0, 1)))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask,
                               spatial_shapes_list=spatial_shapes_list)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerDecoder(nn.Module):
    """A stack of ``num_layers`` decoder layers returning every layer's output; no final norm.

    With ``bbox_embed`` (one box head per layer) given to :meth:`forward`, the reference of
    each layer is the previous layer's refined, detached box (iterative box refinement).
    The heads are passed in rather than registered here, so that they are stored once, in
    the meta-architecture.
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                src_valid_ratios, query_pos, src_padding_mask=None,
                bbox_embed: Sequence[nn.Module] | None = None, *, spatial_shapes_list=None):
        """
        Args:
            tgt, query_pos: [N, Q, C].
            reference_points: [N, Q, 2] (x, y) or [N, Q, 4] (cx, cy, w, h), normalised to the
                valid (unpadded) image, in [0, 1].
            src: [N, S, C]; src_spatial_shapes int64 [L, 2]; src_level_start_index int64 [L];
            src_valid_ratios: [N, L, 2] (w, h); src_padding_mask bool [N, S].
            bbox_embed: ``num_layers`` box heads for iterative refinement, or None.
            spatial_shapes_list: the (H, W) of ``src_spatial_shapes`` as ints, or None (then
                the PyTorch attention path reads the shapes tensor on the host).

        Returns:
            states: [num_layers, N, Q, C] every layer's output.
            references: [num_layers, N, Q, 2 or 4] the reference after each layer (the input
                reference unchanged without refinement; boxes after refinement).
        """
        if bbox_embed is not None and len(bbox_embed) < self.num_layers:
            raise ValueError(f"bbox_embed needs {self.num_layers} heads, got {len(bbox_embed)}")
        # Each level's reference is the query's reference in that level's padded coordinates.
        ratios = src_valid_ratios[:, None]
        box_ratios = torch.cat([ratios, ratios], -1)
        output = tgt
        states, references = [], []
        for lid, layer in enumerate(self.layers):
            scale = box_ratios if reference_points.shape[-1] == 4 else ratios
            output = layer(output, query_pos, reference_points[:, :, None] * scale, src,
                           src_spatial_shapes, src_level_start_index, src_padding_mask,
                           spatial_shapes_list=spatial_shapes_list)
            if bbox_embed is not None:
                reference_points = refine_boxes(bbox_embed[lid](output), reference_points).detach()
            states.append(output)
            references.append(reference_points)
        return torch.stack(states), torch.stack(references)
