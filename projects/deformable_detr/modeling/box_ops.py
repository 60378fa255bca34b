"""Box conversions, generalized IoU, the clamped inverse sigmoid and the box refinement step.

Boxes are ``(cx, cy, w, h)`` ("cxcywh") or ``(x0, y0, x1, y1)`` ("xyxy") in the last
dimension; the functions work in any coordinates (normalised or pixels).
"""
from __future__ import annotations

import torch

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "inverse_sigmoid",
    "paired_generalized_box_iou",
    "refine_boxes",
    "upcast",
]


def box_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy."""
    x_c, y_c, w, h = x.unbind(-1)
    return torch.stack([x_c - 0.5 * w, y_c - 0.5 * h, x_c + 0.5 * w, y_c + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 4] xyxy -> [...] areas."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """Pairwise IoU and union of [N, 4] and [M, 4] xyxy boxes: ([N, M], [N, M])."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., 2019) of [N, 4] and [M, 4] xyxy boxes.

    Returns [N, M]. Degenerate boxes (x1 < x0 or y1 < y0) raise a ValueError: they come from
    non-finite predictions and would otherwise surface as NaN losses far from their cause.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def paired_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalized IoU of corresponding [N, 4] xyxy boxes: [N].

    The same arithmetic as the diagonal of :func:`generalized_box_iou`, without the N x M
    matrix.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"paired boxes must have equal shapes, got {list(boxes1.shape)} and "
                         f"{list(boxes2.shape)}")
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2]))
    wh = wh.clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2]))
    wh = wh.clamp(min=0)
    area = wh[:, 0] * wh[:, 1]
    return iou - (area - union) / area


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be [N, 4] xyxy, got {list(boxes.shape)}")
    if not bool((boxes[:, 2:] >= boxes[:, :2]).all()):
        raise ValueError(
            f"{name} has degenerate boxes (x1 < x0 or y1 < y0, or NaN); predictions may have "
            "diverged"
        )


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least ``eps``.

    [...] -> [...], float32 for float16/bfloat16 ``x`` (else ``x``'s dtype): the ratio reaches
    1 / eps = 1e5, beyond float16's range, and a half-precision logit would cost the refined
    boxes their precision.
    """
    x = upcast(x).clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)


def refine_boxes(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A box head's prediction around a reference: ``sigmoid(delta + inverse_sigmoid(ref))``.

    A point reference gives the centre only; the size comes from the head alone.

    Args:
        delta: [..., 4] box head output (cx, cy, w, h) in logit space.
        reference: [..., 4] boxes (cx, cy, w, h) or [..., 2] points (x, y), in [0, 1].

    Returns:
        [..., 4] boxes (cx, cy, w, h) in [0, 1], float32 for half-precision ``reference``.
    """
    reference = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return (delta + reference).sigmoid()
    return torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1).sigmoid()


def upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 (losses and costs under mixed precision); else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
