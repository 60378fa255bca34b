"""Prediction heads: class logits and box deltas per decoder layer (and encoder proposals)."""
from __future__ import annotations

import copy
import math

import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "build_prediction_heads", "check_class_count"]


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim])
        )

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def check_class_count(num_classes: int, name: str = "num_classes") -> None:
    """Raise a ValueError unless there is at least one class; ``name`` is what the message
    calls the number (e.g. the config key it comes from)."""
    if num_classes < 1:
        raise ValueError(f"{name} must be at least 1, got {num_classes}")


def build_prediction_heads(hidden_dim: int, num_classes: int, num_decoder_layers: int, *,
                           with_box_refine: bool, two_stage: bool,
                           prior_prob: float = 0.01) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The class heads (Linear -> ``num_classes`` logits, no background) and box heads
    (MLP -> 4 deltas in logit space, added to the inverse-sigmoid reference).

    - plain: one head pair serving every decoder layer (the ModuleLists repeat the same
      modules, so the state dict has one identical entry per layer, as the released
      checkpoints); box bias [2:] = -2.0 (small initial boxes).
    - with_box_refine: independent copies per layer (identically initialised); only layer 0's
      box bias [2:] is -2.0, later layers refine an existing box.
    - two_stage: one more pair (index ``num_decoder_layers``) scores and regresses encoder
      proposals; every box bias [2:] is 0, proposals already have a size.

    Returns:
        (class_embed, bbox_embed), ModuleLists of ``num_decoder_layers (+1 for two-stage)``.
    """
    check_class_count(num_classes)
    class_embed = nn.Linear(hidden_dim, num_classes)
    bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
    # Focal-loss prior: every class starts at probability prior_prob.
    nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.constant_(bbox_embed.layers[-1].weight, 0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0)

    num_pred = num_decoder_layers + 1 if two_stage else num_decoder_layers
    if with_box_refine:
        class_embeds = nn.ModuleList([copy.deepcopy(class_embed) for _ in range(num_pred)])
        bbox_embeds = nn.ModuleList([copy.deepcopy(bbox_embed) for _ in range(num_pred)])
        nn.init.constant_(bbox_embeds[0].layers[-1].bias.data[2:], -2.0)
    else:
        nn.init.constant_(bbox_embed.layers[-1].bias.data[2:], -2.0)
        class_embeds = nn.ModuleList([class_embed for _ in range(num_pred)])
        bbox_embeds = nn.ModuleList([bbox_embed for _ in range(num_pred)])
    if two_stage:
        for box_head in bbox_embeds:
            nn.init.constant_(box_head.layers[-1].bias.data[2:], 0.0)
    return class_embeds, bbox_embeds
