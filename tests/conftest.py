"""Shared test helpers: a tiny Deformable DETR config and synthetic detectron2 inputs.

Use the fixtures ``tiny_cfg`` (a factory: ``tiny_cfg(WITH_BOX_REFINE=True)``) and
``make_inputs``; the plain functions are importable as ``from conftest import ...`` too.
"""
from __future__ import annotations

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import Boxes, Instances

from deformable_detr import add_deformable_detr_config

PIXEL_MEAN = [123.675, 116.280, 103.530]
PIXEL_STD = [58.395, 57.120, 57.375]


def make_tiny_cfg(**overrides) -> CfgNode:
    """A CPU-sized model: ResNet-18 (res3..res5), 32 channels, 4 heads, 1 encoder and 2
    decoder layers, 10 queries, 5 classes, 20 detections per image.

    ``overrides`` are ``MODEL.DEFORMABLE_DETR`` keys, or full dotted keys
    (``**{"MODEL.RESNETS.DEPTH": 34}``).
    """
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DeformableDETR"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.PIXEL_MEAN = list(PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    c = cfg.MODEL.DEFORMABLE_DETR
    c.NUM_CLASSES = 5
    c.HIDDEN_DIM = 32
    c.NHEADS = 4
    c.ENC_LAYERS = 1
    c.DEC_LAYERS = 2
    c.DIM_FEEDFORWARD = 64
    c.NUM_QUERIES = 10
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    flat = []
    for k, v in overrides.items():
        flat += [k if "." in k else f"MODEL.DEFORMABLE_DETR.{k}", v]
    # merge_from_list type-checks values against the defaults, as a user's command line.
    cfg.merge_from_list(flat)
    return cfg


def make_inputs(sizes=((64, 96), (96, 64)), num_classes: int = 5, boxes_per_image: int = 2,
                with_instances: bool = True, seed: int = 0, out_scale: float = 1.0):
    """detectron2 inputs: random uint8 RGB images of ``sizes`` (h, w) with
    ``boxes_per_image`` random boxes each (0 gives empty Instances), and height/width
    ``out_scale`` times the image size."""
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for h, w in sizes:
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
             "height": int(round(h * out_scale)), "width": int(round(w * out_scale))}
        if with_instances:
            xy0 = torch.rand(boxes_per_image, 2, generator=g) * 0.6
            wh = 0.1 + torch.rand(boxes_per_image, 2, generator=g) * 0.3
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.cat([xy0, xy0 + wh], 1) * scale)
            inst.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
            x["instances"] = inst
        inputs.append(x)
    return inputs


@pytest.fixture
def tiny_cfg():
    return make_tiny_cfg


@pytest.fixture(name="make_inputs")
def make_inputs_fixture():
    return make_inputs
