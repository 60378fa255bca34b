"""Export (deformable_detr.export, tools/export_model.py) and the batched predictors, on tiny
models (CPU). Exported graphs are compared with ``model.raw_outputs`` on padded batches of
images of different sizes; the TensorRT plugin graph, which nothing here can run, by its
structure."""
import logging
import os
import runpy
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from deformable_detr.engine.predictor import Predictor
from deformable_detr.export import (
    TRT_PLUGIN_DOMAIN,
    TRT_PLUGIN_OP,
    ExportableDeformableDETR,
    OnnxPredictor,
    check_plugin_graph,
    export_model,
    level_padding_masks,
    load_torch_export,
    min_image_size,
    ms_deform_attn_portable,
    num_attention_calls,
    onnx_metadata,
    run_onnx,
)
from deformable_detr.layers import has_compiled_op, ms_deform_attn, ms_deform_attn_pytorch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tool's functions, loaded from its file as ``python tools/export_model.py`` would.
export_tool = types.SimpleNamespace(
    **runpy.run_path(os.path.join(ROOT, "tools", "export_model.py")))

needs_op = pytest.mark.skipif(not has_compiled_op("cpu"), reason="compiled op not built")

# Tracing time grows with the number of operations: a ResNet-10 (one block per stage).
SLIM = {"MODEL.BACKBONE.NAME": "build_slim_resnet_backbone", "MODEL.RESNETS.DEPTH": 10,
        "MODEL.RESNETS.STEM_OUT_CHANNELS": 16, "MODEL.RESNETS.RES2_OUT_CHANNELS": 16}
SINGLE = {"IN_FEATURES": ["res5"], "NUM_FEATURE_LEVELS": 1,
          "MODEL.RESNETS.OUT_FEATURES": ["res5"]}
VARIANTS = {
    "plain": SLIM,
    "box_refine": dict(SLIM, WITH_BOX_REFINE=True),
    # More proposals than small images have positions: the graph keeps min(300, S).
    "two_stage": dict(SLIM, WITH_BOX_REFINE=True, TWO_STAGE=True, NUM_QUERIES=300),
    "single_scale": dict(SLIM, **SINGLE),
    # detectron2 has no dilated res5 for R-18: a narrow R-50, with torchvision's dilation.
    "dc5": dict(SINGLE, **{"MODEL.BACKBONE.NAME": "build_torchvision_resnet_backbone",
                           "MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.WIDTH_PER_GROUP": 8,
                           "MODEL.RESNETS.RES5_DILATION": 2}),
}
# Each export takes tens of seconds: every variant is exported in at least one format
# (plain to ONNX by the tool test, box refinement as the plugin graph), and all run eagerly
# through the exported module (test_wrapper_equals_raw_outputs).
TORCH_EXPORT_VARIANTS = ["two_stage", "dc5"]
ONNX_VARIANTS = ["two_stage", "single_scale"]
TOL = 1e-4
# A padded batch of two images of different sizes (each padded in one direction).
SIZES = ((120, 97), (100, 130))


def build(variant, seed=0):
    """A tiny model in eval mode with perturbed parameters: the zero-initialised offsets and
    heads would otherwise put every sampling point on a pixel centre."""
    torch.manual_seed(seed)
    model = build_model(make_tiny_cfg(**VARIANTS[variant])).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def padded_batch(sizes=SIZES, seed=0, pad_value=0):
    """uint8 [N, 3, H, W] holding random images of ``sizes`` top-left, the rest
    ``pad_value``; int64 [N, 2] sizes; the detectron2 inputs of the unpadded images."""
    g = torch.Generator().manual_seed(seed)
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    images = torch.full((len(sizes), 3, h, w), pad_value, dtype=torch.uint8)
    inputs = []
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randint(0, 256, (3, hi, wi), generator=g,
                                               dtype=torch.uint8)
        inputs.append({"image": images[i, :, :hi, :wi].clone()})
    return images, torch.tensor(sizes), inputs


def reference(model, inputs):
    with torch.no_grad():
        out = model.raw_outputs(inputs)
    return out["pred_logits"], out["pred_boxes"]


def assert_close(got, want, tol=TOL):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        diff = float((g - w).abs().max())
        assert diff <= tol, diff


# ------------------------------------------------------------------- graph pieces, eager


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_portable_attention_matches_compiled_op(dtype):
    """The gather implementation equals the kernels and grid_sample, locations outside the
    maps and on their borders included."""
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 9), (4, 5), (1, 3)]
    n, m, d, lq, p = 2, 3, 4, 11, 3
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * 1.4 - 0.2
    loc[0, 0, 0, :, 0] = torch.tensor([0.0, 1.0], dtype=dtype)  # corners of the map
    attn = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype)
    spatial = torch.tensor(shapes)
    start = torch.tensor([0, 63, 83])
    got = ms_deform_attn_portable(value, spatial, start, loc, attn)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close([got], [ms_deform_attn(value, spatial, start, loc, attn)], tol)
    assert_close([got], [ms_deform_attn_pytorch(value, spatial, start, loc, attn)], tol)


def test_level_masks_equal_nearest_interpolation():
    """Masks made from the image sizes equal the eager model's nearest resize of the image
    mask, also for sizes where float rounding decides the pixel (92 -> 12)."""
    g = torch.Generator().manual_seed(0)
    for height, width, levels in [(92, 130, [(12, 17), (6, 9), (3, 5), (2, 3)]),
                                  (120, 97, [(15, 13), (8, 7), (4, 4), (2, 2)]),
                                  (33, 65, [(3, 5), (1, 1)])]:
        sizes = torch.stack([torch.randint(1, height + 1, (6,), generator=g),
                             torch.randint(1, width + 1, (6,), generator=g)], 1)
        sizes[0] = torch.tensor([height, width])
        mask = torch.ones(6, height, width, dtype=torch.bool)
        for i, (h, w) in enumerate(sizes.tolist()):
            mask[i, :h, :w] = False
        for got, hw in zip(level_padding_masks(sizes, (height, width), levels), levels):
            want = F.interpolate(mask[None].float(), size=hw).to(torch.bool)[0]
            assert torch.equal(got, want), (height, width, hw)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_wrapper_equals_raw_outputs(variant):
    """The graph to export, run eagerly: whatever the padding holds, the outputs of every
    variant are raw_outputs of the unpadded images."""
    model = build(variant)
    images, sizes, inputs = padded_batch(pad_value=255)
    with torch.no_grad():
        got = ExportableDeformableDETR(model).eval()(images, sizes)
    assert_close(got, reference(model, inputs), 1e-6)


@pytest.mark.parametrize("constraints", [{}, {"square_size": 144}, {"square_size": 96}])
def test_wrapper_pads_as_the_backbone_asks(constraints, monkeypatch):
    """A backbone with a size_divisibility (and a square): the graph pads the batch as the
    eager model does."""
    model = build("plain")
    backbone = type(model.backbone)
    monkeypatch.setattr(backbone, "size_divisibility", property(lambda self: 32),
                        raising=False)
    monkeypatch.setattr(backbone, "padding_constraints", property(lambda self: constraints),
                        raising=False)
    images, sizes, inputs = padded_batch()  # 120x130: 128x160, 160x160 or 160x160
    wrapper = ExportableDeformableDETR(model).eval()
    assert wrapper.size_divisibility == 32
    with torch.no_grad():
        got = wrapper(images, sizes)
    assert_close(got, reference(model, inputs), 1e-6)


# ------------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("export")


@needs_op
@pytest.mark.parametrize("variant", TORCH_EXPORT_VARIANTS)
def test_torch_export_runs_the_compiled_op(variant, export_dir):
    """model.pt2 keeps the custom op, loads with torch.export.load and takes other batch and
    image sizes."""
    model = build(variant)
    out = export_dir / f"pt2_{variant}"
    path = export_model(model, str(out), format="torch_export", metadata={"k": 1})
    assert path == str(out / "model.pt2")
    program, meta = load_torch_export(path)
    assert meta == {"k": 1}
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.deformable_detr.ms_deform_attn_forward.default) == \
        num_attention_calls(model)
    images, sizes, inputs = padded_batch()
    with torch.no_grad():
        assert_close(program.module()(images, sizes), reference(model, inputs))
        lo = min_image_size(model)
        images, sizes, inputs = padded_batch(((lo, lo + 40), (lo + 3, lo + 1), (lo + 20, lo)))
        assert_close(program.module()(images, sizes), reference(model, inputs))


@needs_op
@pytest.mark.parametrize("variant", ONNX_VARIANTS)
def test_onnx_portable_runs_in_onnxruntime(variant, export_dir):
    """Standard operators only (no GridSample), dynamic N, H, W, the outputs of raw_outputs."""
    model = build(variant)
    path = export_model(model, str(export_dir / f"onnx_{variant}"), format="onnx",
                        metadata={"input_format": "RGB"})
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    ops = {(n.domain, n.op_type) for n in graph.graph.node}
    assert {d for d, _ in ops} <= {"", "ai.onnx"}
    assert "GridSample" not in {op for _, op in ops}
    assert [i.name for i in graph.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    assert onnx_metadata(path) == {"input_format": "RGB", "attention": "portable"}
    images, sizes, inputs = padded_batch()
    assert_close(run_onnx(path, images, sizes), reference(model, inputs))
    lo = min_image_size(model)
    images, sizes, inputs = padded_batch(((lo + 30, lo), (lo, lo + 2), (lo + 5, lo + 50)))
    assert_close(run_onnx(path, images, sizes), reference(model, inputs))


@needs_op
def test_onnx_plugin_graph_is_what_tensorrt_expects(export_dir):
    """One MultiscaleDeformableAttnPlugin_TRT node per attention call, with the plugin's
    inputs (value [N, S, M, D], int32 shapes [L, 2] and starts [L], locations
    [N, Lq, M, L, P, 2], weights [N, Lq, M, L, P]) and output [N, Lq, M, D]."""
    model = build("box_refine")
    path = export_model(model, str(export_dir / "onnx_plugin"), format="onnx",
                        attention="plugin")
    graph = onnx.load(path)
    onnx.checker.check_model(graph)
    assert {o.domain: o.version for o in graph.opset_import}[TRT_PLUGIN_DOMAIN] == 1
    nodes = check_plugin_graph(path, num_attention_calls(model))
    assert len(nodes) == 3  # 1 encoder + 2 decoder layers
    m, d, levels, points = 4, 8, 4, 4  # tiny config: 32 channels, 4 heads, 4 levels
    for node in nodes:
        assert node["domain"] == TRT_PLUGIN_DOMAIN
        (vt, value), (st, shapes), (it, starts), (lt, loc), (wt, weights) = node["inputs"]
        assert (vt, lt, wt, st, it) == ("FLOAT",) * 3 + ("INT32",) * 2
        assert value[2:] == [m, d] and shapes == [levels, 2] and starts == [levels]
        assert loc[2:] == [m, levels, points, 2] and weights[2:] == [m, levels, points]
        assert value[0] == loc[0] == weights[0] and loc[1] == weights[1]
        ot, out = node["output"]
        assert ot == "FLOAT" and out == [value[0], loc[1], m, d]
    n_ops = [n for n in graph.graph.node if n.op_type == TRT_PLUGIN_OP]
    assert all(len(n.attribute) == 0 for n in n_ops)  # the plugin has no attributes
    with pytest.raises(ValueError, match="TensorRT"):
        OnnxPredictor(path)


# ---------------------------------------------------------------------------- predictors

TEST_SIZE = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160"]


@pytest.fixture(scope="module")
def weights_cfg(tmp_path_factory):
    """A tiny config file and perturbed weights saved next to it."""
    out = tmp_path_factory.mktemp("weights")
    model = build("plain")
    DetectionCheckpointer(model, save_dir=str(out)).save("model")
    cfg = make_tiny_cfg(**VARIANTS["plain"])
    config = out / "tiny.yaml"
    config.write_text(cfg.dump())
    cfg.merge_from_list(["MODEL.WEIGHTS", str(out / "model.pth"), *TEST_SIZE])
    return str(config), cfg


def images_of(sizes, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def assert_same_instances(a, b, tol):
    assert a.image_size == b.image_size and len(a) == len(b)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert float((a.scores - b.scores).abs().max()) <= tol
    assert float((a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max()) <= tol * 200


@needs_op
def test_predictor_result_does_not_depend_on_the_batch(weights_cfg):
    """Images of equal resized size run together without padding; an image's detections
    are those it gets alone. pad_batches pads other sizes in, which changes them."""
    _, cfg = weights_cfg
    predictor = Predictor(cfg)
    images = images_of([(100, 150), (80, 150), (100, 150), (90, 90)])
    calls = []
    run = predictor.predict_batch
    predictor.predict_batch = lambda inputs: calls.append(len(inputs)) or run(inputs)
    batched = predictor(images)
    assert calls == [2, 1, 1]
    for image, result in zip(images, batched):
        assert_same_instances(result, predictor(image), 1e-5)
    assert batched[0].image_size == (100, 150)

    padded = Predictor(cfg, pad_batches=True)(images)
    differ = [float((p.scores - b.scores).abs().max()) for p, b in zip(padded, batched)]
    assert max(differ) > 1e-4  # the padded images changed (documented behaviour)


@needs_op
def test_predictor_input_errors(weights_cfg):
    predictor = Predictor(weights_cfg[1])
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        predictor([np.zeros((10, 10), dtype=np.uint8)])
    with pytest.raises(ValueError, match="max_batch_size"):
        Predictor(weights_cfg[1], max_batch_size=0)


# ------------------------------------------------------------------------------ the tool


def _tool(args, caplog):
    caplog.clear()
    log = logging.getLogger("deformable_detr")
    log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="deformable_detr"):
            return export_tool.main(args)
    finally:
        log.removeHandler(caplog.handler)


@needs_op
def test_tool_exports_onnx_and_onnx_predictor_matches(weights_cfg, tmp_path, capsys, caplog):
    """tools/export_model.py writes model.onnx (at another opset than the exporter's 18),
    checks it and says how to run it; the OnnxPredictor returns the Predictor's
    detections."""
    config, cfg = weights_cfg
    out = tmp_path / "out"
    rc = _tool(["--config-file", config, "--format", "onnx", "--opset", "20", "--output",
                str(out), "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS, *TEST_SIZE], caplog)
    printed = capsys.readouterr().out
    assert rc == 0, printed + caplog.text
    path = str(out / "model.onnx")
    assert f"wrote {path}" in printed and "onnxruntime" in printed
    assert "max |difference|" in printed and "OnnxPredictor" in printed
    meta = onnx_metadata(path)
    assert meta["min_size_test"] == 96 and meta["input_format"] == "RGB"
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 20

    images = images_of([(100, 150), (70, 120), (100, 150)], seed=1)
    want = Predictor(cfg)(images)
    for pad in (False, True):
        got = OnnxPredictor(path, pad_batches=pad, num_threads=1)(images)
        ref = Predictor(cfg, pad_batches=True)(images) if pad else want
        for a, b in zip(got, ref):
            assert_same_instances(a, b, TOL)


def test_tool_errors(weights_cfg, tmp_path, capsys, caplog):
    """Unknown format, missing weights, a config key typo, options of another format and an
    output that is a file: clear messages, nothing written."""
    config, cfg = weights_cfg
    out = str(tmp_path / "out")
    base = ["--config-file", config, "--output", out]
    with pytest.raises(SystemExit) as e:
        export_tool.main(base + ["--format", "tflite"])
    assert e.value.code == 2 and "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_tool.main(base + ["--format", "torch_export", "--attention", "plugin"])
    assert "--attention applies to --format onnx only" in capsys.readouterr().err

    missing = str(tmp_path / "nope.pth")
    assert _tool(base + ["--format", "onnx", "MODEL.WEIGHTS", missing], caplog) == 2
    assert f"MODEL.WEIGHTS file not found: {missing}" in caplog.text
    assert _tool(base + ["--format", "onnx", "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS,
                         "MODEL.DEFORMABLE_DETR.NUM_CLASS", "3"], caplog) == 2
    assert ("unknown config key 'MODEL.DEFORMABLE_DETR.NUM_CLASS'; did you mean "
            "MODEL.DEFORMABLE_DETR.NUM_CLASSES") in caplog.text
    assert _tool(base + ["--format", "onnx", "MODEL.WEIGHTS"], caplog) == 2
    assert "KEY VALUE pairs" in caplog.text
    assert _tool(base + ["--format", "onnx"], caplog) == 2  # the tiny config has no weights
    assert "No weights" in caplog.text
    afile = tmp_path / "afile"
    afile.write_text("")
    assert _tool(["--config-file", config, "--output", str(afile), "--format", "onnx",
                  "MODEL.WEIGHTS", cfg.MODEL.WEIGHTS], caplog) == 2
    assert "is a file" in caplog.text
    assert not os.path.exists(out)
