"""The Deformable DETR training losses."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou, upcast
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "sigmoid_focal_loss"]


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) on [N, Q, C] logits and {0, 1} targets, summed over
    everything and divided by ``num_boxes``.

    Computed as ``mean over Q, summed, / num_boxes * Q`` -- the published model's order of
    operations, which rounds differently from a plain sum.
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / num_boxes * inputs.shape[1]


class SetCriterion(nn.Module):
    """Hungarian-matched set losses: sigmoid focal classification, L1 and GIoU on boxes.

    Returns the *weighted* losses under the published names: ``loss_ce``, ``loss_bbox``,
    ``loss_giou`` for the last decoder layer, the same with suffix ``_{i}`` for the
    auxiliary decoder layers ``i`` in ``outputs["aux_outputs"]``, and ``_enc`` for two-stage
    encoder proposals (``outputs["enc_outputs"]``, matched class-agnostically: every target
    label set to 0). Every loss is normalised by the number of target boxes averaged over
    processes (at least 1).

    Args:
        num_classes: C, the logits' last dimension (no background class).
        matcher: the query-to-target assignment.
        class_weight, bbox_weight, giou_weight: loss weights.
        focal_alpha, focal_gamma: focal loss parameters.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, class_weight: float = 2.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {"loss_ce": class_weight, "loss_bbox": bbox_weight,
                            "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @staticmethod
    def _src_permutation_idx(indices):
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    def loss_labels(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        src_logits = upcast(outputs["pred_logits"])
        idx = self._src_permutation_idx(indices)
        target_classes_o = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[idx] = target_classes_o.to(src_logits.device)
        # One extra "no object" column absorbs unmatched queries, then is dropped.
        onehot = torch.zeros(
            [src_logits.shape[0], src_logits.shape[1], src_logits.shape[2] + 1],
            dtype=src_logits.dtype, layout=src_logits.layout, device=src_logits.device,
        )
        onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
        onehot = onehot[:, :, :-1]
        loss_ce = sigmoid_focal_loss(src_logits, onehot, num_boxes, alpha=self.focal_alpha,
                                     gamma=self.focal_gamma)
        return {"loss_ce": loss_ce}

    def loss_boxes(self, outputs, targets, indices, num_boxes) -> dict[str, torch.Tensor]:
        idx = self._src_permutation_idx(indices)
        src_boxes = upcast(outputs["pred_boxes"][idx])
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)], dim=0)
        target_boxes = target_boxes.to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        loss_giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                   box_cxcywh_to_xyxy(target_boxes))
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": loss_giou.sum() / num_boxes}

    def _losses(self, outputs, targets, indices, num_boxes, suffix: str):
        losses = {}
        losses.update(self.loss_labels(outputs, targets, indices, num_boxes))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return {k + suffix: v * self.weight_dict[k] for k, v in losses.items()}

    def _num_boxes(self, targets, device) -> float:
        num_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor([num_boxes], dtype=torch.float, device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            world_size = dist.get_world_size()
        return torch.clamp(num_boxes / world_size, min=1).item()

    def _check_targets(self, targets):
        for i, t in enumerate(targets):
            labels, boxes = t["labels"], t["boxes"]
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or len(boxes) != len(labels):
                raise ValueError(f"target {i}: boxes must be [T, 4] with T = len(labels) = "
                                 f"{len(labels)}, got {list(boxes.shape)}")
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise ValueError(
                    f"target {i}: class ids must be in [0, {self.num_classes}) (NUM_CLASSES = "
                    f"{self.num_classes}), got min {int(labels.min())} max {int(labels.max())}"
                )

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
        """
        Args:
            outputs: "pred_logits" [N, Q, C], "pred_boxes" [N, Q, 4] (normalised cxcywh),
                optionally "aux_outputs" (list of such dicts) and "enc_outputs" (one dict).
            targets: N dicts, "labels" int64 [T_i] in [0, C) and "boxes" [T_i, 4] normalised
                cxcywh.

        Returns:
            weighted losses (scalars).
        """
        self._check_targets(targets)
        num_boxes = self._num_boxes(targets, outputs["pred_logits"].device)

        indices = self.matcher(outputs, targets)
        losses = self._losses(outputs, targets, indices, num_boxes, "")
        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            indices = self.matcher(aux_outputs, targets)
            losses.update(self._losses(aux_outputs, targets, indices, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            bin_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]}
                           for t in targets]
            indices = self.matcher(outputs["enc_outputs"], bin_targets)
            losses.update(self._losses(outputs["enc_outputs"], bin_targets, indices, num_boxes,
                                       "_enc"))
        return losses

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weights={self.weight_dict}"


