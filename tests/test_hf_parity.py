"""Converted Hugging Face weights give the same outputs as ``transformers``' model.

For every variant a small ``DeformableDetrForObjectDetection`` (timm-free ResNet, d_model 64,
4 heads, 2 encoder / 3 decoder layers) gets random weights at a realistic scale (so no output
depends on zero-initialised parameters), is saved in one of the layouts users have, converted
by ``tools/convert_weights.py``'s API and loaded with ``DetectionCheckpointer`` into the model
built from the printed config + overrides. Both models then see the same batch of two
differently sized images (zero padding, the same pixel mask).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from deformable_detr import add_deformable_detr_config  # noqa: E402
from deformable_detr.checkpoint import (  # noqa: E402
    VARIANTS,
    coco_contiguous_ids,
    convert_checkpoint,
    save_detectron2_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(64, 96), (80, 56)]  # (h, w): each image is padded along one side
TOL = 1e-4

# The overrides the converter must print for the small models built here.
EXPECTED_OVERRIDES = {
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM": "64",
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS": "2",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS": "3",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD": "128",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES": "20",
    "MODEL.DEFORMABLE_DETR.NHEADS": "4",
    "MODEL.DEFORMABLE_DETR.ENC_N_POINTS": "2",
    "MODEL.DEFORMABLE_DETR.DEC_N_POINTS": "3",
    "MODEL.RESNETS.STEM_OUT_CHANNELS": "16",
    "MODEL.RESNETS.RES2_OUT_CHANNELS": "64",
    "MODEL.RESNETS.WIDTH_PER_GROUP": "16",
}


def build_hf_model(variant: str, num_labels: int, seed: int = 0):
    """A small transformers model of ``variant`` (a name in ``VARIANTS``) with random weights
    (eval mode)."""
    v = VARIANTS[variant]
    backbone = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[64, 128, 256, 512], depths=[3, 4, 6, 3],
        out_features=["stage2", "stage3", "stage4"] if v.num_feature_levels > 1 else ["stage4"],
    )
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
        d_model=64, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_layers=2, decoder_layers=3, encoder_ffn_dim=128, decoder_ffn_dim=128,
        encoder_n_points=2, decoder_n_points=3, num_queries=20, two_stage_num_proposals=20,
        num_labels=num_labels, num_feature_levels=v.num_feature_levels,
        with_box_refine=v.with_box_refine, two_stage=v.two_stage, dilation=v.dilation,
    )
    torch.manual_seed(seed)
    hf = transformers.DeformableDetrForObjectDetection(config).eval()
    if v.dilation:
        # transformers' own ResNet has no dilation (only its timm backbones do): make res5
        # torchvision's DC5, as the released model: stride 1 everywhere, the first block's
        # 3x3 conv undilated, the others dilated by 2.
        for i, block in enumerate(hf.model.backbone.model.encoder.stages[3].layers):
            conv = block.layer[1].convolution
            if i == 0:
                conv.stride = (1, 1)
                block.shortcut.convolution.stride = (1, 1)
            else:
                conv.dilation, conv.padding = (2, 2), (2, 2)
    if v.with_box_refine and not v.two_stage:
        # transformers >= 5 ties the refinement model's class heads to head 0; the released
        # model has one per layer. Untie them so a head mix-up cannot go unnoticed.
        for head in hf.class_embed[1:]:
            head.weight = nn.Parameter(head.weight.detach().clone())
            head.bias = nn.Parameter(head.bias.detach().clone())
    randomize_(hf, torch.Generator().manual_seed(seed + 1))
    return hf


def randomize_(model: nn.Module, g: torch.Generator) -> None:
    """Random values at a realistic scale for every float tensor: weights ~ N(0, 1/fan_in)
    (x2 for convs), norm scales ~ 1 (the last BN of each residual branch ~ 0.2 so the random
    ResNet stays bounded), biases and BN means ~ N(0, 0.1), variances in [0.75, 1.25],
    embeddings ~ N(0, 1), sampling-offset biases the default grid + N(0, 0.5)."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            leaf, parent = name.split(".")[-1], name.split(".")[-2] if "." in name else ""
            noise = torch.randn(t.shape, generator=g)
            if leaf == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif "sampling_offsets" in name and leaf == "bias":
                t.add_(0.5 * noise)
            elif leaf in ("bias", "running_mean") and t.dim() == 1:
                t.copy_(0.1 * noise)
            elif t.dim() == 1 and ("norm" in parent or parent == "1"):
                # BN, LayerNorm and GroupNorm (input_proj.{i}.1) scales.
                last_bn = name.endswith("layer.2.normalization.weight")
                t.copy_((0.2 + 0.05 * noise) if last_bn else (1 + 0.1 * noise))
            elif t.dim() >= 2 and "embed" not in parent and "embed" not in leaf:
                gain = 2.0 if t.dim() == 4 else 1.0
                t.copy_(noise * (gain / t[0].numel()) ** 0.5)
            else:  # level_embed, query embeddings
                t.copy_(noise)


def save_hf(hf, layout: str, directory: str) -> str:
    """Write ``hf`` as users get it; returns the path to give the converter."""
    hf.save_pretrained(directory)
    if layout == "directory":  # config.json + model.safetensors (transformers 4.x names)
        return directory
    if layout == "safetensors":  # the weights file itself
        return os.path.join(directory, "model.safetensors")
    if layout == "bin":  # pytorch_model.bin with the in-memory (transformers 5.x) names
        os.remove(os.path.join(directory, "model.safetensors"))
        path = os.path.join(directory, "pytorch_model.bin")
        torch.save(hf.state_dict(), path)
        return path
    raise ValueError(layout)


def padded_batch(images, mean, std):
    """HF inputs: normalised images zero-padded bottom/right, pixel_mask 1 on pixels."""
    h, w = max(x.shape[1] for x in images), max(x.shape[2] for x in images)
    pixel_values = torch.zeros(len(images), 3, h, w)
    pixel_mask = torch.zeros(len(images), h, w, dtype=torch.long)
    for i, x in enumerate(images):
        pixel_values[i, :, :x.shape[1], :x.shape[2]] = (x - mean) / std
        pixel_mask[i, :x.shape[1], :x.shape[2]] = 1
    return pixel_values, pixel_mask


def build_ours(result, weights: str):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, result.config_file))
    cfg.merge_from_list(result.config_overrides)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg).eval()
    loaded = torch.load(weights, map_location="cpu", weights_only=True)["model"]
    expected = set(model.state_dict()) - {"pixel_mean", "pixel_std"}
    assert set(loaded) == expected, (set(loaded) ^ expected)
    DetectionCheckpointer(model).load(weights)
    for k, v in model.state_dict().items():
        if k in loaded:
            assert torch.equal(v, loaded[k]), f"{k} was not loaded"
    return cfg, model


CASES = [
    # (variant, saved layout, num_labels)
    ("plain", "directory", 91),
    ("box_refine", "bin", 91),
    ("two_stage", "directory", 91),
    ("single_scale", "safetensors", 7),
    # Needs the torchvision layout of res5 (block 0 undilated): the configs'
    # build_torchvision_resnet_backbone; detectron2's own builder differs by ~0.8 in logits.
    ("single_scale_dc5", "directory", 91),
]


@pytest.mark.parametrize("variant,layout,num_labels", CASES)
def test_hf_parity(variant, layout, num_labels, tmp_path):
    hf = build_hf_model(variant, num_labels)
    path = save_hf(hf, layout, str(tmp_path / "hf"))
    result = convert_checkpoint(path)
    assert result.source_format == "huggingface"
    assert result.variant.name == variant
    overrides = dict(zip(result.config_overrides[::2], result.config_overrides[1::2]))
    expected = dict(EXPECTED_OVERRIDES)
    if num_labels != 91:
        expected["MODEL.DEFORMABLE_DETR.NUM_CLASSES"] = str(num_labels)
    assert overrides == expected
    weights = str(tmp_path / "converted.pth")
    save_detectron2_checkpoint(result, weights)
    cfg, model = build_ours(result, weights)

    g = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=g) * 255 for h, w in SIZES]
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    pixel_values, pixel_mask = padded_batch(images, mean, std)
    with torch.no_grad():
        ref = hf(pixel_values=pixel_values, pixel_mask=pixel_mask)
        ours = model.raw_outputs([{"image": x} for x in images])

    # COCO-id heads: our class i is HF row coco_ids[i]; other heads keep their rows.
    rows = list(coco_contiguous_ids()) if num_labels == 91 else list(range(num_labels))
    assert ours["pred_logits"].shape == (2, 20, len(rows))
    torch.testing.assert_close(ours["pred_logits"], ref.logits[..., rows], rtol=0, atol=TOL)
    torch.testing.assert_close(ours["pred_boxes"], ref.pred_boxes, rtol=0, atol=TOL)
    # The outputs vary across queries and images (the comparison is not vacuous).
    assert ref.pred_boxes.std(1).min() > 0.01 and ref.logits.std() > 0.3
    if variant == "two_stage":
        # The encoder head keeps its proposal-scoring channel 0 in place.
        enc_rows = [0] + rows[1:]
        enc = ours["enc_outputs"]
        torch.testing.assert_close(enc["pred_logits"], ref.enc_outputs_class[..., enc_rows],
                                   rtol=0, atol=TOL)
        # Invalid and padded positions have +inf logits in both, i.e. boxes of 1.
        torch.testing.assert_close(enc["pred_boxes"], ref.enc_outputs_coord_logits.sigmoid(),
                                   rtol=0, atol=TOL)


def test_hf_config_settings_we_do_not_implement_are_refused(tmp_path):
    from deformable_detr.checkpoint import CheckpointError

    hf = build_hf_model("plain", 91)
    directory = str(tmp_path / "hf")
    hf.save_pretrained(directory)
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["backbone_config"]["downsample_in_bottleneck"] = True
    with open(config_path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="downsample_in_bottleneck"):
        convert_checkpoint(directory)
