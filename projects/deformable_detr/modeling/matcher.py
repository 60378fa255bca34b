"""Hungarian matching between predictions and ground-truth boxes."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou, upcast

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets, per image, minimising

        cost_bbox * L1(cxcywh) + cost_class * focal_class_cost + cost_giou * (-GIoU)

    with the focal class cost at the target class, p = sigmoid(logit):
    ``alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))``.
    Queries left unmatched are background. Solved with scipy's linear_sum_assignment.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict[str, torch.Tensor], targets: list[dict[str, torch.Tensor]]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            outputs: "pred_logits" [N, Q, C] and "pred_boxes" [N, Q, 4] (normalised cxcywh).
            targets: N dicts with "labels" int64 [T_i] and "boxes" [T_i, 4] (normalised
                cxcywh).

        Returns:
            N pairs (query indices, target indices), int64 CPU tensors of length
            min(Q, T_i): query ``i[k]`` is matched to target ``j[k]``.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layer_outputs: Sequence[dict[str, torch.Tensor]],
                     targets: list[dict[str, torch.Tensor]]
                     ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """:meth:`forward` for the outputs of K layers (each with the same N and Q) against
        the same targets; the costs of all layers are computed together (a few large
        operations instead of K times as many small ones). Returns K lists as
        :meth:`forward`'s."""
        bs, num_queries = layer_outputs[0]["pred_logits"].shape[:2]
        if len(targets) != bs:
            raise ValueError(f"got {len(targets)} targets for a batch of {bs}")
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.empty(0, dtype=torch.int64)
            return [[(empty, empty) for _ in targets] for _ in layer_outputs]

        # Mixed precision: the 1e-8 of the class cost vanishes in float16.
        out_prob = upcast(torch.cat([o["pred_logits"].flatten(0, 1) for o in layer_outputs]))
        out_prob = out_prob.sigmoid()
        out_bbox = upcast(torch.cat([o["pred_boxes"].flatten(0, 1) for o in layer_outputs]))
        tgt_ids = torch.cat([t["labels"] for t in targets])
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox.dtype)

        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost_class = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
        pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
        cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox),
                                         box_cxcywh_to_xyxy(tgt_bbox))

        cost = (self.cost_bbox * cost_bbox + self.cost_class * cost_class
                + self.cost_giou * cost_giou)
        cost = cost.view(len(layer_outputs), bs, num_queries, -1).float().cpu()
        if not torch.isfinite(cost).all():
            raise FloatingPointError(
                "the matching cost has NaN/inf entries: predictions or targets are not finite"
            )
        return [
            [_assignment(image_cost[i]) for i, image_cost in enumerate(layer_cost.split(sizes, -1))]
            for layer_cost in cost
        ]


def _assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum-cost assignment of a [Q, T] cost matrix as int64 (rows, columns)."""
    i, j = linear_sum_assignment(cost)
    return torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)
