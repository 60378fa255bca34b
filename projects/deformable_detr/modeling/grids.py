"""Pixel-centre grids and valid (unpadded) sizes of feature levels.

Padding is at the bottom and right of every level, so a level's valid height is the number
of unpadded rows in its first column, and its valid width that of columns in its first row.
"""
from __future__ import annotations

import torch

__all__ = ["get_valid_ratio", "pixel_centres", "valid_sizes"]


def valid_sizes(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid height and width of each image of a level.

    Args:
        mask: bool [N, H, W], True at padded positions.

    Returns:
        (valid_h, valid_w), int64 [N] each.
    """
    return torch.sum(~mask[:, :, 0], 1), torch.sum(~mask[:, 0, :], 1)


def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """Fractions of a level that are not padding.

    Args:
        mask: bool [N, H, W], True at padded positions.

    Returns:
        float32 [N, 2] (valid_W / W, valid_H / H).
    """
    _, h, w = mask.shape
    valid_h, valid_w = valid_sizes(mask)
    return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


def pixel_centres(h, w, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixel centres of an ``h`` x ``w`` level in its pixels.

    ``arange + 0.5`` equals ``linspace(0.5, h - 0.5, h)`` bit for bit, and keeps a symbolic
    ``h`` symbolic under ``torch.export`` (linspace specialises it).

    Returns:
        (y, x), float32 [h, w] each: ``y[i, j] = i + 0.5`` and ``x[i, j] = j + 0.5``.
    """
    return torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device) + 0.5,
        torch.arange(w, dtype=torch.float32, device=device) + 0.5,
        indexing="ij",
    )
