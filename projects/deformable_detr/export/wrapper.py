"""The exported graph: a padded uint8 batch and its image sizes in, raw predictions out."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import DeformableDETR
from ..modeling.padding import backbone_padding

__all__ = ["ExportableDeformableDETR", "level_padding_masks", "padding_mask_from_sizes"]


def padding_mask_from_sizes(image_sizes: torch.Tensor, height, width) -> torch.Tensor:
    """The padding mask of a batch padded at the bottom and right.

    Args:
        image_sizes: int64 [N, 2], each image's unpadded (height, width).
        height, width: the padded size (ints, or symbolic sizes while exporting).

    Returns:
        bool [N, height, width], True at padded pixels (as ``DeformableDETR.padding_mask``).
    """
    rows = torch.arange(height, device=image_sizes.device)
    cols = torch.arange(width, device=image_sizes.device)
    return ((rows[None, :, None] >= image_sizes[:, 0, None, None])
            | (cols[None, None, :] >= image_sizes[:, 1, None, None]))


def _nearest_source_index(in_size, out_size, device) -> torch.Tensor:
    """int64 [out_size]: the input index ``F.interpolate(mode="nearest")`` reads for each
    output index, with PyTorch's float32 arithmetic (``floor(i * (in / out))``, clamped), so
    that ONNX runtimes pick the same pixels as the eager model (ONNX ``Resize`` computes
    ``i / (out / in)``, which can round to the other side)."""
    scale = (torch.scalar_tensor(in_size, dtype=torch.float32, device=device)
             / torch.scalar_tensor(out_size, dtype=torch.float32, device=device))
    index = (torch.arange(out_size, device=device).to(torch.float32) * scale).floor()
    return index.to(torch.int64).clamp(max=in_size - 1)


def level_padding_masks(image_sizes: torch.Tensor, padded_hw, level_hws) -> list[torch.Tensor]:
    """Each level's padding mask, equal to the eager model's nearest-neighbour resize of the
    image mask (:class:`MultiScaleAdapter`), computed from the image sizes alone.

    Args:
        image_sizes: int64 [N, 2] unpadded (height, width).
        padded_hw: the padded batch's (H, W).
        level_hws: each level's (H_l, W_l).

    Returns:
        L bool tensors [N, H_l, W_l], True at padding.
    """
    height, width = padded_hw
    masks = []
    for h_l, w_l in level_hws:
        rows = _nearest_source_index(height, h_l, image_sizes.device)
        cols = _nearest_source_index(width, w_l, image_sizes.device)
        # Padding is a bottom block and a right block: a level pixel is padding when the
        # image row or column it reads is.
        masks.append((rows[None, :, None] >= image_sizes[:, 0, None, None])
                     | (cols[None, None, :] >= image_sizes[:, 1, None, None]))
    return masks


class ExportableDeformableDETR(nn.Module):
    """:class:`DeformableDETR` with tensor inputs and outputs, for export.

    ``forward(images, image_sizes)`` computes what ``model.raw_outputs`` computes for the
    unpadded images: normalisation, the padding masks and the valid ratios all come from the
    inputs inside the graph.

    Args:
        model: a DeformableDETR (its parameters are shared, not copied).
    """

    def __init__(self, model: DeformableDETR):
        super().__init__()
        if not isinstance(model, DeformableDETR):
            raise TypeError(f"export needs a DeformableDETR model, got {type(model).__name__}")
        self.model = model
        padding = backbone_padding(model.backbone)
        self.size_divisibility = padding["size_divisibility"]
        self.square_size = padding["square_size"]

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor):
        """
        Args:
            images: uint8 [N, C, H, W] in the model's ``input_format``, each image at the
                top left and padded (any value) at the bottom and right.
            image_sizes: int64 [N, 2], each image's unpadded (height, width), at least 1 and
                at most (H, W).

        Returns:
            pred_logits [N, Q, num_classes] and pred_boxes [N, Q, 4] (cx, cy, w, h)
            normalised by each image's unpadded size.
        """
        m = self.model
        x = (images.to(m.pixel_mean.dtype) - m.pixel_mean) / m.pixel_std
        height, width = x.shape[-2:]
        # As the eager model's pad_images: a square when the backbone asks for one (at least
        # the largest side), then multiples of the divisibility.
        if self.square_size > 0:
            height = width = torch.sym_max(self.square_size, torch.sym_max(height, width))
        if self.size_divisibility > 1:
            d = self.size_divisibility
            height, width = (height + d - 1) // d * d, (width + d - 1) // d * d
        if self.square_size > 0 or self.size_divisibility > 1:
            x = F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]))
        mask = padding_mask_from_sizes(image_sizes, height, width)
        # The eager model pads the normalised images with zeros, whatever the input holds.
        x = x.masked_fill(mask[:, None], 0.0)
        if m.backbone_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        srcs = m.adapter.project(m.backbone(x))
        masks = level_padding_masks(image_sizes, (height, width),
                                    [tuple(s.shape[-2:]) for s in srcs])
        out = m.forward_multiscale(srcs, masks)
        return out["pred_logits"], out["pred_boxes"]
