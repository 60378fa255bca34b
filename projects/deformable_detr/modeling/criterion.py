"""The Deformable DETR training losses."""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou, upcast
from .matcher import HungarianMatcher

__all__ = ["SetCriterion", "check_one_to_many_arguments", "sigmoid_focal_loss"]


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, num_boxes: float,
                       alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) on [N, Q, C] logits and {0, 1} targets, summed over
    everything and divided by ``num_boxes``; for [K, N, Q, C] (K layers' outputs), the [K]
    losses of each layer.

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
    loss = loss.mean(-2)
    return loss.flatten(-2).sum(-1) / num_boxes * inputs.shape[-2]


def check_one_to_many_arguments(layers: int, k: int, num_decoder_layers: int | None = None, *,
                                names: dict[str, str] | None = None) -> None:
    """Raise a ValueError naming the argument (or config key, through ``names``) that the
    one-to-many option cannot take: m >= 0 layers, k >= 1, and (given the decoder's depth)
    fewer layers than the decoder has, so that its last layer stays one-to-one."""
    names = {"layers": "one_to_many_layers", "k": "one_to_many_k",
             "num_decoder_layers": "num_decoder_layers", **(names or {})}
    if int(layers) < 0:
        raise ValueError(f"{names['layers']} must be at least 0, got {layers}")
    if int(k) < 1:
        raise ValueError(f"{names['k']} must be at least 1, got {k}")
    if num_decoder_layers is not None and layers >= num_decoder_layers:
        raise ValueError(f"{names['layers']} = {layers} must be less than "
                         f"{names['num_decoder_layers']} = {num_decoder_layers}: the last "
                         "decoder layer (the model's output) is matched one-to-one")


class SetCriterion(nn.Module):
    """Hungarian-matched set losses: sigmoid focal classification, L1 and GIoU on boxes.

    Returns the *weighted* losses under the published names: ``loss_ce``, ``loss_bbox``,
    ``loss_giou`` for the last decoder layer, the same with suffix ``_{i}`` for the
    auxiliary decoder layers ``i`` in ``outputs["aux_outputs"]``, and ``_enc`` for two-stage
    encoder proposals (``outputs["enc_outputs"]``, matched class-agnostically: every target
    label set to 0). Every loss is normalised by the number of target boxes averaged over
    processes (at least 1).

    One-to-many matching (the hybrid layer scheme of H-DETR, Jia et al., CVPR 2023), a
    training-only option: the first ``one_to_many_layers`` decoder layers (auxiliary outputs
    ``_0`` .. ``_{m-1}``) are matched against every target repeated ``one_to_many_k`` times,
    so that up to k queries learn each object (more positive samples per image: faster
    convergence); their losses are normalised by k times the number of boxes. The later
    layers keep one-to-one matching, so the model's output (the last layer) still needs no
    NMS. Off (0 layers) in the published model.

    Args:
        num_classes: C, the logits' last dimension (no background class).
        matcher: the query-to-target assignment.
        class_weight, bbox_weight, giou_weight: loss weights.
        focal_alpha, focal_gamma: focal loss parameters.
        one_to_many_layers: m, the first decoder layers matched one-to-many (0: none).
        one_to_many_k: k, the targets' repetitions for those layers.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, *, class_weight: float = 2.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, one_to_many_layers: int = 0, one_to_many_k: int = 2):
        super().__init__()
        check_one_to_many_arguments(one_to_many_layers, one_to_many_k)
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = {"loss_ce": class_weight, "loss_bbox": bbox_weight,
                            "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.one_to_many_layers = one_to_many_layers
        self.one_to_many_k = one_to_many_k

    def _layer_losses(self, layer_outputs: list[dict], targets: list[dict],
                      layer_indices: list[list[tuple[torch.Tensor, torch.Tensor]]],
                      num_boxes: float) -> list[dict[str, torch.Tensor]]:
        """The unweighted losses of K layers' outputs (each with the same N and Q) under their
        matchings, computed for all layers together: [{"loss_ce", "loss_bbox", "loss_giou"}]
        per layer."""
        num_layers = len(layer_outputs)
        # Every matched (layer, image, query) and its target's row in the concatenated targets,
        # in layer-major order; assembled on the host (the matchings are CPU tensors), then
        # moved in one copy.
        offsets = np.cumsum([0] + [len(t["labels"]) for t in targets])
        rows = [(np.full(len(src), k), np.full(len(src), i), src.numpy(), tgt.numpy() + offsets[i])
                for k, indices in enumerate(layer_indices) for i, (src, tgt) in enumerate(indices)]
        src_logits = upcast(torch.stack([o["pred_logits"] for o in layer_outputs]))
        device = src_logits.device
        matched = torch.from_numpy(
            np.stack([np.concatenate(column) for column in zip(*rows)]).astype(np.int64)
        ).to(device, non_blocking=True)
        idx, target_rows = tuple(matched[:3]), matched[3]
        labels = torch.cat([t["labels"] for t in targets]).to(device)[target_rows]
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)[target_rows]

        target_classes = torch.full(src_logits.shape[:3], self.num_classes, dtype=torch.int64,
                                    device=device)
        target_classes[idx] = labels
        # One extra "no object" column absorbs unmatched queries, then is dropped.
        onehot = src_logits.new_zeros([*src_logits.shape[:3], src_logits.shape[3] + 1])
        onehot.scatter_(3, target_classes.unsqueeze(-1), 1)
        loss_ce = sigmoid_focal_loss(src_logits, onehot[..., :-1], num_boxes,
                                     alpha=self.focal_alpha, gamma=self.focal_gamma)

        src_boxes = upcast(torch.stack([o["pred_boxes"] for o in layer_outputs])[idx])
        target_boxes = boxes.to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none").sum(-1)
        loss_giou = 1 - paired_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes),
                                                   box_cxcywh_to_xyxy(target_boxes))
        # Per-layer sums of the per-box losses.
        box_losses = src_boxes.new_zeros(num_layers, 2).index_add_(
            0, idx[0], torch.stack([loss_bbox, loss_giou], -1)) / num_boxes
        return [{"loss_ce": loss_ce[k], "loss_bbox": box_losses[k, 0],
                 "loss_giou": box_losses[k, 1]} for k in range(num_layers)]

    def _weighted(self, losses: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
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

        # The last decoder layer (no suffix), then the auxiliary ones ("_0", "_1", ...); the
        # first one_to_many_layers auxiliary ones against the repeated targets.
        aux_outputs = outputs.get("aux_outputs", [])
        m = self.one_to_many_layers
        if m > len(aux_outputs):
            raise ValueError(f"one-to-many matching of {m} decoder layers needs as many "
                             f"auxiliary outputs, got {len(aux_outputs)}")
        one_to_one = ["", *(f"_{i}" for i in range(m, len(aux_outputs)))]
        groups = [([outputs, *aux_outputs[m:]], one_to_one, targets, num_boxes)]
        if m:
            k = self.one_to_many_k
            repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)}
                        for t in targets]
            groups.append((aux_outputs[:m], [f"_{i}" for i in range(m)], repeated,
                           num_boxes * k))
        losses = {}
        for layer_outputs, suffixes, group_targets, group_num_boxes in groups:
            layer_losses = self._layer_losses(
                layer_outputs, group_targets,
                self.matcher.match_layers(layer_outputs, group_targets), group_num_boxes)
            for suffix, layer in zip(suffixes, layer_losses):
                losses.update(self._weighted(layer, suffix))
        if "enc_outputs" in outputs:
            bin_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]}
                           for t in targets]
            enc_outputs = [outputs["enc_outputs"]]
            enc_losses, = self._layer_losses(
                enc_outputs, bin_targets, self.matcher.match_layers(enc_outputs, bin_targets),
                num_boxes)
            losses.update(self._weighted(enc_losses, "_enc"))
        return losses

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weights={self.weight_dict}"


