"""train_net.py end to end on a tiny COCO-layout dataset: training, 2-process gloo training,
kill and resume, --eval-only; plus the trainer's checks and the safe checkpointer."""
import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_opts
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from PIL import Image

from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import CheckpointError, SafeDetectionCheckpointer, load_torch_file
from deformable_detr.data import DeformableDetrDatasetMapper
from deformable_detr.engine import Trainer, cpu_autocast
from deformable_detr.engine.cpu_autocast import CPUAutocastTrainer
from deformable_detr.engine.model_ema import ModelEMA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/deformable_detr_R_50_50ep.yaml"
# The released config with the tiny model (conftest.TINY), its backbone frozen for speed, on
# ~64 px images, the crop branch kept.
TINY = tiny_opts(
    "MODEL.BACKBONE.FREEZE_AT", "5",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.DETR_CROP.RESIZE_SHORT", "[64]", "INPUT.DETR_CROP.CROP_SIZE_MIN", "32",
    "INPUT.DETR_CROP.CROP_SIZE_MAX", "48", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.STEPS", "()", "TEST.EVAL_PERIOD", "0",
)


# ------------------------------------------------------------------------------ dataset


def write_coco_split(root, split, num_images, seed, categories):
    """Random-noise images with bright rectangles; image 0 has no objects, image 1 a crowd
    box too. COCO json with the given categories."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images, annos = [], []
    for i in range(num_images):
        h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
        arr = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        for k in range(0 if i == 0 else 2):
            x0, y0 = int(rng.integers(0, w - 16)), int(rng.integers(0, h - 16))
            bw, bh = int(rng.integers(8, w - x0)), int(rng.integers(8, h - y0))
            arr[y0:y0 + bh, x0:x0 + bw] = 200 if k == 0 else 120
            annos.append({"id": len(annos) + 1, "image_id": i + 1, "bbox": [x0, y0, bw, bh],
                          "category_id": categories[k % len(categories)]["id"],
                          "area": bw * bh, "iscrowd": int(i == 1 and k == 1)})
        name = f"{i:06d}.jpg"
        Image.fromarray(arr).save(os.path.join(root, f"{split}2017", name))
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    path = os.path.join(root, "annotations", f"instances_{split}2017.json")
    with open(path, "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annos,
                   "categories": categories}, f)
    return path, os.path.join(root, f"{split}2017")


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """$DETECTRON2_DATASETS with coco/{train,val}2017 and coco/annotations: detectron2's
    builtin coco_2017_train / coco_2017_val (80 classes) find it there."""
    root = tmp_path_factory.mktemp("datasets")
    cats = [{"id": c["id"], "name": c["name"], "supercategory": ""}
            for c in COCO_CATEGORIES if c["isthing"]]
    write_coco_split(str(root / "coco"), "train", 6, 0, cats)
    write_coco_split(str(root / "coco"), "val", 3, 1, cats)
    return str(root)


def train_net(args, datasets_root, **popen_kwargs):
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.join(ROOT, "train_net.py"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen_kwargs)


def finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"train_net did not finish in {timeout} s:\n{out[-5000:]}")
    return proc.returncode, out


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_finite_losses(records):
    losses = [r for r in records if "total_loss" in r]
    assert losses, "no training metrics were written"
    for r in losses:
        for k, v in r.items():
            if k.startswith("loss_") or k == "total_loss":
                assert math.isfinite(v), (k, r)


# ------------------------------------------------------------------------ train_net runs


def test_kill_and_resume(tmp_path, datasets_root):
    """A run killed (SIGKILL) after a checkpoint continues from it with --resume and
    finishes; the losses are finite."""
    out = str(tmp_path / "run")
    args = ["--config-file", CONFIG, *TINY, "SOLVER.MAX_ITER", "60",
            "SOLVER.CHECKPOINT_PERIOD", "4", "DATASETS.TEST", "()", "OUTPUT_DIR", out]
    proc = train_net(args, datasets_root)
    last = os.path.join(out, "last_checkpoint")
    deadline = time.time() + 300
    ckpt = ""
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(last):
            with open(last) as f:
                ckpt = f.read().strip()
            if ckpt:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "train_net ended before it could be killed:\n" + finish(proc)[1]
    proc.send_signal(signal.SIGKILL)
    _, log1 = finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.startswith("model_") and not os.path.exists(os.path.join(out, "model_final.pth"))
    k = int(ckpt[len("model_"):-len(".pth")])
    # Checkpoints are renamed into place once written: a kill mid-write leaves at most a .tmp.
    for name in os.listdir(out):
        if name.endswith(".pth"):
            load_torch_file(os.path.join(out, name))
    state = load_torch_file(os.path.join(out, ckpt))
    # Everything a run needs to continue: iteration, lr schedule and the AdamW moments.
    trainer_state = state["trainer"]
    assert state["iteration"] == trainer_state["iteration"] == k
    assert trainer_state["hooks"]["LRScheduler"]["last_epoch"] == k + 1
    assert len(trainer_state["_trainer"]["optimizer"]["state"]) > 0
    n_before = len(metrics(out)) if os.path.exists(os.path.join(out, "metrics.json")) else 0

    rc, log2 = finish(train_net([*args[:2], "--resume", *args[2:]], datasets_root))
    assert rc == 0, log2[-5000:]
    assert f"Loading from {os.path.join(out, ckpt)}" in log2 or os.path.join(out, ckpt) in log2
    assert f"Starting training from iteration {k + 1}" in log2, log2[-3000:]
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    resumed = [r for r in metrics(out)[n_before:] if "iteration" in r]
    assert resumed and min(r["iteration"] for r in resumed) > k
    assert max(r["iteration"] for r in resumed) == 59
    assert_finite_losses(resumed)


def test_two_process_gloo_training(tmp_path, datasets_root):
    out = str(tmp_path / "ddp")
    # Two images per worker: with one, TINY's GroupNorm(32) over 32 channels sees a single
    # value per group whenever a random crop makes the last level 1x1, which torch refuses in
    # training (the published hidden_dim 256 has 8 channels per group and never hits this).
    rc, log = finish(train_net(
        ["--num-gpus", "2", "--dist-url", "auto", "--config-file", CONFIG, *TINY,
         "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100",
         "DATASETS.TEST", "()", "OUTPUT_DIR", out], datasets_root))
    assert rc == 0, log[-5000:]
    assert "World size: 2" in log, log[-5000:]
    assert os.path.exists(os.path.join(out, "model_final.pth")), log[-5000:]
    assert_finite_losses(metrics(out))


def test_eval_only_uses_model_weights(tmp_path, datasets_root, monkeypatch):
    """--eval-only with MODEL.WEIGHTS: the detections written by COCOEvaluator are those of
    the saved model (random weights never match them)."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIG))
    cfg.merge_from_list(TINY)
    torch.manual_seed(123)
    model = build_model(cfg).eval()
    weights = str(tmp_path / "weights.pth")
    torch.save({"model": model.state_dict()}, weights)
    out = str(tmp_path / "eval")
    rc, log = finish(train_net(["--eval-only", "--config-file", CONFIG, *TINY,
                                "MODEL.WEIGHTS", weights, "OUTPUT_DIR", out], datasets_root))
    assert rc == 0, log[-5000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    with open(os.path.join(out, "inference", "coco_instances_results.json")) as f:
        results = json.load(f)

    # Expected: the same model in this process, on the mapped val images.
    val_json = os.path.join(datasets_root, "coco", "annotations", "instances_val2017.json")
    with open(val_json) as f:
        images = json.load(f)["images"]
    cat_ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    mapper = DeformableDetrDatasetMapper(cfg, is_train=False)
    for img in images:
        d = mapper({"file_name": os.path.join(datasets_root, "coco", "val2017",
                                              img["file_name"]),
                    "height": img["height"], "width": img["width"], "image_id": img["id"]})
        with torch.no_grad():
            inst = model([d])[0]["instances"]
        got = sorted((r for r in results if r["image_id"] == img["id"]),
                     key=lambda r: -r["score"])
        assert len(got) == len(inst) == 100
        np.testing.assert_allclose([r["score"] for r in got],
                                   inst.scores.sort(descending=True).values.numpy(), atol=1e-5)
        for i in range(10):
            x0, y0, x1, y1 = inst.pred_boxes.tensor[i].tolist()
            cid = cat_ids[int(inst.pred_classes[i])]
            score = float(inst.scores[i])
            assert any(r["category_id"] == cid and abs(r["score"] - score) < 1e-5
                       and np.allclose(r["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=1e-3)
                       for r in got), (img["id"], i)


# ----------------------------------------------------------------------- trainer checks


@contextlib.contextmanager
def registered_three_classes(root, name: str):
    """A 3-image COCO split of the classes a, b, c under ``root``, registered as ``name``
    while the context lasts."""
    cats = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate("abc")]
    json_file, image_root = write_coco_split(str(root), "train", 3, 0, cats)
    register_coco_instances(name, {}, json_file, image_root)
    try:
        yield name
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.fixture
def three_class_dataset(tmp_path):
    with registered_three_classes(tmp_path, "test_training_three_classes") as name:
        yield name


def tiny_cfg(tmp_path, dataset, opts=()):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, CONFIG))
    cfg.merge_from_list(TINY + ["DATASETS.TRAIN", (dataset,), "DATASETS.TEST", (dataset,),
                                "OUTPUT_DIR", str(tmp_path / "out"), *opts])
    return cfg


def test_num_classes_mismatch_is_reported(tmp_path, three_class_dataset):
    cfg = tiny_cfg(tmp_path, three_class_dataset, ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "5"])
    with pytest.raises(ValueError, match=r"NUM_CLASSES is 5 .*'test_training_three_classes' "
                                         r"has 3 classes"):
        Trainer(cfg)
    with pytest.raises(ValueError, match="has 3 classes"):
        Trainer.build_test_loader(cfg, three_class_dataset)


def test_trainer_steps_in_process(tmp_path, three_class_dataset):
    """The trainer's pieces together: our optimizer and groups, finite losses, lr schedule."""
    cfg = tiny_cfg(tmp_path, three_class_dataset,
                   ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "MODEL.BACKBONE.FREEZE_AT", "4",
                    "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
                    "DATASETS.TEST", ()])
    trainer = Trainer(cfg)
    opt = trainer.optimizer
    assert {g["name"] for g in opt.param_groups} == {"backbone", "linear_proj", "base"}
    assert type(opt).__name__ == "AdamWWithFullModelGradientClip"
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # the iteration after the last one
    losses = trainer.storage.latest()
    assert math.isfinite(losses["total_loss"][0])

    # A resumed trainer gets the optimizer state (AdamW moments), the lr schedule and the
    # iteration back from the last checkpoint (model_final.pth).
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == cfg.SOLVER.MAX_ITER
    assert resumed.scheduler.last_epoch == trainer.scheduler.last_epoch
    a, b = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["state"].keys() == b["state"].keys() and len(a["state"]) > 0
    for i, st in a["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(b["state"][i][key], st[key], rtol=0, atol=0)


def test_amp_trainer_class(monkeypatch):
    keys = {"amp_key": "SOLVER.AMP.ENABLED", "device_key": "MODEL.DEVICE"}
    monkeypatch.setattr(cpu_autocast, "cpu_has_native_bfloat16", lambda: True)
    assert cpu_autocast.trainer_class(False, "cuda", **keys) is SimpleTrainer
    assert cpu_autocast.trainer_class(True, "cuda:1", **keys) is AMPTrainer
    assert cpu_autocast.trainer_class(True, "cpu", **keys) is CPUAutocastTrainer
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED .* MODEL.DEVICE 'mps'"):
        cpu_autocast.trainer_class(True, "mps", **keys)


def test_cpu_amp_is_refused_without_bfloat16_instructions(tmp_path, three_class_dataset,
                                                          monkeypatch):
    monkeypatch.setattr(cpu_autocast, "cpu_has_native_bfloat16", lambda: False)
    cfg = tiny_cfg(tmp_path, three_class_dataset,
                   ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "SOLVER.AMP.ENABLED", "True"])
    with pytest.raises(ValueError, match=r"SOLVER.AMP.ENABLED on the CPU .* no bfloat16 "
                                         r"instructions"):
        Trainer(cfg)


def test_cpu_amp_trains(tmp_path, three_class_dataset, monkeypatch):
    """SOLVER.AMP.ENABLED with MODEL.DEVICE cpu: the bfloat16 autocast trainer, resumable.
    (Where the CPU lacks bfloat16 instructions it is emulated: slower, the same results.)"""
    monkeypatch.setattr(cpu_autocast, "cpu_has_native_bfloat16", lambda: True)
    cfg = tiny_cfg(tmp_path, three_class_dataset,
                   ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "SOLVER.AMP.ENABLED", "True",
                    "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "100",
                    "DATASETS.TEST", ()])
    trainer = Trainer(cfg)
    assert type(trainer._trainer) is CPUAutocastTrainer
    trainer.train()
    assert trainer.iter == 2 and math.isfinite(trainer.storage.latest()["total_loss"][0])
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2


@pytest.mark.parametrize("dtype, rtol, min_cos", [(torch.bfloat16, 0.01, 0.999),
                                                   (torch.float16, 0.002, 0.9999)])
def test_cpu_autocast_step_against_float32(tmp_path, three_class_dataset, dtype, rtol, min_cos):
    """One step of CPUAutocastTrainer against SimpleTrainer's float32 step on the same weights
    and batch (no dropout): every trainable linear layer and convolution computes in the
    autocast dtype (float32 without autocast), parameters and gradients stay float32, and the
    losses and gradients are the float32 ones to the dtype's rounding (bfloat16 keeps 8
    significant bits, float16 11)."""
    cfg = tiny_cfg(tmp_path, three_class_dataset, ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3",
                                                   "MODEL.DEFORMABLE_DETR.DROPOUT", "0.0"])
    torch.manual_seed(0)
    models = [build_model(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    seed_all_rng(0)  # the loader's order and augmentation
    batch = next(iter(Trainer.build_train_loader(cfg)))
    results = []
    for model, amp in zip(models, (False, True)):
        dtypes, losses = set(), []
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.requires_grad:
                m.register_forward_hook(lambda m, i, o, dtypes=dtypes: dtypes.add(o.dtype))
        model.register_forward_hook(lambda m, i, o, losses=losses: losses.append(
            {k: float(v.detach()) for k, v in o.items()}))
        # lr 0: run_step's update leaves the weights, and the gradients stay readable.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        trainer = (CPUAutocastTrainer(model, [batch], optimizer, dtype=dtype) if amp
                   else SimpleTrainer(model, [batch], optimizer))
        with EventStorage(0):
            trainer.run_step()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(g.dtype == torch.float32 for g in grads.values())
        results.append((dtypes, losses[0], grads))
    (dtypes32, losses32, grads32), (dtypes16, losses16, grads16) = results
    assert dtypes32 == {torch.float32} and dtypes16 == {dtype}
    assert losses16.keys() == losses32.keys()
    for k in losses32:
        assert losses16[k] == pytest.approx(losses32[k], rel=rtol), k
    assert grads16.keys() == grads32.keys()
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    g16 = torch.cat([grads16[n].flatten() for n in grads32])
    assert not torch.equal(g16, g32)  # autocast changed the arithmetic
    cos = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cos > min_cos and (g16.norm() / g32.norm() - 1).abs() < rtol, (cos, g16.norm(),
                                                                          g32.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_training_on_cuda(tmp_path, three_class_dataset):
    cfg = tiny_cfg(tmp_path, three_class_dataset,
                   ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "MODEL.DEVICE", "cuda",
                    "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "3",
                    "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", ()])
    trainer = Trainer(cfg)
    trainer.train()
    assert math.isfinite(trainer.storage.latest()["total_loss"][0])


# ------------------------------------------------------------------------- checkpointer


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpointer_refuses_pickled_code(tmp_path):
    marker = tmp_path / "ran"
    model = torch.nn.Linear(2, 2)
    ckpt = SafeDetectionCheckpointer(model)
    for name in ("evil.pkl", "evil.pth"):
        path = tmp_path / name
        with open(path, "wb") as f:
            if name.endswith(".pkl"):
                pickle.dump({"model": {"weight": Evil(marker)}, "__author__": "x"}, f)
            else:
                torch.save({"model": {"weight": Evil(marker)}}, f)
        with pytest.raises(CheckpointError, match="refused"):
            ckpt.load(str(path))
        assert not marker.exists()


def test_checkpointer_reads_model_zoo_pickles_and_reports_bad_files(tmp_path):
    src = torch.nn.Linear(3, 2)
    path = tmp_path / "weights.pkl"
    with open(path, "wb") as f:  # detectron2 model-zoo format: numpy arrays
        pickle.dump({"model": {k: v.detach().numpy() for k, v in src.state_dict().items()},
                     "__author__": "test"}, f)
    dst = torch.nn.Linear(3, 2)
    SafeDetectionCheckpointer(dst).load(str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v, rtol=0, atol=0)

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="bad.pth"):
        SafeDetectionCheckpointer(dst).load(str(bad))
    bad_pkl = tmp_path / "bad.pkl"
    bad_pkl.write_bytes(pickle.dumps({"model": {}})[:-3])
    with pytest.raises(CheckpointError, match="bad.pkl"):
        SafeDetectionCheckpointer(dst).load(str(bad_pkl))


def test_model_ema_averages_weights_and_resumes(tmp_path, three_class_dataset):
    """MODEL_EMA: the final model is the float64 EMA (with warmup) of the weights after each
    optimizer step; an evaluation in between sees the average and leaves the weights; a
    checkpoint stores the average and a resumed trainer continues it."""
    decay, warmup = 0.7, 2
    cfg = tiny_cfg(tmp_path, three_class_dataset,
                   ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "MODEL.BACKBONE.FREEZE_AT", "4",
                    "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2",
                    "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", str(decay),
                    "MODEL_EMA.WARMUP_ITERS", str(warmup), "DATASETS.TEST", ()])
    trainer = Trainer(cfg)

    class Record(HookBase):
        """Runs before every other hook: the weights right after each optimizer step."""

        def __init__(self):
            self.states = []

        def _record(self):
            sd = trainer.model.state_dict()
            self.states.append({k: v.detach().double().clone() for k, v in sd.items()})

        def before_train(self):
            self._record()

        def after_step(self):
            self._record()

    record = Record()
    trainer.register_hooks([record])
    trainer._hooks.insert(0, trainer._hooks.pop())
    trainer.train()

    expected = dict(record.states[0])
    for n, state in enumerate(record.states[1:], start=1):
        d = decay * (1 - math.exp(-n / warmup))
        expected = {k: d * expected[k] + (1 - d) * v if v.is_floating_point() else v
                    for k, v in state.items()}
    final = trainer.model.state_dict()
    moved = 0
    for k, v in final.items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(v.double(), record.states[-1][k]))
    assert moved > 0, "the final weights are the last step's, not the average"

    # model_final.pth: the average as the model and as the hook's state.
    saved = load_torch_file(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    for k, v in saved["trainer"]["hooks"]["ModelEMA"]["average"].items():
        torch.testing.assert_close(v, final[k].cpu(), rtol=0, atol=0)
    assert saved["trainer"]["hooks"]["ModelEMA"]["updates"] == 3

    # Resuming from the checkpoint of iteration 2 continues the average of 2 updates.
    ckpt = os.path.join(cfg.OUTPUT_DIR, "model_0000001.pth")
    assert os.path.isfile(ckpt)
    with open(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    ema = next(h for h in resumed._hooks if isinstance(h, ModelEMA))
    ema.before_train()
    assert ema.updates == 2
    mid = load_torch_file(ckpt)["trainer"]["hooks"]["ModelEMA"]["average"]
    own = {k: v.detach().clone() for k, v in resumed.model.state_dict().items()}
    with ema.applied():
        for k, v in resumed.model.state_dict().items():
            torch.testing.assert_close(v.cpu(), mid[k], rtol=0, atol=0)
    for k, v in resumed.model.state_dict().items():
        torch.testing.assert_close(v, own[k], rtol=0, atol=0)


@pytest.mark.parametrize("key,value", [("DECAY", "1.0"), ("DECAY", "-0.1"),
                                       ("WARMUP_ITERS", "-1")])
def test_model_ema_bad_config_is_named(tmp_path, three_class_dataset, key, value):
    cfg = tiny_cfg(tmp_path, three_class_dataset,
                   ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "MODEL_EMA.ENABLED", "True",
                    f"MODEL_EMA.{key}", value])
    with pytest.raises(ValueError, match=f"MODEL_EMA.{key}"):
        Trainer(cfg)


def test_model_ema_refuses_an_average_of_another_model():
    class FakeTrainer:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))

    hook = ModelEMA(0.9)
    hook.trainer = FakeTrainer()
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5)).state_dict()
    hook.load_state_dict({"average": other, "updates": 7})
    with pytest.raises(CheckpointError, match=r"MODEL_EMA average does not fit.*0\.weight"):
        hook.before_train()
    with pytest.raises(CheckpointError, match="'average' and 'updates'"):
        hook.load_state_dict({"updates": 7})
    # A fitting one is taken, and the average moves toward the weights.
    hook.load_state_dict({"average": {k: torch.zeros_like(v) for k, v in
                                      FakeTrainer.model.state_dict().items()}, "updates": 7})
    hook.before_train()
    assert hook.updates == 7
    hook.update()
    w = FakeTrainer.model[0].weight.detach().clone()
    with hook.applied():
        torch.testing.assert_close(FakeTrainer.model[0].weight.detach(), 0.1 * w)
    torch.testing.assert_close(FakeTrainer.model[0].weight.detach(), w)
