"""Faults a new user runs into, on purpose (issue #10): malicious and damaged checkpoints in
every command, kills while a checkpoint is written, resuming from damaged checkpoints,
evaluation of weights that were not loaded, invalid annotations, unbounded tool work and the
messages for each. Tiny models; the tools and train_net run in this process except where a
fresh process is the point (a kill, the command line's exit status)."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_opts
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from PIL import Image
from test_convert import synthetic_official
from test_training import CONFIG, TINY, registered_three_classes
from test_training import tiny_cfg as training_cfg

from deformable_detr.checkpoint import (
    CheckpointError,
    SafeDetectionCheckpointer,
    convert_checkpoint,
    convert_state_dict,
    load_inference_weights,
    read_checkpoint,
)
from deformable_detr.data import DeformableDetrDatasetMapper
from deformable_detr.engine import Trainer, setup_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "deformable_detr_shapes.yaml")
# The demo config shrunk for speed (the tiny model of conftest.py).
DEMO_TINY = tiny_opts("TEST.DETECTIONS_PER_IMAGE", "20", "DATALOADER.NUM_WORKERS", "0",
                      demo=True)


def tool(name):
    """A tool's globals (``main``, ...), loaded from its file as ``python tools/x.py`` would."""
    path = os.path.join(ROOT, "tools", f"{name}.py") if name != "train_net" else \
        os.path.join(ROOT, "train_net.py")
    return runpy.run_path(path)


@contextlib.contextmanager
def captured(caplog):
    """caplog for the package's loggers, which detectron2's setup_logger (run by the tools
    and train_net) stops from propagating to the root logger."""
    caplog.clear()
    loggers = [logging.getLogger(n) for n in ("deformable_detr", "fvcore", "detectron2")]
    propagate = [lg.propagate for lg in loggers]
    for lg in loggers:
        lg.addHandler(caplog.handler)
        lg.propagate = False  # each record once, whether or not setup_logger ran
    try:
        with caplog.at_level(logging.INFO, logger="deformable_detr"):
            yield
    finally:
        for lg, p in zip(loggers, propagate):
            lg.removeHandler(caplog.handler)
            lg.propagate = p


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def demo_state_dict():
    torch.manual_seed(0)
    return build_model(setup_cfg(DEMO_CONFIG, DEMO_TINY)).state_dict()


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    with registered_three_classes(tmp_path_factory.mktemp("coco3"),
                                  "test_robustness_three_classes") as name:
        yield name


class Exploit:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_exploit(path, marker) -> str:
    path = str(path)
    payload = {"model": {"w": Exploit(marker)}, "__author__": "x"}
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    else:
        torch.save(payload, path)
    return path


# ------------------------------------------------- 1. no pickled code runs, in any command
@pytest.mark.parametrize("ext", ["pkl", "pth"])
def test_no_command_runs_pickled_code(ext, tmp_path, image_file, three_classes, caplog,
                                      capsys, monkeypatch):
    """Each command and API that loads weights refuses a crafted file without running it,
    with torch told to unpickle anything (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    evil = write_exploit(tmp_path / f"evil.{ext}", marker)

    # train_net.py: evaluation, and training from MODEL.WEIGHTS.
    train_net = tool("train_net")
    for extra in (["--eval-only"], []):
        args = train_net["default_argument_parser"]().parse_args(
            [*extra, "--config-file", CONFIG, *TINY, "MODEL.WEIGHTS", evil,
             "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "DATASETS.TRAIN", f"('{three_classes}',)",
             "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "out")])
        with pytest.raises(CheckpointError, match="refused"):
            train_net["main"](args)
    assert not marker.exists()

    # The drawing tools.
    for name in ("demo", "visualize_attention"):
        with captured(caplog):
            rc = tool(name)["main"](["--config-file", DEMO_CONFIG, "--input", image_file,
                                     "--output", str(tmp_path / name), "--opts",
                                     *DEMO_TINY, "MODEL.WEIGHTS", evil])
        assert rc == 2 and "refused" in caplog.text, caplog.text
    # The converter.
    assert tool("convert_weights")["main"]([evil, str(tmp_path / "c.pth")]) == 1
    assert "error:" in capsys.readouterr().err
    # The APIs.
    model = torch.nn.Linear(2, 2)
    for load in (lambda: SafeDetectionCheckpointer(model).load(evil),
                 lambda: load_inference_weights(model, evil),
                 lambda: read_checkpoint(evil),
                 lambda: convert_checkpoint(evil)):
        with pytest.raises(CheckpointError):
            load()
    assert not marker.exists()

    # Control: the file is live; plain loading would have run it.
    with open(evil, "rb") as f:
        if ext == "pkl":
            pickle.load(f)
        else:
            torch.load(f)  # no weights_only: the variable above makes it False
    assert marker.exists()


def test_eval_only_command_line_refuses_code_with_a_message(tmp_path):
    """In a fresh process, as a user runs it: exit status 1, the reason, no traceback."""
    marker = tmp_path / "ran"
    evil = write_exploit(tmp_path / "evil.pth", marker)
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--eval-only", "--config-file", CONFIG, *TINY,
         "MODEL.WEIGHTS", evil, "OUTPUT_DIR", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "refused to load" in out and "posix.system" in out
    assert "Traceback" not in out
    assert not marker.exists()


# -------------------------------------------------------- 2. atomic saves, verified resume
KILL_MID_WRITE = r"""
import os, signal, sys, torch
from deformable_detr.checkpoint import SafeDetectionCheckpointer

model = torch.nn.Linear(256, 256)
ckpt = SafeDetectionCheckpointer(model, save_dir=sys.argv[1], save_to_disk=True)
with torch.no_grad():
    model.weight.fill_(1.0)
ckpt.save("model_final", iteration=1)
with torch.no_grad():
    model.weight.fill_(2.0)
real_save = torch.save

def save_half_then_die(obj, f):
    real_save(obj, f)
    f.flush()
    f.truncate(f.tell() // 2)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
ckpt.save("model_final", iteration=2)
"""


def test_kill_while_writing_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # The half-written file is the temporary one; the previous checkpoint is whole.
    assert (out / "model_final.pth.tmp").exists()
    with pytest.raises(CheckpointError):
        read_checkpoint(str(out / "model_final.pth.tmp"))
    state = read_checkpoint(str(out / "model_final.pth"))
    assert state["iteration"] == 1 and bool((state["model"]["weight"] == 1).all())
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    ckpt = SafeDetectionCheckpointer(torch.nn.Linear(256, 256), save_dir=str(out))
    assert ckpt.get_checkpoint_file() == str(out / "model_final.pth")


def truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_resume_skips_damaged_checkpoints_and_keeps_a_final_model(tmp_path, three_classes,
                                                                   caplog):
    opts = ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "SOLVER.MAX_ITER", "4",
            "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()"]
    cfg = training_cfg(tmp_path, three_classes, opts)
    out = cfg.OUTPUT_DIR
    final = os.path.join(out, "model_final.pth")

    def resume(max_iter=4):
        c = cfg.clone()
        c.SOLVER.MAX_ITER = max_iter
        trainer = Trainer(c)
        with captured(caplog):
            trainer.resume_or_load(resume=True)
        return trainer

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert sorted(f for f in os.listdir(out) if f.endswith(".pth")) == [
        "model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    # The truncated final model named in last_checkpoint is skipped, with a warning; the
    # newest readable checkpoint already reached MAX_ITER, so the final model is rewritten.
    truncate(final)
    t = resume()
    assert f"Skipping a checkpoint that cannot be resumed from: {final} is a truncated" \
        in caplog.text
    assert t.start_iter == 4
    assert "nothing to train" in caplog.text and "written" in caplog.text
    assert read_checkpoint(final)["iteration"] == 3

    # MAX_ITER below the checkpoint's iteration: nothing to train, the final model is kept.
    t = resume(max_iter=2)
    assert t.start_iter == 4 and "nothing to train" in caplog.text and "kept" in caplog.text

    # An empty last_checkpoint: the newest checkpoint, with a warning.
    open(os.path.join(out, "last_checkpoint"), "w").close()
    t = resume()
    assert "last_checkpoint is empty" in caplog.text and t.start_iter == 4

    # The two newest damaged: training continues from the oldest, to a final model that
    # loads completely into a new model.
    truncate(final)
    truncate(os.path.join(out, "model_0000003.pth"))
    t = resume()
    assert t.start_iter == 2 and "model_0000001.pth" in caplog.text
    t.train()
    assert read_checkpoint(final)["iteration"] == 3
    assert load_inference_weights(Trainer.build_model(cfg), final) == final

    # Nothing readable: an error naming the files and the fix.
    for f in os.listdir(out):
        if f.endswith(".pth"):
            truncate(os.path.join(out, f))
    with pytest.raises(CheckpointError, match="No readable checkpoint.*Move the damaged"):
        resume()


# ------------------------------------------------------ 3. weights that were not loaded
def test_eval_only_refuses_weights_that_leave_the_model_random(tmp_path, caplog):
    train_net = tool("train_net")
    cfg = training_cfg(tmp_path, "coco_2017_val")
    model = Trainer.build_model(cfg)
    sd = model.state_dict()

    def eval_only(weights, *extra):
        args = train_net["default_argument_parser"]().parse_args(
            ["--eval-only", *extra, "--config-file", CONFIG, *TINY, "MODEL.WEIGHTS", weights,
             "OUTPUT_DIR", str(tmp_path / "out")])
        return train_net["main"](args)

    with pytest.raises(CheckpointError, match="No weights.*MODEL.WEIGHTS is empty"):
        eval_only("")
    unrelated = str(tmp_path / "unrelated.pth")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, unrelated)
    with pytest.raises(CheckpointError, match="checkpoint of another model"):
        eval_only(unrelated)
    half = str(tmp_path / "half.pth")
    torch.save({"model": {k: v for k, v in sd.items()
                          if not k.startswith(("transformer.decoder.layers.1.", "class_embed"))}},
               half)
    with pytest.raises(CheckpointError, match=r"transformer\.decoder\.layers\.1 \(\d+\)") as e:
        eval_only(half)
    assert "class_embed" in str(e.value) and "--allow-random-weights" in str(e.value)

    # The override: a warning, then the model runs.
    with captured(caplog):
        assert load_inference_weights(model, half, allow_random_weights=True) == half
    assert "Running anyway (--allow-random-weights)" in caplog.text
    # Non-finite values are refused, whatever the override.
    nan = str(tmp_path / "nan.pth")
    torch.save({"model": dict(sd, **{"transformer.level_embed": torch.full_like(
        sd["transformer.level_embed"], float("nan"))})}, nan)
    with pytest.raises(CheckpointError, match="NaN or infinite values.*level_embed"):
        load_inference_weights(model, nan, allow_random_weights=True)


# ------------------------------------------------------------- 4. invalid annotations
def anno(bbox, mode=BoxMode.XYWH_ABS, i=0):
    return {"id": i, "bbox": bbox, "bbox_mode": mode, "category_id": 0, "iscrowd": 0}


def test_mapper_reports_and_drops_invalid_boxes_once_per_image(tmp_path, caplog):
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "a.png")
    good = [anno([10, 5, 20, 20], i=1), anno([50, 30, 20, 20], i=2),  # partly out: clipped
            anno([5, 5, 15, 15], BoxMode.XYXY_ABS, i=3)]
    bad = [anno([30, 10, -20, 10], i=10),  # negative width: not turned into [10, 10, 30, 20]
           anno([5, 5, 10, 0], i=11),  # zero height
           anno([float("nan"), 5, 10, 10], i=12), anno([5, 5, float("inf"), 10], i=13),
           anno([0, 0, 1e30, 10], i=14),  # far outside
           anno([100, 100, 10, 10], i=15),  # outside
           anno([20, 20, 10, 10], BoxMode.XYXY_ABS, i=16)]  # x1 < x0
    d = {"file_name": str(tmp_path / "a.png"), "height": 40, "width": 60, "image_id": 7,
         "annotations": good + bad}
    mapper = DeformableDetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    with captured(caplog):
        out = mapper(copy.deepcopy(d))
    torch.testing.assert_close(out["instances"].gt_boxes.tensor, torch.tensor(
        [[10.0, 5.0, 30.0, 25.0], [50.0, 30.0, 60.0, 40.0], [5.0, 5.0, 15.0, 15.0]]))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "image id 7" in msg and "dropped 7 unusable" in msg
    for i in (10, 11, 12, 13, 14):
        assert f"annotation {i} " in msg
    assert "width -20 and height 10" in msg and "NaN or infinite" in msg and "far outside" in msg
    with captured(caplog):
        mapper(copy.deepcopy(d))  # the next epoch: not reported again
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]

    strict = DeformableDetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB",
                                         invalid_annotations="error")
    with pytest.raises(ValueError, match="image id 7 .* 7 unusable.*INPUT.INVALID_ANNOTATIONS"):
        strict(copy.deepcopy(d))
    assert len(strict(dict(copy.deepcopy(d), annotations=good))["instances"]) == 3
    with pytest.raises(ValueError, match="INPUT.INVALID_ANNOTATIONS must be one of"):
        DeformableDetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB",
                                    invalid_annotations="ignore")


def test_invalid_annotations_switch_in_config(tmp_path):
    cfg = training_cfg(tmp_path, "coco_2017_val", ["INPUT.INVALID_ANNOTATIONS", "error"])
    assert DeformableDetrDatasetMapper(cfg, is_train=True).invalid_annotations == "error"


# ----------------------------------------------------------------- 5. bounded tool work
@pytest.mark.parametrize("args, message", [
    (["--topk", "500"], "--topk: expected an integer in [1, 10]"),
    (["--topk", "0"], "--topk: expected an integer in [1, 10]"),
    (["--queries", *map(str, range(11))], "--queries: at most 10"),
    (["--dpi", "5000"], "--dpi: expected an integer in [30, 300]"),
])
def test_attention_tool_bounds_its_work(args, message, tmp_path, image_file, capsys):
    with pytest.raises(SystemExit) as e:
        tool("visualize_attention")["main"](["--config-file", DEMO_CONFIG, "--input",
                                             image_file, "--output", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


# -------------------------------------------------------------------------- 6. messages
@pytest.mark.parametrize("case, expected", [
    ("empty", "checkpoint file is empty (0 bytes)"),
    ("random", "could not be read as a PyTorch checkpoint"),
    ("tensor", "holds a Tensor, not a dict of named tensors; save a dict"),
    ("nan", "NaN or infinite values in 1 tensor(s): transformer.level_embed"),
])
def test_tool_messages_name_the_problem_and_the_fix(case, expected, tmp_path, image_file,
                                                    demo_state_dict, caplog):
    path = tmp_path / "weights.pth"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "random":
        path.write_bytes(b"\x80\x02" + np.random.default_rng(0).bytes(4096))
    elif case == "tensor":
        torch.save(torch.zeros(3), path)
    else:
        sd = dict(demo_state_dict)
        sd["transformer.level_embed"] = sd["transformer.level_embed"] * float("nan")
        torch.save({"model": sd}, path)
    with captured(caplog):
        rc = tool("demo")["main"](["--config-file", DEMO_CONFIG, "--input", image_file,
                                   "--output", str(tmp_path / "out"), "--opts",
                                   *DEMO_TINY, "MODEL.WEIGHTS", str(path)])
    assert rc == 2
    assert expected in caplog.text, caplog.text
    assert "weights_only" not in caplog.text and "''" not in caplog.text
    assert not (tmp_path / "out").exists()


def test_demo_argument_messages(tmp_path, image_file, capsys, caplog):
    demo = tool("demo")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with captured(caplog):
        rc = demo["main"](["--config-file", DEMO_CONFIG, "--input", image_file, "--output",
                           str(a_file), "--opts", "MODEL.WEIGHTS", "x.pth"])
    assert rc == 2 and f"--output {a_file} is a file; give a folder" in caplog.text
    for value in ("nan", "inf", "1.5", "-0.1"):
        with pytest.raises(SystemExit):
            demo["main"](["--config-file", DEMO_CONFIG, "--input", image_file, "--output",
                          str(tmp_path), "--confidence-threshold", value])
        assert "--confidence-threshold: expected a number in [0, 1]" in capsys.readouterr().err


def test_converter_names_a_missing_decoder_layer(tmp_path, capsys):
    sd = synthetic_official("plain")
    for layer in (3, 5):
        incomplete = {k: v for k, v in sd.items()
                      if not k.startswith(f"transformer.decoder.layers.{layer}.")}
        with pytest.raises(CheckpointError, match=rf"lacks decoder layer\(s\) \[{layer}\].*"
                                                  r"6 class heads, one per decoder layer"):
            convert_state_dict(incomplete, "official")
    # An output folder instead of a file is refused before converting.
    assert tool("convert_weights")["main"](["in.pth", str(tmp_path)]) == 1
    assert "is a folder; name the file to write" in capsys.readouterr().err
