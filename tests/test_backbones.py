"""DeformableDETR on detectron2's backbones and a user's own; R-50 parameter counts."""
import re

import pytest
import torch
import torchvision
from conftest import make_inputs, make_tiny_cfg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, build_backbone, build_model
from detectron2.modeling.backbone.regnet import RegNet, ResBottleneckBlock, SimpleStem
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from deformable_detr import add_deformable_detr_config

# ----------------------------------------------------------------------------- backbones


@BACKBONE_REGISTRY.register()
def build_test_tiny_regnet_backbone(cfg, input_shape):
    """A small RegNet (detectron2.modeling.backbone.regnet) with s2..s4 outputs."""
    return RegNet(stem_class=SimpleStem, stem_width=16, block_class=ResBottleneckBlock,
                  depth=8, w_a=12, w_0=16, w_m=2.0, group_width=8,
                  out_features=["s2", "s3", "s4"], norm="BN", freeze_at=0)


class TinyUserBackbone(Backbone):
    """A user's backbone with its own names and a size_divisibility of 16."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        c1 = self.c1(x)
        return {"feat_s4": c1, "feat_s8": self.c2(c1)}

    def output_shape(self):
        return {"feat_s4": ShapeSpec(channels=16, stride=4),
                "feat_s8": ShapeSpec(channels=24, stride=8)}

    @property
    def size_divisibility(self):
        return 16


@BACKBONE_REGISTRY.register()
def build_test_tiny_user_backbone(cfg, input_shape):
    return TinyUserBackbone()


def run_train_and_inference(cfg, sizes=((64, 96), (96, 64))):
    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = make_inputs(sizes=sizes)
    losses = model(inputs)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        results = model(inputs)
    assert [len(r["instances"]) for r in results] == [20, 20]
    return model


@pytest.mark.parametrize("depth", [18, 34])
def test_small_resnets(depth):
    model = run_train_and_inference(make_tiny_cfg(**{"MODEL.RESNETS.DEPTH": depth}))
    assert [p[0].in_channels for p in model.adapter.input_proj] == [128, 256, 512, 512]


def test_resnext():
    cfg = make_tiny_cfg(**{"MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.NUM_GROUPS": 8,
                           "MODEL.RESNETS.WIDTH_PER_GROUP": 4,
                           "MODEL.RESNETS.RES2_OUT_CHANNELS": 256})
    model = run_train_and_inference(cfg, sizes=((64, 64), (48, 64)))
    conv2 = model.backbone.res3[0].conv2
    assert conv2.groups == 8
    assert [p[0].in_channels for p in model.adapter.input_proj] == [512, 1024, 2048, 2048]


def test_regnet():
    cfg = make_tiny_cfg(IN_FEATURES=["s2", "s3", "s4"],
                        **{"MODEL.BACKBONE.NAME": "build_test_tiny_regnet_backbone"})
    model = run_train_and_inference(cfg)
    assert [p[0].in_channels for p in model.adapter.input_proj] == [32, 64, 128, 128]
    assert model.adapter.strides == [8, 16, 32, 64]


def test_fpn_outputs_and_size_divisibility():
    cfg = make_tiny_cfg(IN_FEATURES=["p3", "p4", "p5"], **{
        "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
        "MODEL.FPN.IN_FEATURES": ["res3", "res4", "res5"],
        "MODEL.FPN.OUT_CHANNELS": 64,
    })
    model = run_train_and_inference(cfg, sizes=((50, 70), (40, 60)))
    assert [p[0].in_channels for p in model.adapter.input_proj] == [64, 64, 64, 64]
    images = model.preprocess_image(make_inputs(sizes=((50, 70), (40, 60))))
    # FPN needs sizes divisible by its largest stride: 50 x 70 -> 64 x 96.
    assert model.backbone.size_divisibility == 32
    assert images.tensor.shape[-2:] == (64, 96)
    mask = model.padding_mask(images)
    assert (~mask[0]).sum() == 50 * 70 and (~mask[1]).sum() == 40 * 60


def test_user_registered_backbone():
    cfg = make_tiny_cfg(IN_FEATURES=["feat_s4", "feat_s8"], NUM_FEATURE_LEVELS=3,
                        **{"MODEL.BACKBONE.NAME": "build_test_tiny_user_backbone"})
    model = run_train_and_inference(cfg, sizes=((50, 70), (40, 60)))
    assert isinstance(model.backbone, TinyUserBackbone)
    assert [p[0].in_channels for p in model.adapter.input_proj] == [16, 24, 24]
    images = model.preprocess_image(make_inputs(sizes=((50, 70), (40, 60))))
    assert images.tensor.shape[-2:] == (64, 80)


def test_unknown_feature_lists_what_the_backbone_offers():
    cfg = make_tiny_cfg(IN_FEATURES=["res4", "c5"],
                        **{"MODEL.BACKBONE.NAME": "build_test_tiny_user_backbone"})
    with pytest.raises(ValueError, match=r"offers \['feat_s4', 'feat_s8'\]"):
        build_model(cfg)


# ------------------------------------------------------------- ResNet-50, released configs


def r50_cfg(config_file):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(f"configs/{config_file}")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = 91
    return cfg


@pytest.mark.parametrize("config_file, expected", [
    ("deformable_detr_R_50_50ep.yaml", 39_847_265),
    ("deformable_detr_R_50_box_refine_50ep.yaml", 40_627_260),
    ("deformable_detr_R_50_two_stage_50ep.yaml", 40_959_129),
    ("deformable_detr_R_50_single_scale_50ep.yaml", 33_844_193),
    ("deformable_detr_R_50_single_scale_dc5_50ep.yaml", 33_844_193),
])
def test_r50_trainable_parameters_equal_reference(config_file, expected):
    """Counts of the reference implementation with 91 classes (facts file)."""
    model = build_model(r50_cfg(config_file))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    if "dc5" in config_file:
        assert model.backbone.output_shape()["res5"].stride == 16
        # One tiny forward: res5 is 64 / 16 = 4 x 4 with the dilation.
        model.eval()
        with torch.no_grad():
            feats = model.backbone(torch.zeros(1, 3, 64, 64))
        assert feats["res5"].shape == (1, 2048, 4, 4)


def test_r50_shapes_and_one_forward():
    cfg = r50_cfg("deformable_detr_R_50_50ep.yaml")
    cfg.MODEL.DEFORMABLE_DETR.NUM_QUERIES = 20
    model = build_model(cfg)
    shapes = model.backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res3": (512, 8), "res4": (1024, 16), "res5": (2048, 32)}
    # FREEZE_AT 2: stem and res2 frozen, FrozenBN everywhere (no trainable norms).
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.res2.parameters())
    assert all(p.requires_grad for p in model.backbone.res3.parameters())
    model.eval()
    with torch.no_grad():
        raw = model.raw_outputs(make_inputs(sizes=((64, 64),), with_instances=False))
    assert raw["pred_logits"].shape == (1, 20, 91) and torch.isfinite(raw["pred_boxes"]).all()


# ------------------------------------------------- the released backbone (torchvision R-50)


def torchvision_to_detectron2(state_dict):
    """torchvision ResNet names -> detectron2 ResNet names (written for this test)."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        k = re.sub(r"^conv1\.", "stem.conv1.", k)
        k = re.sub(r"^bn1\.", "stem.conv1.norm.", k)
        k = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", k)
        k = re.sub(r"\.bn(\d)\.", r".conv\1.norm.", k)
        k = k.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")
        out[k] = v
    return out


@pytest.mark.parametrize("dc5", [False, True])
def test_resnet50_equals_torchvision_layout(dc5):
    """With STRIDE_IN_1X1 False and FrozenBN, detectron2's R-50 computes torchvision's R-50
    (the released backbone); for DC5 only with build_torchvision_resnet_backbone."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d,
                                     replace_stride_with_dilation=[False, False, dc5])
    for m in tv.modules():  # non-trivial frozen statistics
        if isinstance(m, FrozenBatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    tv = tv.double().eval()
    cfg = r50_cfg("deformable_detr_R_50_50ep.yaml")
    cfg.MODEL.BACKBONE.NAME = "build_torchvision_resnet_backbone"
    cfg.MODEL.RESNETS.RES5_DILATION = 2 if dc5 else 1
    ours = build_backbone(cfg)
    missing, unexpected = ours.load_state_dict(torchvision_to_detectron2(tv.state_dict()),
                                               strict=False)
    assert not missing and not unexpected
    ours = ours.double().eval()

    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    with torch.no_grad():
        feats = ours(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        expected = {}
        for i, layer in enumerate([tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
            y = layer(y)
            expected[f"res{i + 2}"] = y
    for name in ("res3", "res4", "res5"):
        torch.testing.assert_close(feats[name], expected[name], rtol=1e-9, atol=1e-9)
    if dc5:
        assert feats["res5"].shape[-2:] == (4, 6)
        # detectron2's own builder dilates the first res5 block too: a different network.
        cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
        stock = build_backbone(cfg)
        stock.load_state_dict(ours.state_dict())
        with torch.no_grad():
            res5 = stock.double().eval()(x)["res5"]
        assert (res5 - expected["res5"]).abs().max() > 1e-3
