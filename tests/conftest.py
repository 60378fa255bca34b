"""Shared test helpers: the tiny Deformable DETR model and synthetic detectron2 inputs.

The tiny model is defined once, in :data:`TINY` (its transformer: :data:`TINY_TRANSFORMER`):
:func:`tiny_opts` applies it to a shipped config (``cfg.merge_from_list(tiny_opts())`` or a
command line), :func:`make_tiny_cfg` builds a config from detectron2's defaults with it.
Use the fixtures ``tiny_cfg`` (a factory: ``tiny_cfg(WITH_BOX_REFINE=True)``) and
``make_inputs``; the plain functions are importable as ``from conftest import ...`` too
(pytest puts ``tests/`` on ``sys.path``).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from deformable_detr import add_deformable_detr_config

PIXEL_MEAN = [123.675, 116.280, 103.530]
PIXEL_STD = [58.395, 57.120, 57.375]

#: The tiny model's transformer, by ``MODEL.DEFORMABLE_DETR`` key: 32 channels, 4 heads,
#: 1 encoder and 2 decoder layers, FFN 64, 10 queries.
TINY_TRANSFORMER = {
    "HIDDEN_DIM": 32,
    "NHEADS": 4,
    "ENC_LAYERS": 1,
    "DEC_LAYERS": 2,
    "DIM_FEEDFORWARD": 64,
    "NUM_QUERIES": 10,
}
#: The tiny model, as config overrides: CPU, random weights, ResNet-18 (64-channel res2),
#: TINY_TRANSFORMER.
TINY = {
    "MODEL.DEVICE": "cpu",
    "MODEL.WEIGHTS": "",
    "MODEL.RESNETS.DEPTH": 18,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 64,
    **{f"MODEL.DEFORMABLE_DETR.{k}": v for k, v in TINY_TRANSFORMER.items()},
}


#: The backbone of the tiny model on ``configs/demo/`` (its slim ResNet-10, narrowed), in place
#: of TINY's ResNet-18.
TINY_DEMO_BACKBONE = {
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 16,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 16,
}


def tiny_opts(*extra, demo: bool = False) -> list[str]:
    """:data:`TINY` as ``[KEY, VALUE, ...]`` strings, followed by ``extra``: shrinks a
    shipped config (the structure of its variant kept) through ``merge_from_list`` or a
    command line. ``demo``: for ``configs/demo/``, with :data:`TINY_DEMO_BACKBONE`."""
    opts = dict(TINY)
    if demo:
        del opts["MODEL.RESNETS.DEPTH"]
        opts.update(TINY_DEMO_BACKBONE)
    return [str(x) for kv in opts.items() for x in kv] + list(extra)


#: The released variants that the tiny model can take (``make_tiny_cfg`` overrides; named as in
#: ``deformable_detr.checkpoint.VARIANTS``). DC5 is left out: detectron2's ResNet-18 has no
#: dilated res5.
TINY_VARIANTS = {
    "plain": {},
    "box_refine": {"WITH_BOX_REFINE": True},
    "two_stage": {"WITH_BOX_REFINE": True, "TWO_STAGE": True},
    "single_scale": {"IN_FEATURES": ["res5"], "NUM_FEATURE_LEVELS": 1,
                     "MODEL.RESNETS.OUT_FEATURES": ["res5"]},
}


def make_tiny_cfg(**overrides) -> CfgNode:
    """The :data:`TINY` model on detectron2's defaults: detectron2's ResNet (res3..res5,
    FrozenBN), 5 classes, 20 detections per image.

    ``overrides`` are ``MODEL.DEFORMABLE_DETR`` keys, or full dotted keys
    (``**{"MODEL.RESNETS.DEPTH": 34}``).
    """
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "DeformableDETR"
    cfg.MODEL.PIXEL_MEAN = list(PIXEL_MEAN)
    cfg.MODEL.PIXEL_STD = list(PIXEL_STD)
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = 5
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.merge_from_list(tiny_opts())
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


def save_random_model(cfg: CfgNode, directory, init: Optional[Callable] = None) -> str:
    """A model of ``cfg`` with random weights (seed 0), then ``init(model)`` (under no_grad),
    saved by detectron2's DetectionCheckpointer as ``directory/model.pth``; returns its path."""
    torch.manual_seed(0)
    model = build_model(cfg)
    if init is not None:
        with torch.no_grad():
            init(model)
    DetectionCheckpointer(model, save_dir=str(directory)).save("model")
    return os.path.join(str(directory), "model.pth")


def run_logged(main: Callable[[Sequence[str]], int], args: Sequence[str], caplog) -> int:
    """``main(args)`` (a tool's) with the ``deformable_detr`` records in ``caplog``, cleared
    first: the tools log through detectron2's setup_logger, which stops propagation to the
    root logger."""
    caplog.clear()
    log = logging.getLogger("deformable_detr")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="deformable_detr"):
            return main(args)
    finally:
        log.removeHandler(caplog.handler)
