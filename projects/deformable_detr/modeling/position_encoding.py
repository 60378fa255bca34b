"""Sine position encoding computed from a padding mask."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """The normalised 2-D sine encoding of Deformable DETR.

    Positions are counted over the not-padded pixels only (a cumulative sum of the mask), so
    a pixel's encoding does not depend on how much padding follows it. Unlike DETR, the
    normalisation subtracts one half: ``y = (y - 0.5) / (y_last + eps) * scale``, which puts
    pixel centres (not their bottom-right corners) on the [0, scale] range.

    Args:
        num_pos_feats: features per axis; the result has ``2 * num_pos_feats`` channels,
            the y block first.
        temperature: base of the frequencies ``temperature ** (2 * (i // 2) / num_pos_feats)``.
        normalize: divide by the valid extent and multiply by ``scale``.
        scale: defaults to 2*pi.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000,
                 normalize: bool = True, scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            mask: bool [N, H, W], True at padded pixels.

        Returns:
            float32 [N, 2 * num_pos_feats, H, W].
        """
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [N, H, W] tensor, got {mask.dtype} "
                             f"{list(mask.shape)}")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        # sin of even, cos of odd features, interleaved.
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4)
        pos = torch.cat((pos_y.flatten(3), pos_x.flatten(3)), dim=3)
        return pos.permute(0, 3, 1, 2)
