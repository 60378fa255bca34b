"""Sine position encoding computed from a padding mask."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "sine_embedding"]


def sine_embedding(x: torch.Tensor, num_pos_feats: int, temperature: float) -> torch.Tensor:
    """Sine embedding of every entry of ``x``: feature ``i`` is the sine (even ``i``) or
    cosine (odd ``i``) of ``x / temperature ** (2 * (i // 2) / num_pos_feats)``.

    Args:
        x: [...] float32 (or float64) positions.

    Returns:
        [..., num_pos_feats] in ``x``'s dtype.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = x[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """The normalised 2-D sine encoding of Deformable DETR.

    Positions are counted over the not-padded pixels only (a cumulative sum of the mask), so
    a pixel's encoding does not depend on how much padding follows it. Unlike DETR, the
    normalisation subtracts one half: ``y = (y - 0.5) / (y_last + eps) * scale``, which puts
    pixel centres (not their bottom-right corners) on the [0, scale] range.

    Args:
        num_pos_feats: features per axis; the result has ``2 * num_pos_feats`` channels,
            the y block first.
        temperature: base of the frequencies (see :func:`sine_embedding`).
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

        pos_y = sine_embedding(y_embed, self.num_pos_feats, self.temperature)
        pos_x = sine_embedding(x_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
