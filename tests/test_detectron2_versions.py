"""The plugin on each detectron2 it supports: the 0.6 release (``make test``) and detectron2
built from its current source (``make test-d2-source``). Both call themselves 0.6, so the
tests ask for features: the ones that need ViT, Swin or MViT (detectron2 from source, with
timm) skip on the release and say why.

Covered: the 0.6 shims (deformable_detr.compat) against detectron2's own features; padding
as the backbone asks (``padding_constraints``); the safe checkpointer after a refused file
and with ``?matching_heuristics=True``; the LazyConfigs (configs/lazy/): the published model
is the yacs one, trains, resumes and evaluates; ViT + SimpleFeaturePyramid trains from its
shipped LazyConfig with tools/lazyconfig_train_net.py; Swin and MViT train a step.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_TRANSFORMER as TINY_T
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_model
from detectron2.structures import ImageList
from PIL import Image

import deformable_detr.compat as compat
from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import CheckpointError, SafeDetectionCheckpointer
from deformable_detr.engine import cpu_autocast
from deformable_detr.engine.lazy import do_train, evaluate, lazy_class_names, load_lazy_config
from deformable_detr.modeling import (
    DeformableTransformer,
    HungarianMatcher,
    SetCriterion,
    build_deformable_detr,
)
from deformable_detr.modeling.padding import backbone_padding, pad_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY_R50 = os.path.join(ROOT, "configs", "lazy", "deformable_detr_R_50_50ep.py")
LAZY_VIT = os.path.join(ROOT, "configs", "lazy", "deformable_detr_ViTDet_B_50ep.py")

import detectron2.modeling as _d2_modeling  # noqa: E402

HAS_VIT = hasattr(_d2_modeling, "ViT") and hasattr(_d2_modeling, "SimpleFeaturePyramid")
HAS_TIMM = importlib.util.find_spec("timm") is not None
needs_transformer_backbones = pytest.mark.skipif(
    not (HAS_VIT and HAS_TIMM),
    reason="detectron2's ViT, Swin and MViT backbones (detectron2 built from its source, after "
           "0.6) and timm are needed: make test-d2-source runs these",
)


# ------------------------------------------------------------------------------ tiny data


def write_tiny_coco(root, num_images=4, seed=0):
    """A COCO json of ``num_images`` noise images, 40..63 px, each with 1-2 bright boxes of
    two classes ("box", "bar")."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annos = [], []
    for i in range(num_images):
        h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        for k in range(1 + i % 2):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            bw, bh = int(rng.integers(10, w - x0)), int(rng.integers(10, h - y0))
            arr[y0:y0 + bh, x0:x0 + bw] = 200 - 60 * k
            annos.append({"id": len(annos) + 1, "image_id": i + 1, "bbox": [x0, y0, bw, bh],
                          "category_id": k + 1, "area": bw * bh, "iscrowd": 0})
        Image.fromarray(arr).save(os.path.join(root, "images", f"{i}.jpg"))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": h, "width": w})
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annos,
                   "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "bar"}]}, f)
    return path, os.path.join(root, "images")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """The name of a registered 4-image, 2-class COCO-format dataset."""
    name = "d2_versions_tiny"
    if name not in DatasetCatalog.list():
        json_file, image_root = write_tiny_coco(str(tmp_path_factory.mktemp("tiny_coco")))
        register_coco_instances(name, {}, json_file, image_root)
    return name


def tiny_lazy_overrides(dataset, out_dir, max_iter=2):
    """Shrink the shipped LazyConfigs' training to seconds on a CPU: 2-image batches, the
    tiny model's transformer (conftest.TINY_TRANSFORMER), 2 classes."""
    return [
        "train.device=cpu", f"train.output_dir={out_dir}", "train.init_checkpoint=",
        f"train.max_iter={max_iter}", "train.eval_period=0", "train.log_period=1",
        "train.checkpointer.period=1", f"lr_multiplier.milestones=[{max_iter - 1}]",
        f"model.transformer.d_model={TINY_T['HIDDEN_DIM']}",
        f"model.transformer.n_heads={TINY_T['NHEADS']}",
        f"model.transformer.num_encoder_layers={TINY_T['ENC_LAYERS']}",
        f"model.transformer.num_decoder_layers={TINY_T['DEC_LAYERS']}",
        f"model.transformer.dim_feedforward={TINY_T['DIM_FEEDFORWARD']}",
        f"model.num_queries={TINY_T['NUM_QUERIES']}", "model.num_classes=2",
        f"dataloader.train.dataset.names={dataset}", f"dataloader.test.dataset.names={dataset}",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
    ]


# 64-96 px images for the published config; tiny_r18 swaps in a frozen R-18.
TINY_R50 = [
    "model.backbone.freeze_at=5",
    "dataloader.train.mapper.augmentations.1.tfm_or_aug.augs.0.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.1.tfm_or_aug.augs.1.crop_size=[32,48]",
    "dataloader.train.mapper.augmentations.2.short_edge_length=[64]",
    "dataloader.train.mapper.augmentations.2.max_size=96",
    "dataloader.test.mapper.augmentations.0.short_edge_length=64",
    "dataloader.test.mapper.augmentations.0.max_size=96",
]


def load_tiny_r18(opts):
    """The published LazyConfig with ``opts`` and a ResNet-18 (the adapter reads its other
    channels from it)."""
    from detectron2.config import LazyCall as L
    from detectron2.modeling.backbone import ResNet

    cfg = load_lazy_config(LAZY_R50, opts)
    cfg.model.backbone.stages = L(ResNet.make_default_stages)(depth=18, norm="FrozenBN")
    return cfg


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_losses(out_dir):
    records = [r for r in metrics(out_dir) if "total_loss" in r]
    assert records, "no training metrics were written"
    for r in records:
        assert math.isfinite(r["total_loss"]), r
    return records


# ------------------------------------------------------------------------- 0.6 shims


def test_shims_defer_to_detectron2_where_it_has_the_feature():
    """Each shim of deformable_detr.compat is used only where detectron2 lacks the feature."""
    from detectron2.engine import DefaultTrainer
    from detectron2.utils import comm

    assert compat.default_trainer_saves_state() == ("load_state_dict" in DefaultTrainer.__dict__)
    import inspect

    assert compat.HAS_PADDING_CONSTRAINTS == (
        "padding_constraints" in inspect.signature(ImageList.from_tensors).parameters)
    # Two sets of features, never a mix: detectron2 0.6 or detectron2 from its source.
    newer = [compat.HAS_PADDING_CONSTRAINTS, compat.default_trainer_saves_state(),
             hasattr(comm, "create_local_process_group"), hasattr(Backbone, "padding_constraints")]
    assert len(set(newer)) == 1, newer


@pytest.mark.parametrize("sizes, constraints, expected", [
    (((96, 100), (80, 112)), {"square_size": 160, "size_divisibility": 32}, (160, 160)),
    (((96, 100), (80, 112)), {"square_size": 150, "size_divisibility": 32}, (160, 160)),
    (((96, 100), (80, 112)), {"square_size": 0, "size_divisibility": 32}, (96, 128)),
    (((96, 100),), {"square_size": 100}, (100, 100)),
    (((96, 100), (80, 112)), {}, (96, 112)),
])
def test_square_padding_shim_matches_detectron2(sizes, constraints, expected, monkeypatch):
    """The 0.6 stand-in for ``ImageList.from_tensors(padding_constraints=...)`` pads as
    detectron2 > 0.6 does; where detectron2 has the feature, both paths agree."""
    tensors = [torch.rand(3, h, w) for h, w in sizes]
    ours = compat.image_list_from_tensors(tensors, 0, padding_constraints=constraints)
    assert tuple(ours.tensor.shape[-2:]) == expected
    assert ours.image_sizes == [tuple(s) for s in sizes]
    for t, (h, w) in zip(tensors, sizes):
        i = sizes.index((h, w))
        assert torch.equal(ours.tensor[i, :, :h, :w], t)
        rest = ours.tensor[i].clone()
        rest[:, :h, :w] = 0
        assert not rest.any()  # zero padding
    if compat.HAS_PADDING_CONSTRAINTS:
        monkeypatch.setattr(compat, "HAS_PADDING_CONSTRAINTS", False)
        fallback = compat.image_list_from_tensors(tensors, 0, padding_constraints=constraints)
        assert torch.equal(fallback.tensor, ours.tensor)


# ----------------------------------------------------------------------------- padding


class _PaddedBackbone(Backbone):
    """A stride-16 backbone that asks for padding the way ViT + SimpleFeaturePyramid does:
    through ``padding_constraints`` (with that class's spelling of the key), while its
    ``size_divisibility`` says 0."""

    def __init__(self, square=160, divisibility=32, key="size_divisiblity"):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 16, stride=16)
        self._constraints = {key: divisibility, "square_size": square}

    @property
    def padding_constraints(self):
        return dict(self._constraints)

    def forward(self, x):
        return {"p4": self.conv(x)}

    def output_shape(self):
        return {"p4": ShapeSpec(channels=32, stride=16)}


def test_backbone_padding_reads_padding_constraints():
    assert backbone_padding(_PaddedBackbone()) == {"size_divisibility": 32, "square_size": 160}
    assert backbone_padding(_PaddedBackbone(key="size_divisibility"))["size_divisibility"] == 32
    assert backbone_padding(torch.nn.Identity()) == {"size_divisibility": 0, "square_size": 0}


def tiny_model(backbone, in_features, num_classes=3):
    """The tiny model's transformer (conftest.TINY_TRANSFORMER) on ``backbone``."""
    transformer = DeformableTransformer(
        d_model=TINY_T["HIDDEN_DIM"], n_heads=TINY_T["NHEADS"],
        num_encoder_layers=TINY_T["ENC_LAYERS"], num_decoder_layers=TINY_T["DEC_LAYERS"],
        dim_feedforward=TINY_T["DIM_FEEDFORWARD"],
        num_feature_levels=len(in_features) + 1, two_stage_num_proposals=TINY_T["NUM_QUERIES"])
    criterion = SetCriterion(num_classes, HungarianMatcher())
    return build_deformable_detr(
        backbone=backbone, adapter={"in_features": in_features}, transformer=transformer,
        criterion=criterion, num_classes=num_classes, num_queries=TINY_T["NUM_QUERIES"],
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def test_model_pads_as_the_backbone_asks(make_inputs):
    """A batch of 96x100 and 80x112 images is padded to the backbone's 160x160 square, not
    to 96x112: its stride-16 patches then cover every pixel, and the padding mask of each
    level is the image mask at that level's size."""
    model = tiny_model(_PaddedBackbone(), ["p4"]).eval()
    inputs = make_inputs(sizes=((96, 100), (80, 112)), num_classes=3)
    images = model.preprocess_image(inputs)
    assert tuple(images.tensor.shape[-2:]) == (160, 160)
    assert images.image_sizes == [(96, 100), (80, 112)]
    features = model.backbone(images.tensor)
    _, masks = model.adapter(features, model.padding_mask(images))
    assert tuple(masks[0].shape[-2:]) == (10, 10)
    # Image 1 (80 x 112) covers 5 x 7 of the 10 x 10 stride-16 cells.
    assert (~masks[0][1]).sum() == 5 * 7 and not masks[0][1][:5, :7].any()
    with torch.no_grad():
        out = model(inputs)
    assert out[1]["instances"].image_size == (80, 112)


# ----------------------------------------------------------------------- checkpointer


def _save(path, sd):
    torch.save({"model": sd}, path)
    return str(path)


def test_checkpointer_loads_again_after_a_refused_file(tmp_path, tiny_cfg):
    """A refused file leaves no state behind: the next load works (detectron2 > 0.6 asserts
    on the URL it was loading)."""
    model = build_model(tiny_cfg())
    good = _save(tmp_path / "good.pth", model.state_dict())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    ckpt = SafeDetectionCheckpointer(model)
    for _ in range(2):
        with pytest.raises(CheckpointError):
            ckpt.load(str(bad))
        with pytest.raises((CheckpointError, AssertionError), match="not found"):
            ckpt.load(str(tmp_path / "missing.pth"))  # fvcore asserts
    ckpt.load(good)
    assert ckpt.unloaded == [] and ckpt.matched == len(model.state_dict())


def test_checkpointer_url_options(tmp_path, tiny_cfg):
    """``?matching_heuristics=True`` loads by detectron2's name matching (here: backbone
    weights saved without the ``backbone.`` prefix); an unknown option is refused with
    the file and the option named; ``=False`` is a plain load."""
    model = build_model(tiny_cfg())
    backbone_sd = {k[len("backbone."):]: v + 1.0 for k, v in model.state_dict().items()
                   if k.startswith("backbone.") and v.is_floating_point()}
    path = _save(tmp_path / "backbone.pth", backbone_sd)
    ckpt = SafeDetectionCheckpointer(model)

    ckpt.load(path + "?matching_heuristics=False", checkpointables=[])
    assert ckpt.matched == 0  # plain names: nothing matches

    name = "bottom_up.res3.0.conv1.weight" if hasattr(model.backbone, "bottom_up") else \
        "res3.0.conv1.weight"
    before = model.state_dict()["backbone." + name].clone()
    ckpt.load(path + "?matching_heuristics=True", checkpointables=[])
    assert ckpt.matched is None
    assert torch.equal(model.state_dict()["backbone." + name], backbone_sd[name])
    assert not torch.equal(before, backbone_sd[name])

    for query in ("?matching_heuristic=True", "?matching_heuristics=yes"):
        with pytest.raises(CheckpointError, match="matching_heuristics") as e:
            ckpt.load(path + query)
        assert "backbone.pth" in str(e.value)
    ckpt.load(path + "?matching_heuristics=True", checkpointables=[])  # still usable


# ------------------------------------------------------------------------- LazyConfig


def _yacs_r50():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "deformable_detr_R_50_50ep.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_lazy_config_is_the_published_model():
    """configs/lazy/deformable_detr_R_50_50ep.py and the yacs config give the same model
    (names, shapes, what trains), optimizer groups, clipping, schedule, data and
    augmentation."""
    from deformable_detr.data import DeformableDetrDatasetMapper
    from deformable_detr.solver import build_optimizer

    lazy = LazyConfig.load(LAZY_R50)
    yacs = _yacs_r50()
    lazy_model = instantiate(lazy.model)
    yacs_model = build_model(yacs)
    shapes = {k: tuple(v.shape) for k, v in lazy_model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in yacs_model.state_dict().items()}
    trainable = {k for k, p in lazy_model.named_parameters() if p.requires_grad}
    assert trainable == {k for k, p in yacs_model.named_parameters() if p.requires_grad}

    lazy.optimizer.params.model = lazy_model
    lazy_opt = instantiate(lazy.optimizer)
    yacs_opt = build_optimizer(yacs, yacs_model)
    assert type(lazy_opt).__name__ == type(yacs_opt).__name__ == \
        "AdamWWithFullModelGradientClip"

    def groups(opt, model):
        names = {id(p): n for n, p in model.named_parameters()}
        return [(g["name"], g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
                for g in opt.param_groups]

    assert groups(lazy_opt, lazy_model) == groups(yacs_opt, yacs_model)

    assert lazy.train.max_iter == yacs.SOLVER.MAX_ITER
    assert list(lazy.lr_multiplier.milestones) == list(yacs.SOLVER.STEPS)
    assert list(lazy.lr_multiplier["values"]) == [1.0, yacs.SOLVER.GAMMA]
    assert lazy.train.checkpointer.period == yacs.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == yacs.TEST.EVAL_PERIOD
    train = lazy.dataloader.train
    assert train.total_batch_size == yacs.SOLVER.IMS_PER_BATCH
    assert train.aspect_ratio_grouping == yacs.DATALOADER.ASPECT_RATIO_GROUPING
    assert train.dataset.filter_empty == yacs.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert train.dataset.names == yacs.DATASETS.TRAIN[0]
    assert lazy.dataloader.test.dataset.names == yacs.DATASETS.TEST[0]
    assert lazy.train.init_checkpoint == yacs.MODEL.WEIGHTS

    # The same random augmentation draws give the same images.
    image = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    for is_train, node in ((True, train.mapper), (False, lazy.dataloader.test.mapper)):
        lazy_mapper = instantiate(node)
        yacs_mapper = DeformableDetrDatasetMapper(yacs, is_train=is_train)
        assert lazy_mapper.image_format == yacs_mapper.image_format
        for seed in range(12):
            out = []
            for mapper in (lazy_mapper, yacs_mapper):
                np.random.seed(seed)
                out.append(mapper.augmentations(T.AugInput(image.copy()))
                           .apply_image(image).shape)
            assert out[0] == out[1], (is_train, seed, out)


def test_lazy_config_trains_resumes_and_evaluates(tmp_path, tiny_dataset):
    """The published LazyConfig, shrunk (R-18): trains two iterations with the safe
    checkpointer (class names saved), resumes for a third, and evaluates the result; with
    no weights evaluation is refused."""
    out = str(tmp_path / "lazy")
    opts = tiny_lazy_overrides(tiny_dataset, out) + TINY_R50
    cfg = load_tiny_r18(opts)
    evaluator = cfg.dataloader.pop("evaluator")  # evaluated once, below
    do_train(cfg)
    assert training_losses(out)[-1]["iteration"] == 1
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert state["thing_classes"] == ["box", "bar"] == lazy_class_names(cfg)
    assert state["trainer"]["iteration"] == 1 and state["trainer"]["optimizer"]["state"]

    cfg = load_tiny_r18(opts + ["train.max_iter=3", "lr_multiplier.milestones=[2]"])
    cfg.dataloader.pop("evaluator")
    do_train(cfg, resume=True)
    assert [r["iteration"] for r in training_losses(out)][-1] == 2
    assert torch.load(os.path.join(out, "model_final.pth"),
                      weights_only=True)["iteration"] == 2

    cfg.dataloader.evaluator = evaluator
    results = evaluate(cfg, resume=True)
    assert set(results) == {"bbox"} and math.isfinite(results["bbox"]["AP"])
    with pytest.raises(CheckpointError, match="random"):
        evaluate(load_tiny_r18(opts + [f"train.output_dir={tmp_path / 'none'}"]))


def test_lazy_config_cpu_amp(tmp_path, tiny_dataset, monkeypatch):
    """train.amp.enabled with train.device cpu: bfloat16 autocast training where the CPU has
    the instructions for it, else an error naming the key before anything is built."""
    out = str(tmp_path / "lazy_amp")
    opts = tiny_lazy_overrides(tiny_dataset, out) + TINY_R50 + [
        "train.amp.enabled=True"]
    cfg = load_tiny_r18(opts)
    cfg.dataloader.pop("evaluator")
    monkeypatch.setattr(cpu_autocast, "cpu_has_native_bfloat16", lambda: False)
    with pytest.raises(ValueError, match="train.amp.enabled on the CPU .* no bfloat16"):
        do_train(cfg)
    assert not os.path.exists(os.path.join(out, "model_final.pth"))
    monkeypatch.setattr(cpu_autocast, "cpu_has_native_bfloat16", lambda: True)
    steps = []
    monkeypatch.setattr(cpu_autocast.CPUAutocastTrainer, "run_step",
                        lambda self, run=cpu_autocast.CPUAutocastTrainer.run_step: (
                            steps.append(self.dtype), run(self))[1])
    do_train(cfg)
    assert steps == [torch.bfloat16] * 2 and training_losses(out)[-1]["iteration"] == 1


def test_lazy_config_model_ema(tmp_path, tiny_dataset):
    """train.model_ema: the final model is the average the checkpoint stores, evaluated
    during training (eval_period) without changing the trained weights."""
    out = str(tmp_path / "lazy_ema")
    opts = tiny_lazy_overrides(tiny_dataset, out, max_iter=3) + TINY_R50 + [
        "train.model_ema.enabled=True", "train.model_ema.decay=0.5", "train.eval_period=2"]
    cfg = load_tiny_r18(opts)
    do_train(cfg)
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    ema = state["trainer"]["hooks"]["ModelEMA"]
    assert ema["updates"] == 3
    last_raw = torch.load(os.path.join(out, "model_0000001.pth"), weights_only=True)["model"]
    differs = 0
    for k, v in state["model"].items():
        torch.testing.assert_close(v, ema["average"][k], rtol=0, atol=0)
        differs += int(not torch.equal(v, last_raw[k]))
    assert differs > 0
    assert any("bbox/AP" in r for r in metrics(out)), "no evaluation during training"


@needs_transformer_backbones
def test_vit_lazy_config_trains_with_the_tool(tmp_path, tiny_dataset):
    """configs/lazy/deformable_detr_ViTDet_B_50ep.py, shrunk (ViT of 2 blocks, 32 channels,
    128 px square crops), trains three iterations with tools/lazyconfig_train_net.py, writes
    its final model with the class names, and is evaluated at the end."""
    out = str(tmp_path / "vit")
    json_file = MetadataCatalog.get(tiny_dataset).json_file
    image_root = MetadataCatalog.get(tiny_dataset).image_root
    size = 128
    opts = tiny_lazy_overrides("tool_tiny", out, max_iter=3) + [
        "train.eval_period=0", "train.checkpointer.period=100",
        f"model.backbone.net.img_size={size}", "model.backbone.net.embed_dim=32",
        "model.backbone.net.depth=2", "model.backbone.net.num_heads=2",
        "model.backbone.net.window_size=4", "model.backbone.net.window_block_indexes=[0]",
        "model.backbone.net.drop_path_rate=0.0", "model.backbone.out_channels=32",
        f"model.backbone.square_pad={size}",
        f"dataloader.train.mapper.augmentations.1.target_height={size}",
        f"dataloader.train.mapper.augmentations.1.target_width={size}",
        f"dataloader.train.mapper.augmentations.2.crop_size=[{size},{size}]",
        f"dataloader.test.mapper.augmentations.0.short_edge_length={size}",
        f"dataloader.test.mapper.augmentations.0.max_size={size}",
    ]
    # The tool's process registers the dataset from this module's json (as a user's script).
    script = (
        "import runpy, sys\n"
        "from detectron2.data.datasets import register_coco_instances\n"
        f"register_coco_instances('tool_tiny', {{}}, {json_file!r}, {image_root!r})\n"
        f"sys.argv = ['lazyconfig_train_net.py'] + sys.argv[1:]\n"
        f"runpy.run_path({os.path.join(ROOT, 'tools', 'lazyconfig_train_net.py')!r}, "
        "run_name='__main__')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", script, "--config-file", LAZY_VIT, *opts],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert [r["iteration"] for r in training_losses(out)][-1] == 2
    assert "bbox" in log and "AP" in log  # evaluated after the last iteration
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert any(k.startswith("backbone.net.blocks.1.") for k in state["model"])
    assert state["thing_classes"] == ["box", "bar"]


def _swin():
    from detectron2.modeling import SwinTransformer

    return SwinTransformer(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                           window_size=4, drop_path_rate=0.0, out_indices=(1, 2, 3)), \
        ["p1", "p2", "p3"]


def _mvit():
    from detectron2.modeling import MViT

    return MViT(img_size=128, embed_dim=32, depth=4, num_heads=1, last_block_indexes=(0, 1, 2, 3),
                adaptive_window_size=8, drop_path_rate=0.0,
                out_features=("scale3", "scale4", "scale5")), ["scale3", "scale4", "scale5"]


def _vit():
    from functools import partial

    from detectron2.modeling import ViT
    from detectron2.modeling.backbone.vit import SimpleFeaturePyramid

    net = ViT(img_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=4,
              window_block_indexes=[0], use_rel_pos=True, drop_path_rate=0.0,
              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), out_feature="last_feat")
    return SimpleFeaturePyramid(net, "last_feat", 32, scale_factors=(2.0, 1.0, 0.5), norm="LN",
                                square_pad=128), ["p3", "p4", "p5"]


@needs_transformer_backbones
@pytest.mark.parametrize("make_backbone", [_vit, _swin, _mvit], ids=["vit", "swin", "mvit"])
def test_transformer_backbones_train_a_step(make_backbone, make_inputs):
    """detectron2's ViT (+ SimpleFeaturePyramid), Swin and MViT under Deformable DETR: the
    adapter reads their shapes, the batch is padded as each asks, and a training step
    gives finite losses and gradients in the backbone."""
    torch.manual_seed(0)
    backbone, in_features = make_backbone()
    model = tiny_model(backbone, in_features).train()
    inputs = make_inputs(sizes=((96, 112), (128, 80)), num_classes=3)
    images = model.preprocess_image(inputs)
    padding = backbone_padding(backbone)
    h, w = images.tensor.shape[-2:]
    if padding["square_size"]:
        assert h == w == max(padding["square_size"], 128)
    if padding["size_divisibility"] > 1:
        assert h % padding["size_divisibility"] == 0 and w % padding["size_divisibility"] == 0
    losses = model(inputs)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert pad_images([torch.zeros(3, 50, 60)], backbone).tensor.shape[-2:] == \
        pad_images([torch.zeros(3, 50, 60)], model.backbone).tensor.shape[-2:]
