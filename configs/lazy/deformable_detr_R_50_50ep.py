"""Deformable DETR, multi-scale, ResNet-50, COCO, 50 epochs, as a detectron2 LazyConfig.

The released recipe of configs/deformable_detr_R_50_50ep.yaml (COCO val2017 AP 44.5): the
same model, parameter names, augmentation, optimizer (AdamW, three learning rates,
gradient clipping over the whole model) and schedule; tests/test_lazy_config.py checks that
the two agree. Train, evaluate or resume with the safe checkpointer (as train_net.py):

    python tools/lazyconfig_train_net.py --config-file configs/lazy/deformable_detr_R_50_50ep.py \\
        --num-gpus 8 [train.max_iter=1000 dataloader.train.total_batch_size=16 ...]

detectron2's own tools/lazyconfig_train_net.py runs it too (with its plain checkpointer).
Another backbone: set ``model.backbone`` (any detectron2 Backbone) and
``model.adapter.in_features`` (its outputs to use); the adapter reads their channels from
the backbone. See deformable_detr_ViTDet_B_50ep.py (ViT + SimpleFeaturePyramid).
"""
from detectron2.config import LazyCall as L
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.backbone import BasicStem, ResNet
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

from deformable_detr.data import DeformableDetrDatasetMapper, DetrResizeShortestEdge
from deformable_detr.modeling import (
    DeformableTransformer,
    HungarianMatcher,
    SetCriterion,
    build_deformable_detr,
)
from deformable_detr.solver import build_clipped_optimizer, get_param_groups
from deformable_detr.utils.build_info import detectron2_has_compiled_ops

# ------------------------------------------------------------------------------------ model
model = L(build_deformable_detr)(
    # The torchvision R-50 layout (stride on the 3x3 conv), frozen BN, stem and res2 frozen.
    backbone=L(ResNet)(
        stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
        stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="FrozenBN"),
        out_features=["res3", "res4", "res5"],
        freeze_at=2,
    ),
    # Channels come from the backbone; hidden_dim and num_levels from the transformer.
    adapter=dict(in_features=["res3", "res4", "res5"]),
    transformer=L(DeformableTransformer)(
        d_model=256,
        n_heads=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        num_feature_levels=4,
        dec_n_points=4,
        enc_n_points=4,
        with_box_refine=False,
        two_stage=False,
        two_stage_num_proposals="${..num_queries}",
        attn_impl="auto",
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                                    focal_alpha=0.25),
        class_weight=2.0,
        bbox_weight=5.0,
        giou_weight=2.0,
        focal_alpha=0.25,
    ),
    num_classes=80,
    num_queries=300,
    # RGB in [0, 255], normalised like torchvision's ImageNet models.
    pixel_mean=[123.675, 116.280, 103.530],
    pixel_std=[58.395, 57.120, 57.375],
    aux_loss=True,
    detections_per_image=100,
    input_format="RGB",
)

# ------------------------------------------------------------------------------------- data
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    # The reference trains on every image, also those without annotations.
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_train", filter_empty=False),
    mapper=L(DeformableDetrDatasetMapper)(
        is_train=True,
        # Flip; with p=0.5 resize the short side to 400/500/600 and crop 384..600 x 384..600;
        # then the multi-scale resize (short side 480..800, long side at most 1333).
        augmentations=[
            L(T.RandomFlip)(horizontal=True, vertical=False),
            L(T.RandomApply)(
                tfm_or_aug=L(T.AugmentationList)(
                    augs=[
                        L(DetrResizeShortestEdge)(short_edge_length=[400, 500, 600],
                                                  sample_style="choice"),
                        L(T.RandomCrop)(crop_type="absolute_range", crop_size=[384, 600]),
                    ]
                ),
                prob=0.5,
            ),
            L(DetrResizeShortestEdge)(
                short_edge_length=[480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                max_size=1333,
                sample_style="choice",
            ),
        ],
        image_format="RGB",
        invalid_annotations="drop",
    ),
    total_batch_size=32,  # 8 GPUs x 4 images
    # The reference batches random images (no grouping by aspect ratio).
    aspect_ratio_grouping=False,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(DeformableDetrDatasetMapper)(
        is_train=False,
        augmentations=[L(DetrResizeShortestEdge)(short_edge_length=800, max_size=1333,
                                                 sample_style="choice")],
        image_format="${...train.mapper.image_format}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    tasks=["bbox"],
    # The fast evaluation needs detectron2's compiled ops; pycocotools gives the same AP.
    use_fast_impl=L(detectron2_has_compiled_ops)(),
)

# -------------------------------------------------------------------------------- optimizer
# AdamW, weight decay on every parameter; backbone and the sampling-offset / reference-point
# projections at 0.1x the lr; gradients clipped to a global norm of 0.1 over the whole model.
# The training script sets optimizer.params.model.
optimizer = L(build_clipped_optimizer)(
    params=L(get_param_groups)(
        model=None,
        base_lr="${..lr}",
        backbone_multiplier=0.1,
        linear_proj_multiplier=0.1,
        linear_proj_names=["sampling_offsets", "reference_points"],
    ),
    lr=2e-4,
    weight_decay=1e-4,
    clip_norm=0.1,
)

# ------------------------------------------------------------------------------- schedule
# 50 epochs of COCO train2017 at batch 32: 3,696 iterations per epoch, 184,800 in all; the lr
# drops x0.1 after epoch 40 (iteration 147,840). No warmup.
lr_multiplier = L(MultiStepParamScheduler)(
    values=[1.0, 0.1],
    milestones=[147840],
    num_updates="${train.max_iter}",
)

train = dict(
    output_dir="output/deformable_detr_R_50_50ep_lazy",
    # The torchvision ImageNet R-50 in detectron2's format (see configs/Base-DeformableDETR.yaml
    # for how to make it).
    init_checkpoint="detectron2://ImageNetPretrained/torchvision/R-50.pkl",
    max_iter=184800,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=18480, max_to_keep=100),  # every 5 epochs
    eval_period=18480,
    log_period=20,
    device="cuda",
    # Weights of other classes: "by_name" copies the class-head rows of the classes named
    # alike, "reinit" starts every class from the prior (MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT).
    class_head_init="by_name",
    # An exponential moving average of the weights (MODEL_EMA); off in the published recipe.
    model_ema=dict(enabled=False, decay=0.999, warmup_iters=0),
)
