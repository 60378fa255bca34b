"""Two-stage Deformable DETR: encoder positions as proposals, and queries from proposals."""
from __future__ import annotations

import math

import torch

from .box_ops import upcast
from .grids import pixel_centres, valid_sizes
from .position_encoding import sine_embedding

__all__ = ["gen_encoder_output_proposals", "proposal_pos_embed"]


def gen_encoder_output_proposals(memory_padding_mask: torch.Tensor, spatial_shapes
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One proposal box per encoder position.

    The box of position (i, j) on level l is centred on the pixel centre normalised by the
    level's valid size, ``((j + 0.5) / valid_W, (i + 0.5) / valid_H)``, with
    ``w = h = 0.05 * 2**l``.

    Args:
        memory_padding_mask: bool [N, S], True at padded positions.
        spatial_shapes: [L, 2] (H, W) per level: a sequence of int pairs, or a tensor (read on
            the host: a device wait for a CUDA tensor).

    Returns:
        proposals: float32 [N, S, 4] (cx, cy, w, h) in logit space (log(p / (1 - p))); +inf at
            padded positions and where any coordinate is outside (0.01, 0.99).
        valid: bool [N, S, 1], the positions whose proposal is usable.
    """
    if isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    n = memory_padding_mask.shape[0]
    proposals = []
    level_start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask = memory_padding_mask[:, level_start:level_start + h * w].view(n, h, w)
        valid_h, valid_w = valid_sizes(mask)
        centre_y, centre_x = pixel_centres(h, w, memory_padding_mask.device)
        valid_size = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
        centre = torch.stack([centre_x, centre_y], -1) / valid_size
        wh = torch.ones_like(centre) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((centre, wh), -1).view(n, -1, 4))
        level_start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    # The plain logit (no clamping) as the published model; invalid entries become inf below.
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    valid = valid & ~memory_padding_mask.unsqueeze(-1)
    return proposals, valid


def proposal_pos_embed(proposals: torch.Tensor, num_pos_feats: int = 128,
                       temperature: float = 10000) -> torch.Tensor:
    """Sine embedding of proposals given in logit space.

    Args:
        proposals: [N, Q, 4] logits of (cx, cy, w, h).
        num_pos_feats: features per coordinate.

    Returns:
        [N, Q, 4 * num_pos_feats], float32 (float64 for float64 proposals): per coordinate
        (in order), sin/cos interleaved of
        ``sigmoid(p) * 2*pi / temperature ** (2 * (i // 2) / num_pos_feats)``.
    """
    # float32 for half-precision proposals: float16 rounds arguments near 2*pi by up to 2e-3.
    positions = upcast(proposals).sigmoid() * (2 * math.pi)
    return sine_embedding(positions, num_pos_feats, temperature).flatten(2)
