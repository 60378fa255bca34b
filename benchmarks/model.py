#!/usr/bin/env python
"""Time the whole Deformable DETR model with the compiled attention op against the PyTorch path
(and, on the CPU, against the exported ONNX model in onnxruntime; and against Hugging Face
transformers' implementation).

Models are built from the shipped configs in ``configs/`` (the variant table
``deformable_detr.checkpoint.VARIANTS``) with random weights (no downloads:
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

On CUDA (``--device cuda``) every timed call ends with ``torch.cuda.synchronize()``, so the
times are those of the device work (plus the host overhead it could not hide). ``--amp``
times the same passes under mixed precision too: inference under
``torch.autocast("cuda", dtype=--amp-dtype)``, training with autocast and, for float16,
``torch.amp.GradScaler`` (as detectron2's AMPTrainer). ``--batches`` sets the inference
batch sizes, ``--impls compiled`` leaves the PyTorch path out, ``--no-stages`` the per-stage
breakdown (its hooks synchronise at every stage boundary, which on CUDA adds launch gaps to
the totals), and ``--json`` writes every number for ``benchmarks/gpu_check.py``.

``--impls ... onnxruntime`` (CPU, inference only) exports the first model with
``deformable_detr.export`` (ONNX, portable attention: gathers, standard operators) and times
``OnnxPredictor.predict_batch``: padding, ``InferenceSession.run`` with ``--threads``
intra-op threads, top-k and ``detector_postprocess``, i.e. what the eager call does minus
normalisation (which is inside the graph). Needs the ``export`` extra (onnx, onnxruntime,
onnxscript).

On the CPU each implementation runs with the allocator its users get
(``--cpu-memory-cache ours``, the default): our models with the huge-page cache of
``deformable_detr.utils.cpu_memory`` (our predictor, tools and trainer turn it on), the others
(onnxruntime, Hugging Face) with PyTorch's allocator; ``all`` gives every implementation the
cache, ``off`` none.

``--impls ... huggingface`` (inference only) times transformers'
``DeformableDetrForObjectDetection`` built for the same variant in the published
configuration (300 queries, 4 levels or 1 for single-scale, 6 + 6 layers, d_model 256, FFN
1024, 8 heads, 4 points, the variant's box refinement / two-stage, ``num_labels`` = our
classes) on transformers' own ResNet-50 (``use_timm_backbone=False``, stride in the 3x3 conv
as torchvision's), random weights (``HF_HUB_OFFLINE=1``: nothing is downloaded), ``eval()``,
the same threads and device, interleaved with the other implementations' repeats. What each
call times:

- ours: ``model([{"image": uint8 [3, H, W]}] * batch)``, i.e. normalisation, batching
  (zero-padding to the largest image: none here, all images are H x W), backbone,
  transformer, heads, top-k and ``detector_postprocess``;
- huggingface: ``model(pixel_values=float [batch, 3, H, W], pixel_mask=long [batch, H, W])``
  then ``DeformableDetrImageProcessor.post_process_object_detection(outputs, threshold=0,
  target_sizes, top_k=TEST.DETECTIONS_PER_IMAGE)`` (sigmoid, top-k, boxes to pixels),
  wrapped in ``Instances``. ``pixel_values`` is our model's normalised batch (the same
  tensor ours builds), made in the untimed warm-up call: HF's image processor (resize,
  normalise, pad, on the host) is not timed, so HF's time lacks the normalisation that ours
  includes (a few ms on the CPU at 800x1333). DC5 is not offered (transformers' own ResNet
  has no dilation).

Its table column is HF / ours: HF's seconds over the compiled op's (the PyTorch path's when
``compiled`` is not timed); > 1: ours is faster. Needs ``transformers``.

    python benchmarks/model.py [--variants plain box_refine two_stage single_scale dc5]
        [--train-variants plain] [--repeats 3] [--size 800 1333] [--threads N]
        [--device cpu|cuda] [--train/--no-train] [--train-batch 1] [--batches 1 4]
        [--amp off|on|both] [--amp-dtype float16|bfloat16]
        [--impls compiled pytorch onnxruntime huggingface]
        [--stages/--no-stages] [--json results.json]
"""
import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import VARIANTS
from deformable_detr.layers import MSDeformAttn, has_compiled_op
from deformable_detr.solver import build_optimizer
from deformable_detr.utils.cpu_memory import disable_cpu_memory_cache, enable_cpu_memory_cache

# transformers (--impls huggingface) builds its model from a config: nothing to download.
os.environ["HF_HUB_OFFLINE"] = "1"

ROOT = Path(__file__).resolve().parents[1]
#: Short names accepted by --variants.
VARIANT_ALIASES = {"dc5": "single_scale_dc5"}
IMPLS = ("compiled", "pytorch", "onnxruntime", "huggingface")
#: --impls default: the project's own implementations.
DEFAULT_IMPLS = ("compiled", "pytorch", "onnxruntime")
#: Implementations that are PyTorch models (trainable, with stage hooks).
TORCH_IMPLS = ("compiled", "pytorch")
#: Target boxes per training image.
NUM_TARGET_BOXES = 5
#: Inference stages timed by forward hooks, as (label, attribute path in the model).
STAGES = (
    ("backbone", "backbone"),
    ("adapter", "adapter"),
    ("encoder", "transformer.encoder"),
    ("decoder", "transformer.decoder"),
)


#: --amp-dtype values.
AMP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def build(variant, impl, device):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(ROOT / VARIANTS[variant].config_file))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", device,
                         "MODEL.DEFORMABLE_DETR.ATTN_IMPL", impl])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


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


def set_cpu_memory_cache(impl, args):
    """Each implementation with the CPU allocator its users get (``--cpu-memory-cache``):
    "ours" turns on ``deformable_detr.utils.cpu_memory``'s cache for our models (as our
    predictor, tools and trainer do) and off for the others (PyTorch's allocator), "all" on for
    every implementation, "off" off for all."""
    if args.device != "cpu":
        return
    mode = args.cpu_memory_cache
    if mode == "all" or (mode == "ours" and impl in TORCH_IMPLS):
        enable_cpu_memory_cache()
    else:
        disable_cpu_memory_cache()


def autocast(device, amp_dtype):
    """Mixed precision for the forward when ``amp_dtype`` is set, else nothing."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=amp_dtype)


def run_inference(model, inputs, device, amp_dtype=None):
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, amp_dtype):
        out = model(inputs)
    sync(device)
    return time.perf_counter() - t0, out


def run_train_step(model, optimizer, inputs, device, amp_dtype=None, scaler=None):
    """One iteration; under AMP the forward runs in autocast and, with a ``scaler``
    (float16), the loss is scaled and ``scaler.step`` unscales before the optimizer's
    clipping, as detectron2's AMPTrainer does."""
    sync(device)
    t0 = time.perf_counter()
    with autocast(device, amp_dtype):
        losses = model(inputs)
    total = sum(losses.values())
    if not torch.isfinite(total):
        values = {k: float(v) for k, v in losses.items()}
        raise FloatingPointError(f"non-finite training loss: {values}")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - t0


class OnnxRuntimeModel:
    """The first model exported to ONNX (portable attention) and run by onnxruntime, called
    like the eager model: ``model(inputs)`` -> ``[{"instances": Instances}]``."""

    def __init__(self, cfg, model, threads):
        from deformable_detr.export import OnnxPredictor, export_model, predictor_metadata

        self._dir = tempfile.TemporaryDirectory(prefix="bench_onnx_")
        t0 = time.perf_counter()
        path = export_model(model.eval(), self._dir.name, format="onnx",
                            metadata=predictor_metadata(cfg))
        print(f"exported to ONNX in {time.perf_counter() - t0:.0f} s "
              f"({os.path.getsize(path) / 2**20:.0f} MiB)", flush=True)
        self.predictor = OnnxPredictor(path, num_threads=threads)

    def eval(self):
        return self

    def __call__(self, inputs):
        inputs = [dict(x, height=x["image"].shape[-2], width=x["image"].shape[-1])
                  for x in inputs]
        return [{"instances": r} for r in self.predictor.predict_batch(inputs)]


class HuggingFaceModel:
    """transformers' ``DeformableDetrForObjectDetection`` for ``variant`` with the sizes of
    our ``cfg`` (the published ones in the shipped configs), random weights, ``eval()``;
    called like ours: ``model(inputs)`` -> ``[{"instances": Instances}]``.

    The input is made by ``reference.preprocess_image`` (our model's normalisation and
    padding) at the first call with a new ``inputs`` list (the untimed warm-up) and reused by
    later calls, so the timed calls run only HF's forward and post-processing (see the
    module docstring).
    """

    def __init__(self, cfg, variant, reference):
        import transformers

        v = VARIANTS[variant]  # not DC5: transformers' own ResNet has no dilation
        d = cfg.MODEL.DEFORMABLE_DETR
        backbone = transformers.ResNetConfig(  # ResNet-50 (the defaults), res3..res5 or res5
            out_features=["stage2", "stage3", "stage4"] if v.num_feature_levels > 1
            else ["stage4"])
        self.config = transformers.DeformableDetrConfig(
            use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
            num_labels=d.NUM_CLASSES, d_model=d.HIDDEN_DIM, num_queries=d.NUM_QUERIES,
            two_stage_num_proposals=d.NUM_QUERIES, num_feature_levels=d.NUM_FEATURE_LEVELS,
            encoder_layers=d.ENC_LAYERS, decoder_layers=d.DEC_LAYERS,
            encoder_attention_heads=d.NHEADS, decoder_attention_heads=d.NHEADS,
            encoder_ffn_dim=d.DIM_FEEDFORWARD, decoder_ffn_dim=d.DIM_FEEDFORWARD,
            encoder_n_points=d.ENC_N_POINTS, decoder_n_points=d.DEC_N_POINTS,
            with_box_refine=v.with_box_refine, two_stage=v.two_stage,
        )
        torch.manual_seed(0)
        self.model = transformers.DeformableDetrForObjectDetection(self.config)
        self.model.to(cfg.MODEL.DEVICE).eval()
        self.processor = transformers.DeformableDetrImageProcessor()
        self.top_k = cfg.TEST.DETECTIONS_PER_IMAGE
        self.reference = reference
        self._inputs = self._prepared = None

    def describe(self):
        c = self.config
        return (f"huggingface: transformers DeformableDetrForObjectDetection, ResNet-50, "
                f"{c.num_queries} queries, {c.num_feature_levels} levels, "
                f"{c.encoder_layers}+{c.decoder_layers} layers, d_model {c.d_model}, "
                f"FFN {c.encoder_ffn_dim}, {c.encoder_attention_heads} heads, "
                f"{c.encoder_n_points}/{c.decoder_n_points} points, "
                f"box refine {c.with_box_refine}, two-stage {c.two_stage}, "
                f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f} M parameters")

    def eval(self):
        return self

    def _prepare(self, inputs):
        """(pixel_values float [N, 3, Hp, Wp], pixel_mask long [N, Hp, Wp] (1: image),
        target sizes [(h, w)] * N) of our model's padded batch."""
        with torch.no_grad():
            images = self.reference.preprocess_image(inputs)
        mask = torch.zeros(images.tensor[:, 0].shape, dtype=torch.long,
                           device=images.tensor.device)
        for i, (h, w) in enumerate(images.image_sizes):
            mask[i, :h, :w] = 1
        return images.tensor, mask, [tuple(x["image"].shape[-2:]) for x in inputs]

    def __call__(self, inputs):
        if inputs is not self._inputs:
            self._inputs, self._prepared = inputs, self._prepare(inputs)
        pixel_values, pixel_mask, sizes = self._prepared
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        results = self.processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=sizes, top_k=self.top_k)
        return [{"instances": Instances(size, pred_boxes=Boxes(r["boxes"]), scores=r["scores"],
                                        pred_classes=r["labels"])}
                for size, r in zip(sizes, results)]


def build_models(variant, args, impls=None):
    """One model per implementation in ``impls`` (default ``args.impls``), all with the
    first one's weights; "onnxruntime" is the first PyTorch model exported, "huggingface"
    transformers' model (its own random weights)."""
    impls = list(args.impls if impls is None else impls)
    models = {}
    for impl in [i for i in impls if i in TORCH_IMPLS] or ["compiled"]:
        cfg, models[impl] = build(variant, impl, args.device)
    first = next(iter(models.values()))
    for model in models.values():
        if model is not first:
            model.load_state_dict(first.state_dict())
    if "onnxruntime" in impls:
        models["onnxruntime"] = OnnxRuntimeModel(cfg, first, args.threads)
    if "huggingface" in impls:
        models["huggingface"] = HuggingFaceModel(cfg, variant, first)
        print(models["huggingface"].describe(), flush=True)
    return cfg, {impl: models[impl] for impl in impls}


def bench_inference(cfg, models, args, batch=1, amp_dtype=None, stages=True):
    """Median seconds per ``model(inputs)`` call at ``batch`` images, per implementation
    (``models`` from ``build_models``), the per-stage medians (if ``stages``) and the largest
    score difference between the detections of the implementations that share weights (None
    with fewer than two)."""
    for model in models.values():
        model.eval()
    inputs = make_inputs(args.size, batch, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, False)

    # Warm-up; also a check that all paths with the same weights (all but huggingface)
    # compute the same detections.
    scores = {}
    for impl, model in models.items():
        set_cpu_memory_cache(impl, args)
        _, out = run_inference(model, inputs, args.device, amp_dtype)
        if impl != "huggingface":
            scores[impl] = out[0]["instances"].scores.float().sort().values
    score_diff = None
    if len(scores) >= 2:
        a, *others = scores.values()
        score_diff = 0.0
        for b in others:
            n = min(len(a), len(b))
            score_diff = max(score_diff, (a[:n] - b[:n]).abs().max().item() if n else 0.0)

    timers = ({impl: StageTimer(model, args.device) for impl, model in models.items()
               if impl in TORCH_IMPLS} if stages else {})
    times = defaultdict(list)
    for _ in range(args.repeats):
        for impl, model in models.items():
            set_cpu_memory_cache(impl, args)
            t, _ = run_inference(model, inputs, args.device, amp_dtype)
            times[impl].append(t)
            if impl in timers:
                timers[impl].end_forward()
    stage_medians = {}
    for impl, timer in timers.items():
        stage_medians[impl] = timer.medians()
        timer.remove()
    return ({impl: statistics.median(t) for impl, t in times.items()}, stage_medians,
            score_diff)


def bench_training(variant, args, amp_dtype=None):
    """Median seconds per training iteration at ``args.train_batch``, per implementation."""
    cfg, models = build_models(variant, args, [i for i in args.impls if i in TORCH_IMPLS])
    optimizers, scalers = {}, {}
    for impl, model in models.items():
        model.train()
        optimizers[impl] = build_optimizer(cfg, model)
        # bfloat16 has float32's range: no loss scaling (detectron2 scales for float16 only).
        scalers[impl] = (torch.amp.GradScaler(args.device) if amp_dtype == torch.float16
                         else None)
    inputs = make_inputs(args.size, args.train_batch, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES,
                         True)
    set_cpu_memory_cache("compiled", args)  # training: our models only
    for impl, model in models.items():  # warm-up
        run_train_step(model, optimizers[impl], inputs, args.device, amp_dtype, scalers[impl])
    times = defaultdict(list)
    for _ in range(args.repeats):
        for impl, model in models.items():
            times[impl].append(run_train_step(model, optimizers[impl], inputs, args.device,
                                              amp_dtype, scalers[impl]))
    del models, optimizers
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {impl: statistics.median(t) for impl, t in times.items()}


def load_average():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def precisions(args):
    """(label, autocast dtype or None) for each precision --amp asks for."""
    amp = ({"float16": "amp-fp16", "bfloat16": "amp-bf16"}[args.amp_dtype],
           AMP_DTYPES[args.amp_dtype])
    return {"off": [("fp32", None)], "on": [amp], "both": [("fp32", None), amp]}[args.amp]


def result_row(variant, pass_, precision, t, columns=()):
    """A markdown row: seconds per call of the compiled and PyTorch paths and PyTorch /
    compiled, then for each of ``columns`` ("onnxruntime", "huggingface") its seconds and
    compiled / onnxruntime, or HF / ours (ours: compiled, else PyTorch)."""
    def cell(x):
        return f"{x:.3f}" if x is not None else "—"

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b else "—"

    c, p = t.get("compiled"), t.get("pytorch")
    cells = [cell(c), cell(p), ratio(p, c)]
    if "onnxruntime" in columns:
        cells += [cell(t.get("onnxruntime")), ratio(c, t.get("onnxruntime"))]
    if "huggingface" in columns:
        cells += [cell(t.get("huggingface")), ratio(t.get("huggingface"), c or p)]
    return "| " + " | ".join([variant, pass_, precision, *cells]) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    variant_names = [*VARIANTS, *VARIANT_ALIASES]
    parser.add_argument("--variants", nargs="+", default=["plain", "box_refine", "two_stage"],
                        choices=variant_names, help="variants timed at inference")
    parser.add_argument("--train-variants", nargs="*", choices=variant_names,
                        help="variants timed in training (default: --variants)")
    parser.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                        help="also time training iterations")
    parser.add_argument("--train-batch", type=int, default=1, choices=[1, 2, 3, 4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1],
                        help="inference batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", default="off", choices=["off", "on", "both"],
                        help="mixed precision: only, or as well as float32 (meant for CUDA; "
                        "on the CPU autocast is slow, bfloat16 only there)")
    parser.add_argument("--amp-dtype", default="float16", choices=list(AMP_DTYPES))
    parser.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=list(IMPLS),
                        help="implementations to time (huggingface: transformers' model, "
                        "inference only)")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=True,
                        help="time the inference stages (hooks that synchronise)")
    parser.add_argument("--cpu-memory-cache", default="ours", choices=["ours", "all", "off"],
                        help="CPU: the huge-page cache of deformable_detr.utils.cpu_memory "
                        "for our models only (as our tools use it), for every implementation, "
                        "or for none")
    parser.add_argument("--json", help="write all measurements to this file")
    args = parser.parse_args()
    args.variants = [VARIANT_ALIASES.get(v, v) for v in args.variants]
    if args.train_variants is not None:
        args.train_variants = [VARIANT_ALIASES.get(v, v) for v in args.train_variants]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.size) < 32:
        parser.error(f"--size must be at least 32x32 (stride-32 backbone), got {args.size}")
    if min(args.batches) < 1:
        parser.error("--batches must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if "onnxruntime" in args.impls:
        if args.device != "cpu" or args.amp != "off":
            parser.error("--impls onnxruntime runs on the CPU in float32: use --device cpu "
                         "--amp off")
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            parser.error(f"--impls onnxruntime needs the export extra ({e}): "
                         "pip install onnx onnxruntime onnxscript")
    if "huggingface" in args.impls:
        dilated = [v for v in args.variants if VARIANTS[v].dilation]
        if dilated:
            parser.error(f"--impls huggingface: transformers' own ResNet has no dilated res5, "
                         f"leave out {dilated}")
        try:
            import transformers  # noqa: F401
        except ImportError as e:
            parser.error(f"--impls huggingface needs transformers ({e})")
    if "compiled" in args.impls and not has_compiled_op(args.device):
        parser.error(f"the compiled op has no {args.device} kernel: build the extension "
                     "(`pip install -e .`) first")
    args.impls = [i for i in IMPLS if i in args.impls]  # compiled first, as in the tables
    train_variants = args.train_variants if args.train_variants is not None else args.variants
    if not args.train or not any(i in TORCH_IMPLS for i in args.impls):
        train_variants = []
    torch.set_num_threads(args.threads)

    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU, {args.threads} threads")
    h, w = args.size
    labels = ", ".join(label for label, _ in precisions(args))
    print(f"### {name} (torch {torch.__version__}, {labels}, {h}x{w}, random weights, "
          f"median of {args.repeats} after 1 warm-up)\n")
    print(f"load average (1, 5, 15 min) at start: {load_average()}\n", flush=True)

    rows, stage_rows, records = [], [], []
    columns = [i for i in ("onnxruntime", "huggingface") if i in args.impls]
    for variant in args.variants:
        cfg, models = build_models(variant, args)
        for label, amp_dtype in precisions(args):
            for batch in args.batches:
                t, stages, score_diff = bench_inference(cfg, models, args, batch, amp_dtype,
                                                        args.stages)
                pass_ = f"inference, batch {batch}"
                rows.append(result_row(variant, pass_, label, t, columns))
                note = f"  <!-- max |score diff| {score_diff:.1e} -->" if score_diff else ""
                print(rows[-1] + note, flush=True)
                records.append(dict(variant=variant, kind="inference", batch=batch,
                                    precision=label, seconds=t, score_diff=score_diff))
                for impl in (list(stages) if args.stages else []):
                    s = stages[impl]
                    other = t[impl] - sum(s[lbl] for lbl, _ in STAGES)
                    attn_share = s["attention"] / (s["encoder"] + s["decoder"])
                    stage_rows.append(
                        f"| {variant} | {impl} | {label} | batch {batch} | {t[impl]:.3f} | "
                        + " | ".join(f"{s[lbl]:.3f}" for lbl, _ in STAGES)
                        + f" | {other:.3f} | {s['attention']:.3f} ({attn_share:.0%}) |"
                    )
        del models
        if args.device == "cuda":
            torch.cuda.empty_cache()
    for variant in train_variants:
        for label, amp_dtype in precisions(args):
            t = bench_training(variant, args, amp_dtype)
            rows.append(result_row(variant, f"training, batch {args.train_batch}", label, t,
                                   columns))
            print(rows[-1], flush=True)
            records.append(dict(variant=variant, kind="training", batch=args.train_batch,
                                precision=label, seconds=t))

    header = ["variant", "pass", "precision", "compiled s", "PyTorch s", "PyTorch / compiled"]
    if "onnxruntime" in columns:
        header += ["onnxruntime s", "compiled / onnxruntime"]
    if "huggingface" in columns:
        header += ["HF s", "HF / ours"]
    print("\n| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    print("\n".join(rows))
    if stage_rows:
        print("\nWhere inference time goes (seconds, medians; 'attention' = all MSDeformAttn "
              "modules, share of encoder + decoder):\n")
        print("| variant | impl | precision | batch | total | "
              + " | ".join(label for label, _ in STAGES) + " | rest | attention |")
        print("|---" * (len(STAGES) + 7) + "|")
        print("\n".join(stage_rows))
    print(f"\nload average (1, 5, 15 min) at end: {load_average()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device_name=name, torch=torch.__version__, size=args.size,
                           repeats=args.repeats, records=records), f, indent=1)


if __name__ == "__main__":
    main()
