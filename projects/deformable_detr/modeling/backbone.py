"""ResNet with torchvision's dilation convention (for the DC5 variant)."""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import ResNet, build_resnet_backbone

__all__ = ["build_torchvision_resnet_backbone"]


@BACKBONE_REGISTRY.register()
def build_torchvision_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNet (``build_resnet_backbone``, same config keys and parameter names)
    with torchvision's dilation convention.

    With ``MODEL.RESNETS.RES5_DILATION: 2`` (DC5), detectron2 dilates the 3x3 conv of every
    res5 block, while torchvision (``replace_stride_with_dilation``), and so the released
    DC5 model, keeps the first res5 block undilated (dilation 1, padding 1) and dilates the
    others. Without dilation both are the same network.
    """
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.RES5_DILATION != 1 and hasattr(backbone, "res5"):
        conv = backbone.res5[0].conv2
        conv.dilation = (1, 1)
        conv.padding = (1, 1)
    return backbone
