"""Fine-tuning on other classes: checkpoints record their class names, and class heads of
other classes are rebuilt by name (or from the prior) when MODEL.WEIGHTS is loaded."""
import logging
import os
import runpy
import types

import numpy as np
import pytest
import torch
from conftest import make_tiny_cfg, tiny_opts
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model

import deformable_detr.modeling.slim_resnet  # noqa: F401  (registers the demo backbone)
from deformable_detr.checkpoint import (
    CheckpointError,
    SafeDetectionCheckpointer,
    add_class_names,
    class_head_options,
    coco_class_names,
    convert_state_dict,
    dataset_class_names,
    detectron2_to_official,
    load_inference_weights,
    load_torch_file,
    prior_bias,
    save_detectron2_checkpoint,
)
from deformable_detr.data import SHAPES_CATEGORIES, generate_shapes_dataset, register_shapes_dataset
from deformable_detr.engine import Trainer, setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = os.path.join(ROOT, "configs", "demo", "deformable_detr_shapes.yaml")
# The demo config shrunk for speed (the tiny model of conftest.py).
TINY = tiny_opts("TEST.DETECTIONS_PER_IMAGE", "20", "DATALOADER.NUM_WORKERS", "0", demo=True)
SHAPES = [c["name"] for c in SHAPES_CATEGORIES]
# Another dataset's classes: three shared with the shapes (one in other case), two not.
OTHER = ["Red Circle", "dog", "blue square", "cat", "green circle"]
PRIOR = prior_bias()


@pytest.fixture
def caught(caplog):
    """caplog for the package's loggers (detectron2's setup_logger stops propagation; where
    it did not, a record is caught twice)."""
    logs = [logging.getLogger(n) for n in ("deformable_detr", "fvcore", "detectron2")]
    for log in logs:
        log.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO):
        yield caplog
    for log in logs:
        log.removeHandler(caplog.handler)


def heads(model):
    """{index: (weight [C, D], bias [C])} of every class head, copied."""
    return {i: (h.weight.detach().clone(), h.bias.detach().clone())
            for i, h in enumerate(model.class_embed)}


def source_checkpoint(path, cfg_kwargs, names, seed=0):
    """A model of ``len(names)`` classes with distinct class-head values, saved by our
    checkpointer with its names; returns its class heads."""
    torch.manual_seed(seed)
    model = build_model(make_tiny_cfg(NUM_CLASSES=len(names), **cfg_kwargs))
    with torch.no_grad():
        for i, h in enumerate(model.class_embed):
            h.weight.copy_(torch.randn_like(h.weight))
            h.bias.copy_(torch.arange(len(names)) + 10.0 * (i + 1))
    SafeDetectionCheckpointer(model, os.path.dirname(path), class_names=names).save(
        os.path.splitext(os.path.basename(path))[0])
    return heads(model)


def check_rows(model, init, src, model_names, src_names, encoder=None):
    """Copied rows equal the source's row of the same name; the others have the weight as
    initialised and the prior bias; the two-stage encoder head's row 0 is the source's."""
    lower = [n.lower() for n in src_names]
    for i, (w, b) in heads(model).items():
        for j, name in enumerate(model_names):
            if i == encoder and j == 0:
                continue
            if name.lower() in lower:
                k = lower.index(name.lower())
                assert torch.equal(w[j], src[i][0][k]) and b[j] == src[i][1][k], (i, name)
            else:
                assert torch.equal(w[j], init[i][0][j]) and b[j] == pytest.approx(PRIOR)
        if i == encoder:
            assert torch.equal(w[0], src[i][0][0]) and b[0] == src[i][1][0]


# ----------------------------------------------------------------------------- unit level
@pytest.mark.parametrize("variant", [{}, {"WITH_BOX_REFINE": True, "TWO_STAGE": True}],
                         ids=["shared_heads", "two_stage"])
def test_class_heads_by_name_and_reinit(variant, tmp_path, caught):
    src_path = str(tmp_path / "src.pth")
    src = source_checkpoint(src_path, variant, OTHER)
    assert load_torch_file(src_path)["thing_classes"] == OTHER
    names = ["green circle", "horse", "RED CIRCLE"]
    encoder = 2 if variant else None  # DEC_LAYERS 2: the encoder head is class_embed.2

    torch.manual_seed(1)
    model = build_model(make_tiny_cfg(NUM_CLASSES=3, **variant))
    init = heads(model)
    caught.clear()
    ckpt = SafeDetectionCheckpointer(model, class_names=names)
    ckpt.load(src_path)
    check_rows(model, init, src, names, OTHER, encoder)
    assert ckpt.unloaded == [] and ckpt.incorrect_shapes == []
    report = ckpt.class_heads
    assert report.copied == [("green circle", "green circle"), ("RED CIRCLE", "Red Circle")]
    assert report.initialised == ["horse"]
    # One line about the heads, no warning per tensor.
    lines = {r.getMessage() for r in caught.records if "Class heads" in r.getMessage()}
    assert len(lines) == 1 and "copied the rows of 2" in min(lines) and "horse" in min(lines)
    assert not [r for r in caught.records if r.levelno >= logging.WARNING]

    # reinit: the prior everywhere (the encoder's proposal row still kept).
    torch.manual_seed(1)
    model = build_model(make_tiny_cfg(NUM_CLASSES=3, **variant))
    ckpt = SafeDetectionCheckpointer(model, class_names=names, class_head_init="reinit")
    ckpt.load(src_path)
    check_rows(model, init, src, ["x", "y", "z"], OTHER, encoder)
    assert ckpt.class_heads.copied == [] and ckpt.class_heads.mode == "reinit"

    # Same number of classes in another order: rows follow the names.
    torch.manual_seed(1)
    model = build_model(make_tiny_cfg(NUM_CLASSES=5, **variant))
    shuffled = OTHER[::-1]
    SafeDetectionCheckpointer(model, class_names=shuffled).load(src_path)
    check_rows(model, heads(model), src, shuffled, OTHER, encoder)


def test_checkpoint_without_names_reinits_with_a_warning(tmp_path, caught):
    src_path = str(tmp_path / "src.pth")
    src = source_checkpoint(src_path, {}, OTHER)
    bare = str(tmp_path / "bare.pth")
    torch.save({"model": load_torch_file(src_path)["model"]}, bare)
    names = ["cat", "dog"]
    torch.manual_seed(1)
    model = build_model(make_tiny_cfg(NUM_CLASSES=2))
    init = heads(model)
    caught.clear()
    SafeDetectionCheckpointer(model, class_names=names).load(bare)
    check_rows(model, init, src, ["x", "y"], OTHER)
    warnings = {r.getMessage() for r in caught.records if r.levelno == logging.WARNING}
    assert len(warnings) == 1 and "records no class names" in min(warnings)
    assert "add_class_names" in min(warnings) and "tools/convert_weights.py" in min(warnings)

    # The fix the warning names: then the shared classes are copied.
    add_class_names(bare, OTHER)
    SafeDetectionCheckpointer(model, class_names=names).load(bare)
    check_rows(model, init, src, names, OTHER)
    with pytest.raises(CheckpointError, match="3 names for class heads of"):
        add_class_names(bare, ["a", "b", "c"])

    # Same shapes and no names: loaded as it is (as before names were recorded).
    torch.manual_seed(2)
    same = build_model(make_tiny_cfg(NUM_CLASSES=5))
    caught.clear()
    SafeDetectionCheckpointer(same, class_names=["a", "b", "c", "d", "e"]).load(src_path)
    assert "Class heads (by_name)" in caught.text  # the names differ: a..e share none
    torch.save({"model": load_torch_file(src_path)["model"]}, bare)
    caught.clear()
    SafeDetectionCheckpointer(same, class_names=["a", "b", "c", "d", "e"]).load(bare)
    assert "Class heads" not in caught.text
    assert torch.equal(same.class_embed[0].bias, src[0][1])


def test_inference_refuses_classes_without_rows(tmp_path):
    src_path = str(tmp_path / "src.pth")
    source_checkpoint(src_path, {}, OTHER)
    model = build_model(make_tiny_cfg(NUM_CLASSES=2)).eval()
    # Every class of the model is in the file: the model is complete.
    assert load_inference_weights(model, src_path, class_names=["cat", "dog"]) == src_path
    with pytest.raises(CheckpointError, match=r"no class-head rows for 1 of this model's 2 "
                                              r"classes \(horse.*--allow-random-weights"):
        load_inference_weights(model, src_path, class_names=["cat", "horse"])
    load_inference_weights(model, src_path, class_names=["cat", "horse"],
                           allow_random_weights=True)
    # Without the model's names, a mismatched head cannot be loaded either.
    with pytest.raises(CheckpointError, match="no class-head rows for 2"):
        load_inference_weights(model, src_path)


def test_model_class_names_from_the_config(tmp_path):
    cfg = make_tiny_cfg(NUM_CLASSES=3)
    cats = [{"id": i, "name": n} for i, n in ((7, "c"), (2, "a"), (5, "b"))]
    json_file = tmp_path / "train.json"
    json_file.write_text('{"images": [], "annotations": [], "categories": '
                         + str(cats).replace("'", '"') + "}")
    name = "test_finetune_json_names"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    try:
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (name,), ("coco_2017_val",)
        # Read from the json's categories, by id, without loading the dataset.
        assert dataset_class_names(cfg) == ["a", "b", "c"]
        cfg.DATASETS.TRAIN = ()
        cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = 80
        assert dataset_class_names(cfg) == list(coco_class_names())
        cfg.DATASETS.TEST = ("unregistered",)
        assert dataset_class_names(cfg) is None
        cfg.MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT = "random"
        with pytest.raises(ValueError, match="CLASS_HEAD_INIT must be one of"):
            class_head_options(cfg)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_converters_record_the_coco_names(tmp_path):
    torch.manual_seed(0)
    model = build_model(make_tiny_cfg(NUM_CLASSES=80, **{"MODEL.RESNETS.DEPTH": 50,
                                                          "MODEL.RESNETS.RES2_OUT_CHANNELS":
                                                              256}))
    official = detectron2_to_official(model.state_dict())  # 91 COCO-id rows
    result = convert_state_dict(official, "official")
    assert result.class_names == list(coco_class_names()) and len(result.class_names) == 80
    assert "80 class names recorded" in result.summary()
    out = str(tmp_path / "converted.pth")
    save_detectron2_checkpoint(result, out)
    assert load_torch_file(out)["thing_classes"] == list(coco_class_names())
    # A Hugging Face config's id2label names identity-mapped heads.
    from deformable_detr.checkpoint.convert import _id2label_names

    assert _id2label_names({"id2label": {"1": "b", "0": "a"}}, 2) == ["a", "b"]
    assert _id2label_names({"id2label": {"0": "a"}}, 2) is None


# ------------------------------------------------------------------------------ end to end
def test_finetune_shapes_from_other_classes(tmp_path, caught):
    """The demo's 6 classes fine-tuned from a checkpoint of 5 other classes (3 shared) for
    a few iterations: copied and prior rows after loading, names in the checkpoints written,
    then evaluation and drawing from the fine-tuned weights."""
    generate_shapes_dataset(str(tmp_path / "shapes"), num_train=4, num_val=2, seed=1)
    register_shapes_dataset(str(tmp_path / "shapes"))
    src_cfg = setup_cfg(CONFIG, TINY + ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "5"])
    torch.manual_seed(0)
    src_model = build_model(src_cfg)
    with torch.no_grad():
        for h in src_model.class_embed:
            h.bias.copy_(torch.arange(5.0))
    src_path = str(tmp_path / "other_classes.pth")
    SafeDetectionCheckpointer(src_model, str(tmp_path), class_names=OTHER).save("other_classes")
    src = heads(src_model)

    out = tmp_path / "finetune"
    cfg = setup_cfg(CONFIG, TINY + ["MODEL.WEIGHTS", src_path, "OUTPUT_DIR", str(out),
                                    "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
                                    "SOLVER.WARMUP_ITERS", "0"])
    trainer = Trainer(cfg)
    init = heads(trainer.model)
    caught.clear()
    trainer.resume_or_load(resume=False)
    check_rows(trainer.model, init, src, SHAPES, OTHER)
    line = next(r.getMessage() for r in caught.records if "Class heads" in r.getMessage())
    assert ("copied the rows of 3 (red circle <- Red Circle, green circle, blue square)"
            in line and "initialised 3 to the prior (red triangle, green square, "
            "blue triangle)" in line)
    assert "Skip loading parameter" not in caught.text
    trainer.train()
    final = load_torch_file(str(out / "model_final.pth"))
    assert final["thing_classes"] == SHAPES
    assert all(torch.isfinite(v).all() for v in final["model"].values())

    # Evaluate and draw from the fine-tuned weights: same classes, loaded as they are.
    train_net = types.SimpleNamespace(**runpy.run_path(os.path.join(ROOT, "train_net.py")))
    caught.clear()
    args = train_net.default_argument_parser().parse_args(
        ["--eval-only", "--config-file", CONFIG, *TINY, "MODEL.WEIGHTS",
         str(out / "model_final.pth"), "OUTPUT_DIR", str(out)])
    res = train_net.main(args)
    assert "AP" in res["bbox"] and "Class heads" not in caught.text
    # The source weights themselves: three of the six classes would score untrained rows.
    args = train_net.default_argument_parser().parse_args(
        ["--eval-only", "--config-file", CONFIG, *TINY, "MODEL.WEIGHTS", src_path,
         "OUTPUT_DIR", str(out)])
    with pytest.raises(CheckpointError, match=r"no class-head rows for 3 of this model's 6 "
                                              r"classes \(red triangle, green square"):
        train_net.main(args)

    visualize_gradients = types.SimpleNamespace(
        **runpy.run_path(os.path.join(ROOT, "tools", "visualize_gradients.py")))

    pictures = tmp_path / "gradients"
    rc = visualize_gradients.main(
        ["--config-file", CONFIG, "--input", str(tmp_path / "shapes" / "val" / "000000.png"),
         "--output", str(pictures), "--topk", "1", *TINY,
         "MODEL.WEIGHTS", str(out / "model_final.pth")])
    assert rc == 0
    assert len([f for f in os.listdir(pictures) if f.endswith(".png")]) == 1
    npz = np.load(next(pictures / f for f in os.listdir(pictures) if f.endswith(".npz")))
    assert {"cx", "cy", "w", "h", "class", "query"} <= set(npz.files)
