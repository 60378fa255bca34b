"""From backbone features to the transformer's multi-scale inputs."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import nn

__all__ = ["MultiScaleAdapter", "check_adapter_arguments"]


def check_adapter_arguments(in_features: Sequence[str], hidden_dim: int, num_levels: int,
                            input_shape: Mapping[str, ShapeSpec] | None = None, *,
                            names: Mapping[str, str] | None = None,
                            backbone_name: str | None = None) -> None:
    """Raise a ValueError unless :class:`MultiScaleAdapter` can be built with these.

    Args:
        input_shape: the backbone's ``output_shape()``; without it ``in_features`` is not
            checked against the backbone's outputs.
        names: what the messages call the arguments (e.g. the config keys they come from);
            by default their own names.
        backbone_name: the backbone, for the messages.
    """
    names = {"in_features": "in_features", "hidden_dim": "hidden_dim",
             "num_levels": "num_levels", **(names or {})}
    in_features = list(in_features)
    if not in_features or (input_shape is not None
                           and any(f not in input_shape for f in in_features)):
        backbone = f" ({backbone_name})" if backbone_name else ""
        offers = f", which offers {sorted(input_shape.keys())}" if input_shape is not None else ""
        raise ValueError(f"{names['in_features']} {in_features} must name outputs of the "
                         f"backbone{backbone}{offers}")
    if num_levels < len(in_features):
        raise ValueError(f"{names['num_levels']} ({num_levels}) must be at least the number of "
                         f"{names['in_features']} ({len(in_features)}: {in_features})")
    if hidden_dim % 32 != 0:
        raise ValueError(f"{names['hidden_dim']} must be a multiple of 32 (GroupNorm(32) in the "
                         f"input projection), got {hidden_dim}")


class MultiScaleAdapter(nn.Module):
    """Projects backbone features to ``num_levels`` maps of ``hidden_dim`` channels.

    Each backbone level in ``in_features`` gets a 1x1 conv and GroupNorm(32). When
    ``num_levels`` exceeds their number, extra levels come from 3x3 stride-2 convs with
    GroupNorm(32): the first on the *raw* last backbone feature (as the published model),
    later ones on the previous projected level. Works with any detectron2 backbone, since
    channels come from its ``output_shape()``.

    ``input_proj`` is a ModuleList of ``Sequential(conv, GroupNorm)``, so parameter names
    read ``input_proj.{i}.0.weight`` as in the released checkpoints.

    Args:
        input_shape: the backbone's ``output_shape()``.
        in_features: names of the backbone outputs to use, in level order.
        hidden_dim: channels of the projected maps (a multiple of 32 for GroupNorm(32)).
        num_levels: number of levels, at least ``len(in_features)``.
    """

    def __init__(self, input_shape: dict[str, ShapeSpec], in_features: Sequence[str],
                 hidden_dim: int, num_levels: int):
        super().__init__()
        in_features = list(in_features)
        check_adapter_arguments(in_features, hidden_dim, num_levels, input_shape)
        self.in_features = in_features
        self.num_levels = num_levels
        self.hidden_dim = hidden_dim

        layers = []
        for name in in_features:
            layers.append(nn.Sequential(
                nn.Conv2d(input_shape[name].channels, hidden_dim, kernel_size=1),
                nn.GroupNorm(32, hidden_dim),
            ))
        in_channels = input_shape[in_features[-1]].channels
        stride = input_shape[in_features[-1]].stride
        self._strides = [input_shape[name].stride for name in in_features]
        for _ in range(num_levels - len(in_features)):
            layers.append(nn.Sequential(
                nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                nn.GroupNorm(32, hidden_dim),
            ))
            in_channels = hidden_dim
            stride = stride * 2 if stride else stride
            self._strides.append(stride)
        self.input_proj = nn.ModuleList(layers)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

    @property
    def strides(self) -> list[int]:
        """Nominal stride of each output level (the backbone's, doubled per extra level)."""
        return list(self._strides)

    def project(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The ``num_levels`` maps [N, hidden_dim, H_l, W_l] of :meth:`forward`, without
        the masks (export makes its masks from the image sizes)."""
        srcs = []
        for name, proj in zip(self.in_features, self.input_proj):
            srcs.append(proj(features[name]))
        for lvl in range(len(self.in_features), self.num_levels):
            if lvl == len(self.in_features):
                srcs.append(self.input_proj[lvl](features[self.in_features[-1]]))
            else:
                srcs.append(self.input_proj[lvl](srcs[-1]))
        return srcs

    def forward(self, features: dict[str, torch.Tensor], mask: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """
        Args:
            features: backbone outputs, ``[N, C_i, H_i, W_i]`` each.
            mask: bool [N, H, W], True at padded pixels of the (padded) image batch.

        Returns:
            srcs: ``num_levels`` tensors [N, hidden_dim, H_l, W_l].
            masks: ``num_levels`` bool tensors [N, H_l, W_l]: the image mask resized to each
                level with nearest interpolation.
        """
        srcs = self.project(features)
        masks = [
            F.interpolate(mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            for src in srcs
        ]
        return srcs, masks
