"""Dataset mapper (augmentation, boxes, errors) and optimizer (groups, lrs, clipping, AMP)."""
import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.solver import build_lr_scheduler
from detectron2.structures import BoxMode
from PIL import Image

from deformable_detr import add_deformable_detr_config
from deformable_detr.data import (
    DeformableDetrDatasetMapper,
    DetrResizeShortestEdge,
    build_detr_augmentation,
)
from deformable_detr.layers import MSDeformAttn
from deformable_detr.solver import build_optimizer, get_param_groups


def make_cfg():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file("configs/Base-DeformableDETR.yaml")
    return cfg


# ------------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    "hw, size, max_size, expected",
    [
        # short side exact, long side truncated (detectron2 would round: 1067)
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((427, 640), 800, 1333, (800, 1199)),  # 800 * 640 / 427 = 1199.06
        # long side limit: size = round(1333 * 500 / 1000) = round(666.5) = 666 (half to
        # even), long = 666 * 2 = 1332 (detectron2: 667 x 1333)
        ((500, 1000), 800, 1333, (666, 1332)),
        ((800, 1200), 800, 1333, (800, 1200)),  # already the right size
        ((300, 700), 400, None, (400, 933)),  # no limit (the crop branch's first resize)
    ],
)
def test_detr_resize_output_shape(hw, size, max_size, expected):
    import sys

    max_size = sys.maxsize if max_size is None else max_size
    assert DetrResizeShortestEdge.get_output_shape(*hw, size, max_size) == expected


# ------------------------------------------------------------------------------- mapper


def write_image(path, h, w, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def anno(x, y, w, h, cls, crowd=0):
    return {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cls,
            "iscrowd": crowd}


def test_mapper_flip_resize_boxes_by_hand(tmp_path):
    arr = write_image(tmp_path / "a.png", 40, 60)
    d = {"file_name": str(tmp_path / "a.png"), "height": 40, "width": 60, "image_id": 1,
         "annotations": [anno(10, 5, 20, 20, 3), anno(0, 0, 5, 5, 1, crowd=1),
                         anno(50, 30, 20, 20, 2)]}
    mapper = DeformableDetrDatasetMapper(
        is_train=True,
        augmentations=[T.RandomFlip(prob=1.0), DetrResizeShortestEdge(80, 1333, "choice")],
        image_format="RGB",
    )
    out = mapper(copy.deepcopy(d))
    # Flip: x -> 60 - x; then x2 scale: box 1 [10, 5, 30, 25] -> [30, 5, 50, 25] -> x2.
    # Box 3 [50, 30, 70, 50] is clipped to the image [50, 30, 60, 40] -> flip [0, 30, 10, 40].
    # The crowd box is dropped.
    expected = torch.tensor([[60.0, 10.0, 100.0, 50.0], [0.0, 60.0, 20.0, 80.0]])
    inst = out["instances"]
    assert inst.image_size == (80, 120)
    torch.testing.assert_close(inst.gt_boxes.tensor, expected)
    assert inst.gt_classes.tolist() == [3, 2]
    ref = np.asarray(Image.fromarray(arr[:, ::-1].copy()).resize((120, 80), Image.BILINEAR))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 80, 120)
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), ref)
    assert (out["height"], out["width"]) == (40, 60)  # original size, for inference


def test_mapper_crop_clips_and_drops_empty(tmp_path):
    write_image(tmp_path / "a.png", 40, 60)
    d = {"file_name": str(tmp_path / "a.png"), "height": 40, "width": 60,
         "annotations": [anno(5, 5, 10, 10, 0), anno(15, 5, 20, 10, 1), anno(45, 25, 10, 10, 2)]}
    # A fixed crop x in [10, 40), y in [0, 20).
    mapper = DeformableDetrDatasetMapper(
        is_train=True, augmentations=[T.CropTransform(10, 0, 30, 20)], image_format="RGB"
    )
    out = mapper(d)
    inst = out["instances"]
    assert out["image"].shape == (3, 20, 30)
    # box 0 [5, 5, 15, 15] -> [-5, 5, 5, 15] clipped [0, 5, 5, 15]; box 1 [15, 5, 35, 15] ->
    # [5, 5, 25, 15]; box 2 [45, 25, 55, 35] lies outside the crop -> empty, dropped.
    torch.testing.assert_close(inst.gt_boxes.tensor,
                               torch.tensor([[0.0, 5.0, 5.0, 15.0], [5.0, 5.0, 25.0, 15.0]]))
    assert inst.gt_classes.tolist() == [0, 1]


def test_mapper_bgr_and_test_mode(tmp_path):
    arr = write_image(tmp_path / "a.jpg", 30, 20)
    arr = np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"))  # after jpeg coding
    cfg = make_cfg()
    cfg.INPUT.FORMAT = "BGR"
    mapper = DeformableDetrDatasetMapper(cfg, is_train=False)
    d = {"file_name": str(tmp_path / "a.jpg"), "height": 30, "width": 20,
         "annotations": [anno(1, 1, 5, 5, 0)]}
    out = mapper(d)
    # Test: short side 800 (w 20 -> 800), long side 30 * 40 = 1200 <= 1333.
    assert out["image"].shape == (3, 1200, 800)
    assert "instances" not in out and "annotations" not in out
    ref = np.asarray(Image.fromarray(arr).resize((800, 1200), Image.BILINEAR))[:, :, ::-1]
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), ref)


def test_mapper_training_augmentation_from_config(tmp_path):
    """Sizes follow the recipe; both branches (plain resize, resize-crop-resize) occur."""
    cfg = make_cfg()
    augs = build_detr_augmentation(cfg, is_train=True)
    assert [type(a) for a in augs] == [T.RandomFlip, T.RandomApply, DetrResizeShortestEdge]
    assert augs[1].prob == 0.5
    write_image(tmp_path / "a.png", 50, 100)
    mapper = DeformableDetrDatasetMapper(cfg, is_train=True)
    d = {"file_name": str(tmp_path / "a.png"), "height": 50, "width": 100,
         "annotations": [anno(0, 0, 100, 50, 0)]}
    scales = set(cfg.INPUT.MIN_SIZE_TRAIN)
    np.random.seed(0)
    aspect_kept = cropped = 0
    for _ in range(40):
        out = mapper(copy.deepcopy(d))
        h, w = out["image"].shape[1:]
        assert max(h, w) <= 1333
        assert min(h, w) in scales or max(h, w) >= 1332, (h, w)
        if (h, w) in {DetrResizeShortestEdge.get_output_shape(50, 100, s, 1333) for s in scales}:
            aspect_kept += 1
        else:
            # Crop branch: 50x100 -> short side 400..600 -> crop h, w in [384, 600].
            cropped += 1
        # The whole-image box covers whatever was cropped: it is the full image.
        torch.testing.assert_close(out["instances"].gt_boxes.tensor,
                                   torch.tensor([[0.0, 0.0, float(w), float(h)]]))
    assert aspect_kept > 5 and cropped > 5


def test_mapper_random_size_crop_range():
    """The crop branch: h, w each uniform in [384, min(side, 600)] after a 400..600 resize."""
    cfg = make_cfg()
    branch = build_detr_augmentation(cfg, is_train=True)[1].aug
    np.random.seed(0)
    sizes = set()
    for _ in range(200):
        aug_input = T.AugInput(np.zeros((100, 200, 3), np.uint8))
        branch(aug_input)
        h, w = aug_input.image.shape[:2]
        # short side 400, 500 or 600 -> h in [384, min(short, 600)], w in [384, 600].
        assert 384 <= h <= 600 and 384 <= w <= 600
        sizes.add((h, w))
    assert len(sizes) > 100


def test_mapper_missing_and_corrupt_files(tmp_path):
    mapper = DeformableDetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    missing = str(tmp_path / "nope.jpg")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        mapper({"file_name": missing, "annotations": []})
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="bad.jpg"):
        mapper({"file_name": str(bad), "annotations": []})
    write_image(tmp_path / "trunc.png", 64, 64)
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.png"):
        mapper({"file_name": str(tmp_path / "trunc.png"), "annotations": []})


# ---------------------------------------------------------------------------- optimizer


class ToyDetector(torch.nn.Module):
    """Parameter names like the detector's: backbone.*, *.sampling_offsets.*,
    *.reference_points.*, a frozen backbone stem and a shared head."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 8))
        self.backbone[0].requires_grad_(False)
        self.attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
        self.reference_points = torch.nn.Linear(8, 2)
        head = torch.nn.Linear(8, 3)
        self.heads = torch.nn.ModuleList([head, head])  # shared, like the plain model's

    def forward(self, x):
        h = self.backbone(x)
        h = self.attn.value_proj(h) + self.attn.sampling_offsets(h)[:, :8]
        h = h + self.attn.attention_weights(h)[:, :1] + self.attn.output_proj(h)
        return (self.heads[0](h).sum() + self.heads[1](h).sum()
                + self.reference_points(h).sum())


def test_optimizer_groups_and_lrs():
    cfg = make_cfg()
    model = ToyDetector()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = {g["name"]: sorted(by_id[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert names == {
        "backbone": ["backbone.1.bias", "backbone.1.weight"],
        "linear_proj": ["attn.sampling_offsets.bias", "attn.sampling_offsets.weight",
                        "reference_points.bias", "reference_points.weight"],
        "base": ["attn.attention_weights.bias", "attn.attention_weights.weight",
                 "attn.output_proj.bias", "attn.output_proj.weight", "attn.value_proj.bias",
                 "attn.value_proj.weight", "heads.0.bias", "heads.0.weight"],
    }
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"backbone": 2e-5, "linear_proj": 2e-5, "base": 2e-4})
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)
    # Every trainable parameter exactly once, frozen ones never.
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}


def test_optimizer_with_lr_scheduler():
    cfg = make_cfg()
    cfg.SOLVER.MAX_ITER = 10
    cfg.SOLVER.STEPS = (8,)
    model = ToyDetector()
    opt = build_optimizer(cfg, model)
    sched = build_lr_scheduler(cfg, opt)
    seen = []
    for _ in range(10):
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        model(torch.randn(2, 4)).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    # No warmup; x0.1 from iteration 8 on, for every group.
    for it, lrs in enumerate(seen):
        f = 1.0 if it < 8 else 0.1
        assert lrs == pytest.approx({"backbone": 2e-5 * f, "linear_proj": 2e-5 * f,
                                     "base": 2e-4 * f}), it


def reference_step(model, clip, lr_groups, scale=1.0):
    """Unscale, clip by the global norm (torch's function), AdamW with the same groups."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad /= scale
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    ref = torch.optim.AdamW(lr_groups(model), lr=2e-4, weight_decay=1e-4)
    ref.step()


def groups_of(model):
    return get_param_groups(model, base_lr=2e-4, backbone_multiplier=0.1,
                            linear_proj_multiplier=0.1,
                            linear_proj_names=["sampling_offsets", "reference_points"])


def test_full_model_gradient_clipping_matches_torch():
    cfg = make_cfg()
    torch.manual_seed(0)
    model = ToyDetector()
    ref_model = copy.deepcopy(model)
    x = torch.randn(5, 4)
    model(x).backward()
    ref_model(x).backward()
    grads = [p.grad.double() for p in model.parameters() if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert total > 1.0  # so clipping at 0.1 is active

    opt = build_optimizer(cfg, model)
    opt.step()
    reference_step(ref_model, 0.1, groups_of)
    # After the step the gradients are the clipped ones: global norm 0.1 (by hand).
    clipped = torch.sqrt(sum((p.grad.double() ** 2).sum()
                             for p in model.parameters() if p.grad is not None))
    assert clipped == pytest.approx(0.1, rel=1e-5)
    # Equal to float32 rounding, not bit for bit: our fused AdamW kernel and torch's default
    # implementation may round the same update an ulp apart (they do on CPUs without AVX-512).
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-12, msg=n)

    # FULL_MODEL_CLIP_NORM <= 0 disables the clipping: the plain AdamW class.
    cfg.SOLVER.FULL_MODEL_CLIP_NORM = 0.0
    assert type(build_optimizer(cfg, ToyDetector())) is torch.optim.AdamW


def test_clipping_under_grad_scaler_sees_unscaled_gradients():
    """detectron2's AMPTrainer calls grad_scaler.step(optimizer): the gradients must be
    unscaled before the clipping in step(), and the step skipped on inf."""
    cfg = make_cfg()
    torch.manual_seed(0)
    model = ToyDetector()
    ref_model = copy.deepcopy(model)
    x = torch.randn(5, 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = build_optimizer(cfg, model)
    scaler.scale(model(x)).backward()
    scaler.step(opt)
    scaler.update()
    ref_model(x).backward()
    reference_step(ref_model, 0.1, groups_of)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, msg=n)

    before = copy.deepcopy(model.state_dict())
    opt.zero_grad()
    scaler.scale(model(x)).backward()
    model.heads[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped
    scaler.update()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_optimizer_config_errors():
    cfg = make_cfg()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER"):
        build_optimizer(cfg, ToyDetector())
    cfg = make_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    with pytest.raises(ValueError, match="FULL_MODEL_CLIP_NORM"):
        build_optimizer(cfg, ToyDetector())
    frozen = ToyDetector().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(make_cfg(), frozen)


def test_param_group_names_come_from_config():
    cfg = make_cfg()
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["value_proj"]
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.5
    opt = build_optimizer(cfg, ToyDetector())
    g = {g["name"]: g for g in opt.param_groups}["linear_proj"]
    assert len(g["params"]) == 2 and g["lr"] == pytest.approx(1e-4)
