"""Padding an image batch as the backbone asks: size divisibility and square padding."""
from __future__ import annotations

from typing import Dict, List

import torch
from detectron2.structures import ImageList
from torch import nn

from ..compat import image_list_from_tensors

__all__ = ["backbone_padding", "pad_images"]

# detectron2's SimpleFeaturePyramid (the ViT backbones' pyramid) spells the key this way in
# its padding_constraints, so detectron2's own detectors never see its divisibility.
_MISSPELLED_DIVISIBILITY = "size_divisiblity"


def backbone_padding(backbone: nn.Module) -> Dict[str, int]:
    """What a detectron2 backbone asks of its input batch.

    Returns:
        ``{"size_divisibility": d, "square_size": s}``: pad the batch to an ``s`` x ``s``
        square when ``s > 0``, and its height and width to multiples of ``d`` when ``d > 1``.
        ``d`` is ``backbone.size_divisibility`` unless ``backbone.padding_constraints``
        (detectron2 > 0.6) gives one, under either spelling detectron2 uses.
    """
    divisibility = int(getattr(backbone, "size_divisibility", 0) or 0)
    constraints = dict(getattr(backbone, "padding_constraints", None) or {})
    for key in (_MISSPELLED_DIVISIBILITY, "size_divisibility"):
        if constraints.get(key) is not None:
            divisibility = int(constraints[key])
    square = int(constraints.get("square_size", 0) or 0)
    return {"size_divisibility": divisibility, "square_size": square}


def pad_images(images: List[torch.Tensor], backbone: nn.Module,
               pad_value: float = 0.0) -> ImageList:
    """Zero-pad [C, H, W] images into one batch as :func:`backbone_padding` says: to the
    largest image (or the backbone's square), rounded up to its divisibility.

    An image larger than the square gets a larger square (detectron2 would crop it): with
    the square training recipes the data pipeline never makes one.
    """
    padding = backbone_padding(backbone)
    if padding["square_size"] <= 0:
        return ImageList.from_tensors(images, padding["size_divisibility"], pad_value)
    largest = max(max(int(s) for s in image.shape[-2:]) for image in images)
    padding["square_size"] = max(padding["square_size"], largest)
    return image_list_from_tensors(images, padding["size_divisibility"], pad_value,
                                   padding_constraints=padding)
