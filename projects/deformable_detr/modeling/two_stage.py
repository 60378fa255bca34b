"""Two-stage Deformable DETR: encoder positions as proposals, and queries from proposals."""
from __future__ import annotations

import math

import torch

from .box_ops import upcast

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
    device = memory_padding_mask.device
    proposals = []
    cur = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask_l = memory_padding_mask[:, cur:cur + h * w].view(n, h, w, 1)
        valid_h = torch.sum(~mask_l[:, :, 0, 0], 1)
        valid_w = torch.sum(~mask_l[:, 0, :, 0], 1)
        # arange equals linspace(0, h - 1, h) bit for bit, and keeps a symbolic h symbolic
        # under torch.export (linspace specialises it).
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=device),
            torch.arange(w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        cur += h * w
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
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    # float32 for half-precision proposals: float16 rounds arguments near 2*pi by up to 2e-3.
    proposals = upcast(proposals).sigmoid() * scale
    pos = proposals[:, :, :, None] / dim_t
    return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)
