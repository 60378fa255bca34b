"""Every config merges and builds; the released recipe and variants are what the paper says."""
import glob
import math
import os
import re

import pytest
import torch
from conftest import tiny_opts
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
)
# Variant -> trainable parameters of the reference model with 91 classes (from the released
# checkpoints).
REFERENCE_PARAMETERS = {
    "plain": 39_847_265,
    "box_refine": 40_627_260,
    "two_stage": 40_959_129,
    "single_scale": 33_844_193,
    "single_scale_dc5": 33_844_193,
}


def load(path, opts=()):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, path))
    cfg.merge_from_list(list(opts))
    return cfg


def test_variant_table_lists_the_released_models():
    assert set(VARIANTS) == set(REFERENCE_PARAMETERS)
    assert {v.config_file for v in VARIANTS.values()} <= set(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_and_runs(path):
    """Merge, build at small size (the variant's structure kept) and run one training and one
    inference step on two small images."""
    torch.manual_seed(0)
    cfg = load(path, tiny_opts(demo=path.startswith(os.path.join("configs", "demo"))))
    if cfg.MODEL.RESNETS.RES5_DILATION != 1:  # detectron2 has no dilated res5 for R-18
        cfg.MODEL.RESNETS.DEPTH = 50
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    model = build_model(cfg)
    inputs = []
    for h, w in ((64, 80), (72, 56)):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 40.0, 50.0]]))
        inst.gt_classes = torch.tensor([cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES - 1])
        inputs.append({"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                       "instances": inst, "height": h, "width": w})
    model.train()
    losses = model(inputs)
    assert {"loss_ce", "loss_bbox", "loss_giou"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(inputs)
    d = cfg.MODEL.DEFORMABLE_DETR
    k = min(cfg.TEST.DETECTIONS_PER_IMAGE, d.NUM_QUERIES * d.NUM_CLASSES)
    assert len(out) == 2 and len(out[0]["instances"]) == k


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_variant_parameter_count(variant):
    """Full-size model: trainable parameters equal the reference model's (91 classes)."""
    path = VARIANTS[variant].config_file
    cfg = load(path, ["MODEL.DEVICE", "cpu", "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "91"])
    model = build_model(cfg)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == REFERENCE_PARAMETERS[variant]
    strides = {k: v.stride for k, v in model.backbone.output_shape().items()}
    if "single_scale" in path:
        assert list(cfg.MODEL.DEFORMABLE_DETR.IN_FEATURES) == ["res5"]
        assert strides["res5"] == (16 if "dc5" in path else 32)
        # torchvision's DC5 (replace_stride_with_dilation): block 0's 3x3 conv undilated.
        dilations = [b.conv2.dilation for b in model.backbone.res5]
        assert dilations == ([(1, 1), (2, 2), (2, 2)] if "dc5" in path else [(1, 1)] * 3)
    else:
        assert [strides[f] for f in ("res3", "res4", "res5")] == [8, 16, 32]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_variant_states_its_ap(variant):
    """The config's header and the variant table give the same published AP."""
    with open(os.path.join(ROOT, VARIANTS[variant].config_file)) as f:
        head = "".join(line for line in f if line.startswith("#"))
    m = re.search(r"AP (\d+\.\d)", head)
    assert m is not None and float(m.group(1)) == VARIANTS[variant].coco_ap


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_released_recipe(variant):
    path = VARIANTS[variant].config_file
    cfg = load(path)
    s, i, m = cfg.SOLVER, cfg.INPUT, cfg.MODEL
    assert s.OPTIMIZER == "ADAMW" and s.IMS_PER_BATCH == 32
    assert (s.BASE_LR, s.WEIGHT_DECAY) == (2e-4, 1e-4)
    assert (s.BACKBONE_MULTIPLIER, s.LINEAR_PROJ_MULTIPLIER) == (0.1, 0.1)
    assert list(s.LINEAR_PROJ_NAMES) == ["sampling_offsets", "reference_points"]
    assert s.FULL_MODEL_CLIP_NORM == 0.1 and not s.CLIP_GRADIENTS.ENABLED
    # The reference's epoch: 8 processes x batches of 4 over a 1/8 shard, last batch dropped.
    iters_per_epoch = math.ceil(118_287 / 8) // 4
    assert iters_per_epoch == 3696
    assert s.MAX_ITER == 50 * iters_per_epoch and tuple(s.STEPS) == (40 * iters_per_epoch,)
    assert s.GAMMA == 0.1 and s.WARMUP_ITERS == 0 and s.WARMUP_FACTOR == 1.0
    assert not s.AMP.ENABLED
    assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert not cfg.DATALOADER.ASPECT_RATIO_GROUPING
    assert cfg.DATASETS.TRAIN == ("coco_2017_train",) and cfg.DATASETS.TEST == ("coco_2017_val",)
    assert i.FORMAT == "RGB"
    assert tuple(i.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert i.MIN_SIZE_TRAIN_SAMPLING == "choice" and i.MAX_SIZE_TRAIN == 1333
    assert (i.MIN_SIZE_TEST, i.MAX_SIZE_TEST) == (800, 1333) and i.RANDOM_FLIP == "horizontal"
    assert i.DETR_CROP.ENABLED and list(i.DETR_CROP.RESIZE_SHORT) == [400, 500, 600]
    assert (i.DETR_CROP.CROP_SIZE_MIN, i.DETR_CROP.CROP_SIZE_MAX) == (384, 600)
    assert list(m.PIXEL_MEAN) == [123.675, 116.280, 103.530]
    assert list(m.PIXEL_STD) == [58.395, 57.120, 57.375]
    assert m.WEIGHTS == "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
    assert m.META_ARCHITECTURE == "DeformableDETR"
    r = m.RESNETS
    assert r.DEPTH == 50 and not r.STRIDE_IN_1X1 and r.NORM == "FrozenBN"
    assert m.BACKBONE.FREEZE_AT == 2
    assert m.BACKBONE.NAME == "build_torchvision_resnet_backbone"  # torchvision's DC5 too
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    d = m.DEFORMABLE_DETR
    assert (d.NUM_CLASSES, d.HIDDEN_DIM, d.NHEADS, d.ENC_LAYERS, d.DEC_LAYERS) == (80, 256, 8, 6, 6)
    assert (d.DIM_FEEDFORWARD, d.DROPOUT, d.NUM_QUERIES) == (1024, 0.1, 300)
    assert (d.ENC_N_POINTS, d.DEC_N_POINTS) == (4, 4)
    # The variant table (what select_variant reads) and the file names agree with the config.
    v = VARIANTS[variant]
    assert (d.WITH_BOX_REFINE, d.TWO_STAGE) == (v.with_box_refine, v.two_stage)
    assert d.NUM_FEATURE_LEVELS == v.num_feature_levels and (r.RES5_DILATION == 2) == v.dilation
    name = os.path.basename(path)
    assert d.WITH_BOX_REFINE == ("refine" in name or "two_stage" in name)
    assert d.TWO_STAGE == ("two_stage" in name)
    if "single_scale" in name:
        assert list(r.OUT_FEATURES) == ["res5"] and d.NUM_FEATURE_LEVELS == 1
        assert r.RES5_DILATION == (2 if "dc5" in name else 1)
    else:
        assert list(r.OUT_FEATURES) == ["res3", "res4", "res5"] and d.NUM_FEATURE_LEVELS == 4
        assert list(d.IN_FEATURES) == ["res3", "res4", "res5"] and r.RES5_DILATION == 1
