"""The deformable transformer: multi-scale encoder, query preparation, decoder."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.init import constant_, normal_, xavier_uniform_

from ..layers import MSDeformAttn
from .box_ops import upcast
from .deformable_decoder import DeformableTransformerDecoder, DeformableTransformerDecoderLayer
from .deformable_encoder import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from .grids import get_valid_ratio
from .two_stage import gen_encoder_output_proposals, proposal_pos_embed

__all__ = ["DeformableTransformer", "check_transformer_arguments"]


def _shapes_tensor(spatial_shapes: Sequence[tuple[int, int]], device: torch.device
                  ) -> torch.Tensor:
    """int64 [L, 2] (H, W) on ``device`` without waiting for it.

    ``torch.as_tensor(..., device="cuda")`` copies from pageable memory, which blocks the host
    until the device has run everything queued before; a copy from pinned memory does not.
    ``torch.tensor`` (not ``as_tensor``) keeps symbolic sizes symbolic under ``torch.export``.
    """
    shapes = torch.tensor(spatial_shapes, dtype=torch.long).view(-1, 2)
    if device.type == "cuda":
        shapes = shapes.pin_memory().to(device, non_blocking=True)
    return shapes.to(device)


class _FlatLevels(NamedTuple):
    """The L levels flattened into S = sum of H_l * W_l positions."""

    src: torch.Tensor  # [N, S, C]
    mask: torch.Tensor  # bool [N, S], True at padding
    pos: torch.Tensor  # [N, S, C] position + level embeddings
    spatial_shapes: torch.Tensor  # int64 [L, 2] (H, W)
    spatial_shapes_list: list[tuple[int, int]]  # the same as ints
    level_start_index: torch.Tensor  # int64 [L]
    valid_ratios: torch.Tensor  # float32 [N, L, 2] (w, h)


def check_transformer_arguments(d_model: int, with_box_refine: bool, two_stage: bool, *,
                                names: Mapping[str, str] | None = None) -> None:
    """Raise a ValueError unless :class:`DeformableTransformer` can be built with these.

    Args:
        names: what the messages call the arguments (e.g. the config keys they come from);
            by default their own names.
    """
    names = {"d_model": "d_model", "with_box_refine": "with_box_refine",
             "two_stage": "two_stage", **(names or {})}
    if d_model % 2 != 0:
        raise ValueError(f"{names['d_model']} must be even (sine embeddings), got {d_model}")
    if two_stage and not with_box_refine:
        raise ValueError(f"{names['two_stage']}=True requires {names['with_box_refine']}=True "
                         "(the published two-stage model refines boxes; its proposals come "
                         "from the refinement heads)")


class DeformableTransformer(nn.Module):
    """Encoder and decoder of Deformable DETR, with the released checkpoints' attribute names
    (``level_embed``, ``encoder.layers.N``, ``decoder.layers.N``, ``reference_points`` for
    one-stage, ``enc_output``/``enc_output_norm``/``pos_trans``/``pos_trans_norm`` for
    two-stage).

    Args:
        d_model: channels C.
        n_heads: attention heads.
        num_encoder_layers, num_decoder_layers: stack depths.
        dim_feedforward: FFN hidden channels.
        dropout: dropout in the FFNs, residuals and the decoder self-attention.
        num_feature_levels: L.
        dec_n_points, enc_n_points: sampling points per head and level.
        with_box_refine: iterative box refinement: each decoder layer's reference is the
            previous layer's predicted box (the box heads are given to :meth:`forward`).
        two_stage: queries from the top ``two_stage_num_proposals`` encoder proposals
            instead of learned embeddings; needs ``with_box_refine`` (as every released
            two-stage model).
        attn_impl: passed to every :class:`MSDeformAttn`.
    """

    def __init__(self, d_model: int = 256, n_heads: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, with_box_refine: bool = False, two_stage: bool = False,
                 two_stage_num_proposals: int = 300, attn_impl: str = "auto"):
        super().__init__()
        check_transformer_arguments(d_model, with_box_refine, two_stage)
        self.d_model = d_model
        self.num_feature_levels = num_feature_levels
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, n_heads, enc_n_points,
            attn_impl=attn_impl,
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, n_heads, dec_n_points,
            attn_impl=attn_impl,
        )
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)

        self.level_embed = nn.Parameter(torch.Tensor(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            xavier_uniform_(self.reference_points.weight.data, gain=1.0)
            constant_(self.reference_points.bias.data, 0.0)
        normal_(self.level_embed)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor],
                pos_embeds: list[torch.Tensor], query_embed: torch.Tensor | None = None,
                class_embed: Sequence[nn.Module] | None = None,
                bbox_embed: Sequence[nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            srcs: L maps [N, C, H_l, W_l]; masks: L bool [N, H_l, W_l] (True = padding);
            pos_embeds: L maps [N, C, H_l, W_l].
            query_embed: [Q, 2C] learned queries (query_pos first, then tgt); one-stage only.
            class_embed, bbox_embed: the prediction heads (not stored here). With box
                refinement the decoder refines its references with ``bbox_embed[0..D-1]``;
                two-stage scores proposals with heads ``D`` (D = num_decoder_layers).

        Returns:
            dict with
            - "decoder_states": [num_decoder_layers, N, Q, C] decoder outputs;
            - "init_reference": [N, Q, 2] points (one-stage) or [N, Q, 4] boxes (two-stage),
              normalised to the valid image;
            - "inter_references": [num_decoder_layers, N, Q, 2 or 4] references after each
              layer;
            - two-stage only: "enc_outputs_class" [N, S, num_classes] and
              "enc_outputs_coord_unact" [N, S, 4] (logit space) for every encoder position.
        """
        if len(srcs) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got "
                             f"{len(srcs)}")
        if self.two_stage and class_embed is None:
            raise ValueError("two-stage needs class_embed")
        if self.with_box_refine and bbox_embed is None:
            raise ValueError("box refinement needs bbox_embed")
        if not self.two_stage and query_embed is None:
            raise ValueError("one-stage needs query_embed")

        levels = self._flatten_levels(srcs, masks, pos_embeds)
        memory = self.encoder(levels.src, levels.spatial_shapes, levels.level_start_index,
                              levels.valid_ratios, levels.pos, levels.mask,
                              spatial_shapes_list=levels.spatial_shapes_list)
        out = {}
        if self.two_stage:
            query_pos, tgt, reference_points, enc_outputs = self._proposal_queries(
                memory, levels, class_embed, bbox_embed)
            out.update(enc_outputs)
        else:
            query_pos, tgt, reference_points = self._learned_queries(query_embed, memory.shape[0])
        decoder_states, inter_references = self.decoder(
            tgt, reference_points, memory, levels.spatial_shapes, levels.level_start_index,
            levels.valid_ratios, query_pos, levels.mask,
            bbox_embed=bbox_embed if self.with_box_refine else None,
            spatial_shapes_list=levels.spatial_shapes_list,
        )
        out.update(decoder_states=decoder_states, init_reference=reference_points,
                   inter_references=inter_references)
        return out

    def _flatten_levels(self, srcs: list[torch.Tensor], masks: list[torch.Tensor],
                        pos_embeds: list[torch.Tensor]) -> _FlatLevels:
        """The levels flattened row-major and concatenated, with their shapes, start indices
        and valid ratios; the level embedding added to the position embedding."""
        src_flatten, mask_flatten, pos_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(tuple(src.shape[-2:]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_embed = pos_embed.flatten(2).transpose(1, 2)
            pos_flatten.append(pos_embed + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        shapes = _shapes_tensor(spatial_shapes, src_flatten.device)
        return _FlatLevels(
            src=src_flatten,
            mask=torch.cat(mask_flatten, 1),
            pos=torch.cat(pos_flatten, 1),
            spatial_shapes=shapes,
            # The shapes go down as ints too: nothing below reads a device tensor on the host.
            spatial_shapes_list=spatial_shapes,
            level_start_index=torch.cat((shapes.new_zeros((1,)), shapes.prod(1).cumsum(0)[:-1])),
            valid_ratios=torch.stack([get_valid_ratio(m) for m in masks], 1),
        )

    def _learned_queries(self, query_embed: torch.Tensor, batch_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One-stage queries: (query_pos [N, Q, C], tgt [N, Q, C], reference points
        [N, Q, 2]) from the learned [Q, 2C] embeddings."""
        query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(batch_size, -1, -1)
        tgt = tgt.unsqueeze(0).expand(batch_size, -1, -1)
        # float32 under autocast, where the linear layer gives half precision: the
        # references (and with them the sampling locations) keep float32 accuracy.
        reference_points = upcast(self.reference_points(query_pos)).sigmoid()
        return query_pos, tgt, reference_points

    def _proposal_queries(self, memory: torch.Tensor, levels: _FlatLevels,
                          class_embed: Sequence[nn.Module], bbox_embed: Sequence[nn.Module]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """Two-stage queries from the top-scoring encoder proposals.

        Returns:
            query_pos, tgt: [N, Q, C]; reference boxes [N, Q, 4] (detached);
            {"enc_outputs_class": [N, S, num_classes], "enc_outputs_coord_unact": [N, S, 4]}.
        """
        proposals, valid = gen_encoder_output_proposals(levels.mask, levels.spatial_shapes_list)
        output_memory = memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        proposal_heads = self.decoder.num_layers
        enc_outputs_class = class_embed[proposal_heads](output_memory)
        enc_outputs_coord_unact = bbox_embed[proposal_heads](output_memory) + proposals
        # The proposal head is trained class-agnostic (all labels 0): rank by channel 0.
        topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
        topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
        topk_coords_unact = torch.gather(
            enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
        ).detach()
        pos_trans_out = self.pos_trans_norm(
            self.pos_trans(proposal_pos_embed(topk_coords_unact, self.d_model // 2))
        )
        query_pos, tgt = torch.split(pos_trans_out, self.d_model, dim=2)
        enc_outputs = {"enc_outputs_class": enc_outputs_class,
                       "enc_outputs_coord_unact": enc_outputs_coord_unact}
        return query_pos, tgt, topk_coords_unact.sigmoid(), enc_outputs
