"""Deformable DETR on a ViT-B backbone with ViTDet's SimpleFeaturePyramid, as a LazyConfig.

Needs detectron2 built from its source repository (ViT is not in the 0.6 release) and timm.
Everything but the backbone and the data pipeline is deformable_detr_R_50_50ep.py: the same
transformer, losses, optimizer (the backbone at 0.1x the lr) and 50-epoch schedule. Not a
released model: no published AP. Data as ViTDet trains it: large-scale jitter to a
1024 x 1024 crop, which the pyramid asks the model to pad to (square padding).

    python tools/lazyconfig_train_net.py \\
        --config-file configs/lazy/deformable_detr_ViTDet_B_50ep.py --num-gpus 8

``train.init_checkpoint`` is the MAE-pretrained ViT-B that ViTDet starts from, loaded with
``?matching_heuristics=True`` (its names lack the ``backbone.net.`` prefix).
"""
from functools import partial

from detectron2.config import LazyCall as L
from detectron2.data import transforms as T
from detectron2.modeling import SimpleFeaturePyramid, ViT
from torch import nn

from .deformable_detr_R_50_50ep import dataloader, lr_multiplier, model, optimizer, train

# ViT-B/16, windowed attention with global attention in blocks 2, 5, 8, 11, as ViTDet.
# The pyramid makes strides 8, 16, 32 from the stride-16 output; the adapter adds 64.
model.backbone = L(SimpleFeaturePyramid)(
    net=L(ViT)(
        img_size=1024,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_block_indexes=[0, 1, 3, 4, 6, 7, 9, 10],
        residual_block_indexes=[],
        use_rel_pos=True,
        out_feature="last_feat",
    ),
    in_feature="${.net.out_feature}",
    out_channels=256,
    scale_factors=(2.0, 1.0, 0.5),
    top_block=None,
    norm="LN",
    square_pad=1024,
)
model.adapter.in_features = ["p3", "p4", "p5"]

image_size = 1024
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=image_size,
                     target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]

train.output_dir = "output/deformable_detr_ViTDet_B_50ep"
train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)

__all__ = ["dataloader", "lr_multiplier", "model", "optimizer", "train"]
