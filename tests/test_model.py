"""The DeformableDETR meta-architecture and its parts, on tiny configs (CPU)."""
import importlib
import math

import numpy as np
import pytest
import torch
from conftest import PIXEL_MEAN, PIXEL_STD, TINY_VARIANTS, make_inputs, make_tiny_cfg
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Instances

from deformable_detr import add_deformable_detr_config
from deformable_detr.layers import has_compiled_op
from deformable_detr.modeling import (
    DeformableDETR,
    DeformableTransformer,
    HungarianMatcher,
    MultiScaleAdapter,
    PositionEmbeddingSine,
    SetCriterion,
    encoder_reference_points,
    gen_encoder_output_proposals,
    get_valid_ratio,
)

# The submodule, not the op function of the same name that deformable_detr.layers exports.
ms_deform_attn_module = importlib.import_module("deformable_detr.layers.ms_deform_attn")

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def build(**overrides):
    torch.manual_seed(0)
    return build_model(make_tiny_cfg(**overrides))


def perturb(model, std=0.1, seed=0):
    """Adds noise to every trainable parameter: the zero-initialised sampling offsets,
    attention weights and box-head outputs would otherwise make the outputs independent of
    the image (and put every sampling point exactly on a pixel centre)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------- position encoding, ratios


def test_position_encoding_against_formula():
    """Valid pixels: y = (i + 0.5) / valid_h * 2pi, x = (j + 0.5) / valid_w * 2pi (the
    "- 0.5" of Deformable DETR), sin/cos interleaved, y block first."""
    f = 8
    mask = torch.ones(2, 6, 7, dtype=torch.bool)
    mask[0, :4, :5] = False
    mask[1] = False
    pos = PositionEmbeddingSine(f, normalize=True)(mask)
    assert pos.shape == (2, 2 * f, 6, 7) and pos.dtype == torch.float32
    for b, (vh, vw) in enumerate([(4, 5), (6, 7)]):
        for i in range(vh):
            for j in range(vw):
                y = (i + 0.5) / (vh + 1e-6) * 2 * math.pi
                x = (j + 0.5) / (vw + 1e-6) * 2 * math.pi
                expected = []
                for v in (y, x):
                    for k in range(f):
                        t = v / 10000 ** (2 * (k // 2) / f)
                        expected.append(math.sin(t) if k % 2 == 0 else math.cos(t))
                np.testing.assert_allclose(pos[b, :, i, j].numpy(), expected, atol=1e-5)


def test_valid_ratio_with_padding():
    mask = torch.ones(2, 10, 16, dtype=torch.bool)
    mask[0, :7, :12] = False
    mask[1] = False
    np.testing.assert_allclose(get_valid_ratio(mask).numpy(), [[12 / 16, 7 / 10], [1, 1]])


def test_encoder_reference_points_with_padding():
    shapes = [(10, 16), (5, 8)]
    valid = [(7, 12), (4, 6)]  # (valid_h, valid_w) per level
    masks = []
    for (h, w), (vh, vw) in zip(shapes, valid):
        m = torch.ones(1, h, w, dtype=torch.bool)
        m[0, :vh, :vw] = False
        masks.append(m)
    ratios = torch.stack([get_valid_ratio(m) for m in masks], 1)
    ref = encoder_reference_points(torch.tensor(shapes), ratios)
    assert ref.shape == (1, 160 + 40, 2, 2)
    expected = []
    for (h, w), (vh, vw) in zip(shapes, valid):
        for i in range(h):
            for j in range(w):
                # normalised by the own level's valid size, then into every level's padded
                # coordinates: x * valid_w_k / W_k.
                x, y = (j + 0.5) / vw, (i + 0.5) / vh
                expected.append([[x * vw_k / w_k, y * vh_k / h_k]
                                 for (h_k, w_k), (vh_k, vw_k) in zip(shapes, valid)])
    np.testing.assert_allclose(ref[0].numpy(), np.array(expected), rtol=1e-6)


def test_two_stage_proposals_by_hand():
    # Level 0: 1 x 60, all valid: x centres (j + 0.5) / 60 fall outside (0.01, 0.99) at the
    # two ends. Level 1: 3 x 4 with 2 x 3 valid: padded positions are inf.
    mask0 = torch.zeros(1, 1, 60, dtype=torch.bool)
    mask1 = torch.ones(1, 3, 4, dtype=torch.bool)
    mask1[0, :2, :3] = False
    mask = torch.cat([mask0.flatten(1), mask1.flatten(1)], 1)
    proposals, valid = gen_encoder_output_proposals(mask, [(1, 60), (3, 4)])
    assert proposals.shape == (1, 72, 4) and valid.shape == (1, 72, 1)

    def logit(p):
        return math.log(p / (1 - p))

    assert torch.isinf(proposals[0, 0]).all() and torch.isinf(proposals[0, 59]).all()
    np.testing.assert_allclose(proposals[0, 1].numpy(),
                               [logit(1.5 / 60), logit(0.5), logit(0.05), logit(0.05)],
                               rtol=1e-5)
    # level 1, (i, j) = (1, 2) -> flat 60 + 1 * 4 + 2; w = h = 0.05 * 2
    np.testing.assert_allclose(proposals[0, 66].numpy(),
                               [logit(2.5 / 3), logit(1.5 / 2), logit(0.1), logit(0.1)],
                               rtol=1e-5)
    padded = mask[0].nonzero().flatten()
    assert torch.isinf(proposals[0, padded]).all() and not valid[0, padded].any()
    assert int(valid.sum()) == 58 + 6


def test_adapter_levels_masks_and_names():
    cfg = make_tiny_cfg()
    backbone = build_backbone(cfg)
    adapter = MultiScaleAdapter(backbone.output_shape(), ["res3", "res4", "res5"], 32, 5)
    assert adapter.strides == [8, 16, 32, 64, 128]
    names = {k for k, _ in adapter.named_parameters()}
    assert "input_proj.3.0.weight" in names and "input_proj.4.1.bias" in names
    # First extra level on the raw res5 (512 channels), the next on the projected one.
    assert adapter.input_proj[3][0].in_channels == 512
    assert adapter.input_proj[4][0].in_channels == 32
    assert adapter.input_proj[3][0].stride == (2, 2)
    mask = torch.ones(1, 192, 256, dtype=torch.bool)
    mask[0, :128, :176] = False
    feats = backbone(torch.zeros(1, 3, 192, 256))
    srcs, masks = adapter(feats, mask)
    assert [tuple(s.shape[-2:]) for s in srcs] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
    # valid (rows, cols) per level: the image mask resized with nearest interpolation,
    # i.e. sampled at rows floor(i * 192 / H_l), cols floor(j * 256 / W_l).
    expected_valid = [(16, 22), (8, 11), (4, 6), (2, 3), (2, 2)]
    for m, (vh, vw) in zip(masks, expected_valid):
        assert m.dtype == torch.bool
        assert int((~m[0]).sum(0).max()) == vh and int((~m[0]).sum(1).max()) == vw


# ------------------------------------------------------------------------- heads & names


@pytest.mark.parametrize("variant", ["plain", "box_refine", "two_stage"])
def test_heads_init_and_sharing(variant):
    model = build(**TINY_VARIANTS[variant])
    n_pred = 3 if variant == "two_stage" else 2
    assert len(model.class_embed) == len(model.bbox_embed) == n_pred
    prior = -math.log((1 - 0.01) / 0.01)
    for ce, be in zip(model.class_embed, model.bbox_embed):
        assert torch.allclose(ce.bias, torch.full_like(ce.bias, prior))
        assert (be.layers[-1].weight == 0).all() and (be.layers[-1].bias[:2] == 0).all()
    box_bias = [be.layers[-1].bias[2:].tolist() for be in model.bbox_embed]
    if variant == "plain":
        assert all(m is model.class_embed[0] for m in model.class_embed)
        assert all(m is model.bbox_embed[0] for m in model.bbox_embed)
        assert box_bias == [[-2.0, -2.0]] * 2
    else:
        assert len({id(m) for m in model.bbox_embed}) == n_pred
        assert len({id(m) for m in model.class_embed}) == n_pred
        if variant == "box_refine":
            assert box_bias == [[-2.0, -2.0], [0.0, 0.0]]
        else:
            assert box_bias == [[0.0, 0.0]] * 3
    keys = model.state_dict().keys()
    assert ("query_embed.weight" in keys) == (variant != "two_stage")
    assert ("transformer.reference_points.weight" in keys) == (variant != "two_stage")
    assert ("transformer.pos_trans.weight" in keys) == (variant == "two_stage")
    assert not any(k.startswith("transformer.decoder.bbox_embed") for k in keys)
    assert "transformer.decoder.layers.1.self_attn.in_proj_weight" in keys
    assert "adapter.input_proj.3.0.weight" in keys


# --------------------------------------------------------------------- variants end to end


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_variant_trains_and_infers(variant):
    model = build(**TINY_VARIANTS[variant])
    inputs = make_inputs(out_scale=1.5)
    model.train()
    losses = model(inputs)
    suffixes = ["", "_0"] + (["_enc"] if variant == "two_stage" else [])
    assert set(losses) == {n + s for n in LOSS_NAMES for s in suffixes}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.class_embed[-1].weight.grad is not None
    offsets = model.transformer.encoder.layers[0].self_attn.sampling_offsets
    assert offsets.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        results = model(inputs)
        raw = model.raw_outputs(inputs)
    assert len(results) == 2
    for r, x in zip(results, inputs):
        inst = r["instances"]
        assert isinstance(inst, Instances)
        assert inst.image_size == (x["height"], x["width"])
        assert len(inst) == 20  # TEST.DETECTIONS_PER_IMAGE
        assert set(inst.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
        b = inst.pred_boxes.tensor
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= x["width"]).all()
        assert (b[:, 1] >= 0).all() and (b[:, 3] <= x["height"]).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all()
        assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < 5

    assert raw["pred_logits"].shape == (2, 10, 5) and raw["pred_boxes"].shape == (2, 10, 4)
    assert ((raw["pred_boxes"] > 0) & (raw["pred_boxes"] < 1)).all()
    assert len(raw["aux_outputs"]) == 1
    assert raw["aux_outputs"][0]["pred_logits"].shape == (2, 10, 5)
    if variant == "two_stage":
        # one proposal per encoder position: 96x96 padded batch, strides 8, 16, 32, 64
        s = 12 * 12 + 6 * 6 + 3 * 3 + 2 * 2
        assert raw["enc_outputs"]["pred_logits"].shape == (2, s, 5)
        assert raw["enc_outputs"]["pred_boxes"].shape == (2, s, 4)
    else:
        assert "enc_outputs" not in raw


def test_inference_topk_over_queries_and_classes():
    """Scores are the k largest sigmoid(logit) over all Q x C pairs, boxes the queries'
    cxcywh boxes in pixels of the input (before rescaling to height/width)."""
    model = build()
    model.eval()
    inputs = make_inputs(with_instances=False)
    with torch.no_grad():
        raw = model.raw_outputs(inputs)
        results = model.inference(inputs, do_postprocess=False)
    for b, (r, x) in enumerate(zip(results, inputs)):
        h, w = x["image"].shape[-2:]
        prob = raw["pred_logits"][b].sigmoid().double()
        order = np.argsort(-prob.flatten().numpy(), kind="stable")[:20]
        q, c = order // 5, order % 5
        np.testing.assert_allclose(r.scores.numpy(), prob.flatten().numpy()[order], rtol=1e-6)
        assert r.pred_classes.tolist() == c.tolist()
        cx, cy, bw, bh = raw["pred_boxes"][b, q].double().unbind(-1)
        expected = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h,
                                (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
        np.testing.assert_allclose(r.pred_boxes.tensor.numpy(), expected.numpy(), rtol=1e-5)


def test_preprocess_normalises_and_pads_to_largest():
    model = build()
    inputs = make_inputs(sizes=((50, 70), (66, 40)))
    images = model.preprocess_image(inputs)
    assert images.tensor.shape == (2, 3, 66, 70)  # no rounding (ResNet size_divisibility 0)
    img = inputs[0]["image"].double()
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, dtype=torch.float64).view(3, 1, 1)
    np.testing.assert_allclose(images.tensor[0, :, :50, :70].numpy(),
                               ((img - mean) / std).numpy(), atol=1e-5)
    assert (images.tensor[0, :, 50:] == 0).all()
    mask = model.padding_mask(images)
    assert (~mask[0]).sum() == 50 * 70 and (~mask[1]).sum() == 66 * 40
    assert not mask[1, :66, :40].any() and mask[1, :, 40:].all()


def test_targets_normalised_by_own_image_size():
    model = build()
    inputs = make_inputs(sizes=((50, 80), (64, 64)))
    inputs[0]["instances"].gt_boxes.tensor[:] = torch.tensor([[8.0, 10.0, 40.0, 30.0]])
    targets = model.prepare_targets([x["instances"] for x in inputs], [(50, 80), (64, 64)])
    # cx = 24 / 80, cy = 20 / 50, w = 32 / 80, h = 20 / 50
    np.testing.assert_allclose(targets[0]["boxes"][0].numpy(), [0.3, 0.4, 0.4, 0.4], rtol=1e-6)
    assert targets[0]["labels"].dtype == torch.int64


def test_training_with_images_without_annotations():
    model = build(WITH_BOX_REFINE=True, TWO_STAGE=True)
    inputs = make_inputs(boxes_per_image=0) + make_inputs(sizes=((64, 64),), seed=3)
    losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    losses = model(make_inputs(boxes_per_image=0))
    assert losses["loss_bbox"].item() == 0 and losses["loss_ce"].item() > 0


def test_aux_loss_off_gives_last_layer_only():
    losses = build(AUX_LOSS=False)(make_inputs())
    assert set(losses) == set(LOSS_NAMES)


def test_keyword_construction_equals_config_construction():
    cfg = make_tiny_cfg()
    torch.manual_seed(0)
    from_cfg = DeformableDETR(cfg)
    backbone = build_backbone(cfg)
    kwargs = dict(
        backbone=backbone,
        adapter=MultiScaleAdapter(backbone.output_shape(), ["res3", "res4", "res5"], 32, 4),
        transformer=DeformableTransformer(d_model=32, n_heads=4, num_encoder_layers=1,
                                          num_decoder_layers=2, dim_feedforward=64,
                                          num_feature_levels=4),
        criterion=SetCriterion(5, HungarianMatcher()),
        num_classes=5, num_queries=10, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD,
        detections_per_image=20,
    )
    from_kwargs = DeformableDETR(**kwargs)
    sd1, sd2 = from_cfg.state_dict(), from_kwargs.state_dict()
    assert {k: v.shape for k, v in sd1.items()} == {k: v.shape for k, v in sd2.items()}
    from_kwargs.load_state_dict(sd1)
    from_cfg.eval()
    from_kwargs.eval()
    inputs = make_inputs(with_instances=False)
    with torch.no_grad():
        a, b = from_cfg.raw_outputs(inputs), from_kwargs.raw_outputs(inputs)
    assert torch.equal(a["pred_boxes"], b["pred_boxes"])


# ------------------------------------------------------------------- padding invariance


@pytest.mark.parametrize("variant", ["plain", "box_refine"])
def test_padding_invariance(variant):
    """Transformer + heads: one image alone vs. the same image padded (with junk in the
    padding) next to a larger one give the same outputs. Checks the per-level masks, valid
    ratios, reference points and position encodings.

    (The full network is not invariant in the published design: the backbone's convolutions
    and the adapter's GroupNorm see the padding, so the test starts after the adapter.)"""
    model = perturb(build(**TINY_VARIANTS[variant]))
    model.eval()
    g = torch.Generator().manual_seed(0)
    alone = [(8, 12), (4, 6), (2, 3), (1, 2)]
    padded = [(11, 15), (6, 8), (3, 4), (2, 2)]
    srcs_alone, srcs_batch, masks_alone, masks_batch = [], [], [], []
    for (h, w), (hp, wp) in zip(alone, padded):
        x = torch.randn(1, 32, h, w, generator=g)
        big = 10 * torch.randn(2, 32, hp, wp, generator=g)  # junk in the padding
        big[0, :, :h, :w] = x[0]
        m = torch.ones(2, hp, wp, dtype=torch.bool)
        m[0, :h, :w] = False
        m[1] = False
        srcs_alone.append(x)
        masks_alone.append(torch.zeros(1, h, w, dtype=torch.bool))
        srcs_batch.append(big)
        masks_batch.append(m)
    with torch.no_grad():
        a = model.forward_multiscale(srcs_alone, masks_alone)
        b = model.forward_multiscale(srcs_batch, masks_batch)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(b[key][:1], a[key], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b["aux_outputs"][0][key][:1], a["aux_outputs"][0][key],
                                   atol=1e-4, rtol=1e-4)
    # The outputs depend on the image (the comparison is not vacuous).
    assert (b["pred_boxes"][1] - a["pred_boxes"][0]).abs().max() > 1e-2
    assert (b["pred_logits"][1] - a["pred_logits"][0]).abs().max() > 1e-2


def test_mixed_precision_training_step():
    """Under autocast (bfloat16 on the CPU) the losses stay finite and float32."""
    model = build(WITH_BOX_REFINE=True, TWO_STAGE=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(make_inputs())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


# ----------------------------------------------------------------------------- overfit


def test_overfits_a_fixed_batch():
    # A frozen backbone keeps this fast; the adapter, transformer and heads learn.
    model = build(WITH_BOX_REFINE=True, DROPOUT=0.0, **{"MODEL.BACKBONE.FREEZE_AT": 5})
    inputs = make_inputs(sizes=((64, 64), (64, 64)), boxes_per_image=2, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                            weight_decay=1e-4)
    history = []
    for _ in range(15):
        loss = sum(model(inputs).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


# --------------------------------------------------------------------- attention backends


@pytest.mark.skipif(not has_compiled_op(), reason="compiled extension not built")
@pytest.mark.parametrize("variant", ["box_refine", "two_stage"])
def test_compiled_and_pytorch_attention_agree(variant):
    pt = perturb(build(ATTN_IMPL="pytorch", DROPOUT=0.0, **TINY_VARIANTS[variant]))
    cc = build(ATTN_IMPL="compiled", DROPOUT=0.0, **TINY_VARIANTS[variant])
    cc.load_state_dict(pt.state_dict())
    inputs = make_inputs()
    assert_same_training_step(pt, cc, inputs)
    pt.eval()
    cc.eval()
    with torch.no_grad():
        a, b = pt.raw_outputs(inputs), cc.raw_outputs(inputs)
    torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], atol=1e-5, rtol=1e-5)


def assert_same_training_step(reference, model, inputs):
    """The same losses and parameter gradients from one training forward/backward."""
    losses_ref, losses = reference(inputs), model(inputs)
    for k in losses_ref:
        torch.testing.assert_close(losses[k], losses_ref[k], atol=1e-5, rtol=1e-5)
    sum(losses_ref.values()).backward()
    sum(losses.values()).backward()
    for (name, p1), p2 in zip(reference.named_parameters(), model.parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_backbone_channels_last_is_the_same_model():
    ref = perturb(build(DROPOUT=0.0, WITH_BOX_REFINE=True, BACKBONE_CHANNELS_LAST=False))
    ref_conv = next(m for m in ref.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert not ref_conv.weight.is_contiguous(memory_format=torch.channels_last)
    cl = build(DROPOUT=0.0, WITH_BOX_REFINE=True, BACKBONE_CHANNELS_LAST=True)
    conv = next(m for m in cl.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    cl.load_state_dict(ref.state_dict())
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)  # kept on loading
    assert_same_training_step(ref, cl, make_inputs())


@pytest.mark.skipif(not torch.cuda.is_available() or not has_compiled_op("cuda"),
                    reason="needs a GPU and the CUDA kernels")
def test_cuda_compiled_matches_cpu_pytorch():
    cpu = build(ATTN_IMPL="pytorch", WITH_BOX_REFINE=True, TWO_STAGE=True)
    gpu = build(ATTN_IMPL="compiled", WITH_BOX_REFINE=True, TWO_STAGE=True, **{
        "MODEL.DEVICE": "cuda"})
    gpu.load_state_dict(cpu.state_dict())
    cpu.eval()
    gpu.eval()
    inputs = make_inputs()
    with torch.no_grad():
        a, b = cpu.raw_outputs(inputs), gpu.raw_outputs(inputs)
    assert b["pred_boxes"].is_cuda
    torch.testing.assert_close(b["pred_boxes"].cpu(), a["pred_boxes"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["pred_logits"].cpu(), a["pred_logits"], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, match", [
    ({"IN_FEATURES": ["res3", "res6"]},
     r"IN_FEATURES \['res3', 'res6'\] must name outputs.*offers \['res3', 'res4', 'res5'\]"),
    ({"NUM_FEATURE_LEVELS": 2}, r"NUM_FEATURE_LEVELS \(2\) must be at least"),
    ({"ATTN_IMPL": "cuda"}, r"ATTN_IMPL must be one of \('auto', 'compiled', 'pytorch'\)"),
    ({"TWO_STAGE": True}, r"TWO_STAGE=True requires MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE"),
    ({"HIDDEN_DIM": 48}, r"HIDDEN_DIM must be a multiple of 32"),
    ({"NHEADS": 3}, r"HIDDEN_DIM \(32\) must be divisible by MODEL.DEFORMABLE_DETR.NHEADS"),
    ({"NUM_CLASSES": 0}, r"NUM_CLASSES must be at least 1"),
    ({"ONE_TO_MANY_LAYERS": 2}, r"ONE_TO_MANY_LAYERS = 2 must be less than "
                                r"MODEL.DEFORMABLE_DETR.DEC_LAYERS = 2"),
    ({"ONE_TO_MANY_LAYERS": 1, "ONE_TO_MANY_K": 0}, r"ONE_TO_MANY_K must be at least 1"),
    ({"ONE_TO_MANY_LAYERS": 1, "AUX_LOSS": False}, r"ONE_TO_MANY_LAYERS needs "
                                                   r"MODEL.DEFORMABLE_DETR.AUX_LOSS"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model(make_tiny_cfg(**overrides))


def test_compiled_attention_unavailable_error(monkeypatch):
    monkeypatch.setattr(ms_deform_attn_module, "has_compiled_op", lambda device=None: False)
    with pytest.raises(ValueError, match=r"ATTN_IMPL='compiled' but the deformable_detr._C"):
        build_model(make_tiny_cfg(ATTN_IMPL="compiled"))


def test_input_errors():
    model = build()
    inputs = make_inputs()
    del inputs[1]["instances"]
    with pytest.raises(ValueError, match="training needs 'instances'"):
        model(inputs)
    inputs = make_inputs()
    inputs[0]["image"] = inputs[0]["image"][:1]
    with pytest.raises(ValueError, match=r"input 0: 'image' must be \[3, H, W\]"):
        model(inputs)
    inputs = make_inputs()
    inputs[1]["instances"].gt_classes[0] = 5
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 5\)"):
        model(inputs)


def test_default_config_is_the_published_model():
    """Defaults of add_deformable_detr_config match the facts (spot check of the keys the
    model reads)."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    c = cfg.MODEL.DEFORMABLE_DETR
    assert (c.HIDDEN_DIM, c.NHEADS, c.ENC_LAYERS, c.DEC_LAYERS, c.DIM_FEEDFORWARD) == (
        256, 8, 6, 6, 1024)
    assert (c.NUM_QUERIES, c.NUM_FEATURE_LEVELS, c.ENC_N_POINTS, c.DEC_N_POINTS) == (
        300, 4, 4, 4)
    assert (c.CLS_WEIGHT, c.BBOX_WEIGHT, c.GIOU_WEIGHT) == (2.0, 5.0, 2.0)
    assert (c.COST_CLASS, c.COST_BBOX, c.COST_GIOU, c.FOCAL_ALPHA) == (2.0, 5.0, 2.0, 0.25)
