"""From raw predictions to per-image detections."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from detectron2.structures import Boxes, Instances

from .box_ops import box_cxcywh_to_xyxy

__all__ = ["topk_detections", "topk_query_classes"]


def topk_query_classes(pred_logits: torch.Tensor, k: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best (query, class) pairs of each image by sigmoid score.

    Top-k runs over the flattened Q x C scores, so a query can appear with several classes.

    Args:
        pred_logits: [N, Q, C].
        k: pairs per image (at most Q * C are returned).

    Returns:
        (scores, query indices, classes), each [N, k'] with k' = min(k, Q * C), best first.
    """
    n, num_queries, num_classes = pred_logits.shape
    prob = pred_logits.sigmoid()
    k = min(k, num_queries * num_classes)
    scores, topk_indexes = torch.topk(prob.view(n, -1), k, dim=1)
    queries = torch.div(topk_indexes, num_classes, rounding_mode="floor")
    return scores, queries, topk_indexes % num_classes


def topk_detections(pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                    image_sizes: Sequence[tuple[int, int]], k: int) -> list[Instances]:
    """The ``k`` best (query, class) pairs of each image (:func:`topk_query_classes`) as
    detections; no NMS and no threshold.

    Args:
        pred_logits: [N, Q, C].
        pred_boxes: [N, Q, 4] cxcywh normalised by each image's unpadded size.
        image_sizes: N (height, width) of the unpadded images, in pixels.
        k: detections per image (at most Q * C are returned).

    Returns:
        N Instances of ``image_size`` (h, w) with ``pred_boxes`` (xyxy pixels),
        ``scores`` and ``pred_classes``.
    """
    scores, queries, labels = topk_query_classes(pred_logits, k)
    boxes = box_cxcywh_to_xyxy(pred_boxes)
    boxes = torch.gather(boxes, 1, queries.unsqueeze(-1).repeat(1, 1, 4))
    results = []
    for i, (h, w) in enumerate(image_sizes):
        scale = torch.as_tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        result = Instances((h, w))
        result.pred_boxes = Boxes(boxes[i] * scale)
        result.scores = scores[i]
        result.pred_classes = labels[i]
        results.append(result)
    return results
