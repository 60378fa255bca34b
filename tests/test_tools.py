"""tools/demo.py, tools/visualize_attention.py and tools/run_demo.py on a tiny randomly
initialised model, and a few training iterations of train_net.py on the shapes dataset."""
import json
import os
import runpy
import types

import numpy as np
import pytest
from conftest import run_logged, save_random_model, tiny_opts
from PIL import Image

import deformable_detr.modeling.slim_resnet  # noqa: F401  (registers the demo backbone)
import deformable_detr.visualization.attention as visualize_attention
from deformable_detr.data import generate_shapes_dataset, register_shapes_dataset
from deformable_detr.engine import Predictor, setup_cfg
from deformable_detr.engine.cpu_autocast import cpu_has_native_bfloat16
from deformable_detr.engine.defaults import default_argument_parser, train_net_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool(name):
    """A tool's functions, loaded from its file as ``python tools/<name>.py`` would."""
    return types.SimpleNamespace(**runpy.run_path(os.path.join(ROOT, "tools", f"{name}.py")))


demo = load_tool("demo")
visualize_attention_tool = load_tool("visualize_attention")

CONFIG = os.path.join(ROOT, "configs", "demo", "deformable_detr_shapes.yaml")
# The demo config shrunk for speed (the tiny model of conftest.py).
TINY = tiny_opts("TEST.DETECTIONS_PER_IMAGE", "20", "DATALOADER.NUM_WORKERS", "0", demo=True)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    datasets = tmp_path_factory.mktemp("datasets")
    generate_shapes_dataset(str(datasets / "shapes"), num_train=8, num_val=4, seed=1)
    return datasets


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A randomly initialised tiny demo model saved with DetectionCheckpointer."""
    return save_random_model(setup_cfg(CONFIG, TINY), tmp_path_factory.mktemp("weights"))


def _run(tool, args, caplog):
    return run_logged(tool.main, args, caplog)


def test_demo_draws_detections(shapes_root, weights, tmp_path, caplog):
    val = shapes_root / "shapes" / "val"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    rc = _run(demo, ["--config-file", CONFIG, "--input", str(val / "000000.png"),
                     str(val / "00000[12].png"), str(corrupt), "--output", str(out),
                     "--confidence-threshold", "0", "--opts", *TINY, "MODEL.WEIGHTS", weights],
              caplog)
    assert rc == 1  # the corrupt file failed, the others were drawn
    assert "corrupt.png" in caplog.text and "Cannot read image" in caplog.text
    assert sorted(os.listdir(out)) == ["000000.png", "000001.png", "000002.png"]
    src = np.asarray(Image.open(val / "000000.png"))
    drawn = np.asarray(Image.open(out / "000000.png"))
    # Enlarged to ~640 px for readable labels, with the boxes drawn over the image.
    scale = 640 / max(src.shape[:2])
    assert abs(drawn.shape[0] - src.shape[0] * scale) <= 1
    assert abs(drawn.shape[1] - src.shape[1] * scale) <= 1
    plain = np.asarray(Image.fromarray(src).resize(drawn.shape[1::-1], Image.NEAREST))
    assert np.mean(np.any(np.abs(drawn.astype(int) - plain) > 40, -1)) > 0.01


def test_demo_folder_and_errors(shapes_root, weights, tmp_path, caplog):
    val = shapes_root / "shapes" / "val"
    out = tmp_path / "out"
    assert _run(demo, ["--config-file", CONFIG, "--input", str(val), "--output", str(out),
                       "--opts", *TINY, "MODEL.WEIGHTS", weights], caplog) == 0
    assert len(os.listdir(out)) == 4
    # Missing weights, missing input, missing config: clear messages, no pictures.
    missing = str(tmp_path / "nope.pth")
    assert _run(demo, ["--config-file", CONFIG, "--input", str(val), "--output", str(out),
                       "--opts", *TINY, "MODEL.WEIGHTS", missing], caplog) == 2
    assert f"MODEL.WEIGHTS file not found: {missing}" in caplog.text
    assert _run(demo, ["--config-file", CONFIG, "--input", str(val), "--output", str(out),
                       "--opts", *TINY], caplog) == 2
    assert "No weights" in caplog.text
    assert _run(demo, ["--config-file", CONFIG, "--input", str(tmp_path / "x.jpg"),
                       "--output", str(out), "--opts", "MODEL.WEIGHTS", weights], caplog) == 2
    assert "Input image not found" in caplog.text
    assert _run(demo, ["--config-file", CONFIG, "--input", str(tmp_path / "*.jpg"),
                       "--output", str(out), "--opts", "MODEL.WEIGHTS", weights], caplog) == 2
    assert "No files match" in caplog.text
    assert _run(demo, ["--config-file", str(tmp_path / "c.yaml"), "--input", str(val),
                       "--output", str(out)], caplog) == 2
    assert "Config file not found" in caplog.text
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert _run(demo, ["--config-file", CONFIG, "--input", str(val), "--output", str(out),
                       "--opts", *TINY, "MODEL.WEIGHTS", str(garbage)], caplog) == 2
    assert "Cannot load MODEL.WEIGHTS" in caplog.text


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor(setup_cfg(CONFIG, [*TINY, "MODEL.WEIGHTS", weights]))


def test_attention_records(shapes_root, predictor):
    image = np.asarray(Image.open(shapes_root / "shapes" / "val" / "000000.png"))
    inputs = predictor.make_input(image)
    outputs, records, padded_hw = visualize_attention.run_with_recording(predictor.model, inputs)
    enc = [r for r in records if r.is_encoder]
    dec = [r for r in records if not r.is_encoder]
    assert len(enc) == 1 and len(dec) == 2  # ENC_LAYERS, DEC_LAYERS
    assert padded_hw == tuple(inputs["image"].shape[-2:])  # one image: no padding
    shapes = enc[0].spatial_shapes
    h, w = padded_hw
    # Levels of strides 8, 16, 32, 64 (convolution arithmetic: ceil at every stride 2).
    assert shapes[0].tolist() == [-(-h // 8), -(-w // 8)]
    assert len(shapes) == 4
    # The encoder query of a pixel is its cell on that level; its reference point is that
    # cell's centre (hand computation), also away from the first level.
    for level, (x, y) in [(0, (37.0, 91.0)), (1, (5.0, 130.0)), (2, (100.0, 20.0))]:
        q = visualize_attention.encoder_query_index(shapes, level, x, y, padded_hw)
        fh, fw = shapes[level]
        row, col = int(y / h * fh), int(x / w * fw)
        assert q == int(sum(a * b for a, b in shapes[:level])) + row * fw + col
        np.testing.assert_allclose(enc[0].reference_points[q], [(col + 0.5) / fw,
                                                                (row + 0.5) / fh], atol=1e-6)
    # Decoder records: one per query; attention weights of each head sum to 1.
    assert dec[-1].sampling_locations.shape == (10, 4, 4, 4, 2)
    np.testing.assert_allclose(dec[-1].attention_weights.sum((-1, -2)), 1.0, atol=1e-5)
    # The top detections are those of the model's own inference path.
    dets = visualize_attention.top_detections(outputs["pred_logits"][0],
                                              outputs["pred_boxes"][0], 5)
    inst = predictor(image)
    np.testing.assert_allclose([d[2] for d in dets], inst.scores[:5].numpy(), rtol=1e-5)
    assert [d[1] for d in dets] == inst.pred_classes[:5].tolist()
    ih, iw = image.shape[:2]
    for (_, _, _, (cx, cy, bw, bh)), box in zip(dets, inst.pred_boxes.tensor[:5].numpy()):
        np.testing.assert_allclose([(cx - bw / 2) * iw, (cy - bh / 2) * ih,
                                    (cx + bw / 2) * iw, (cy + bh / 2) * ih], box, atol=0.05)
    # Recording is switched off again afterwards: no hooks left on the model.
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for m in predictor.model.modules())


def test_visualize_attention_writes_pictures(shapes_root, weights, tmp_path, caplog):
    val = shapes_root / "shapes" / "val"
    out = tmp_path / "att"
    rc = _run(visualize_attention_tool,
              ["--config-file", CONFIG, "--input", str(val / "000001.png"), "--output", str(out),
               "--topk", "2", "--pixels", "10,20", "60,70", "--opts", *TINY, "MODEL.WEIGHTS",
               weights], caplog)
    assert rc == 0
    assert sorted(os.listdir(out)) == ["000001_decoder.png", "000001_encoder.png"]
    for name in os.listdir(out):
        with Image.open(out / name) as im:
            assert im.width > 800 and im.height > 250
    rc = _run(visualize_attention_tool,
              ["--config-file", CONFIG, "--input", str(val / "000001.png"), "--output", str(out),
               "--queries", "99", "--opts", *TINY, "MODEL.WEIGHTS", weights], caplog)
    assert rc == 1 and "--queries must be in [0, 9]" in caplog.text


def test_train_net_on_shapes(shapes_root, tmp_path):
    """A few iterations through train_net.py's main(), then its COCO evaluation."""
    register_shapes_dataset(str(shapes_root / "shapes"))
    out = tmp_path / "train"
    args = default_argument_parser().parse_args(
        ["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2",
         "SOLVER.WARMUP_ITERS", "0", "OUTPUT_DIR", str(out)]
    )
    train_net_main(args)
    assert os.path.isfile(out / "model_final.pth")
    with open(out / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    # The COCO evaluation at the end of training (a random model: AP near 0).
    assert {"bbox/AP", "bbox/AP50", "bbox/APs", "bbox/APm"} <= set(metrics[-1])
    assert 0 <= metrics[-1]["bbox/AP"] < 5
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(np.isfinite(losses))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))


def test_run_demo_end_to_end(shapes_root, tmp_path, monkeypatch, capsys):
    run_demo = load_tool("run_demo")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "ds"))
    out = tmp_path / "demo"
    rc = run_demo.main(["--output", str(out), "--num-train", "6", "--num-val", "3",
                        "--num-pictures", "2", "--min-ap", "0", *TINY,
                        "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2"])
    assert rc == 0
    assert sorted(os.listdir(out / "detections")) == ["000000.png", "000001.png"]
    assert sorted(os.listdir(out / "attention")) == ["000000_decoder.png", "000000_encoder.png"]
    with open(out / "demo_summary.json") as f:
        summary = json.load(f)
    assert "AP" in summary["bbox"] and summary["timings"]["total_s"] > 0
    # --amp auto: bfloat16 autocast where this CPU has the instructions for it.
    assert summary["opts"][-2:] == ["SOLVER.AMP.ENABLED", str(cpu_has_native_bfloat16())]
    assert "COCO bbox on shapes_val: AP" in capsys.readouterr().out
    # An AP below --min-ap is a failure (a random model scores ~0).
    rc = run_demo.main(["--output", str(out), "--num-train", "6", "--num-val", "3",
                        "--num-pictures", "1", "--min-ap", "50", *TINY,
                        "SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "2"])
    assert rc == 1


def test_run_demo_amp_choice(monkeypatch):
    """--amp auto turns bfloat16 autocast on only for training on a CPU with bfloat16
    instructions; on and off are taken as said; SOLVER.AMP.ENABLED among the overrides wins;
    a config error is left to the training step."""
    run_demo = load_tool("run_demo")
    config = run_demo.DEFAULT_CONFIG
    for native in (True, False):
        # The tool's own globals (load_tool returns a copy of its namespace).
        monkeypatch.setitem(run_demo.use_amp.__globals__, "cpu_has_native_bfloat16",
                            lambda native=native: native)
        assert run_demo.use_amp("auto", config, []) is native
        assert run_demo.use_amp("on", config, []) is True
        assert run_demo.use_amp("off", config, []) is False
        for choice in ("auto", "on", "off"):
            for value in (True, False):
                assert run_demo.use_amp(choice, config,
                                        ["SOLVER.AMP.ENABLED", str(value)]) is value
        assert run_demo.use_amp("auto", config, ["NO.SUCH_KEY", "1"]) is False
        assert run_demo.use_amp("auto", "missing.yaml", []) is False
