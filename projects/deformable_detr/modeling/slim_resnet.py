"""Narrow ResNets with basic blocks, for training from scratch on small CPU budgets."""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_slim_resnet_backbone", "SLIM_RESNET_BLOCKS"]

#: Basic blocks per stage (res2..res5) for each ``MODEL.RESNETS.DEPTH``.
SLIM_RESNET_BLOCKS = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


@BACKBONE_REGISTRY.register()
def build_slim_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """A ResNet-10/18/34 (basic blocks) of any width: detectron2's ``build_resnet_backbone``
    fixes R18/R34 at 64 res2 channels, too slow to train from scratch within minutes on a
    CPU (the built-in demo).

    Keys: ``MODEL.RESNETS.DEPTH`` (10, 18 or 34), ``STEM_OUT_CHANNELS``,
    ``RES2_OUT_CHANNELS`` (doubled at each later stage), ``NORM`` (e.g. "BN" or "GN" from
    scratch; "FrozenBN" only with pretrained weights), ``OUT_FEATURES``;
    ``MODEL.BACKBONE.FREEZE_AT``. Outputs ``res2``..``res5`` have strides 4, 8, 16, 32.
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in SLIM_RESNET_BLOCKS:
        raise ValueError(f"build_slim_resnet_backbone: MODEL.RESNETS.DEPTH must be one of "
                         f"{sorted(SLIM_RESNET_BLOCKS)}, got {r.DEPTH}")
    if r.RES5_DILATION != 1 or r.NUM_GROUPS != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError("build_slim_resnet_backbone uses plain basic blocks: set "
                         "MODEL.RESNETS.RES5_DILATION 1, NUM_GROUPS 1 and no "
                         "DEFORM_ON_PER_STAGE")
    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    stages = []
    for idx, num_blocks in enumerate(SLIM_RESNET_BLOCKS[r.DEPTH]):
        stride = 1 if idx == 0 else 2
        stages.append(ResNet.make_stage(
            BasicBlock, num_blocks, in_channels=in_channels, out_channels=out_channels,
            stride_per_block=[stride] + [1] * (num_blocks - 1), norm=r.NORM,
        ))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES,
                  freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
