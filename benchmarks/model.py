#!/usr/bin/env python
"""Time the whole Deformable DETR model with the compiled attention op against the PyTorch path.

Models are built from the shipped configs in ``configs/`` with random weights (no downloads:
``MODEL.WEIGHTS ""``), once with ``MODEL.DEFORMABLE_DETR.ATTN_IMPL compiled`` and once with
``pytorch``; the PyTorch model gets the compiled model's weights, so both compute the same
function. Measured, in the same run:

- inference: seconds per image, ``model([{"image": uint8 [3, H, W]}])`` at batch 1 in
  ``eval()`` mode (preprocessing, backbone, transformer, top-k and ``detector_postprocess``);
- training: seconds per iteration (forward with losses, backward, optimizer step with the
  project's ``deformable_detr.solver.build_optimizer``, i.e. AdamW with global-norm
  clipping) at batch ``--train-batch`` with a few random target boxes per image;
- where inference time goes: backbone, multi-scale adapter, encoder, decoder, the rest
  (position encoding, two-stage proposals, heads, post-processing), and the share of the
  ``MSDeformAttn`` modules (their linear layers included) in encoder + decoder.

Repeats of the two implementations are interleaved (compiled, PyTorch, compiled, ...) after
one warm-up each, so a change of load on a shared machine hits both alike; the table gives
medians and the ratio PyTorch / compiled (> 1: the compiled op is faster).

    python benchmarks/model.py [--variants plain box_refine two_stage single_scale dc5]
        [--train-variants plain] [--repeats 3] [--size 800 1333] [--threads N]
        [--device cpu|cuda] [--train/--no-train] [--train-batch 1]
"""
import argparse
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from deformable_detr import add_deformable_detr_config
from deformable_detr.layers import MSDeformAttn, has_compiled_op

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
#: Benchmark variant -> shipped config.
VARIANTS = {
    "plain": "deformable_detr_R_50_50ep.yaml",
    "box_refine": "deformable_detr_R_50_box_refine_50ep.yaml",
    "two_stage": "deformable_detr_R_50_two_stage_50ep.yaml",
    "single_scale": "deformable_detr_R_50_single_scale_50ep.yaml",
    "dc5": "deformable_detr_R_50_single_scale_dc5_50ep.yaml",
}
IMPLS = ("compiled", "pytorch")
#: Target boxes per training image.
NUM_TARGET_BOXES = 5
#: Inference stages timed by forward hooks, as (label, attribute path in the model).
STAGES = (
    ("backbone", "backbone"),
    ("adapter", "adapter"),
    ("encoder", "transformer.encoder"),
    ("decoder", "transformer.decoder"),
)


def build(variant, impl, device):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(CONFIG_DIR / VARIANTS[variant]))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device,
                         "MODEL.DEFORMABLE_DETR.ATTN_IMPL", impl])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def build_optimizer(cfg, model):
    try:
        from deformable_detr.solver import build_optimizer as project_optimizer
    except ImportError:  # the project's solver is optional here
        return torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR,
                                 weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return project_optimizer(cfg, model)


def make_inputs(size, batch, num_classes, with_instances, seed=0):
    """``batch`` detectron2 inputs: deterministic random uint8 RGB images [3, H, W] and, for
    training, ``NUM_TARGET_BOXES`` random boxes (xyxy pixels, 10-40 % of the image per side)
    with random classes."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(batch):
        x = {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        if with_instances:
            xy0 = torch.rand(NUM_TARGET_BOXES, 2, generator=g) * 0.6
            wh = 0.1 + torch.rand(NUM_TARGET_BOXES, 2, generator=g) * 0.3
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(torch.cat([xy0, xy0 + wh], 1) * torch.tensor([w, h, w, h]))
            inst.gt_classes = torch.randint(0, num_classes, (NUM_TARGET_BOXES,), generator=g)
            x["instances"] = inst
        inputs.append(x)
    return inputs


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Wall time per inference stage, from forward pre-hooks and hooks (the device is
    synchronised at each boundary, so on CUDA the times are those of the stage's kernels).

    ``MSDeformAttn`` modules are summed into "attention"; nested stages are not subtracted
    (the attention time is part of the encoder and decoder times).
    """

    def __init__(self, model, device):
        self.device = device
        self.times = defaultdict(list)  # stage -> seconds, one entry per forward
        self._current = defaultdict(float)
        self._handles = []
        modules = [(label, model.get_submodule(path)) for label, path in STAGES]
        modules += [("attention", m) for m in model.modules() if isinstance(m, MSDeformAttn)]
        for label, module in modules:
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop(label)))
        self._starts = {}

    def _start(self, module, args):
        sync(self.device)
        self._starts[id(module)] = time.perf_counter()

    def _stop(self, label):
        def hook(module, args, output):
            sync(self.device)
            self._current[label] += time.perf_counter() - self._starts.pop(id(module))
        return hook

    def end_forward(self):
        for label, t in self._current.items():
            self.times[label].append(t)
        self._current.clear()

    def medians(self):
        return {label: statistics.median(t) for label, t in self.times.items()}

    def remove(self):
        for h in self._handles:
            h.remove()


def run_inference(model, inputs, device):
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(inputs)
    sync(device)
    return time.perf_counter() - t0, out


def run_train_step(model, optimizer, inputs, device):
    sync(device)
    t0 = time.perf_counter()
    losses = model(inputs)
    total = sum(losses.values())
    if not torch.isfinite(total):
        values = {k: float(v) for k, v in losses.items()}
        raise FloatingPointError(f"non-finite training loss: {values}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - t0


def bench_inference(variant, args):
    models = {}
    for impl in IMPLS:
        cfg, models[impl] = build(variant, impl, args.device)
        models[impl].eval()
    models["pytorch"].load_state_dict(models["compiled"].state_dict())
    inputs = make_inputs(args.size, 1, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, False)

    # Warm-up; also a check that both paths compute the same detections.
    scores = {}
    for impl, model in models.items():
        _, out = run_inference(model, inputs, args.device)
        scores[impl] = out[0]["instances"].scores.sort().values
    n = min(len(scores["compiled"]), len(scores["pytorch"]))
    score_diff = (scores["compiled"][:n] - scores["pytorch"][:n]).abs().max().item()

    timers = {impl: StageTimer(model, args.device) for impl, model in models.items()}
    times = defaultdict(list)
    for _ in range(args.repeats):
        for impl, model in models.items():
            t, _ = run_inference(model, inputs, args.device)
            times[impl].append(t)
            timers[impl].end_forward()
    stages = {}
    for impl, timer in timers.items():
        stages[impl] = timer.medians()
        timer.remove()
    return {impl: statistics.median(t) for impl, t in times.items()}, stages, score_diff


def bench_training(variant, args):
    models, optimizers = {}, {}
    for impl in IMPLS:
        cfg, models[impl] = build(variant, impl, args.device)
        models[impl].train()
    models["pytorch"].load_state_dict(models["compiled"].state_dict())
    for impl, model in models.items():
        optimizers[impl] = build_optimizer(cfg, model)
    inputs = make_inputs(args.size, args.train_batch, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES,
                         True)
    for impl, model in models.items():  # warm-up
        run_train_step(model, optimizers[impl], inputs, args.device)
    times = defaultdict(list)
    for _ in range(args.repeats):
        for impl, model in models.items():
            times[impl].append(run_train_step(model, optimizers[impl], inputs, args.device))
    return {impl: statistics.median(t) for impl, t in times.items()}


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["plain", "box_refine", "two_stage"],
                        choices=list(VARIANTS), help="variants timed at inference")
    parser.add_argument("--train-variants", nargs="*", choices=list(VARIANTS),
                        help="variants timed in training (default: --variants)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="also time training iterations")
    parser.add_argument("--train-batch", type=int, default=1, choices=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.size) < 32:
        parser.error(f"--size must be at least 32x32 (stride-32 backbone), got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if not has_compiled_op(args.device):
        parser.error(f"the compiled op has no {args.device} kernel: build the extension "
                     "(`pip install -e .`) first")
    train_variants = args.train_variants if args.train_variants is not None else args.variants
    if not args.train:
        train_variants = []
    torch.set_num_threads(args.threads)

    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU, {args.threads} threads")
    h, w = args.size
    print(f"### {name} (torch {torch.__version__}, float32, {h}x{w}, random weights, "
          f"median of {args.repeats} after 1 warm-up)\n")
    print(f"load average (1, 5, 15 min) at start: {load_average()}\n", flush=True)

    rows, stage_rows = [], []
    for variant in args.variants:
        t, stages, score_diff = bench_inference(variant, args)
        rows.append(f"| {variant} | inference, batch 1 | {t['compiled']:.3f} | "
                    f"{t['pytorch']:.3f} | {t['pytorch'] / t['compiled']:.2f}x |")
        print(rows[-1] + f"  <!-- max |score diff| {score_diff:.1e} -->", flush=True)
        for impl in IMPLS:
            s = stages[impl]
            other = t[impl] - sum(s[label] for label, _ in STAGES)
            attn_share = s["attention"] / (s["encoder"] + s["decoder"])
            stage_rows.append(
                f"| {variant} | {impl} | {t[impl]:.3f} | "
                + " | ".join(f"{s[label]:.3f}" for label, _ in STAGES)
                + f" | {other:.3f} | {s['attention']:.3f} ({attn_share:.0%}) |"
            )
    for variant in train_variants:
        t = bench_training(variant, args)
        rows.append(f"| {variant} | training, batch {args.train_batch} | {t['compiled']:.3f} | "
                    f"{t['pytorch']:.3f} | {t['pytorch'] / t['compiled']:.2f}x |")
        print(rows[-1], flush=True)

    print("\n| variant | pass | compiled s | PyTorch s | PyTorch / compiled |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    if stage_rows:
        print("\nWhere inference time goes (seconds, medians; 'attention' = all MSDeformAttn "
              "modules, share of encoder + decoder):\n")
        print("| variant | impl | total | " + " | ".join(label for label, _ in STAGES)
              + " | rest | attention |")
        print("|---" * (len(STAGES) + 5) + "|")
        print("\n".join(stage_rows))
    print(f"\nload average (1, 5, 15 min) at end: {load_average()}")


if __name__ == "__main__":
    main()
