"""The deformable transformer: multi-scale encoder, query preparation, decoder."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.init import constant_, normal_, xavier_uniform_

from ..layers import MSDeformAttn
from .box_ops import upcast
from .deformable_decoder import DeformableTransformerDecoder, DeformableTransformerDecoderLayer
from .deformable_encoder import DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from .two_stage import gen_encoder_output_proposals, proposal_pos_embed

__all__ = ["DeformableTransformer", "get_valid_ratio"]


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


def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fractions of a level that are not padding.

    Args:
        mask: bool [N, H, W], True at padded positions. Padding is at the bottom and right,
            so valid counts are read from the first column and the first row.

    Returns:
        float32 [N, 2] (valid_W / W, valid_H / H).
    """
    _, h, w = mask.shape
    valid_h = torch.sum(~mask[:, :, 0], 1)
    valid_w = torch.sum(~mask[:, 0, :], 1)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class DeformableTransformer(nn.Module):
    """Encoder and decoder of Deformable DETR, with the released checkpoints' attribute names
    (``level_embed``, ``encoder.layers.N``, ``decoder.layers.N``, ``reference_points`` for
    one-stage, ``enc_output``/``enc_output_norm``/``pos_trans``/``pos_trans_norm`` for
    two-stage).

    Args:
        d_model: channels C.
        nhead: attention heads.
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

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024,
                 dropout: float = 0.1, num_feature_levels: int = 4, dec_n_points: int = 4,
                 enc_n_points: int = 4, with_box_refine: bool = False, two_stage: bool = False,
                 two_stage_num_proposals: int = 300, attn_impl: str = "auto"):
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even (sine embeddings), got {d_model}")
        if two_stage and not with_box_refine:
            raise ValueError("two_stage requires with_box_refine (the published two-stage model "
                             "refines boxes; its proposals come from the refinement heads)")
        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals

        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points,
            attn_impl=attn_impl,
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points,
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
            - "hs": [num_decoder_layers, N, Q, C] decoder outputs;
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

        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes = [], [], [], []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes.append(tuple(src.shape[-2:]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_embed = pos_embed.flatten(2).transpose(1, 2)
            lvl_pos_embed_flatten.append(pos_embed + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        spatial_shapes_t = _shapes_tensor(spatial_shapes, src_flatten.device)
        level_start_index = torch.cat((spatial_shapes_t.new_zeros((1,)),
                                       spatial_shapes_t.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)

        # The shapes go down as ints too (spatial_shapes_list): nothing below reads a device
        # tensor on the host.
        memory = self.encoder(src_flatten, spatial_shapes_t, level_start_index, valid_ratios,
                              lvl_pos_embed_flatten, mask_flatten,
                              spatial_shapes_list=spatial_shapes)

        n, _, c = memory.shape
        out = {}
        if self.two_stage:
            proposals, valid = gen_encoder_output_proposals(mask_flatten, spatial_shapes)
            output_memory = memory.masked_fill(~valid, 0.0)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            lid = self.decoder.num_layers
            enc_outputs_class = class_embed[lid](output_memory)
            enc_outputs_coord_unact = bbox_embed[lid](output_memory) + proposals
            # The proposal head is trained class-agnostic (all labels 0): rank by channel 0.
            topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(
                self.pos_trans(proposal_pos_embed(topk_coords_unact, c // 2))
            )
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
            out["enc_outputs_class"] = enc_outputs_class
            out["enc_outputs_coord_unact"] = enc_outputs_coord_unact
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            # float32 under autocast, where the linear layer gives half precision: the
            # references (and with them the sampling locations) keep float32 accuracy.
            reference_points = upcast(self.reference_points(query_pos)).sigmoid()

        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes_t, level_start_index, valid_ratios,
            query_pos, mask_flatten, bbox_embed=bbox_embed if self.with_box_refine else None,
            spatial_shapes_list=spatial_shapes,
        )
        out.update(hs=hs, init_reference=reference_points, inter_references=inter_references)
        return out
