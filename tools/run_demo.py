#!/usr/bin/env python
"""The CPU demo: train a small Deformable DETR from scratch on the built-in shapes dataset,
evaluate it with COCO AP, and draw its detections, attention and gradient maps.

Steps (all on the CPU, about 11 minutes on 2 cores):

1. generate the synthetic dataset under ``$DETECTRON2_DATASETS/shapes`` (default
   ``./datasets/shapes``) unless it is already there;
2. train ``configs/demo/deformable_detr_shapes.yaml`` as ``train_net.py`` does
   (``deformable_detr.engine.defaults.train_net_main``: detectron2's ``DefaultTrainer``,
   progress with ETA, metrics.json, TensorBoard events), then evaluate on ``shapes_val``
   with ``COCOEvaluator`` (AP table in the log);
3. draw detections on val images (as ``tools/demo.py``), attention sampling points (as
   ``tools/visualize_attention.py``) and, for the first val image's top detection, the
   gradient norm of each prediction element w.r.t. the pixels (as
   ``tools/visualize_gradients.py``) into ``OUTPUT/detections``, ``OUTPUT/attention`` and
   ``OUTPUT/gradients``, with the functions of :mod:`deformable_detr.visualization` those
   tools run.

Every step runs in this process: a process per step would import torch and detectron2 again
(about 10 s each).

Usage::

    python tools/run_demo.py                       # everything, into output/demo
    python tools/run_demo.py --output /tmp/demo SOLVER.MAX_ITER 100   # config overrides

Exits with status 1 if a step fails, or if the final AP is below ``--min-ap`` (when given).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Dict, Optional, Sequence

import torch

from deformable_detr.data import (
    default_shapes_root,
    ensure_shapes_dataset,
    register_shapes_dataset,
)
from deformable_detr.engine.cpu_autocast import cpu_has_native_bfloat16
from deformable_detr.engine.defaults import default_argument_parser, setup_cfg, train_net_main
from deformable_detr.visualization import (
    write_attention_pictures,
    write_detection_pictures,
    write_gradient_pictures,
)

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS_DIR)

# The AP on shapes_val the demo is meant to reach (a warning below it).
TARGET_AP = 50.0
logger = logging.getLogger("deformable_detr.run_demo")

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "demo", "deformable_detr_shapes.yaml")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    p.add_argument("--output", default="output/demo", help="OUTPUT_DIR of the run")
    p.add_argument("--num-train", type=int, default=2000, help="training images to generate")
    p.add_argument("--num-val", type=int, default=200, help="validation images to generate")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default: all cores, torch's default)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="train under bfloat16 autocast (SOLVER.AMP.ENABLED); auto: on where the "
                        "CPU has bfloat16 instructions (AVX512-BF16 or AMX), else float32")
    p.add_argument("--num-pictures", type=int, default=6,
                   help="val images to draw detections on (attention: a quarter of them)")
    p.add_argument("--min-ap", type=float, default=None,
                   help="exit with status 1 if the final bbox AP is below this (default: only "
                        f"warn below the demo's target of {TARGET_AP:.0f})")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE overrides")
    return p


def use_amp(choice: str, config_file: str, opts: Sequence[str]) -> bool:
    """Whether the demo trains under bfloat16 autocast: as ``SOLVER.AMP.ENABLED`` says where
    the overrides ``opts`` set it, else as ``--amp`` says: "on", "off", or "auto": on where the
    model trains on a CPU with bfloat16 instructions, there 1.1-1.35x faster per iteration at
    the same AP (docs/demo.md)."""
    try:
        cfg = setup_cfg(config_file, opts, freeze=False)
    except (OSError, ValueError):  # the training step reports it
        return choice == "on"
    if "SOLVER.AMP.ENABLED" in list(opts)[0::2]:
        return bool(cfg.SOLVER.AMP.ENABLED)
    if choice != "auto":
        return choice == "on"
    return torch.device(cfg.MODEL.DEVICE).type == "cpu" and cpu_has_native_bfloat16()


def train_and_evaluate(config_file: str, output_dir: str, opts: Sequence[str]) -> Dict:
    """Train as ``train_net.py --config-file config_file OUTPUT_DIR output_dir opts...`` does,
    in this process (training, then the evaluation that detectron2's ``EvalHook`` runs at the
    end); return that evaluation's bbox metrics, read from the run's ``metrics.json`` ({} if
    there was none or training failed)."""
    metrics_file = os.path.join(output_dir, "metrics.json")
    # metrics.json is appended to by every run in the folder: read only this run's records.
    offset = os.path.getsize(metrics_file) if os.path.isfile(metrics_file) else 0
    args = default_argument_parser().parse_args(
        ["--config-file", config_file, "OUTPUT_DIR", output_dir, *opts])
    try:
        train_net_main(args)
    except Exception:  # reported, and the demo exits with status 1, as a failed step
        logger.exception("Training failed")
        return {}
    if not os.path.isfile(metrics_file):
        logger.error(f"Training wrote no {metrics_file}")
        return {}
    bbox = {}
    with open(metrics_file) as f:
        f.seek(offset)
        for line in f:
            record = json.loads(line)
            if "bbox/AP" in record:
                bbox = {k[len("bbox/"):]: v for k, v in record.items() if k.startswith("bbox/")}
    return bbox


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s]: %(message)s",
                        datefmt="%H:%M:%S")
    timings = {}

    logger.info("1/3 dataset")
    root = default_shapes_root()
    ensure_shapes_dataset(root, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    register_shapes_dataset(root)
    timings["dataset_s"] = time.perf_counter() - start

    amp = use_amp(args.amp, args.config_file, args.opts)
    train_opts = [*args.opts, "SOLVER.AMP.ENABLED", str(amp)]
    logger.info("2/3 training (%s) and evaluation (config %s)",
                "bfloat16 autocast" if amp else "float32", args.config_file)
    t = time.perf_counter()
    bbox = train_and_evaluate(args.config_file, args.output, train_opts)
    timings["train_eval_s"] = time.perf_counter() - t
    if not bbox:
        logger.error("No bbox evaluation results (is TEST.EVAL_PERIOD negative, or "
                     "DATASETS.TEST empty?)")
        return 1

    logger.info("3/3 pictures")
    t = time.perf_counter()
    weights = os.path.join(args.output, "model_final.pth")
    val_dir = os.path.join(root, "val")
    images = sorted(os.listdir(val_dir))[: max(args.num_pictures, 1)]
    # The trained model, also where the overrides name other (initial) weights.
    opts = [*args.opts, "MODEL.WEIGHTS", weights]
    rc = write_detection_pictures(args.config_file, opts,
                                  [os.path.join(val_dir, f) for f in images],
                                  os.path.join(args.output, "detections"),
                                  confidence_threshold=0.5)
    attention_images = [os.path.join(val_dir, f) for f in images[: max(1, len(images) // 4)]]
    rc |= write_attention_pictures(args.config_file, opts, attention_images,
                                   os.path.join(args.output, "attention"))
    # The paper's Fig. 5 for the first val image's top detection (5 backward passes).
    rc |= write_gradient_pictures(args.config_file, opts, [os.path.join(val_dir, images[0])],
                                  os.path.join(args.output, "gradients"), topk=1)
    timings["pictures_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    summary = {"bbox": bbox, "timings": timings, "torch_threads": torch.get_num_threads(),
               "config_file": args.config_file, "opts": train_opts}
    with open(os.path.join(args.output, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\nDemo finished in {timings['total_s'] / 60:.1f} min (dataset "
          f"{timings['dataset_s']:.0f} s, training + evaluation {timings['train_eval_s']:.0f} s, "
          f"pictures {timings['pictures_s']:.0f} s)")
    # APl is NaN: no shape is large in COCO's sense (area above 96 x 96 px).
    print("COCO bbox on shapes_val: " + ", ".join(
        f"{k} {v:.1f}" for k, v in bbox.items() if not k.startswith("AP-") and v == v))
    print(f"Outputs in {args.output}: detections/, attention/, gradients/, metrics.json, "
          "TensorBoard "
          f"events (tensorboard --logdir {args.output}), inference/, model_final.pth")
    if rc:
        logger.error("Drawing the pictures failed")
        return 1
    if args.min_ap is not None and bbox["AP"] < args.min_ap:
        logger.error(f"AP {bbox['AP']:.1f} is below --min-ap {args.min_ap}")
        return 1
    if bbox["AP"] < TARGET_AP:
        logger.warning(f"AP {bbox['AP']:.1f} is below the demo's target of {TARGET_AP:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
