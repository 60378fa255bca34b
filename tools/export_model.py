#!/usr/bin/env python
"""Export a Deformable DETR model to ONNX or to a torch.export program, and check the file.

Examples::

    # ONNX with standard operators only (onnxruntime, TensorRT without plugins)
    python tools/export_model.py --config-file configs/deformable_detr_R_50_50ep.yaml \\
        --format onnx --output output/export MODEL.WEIGHTS model.pth

    # ONNX for TensorRT's MultiscaleDeformableAttnPlugin_TRT
    python tools/export_model.py --config-file CONFIG --format onnx --attention plugin \\
        --output output/export_trt MODEL.WEIGHTS model.pth

    # a torch.export program that keeps the compiled op (CPU and CUDA kernels)
    python tools/export_model.py --config-file CONFIG --format torch_export \\
        --output output/export MODEL.WEIGHTS model.pth

writes ``OUTPUT/model.onnx`` or ``OUTPUT/model.pt2`` with inputs ``images`` uint8
[N, 3, H, W] (padded at the bottom and right, channels in ``INPUT.FORMAT``) and
``image_sizes`` int64 [N, 2], and outputs ``pred_logits`` [N, Q, C] and ``pred_boxes``
[N, Q, 4]; then checks it against the PyTorch model on a padded batch of two images and
prints what it wrote, the check and how to run it. Trailing ``KEY VALUE`` pairs are config
options. Exit status 2 for bad arguments, config, weights or output folder, 1 if the check
fails (difference above ``--tolerance``).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from detectron2.utils.logger import setup_logger

from deformable_detr.engine import setup_cfg
from deformable_detr.export import ATTENTION_MODES, DEFAULT_OPSET, FORMATS, export_from_config
from deformable_detr.utils.cli import float_in, int_in

logger = logging.getLogger("deformable_detr.export_model")

#: Opsets the exporter converts to (it builds 18; TensorRT 10 reads up to 20+).
OPSETS = (18, 23)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export Deformable DETR to ONNX or torch.export")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="onnx: OUTPUT/model.onnx; torch_export: OUTPUT/model.pt2")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for the file (created if missing)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default=None,
                        help="onnx only: portable (default; standard operators, runs in "
                             "onnxruntime) or plugin (TensorRT's "
                             "MultiscaleDeformableAttnPlugin_TRT nodes)")
    parser.add_argument("--opset", type=int_in(*OPSETS, "ONNX opset"), default=None,
                        help=f"onnx only: the ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--tolerance", type=float_in(0, 1, "largest accepted difference"),
                        default=1e-4, help="fail when the exported outputs differ from the "
                                           "model's by more (default 1e-4)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the check against the PyTorch model")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="export even when MODEL.WEIGHTS is empty or leaves parameters of "
                             "the model unloaded (random)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config options, e.g. MODEL.WEIGHTS model.pth")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.format != "onnx":
        for name in ("attention", "opset"):
            if getattr(args, name) is not None:
                parser.error(f"--{name} applies to --format onnx only")
    setup_logger(name="deformable_detr")
    try:
        cfg = setup_cfg(args.config_file, args.opts)
        result = export_from_config(
            cfg, args.output, format=args.format, attention=args.attention or "portable",
            opset=args.opset or DEFAULT_OPSET, allow_random_weights=args.allow_random_weights,
            verify=args.verify)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error(str(e))
        return 2
    print(f"wrote {result['path']} ({result['bytes'] / 2**20:.1f} MiB)")
    print(f"inputs: images uint8 [N, 3, H, W] ({cfg.INPUT.FORMAT}, padded at the bottom and "
          f"right; H, W >= {result['min_image_size']}), image_sizes int64 [N, 2] (unpadded "
          "height, width)")
    print("outputs: pred_logits [N, Q, C], pred_boxes [N, Q, 4] (cx, cy, w, h normalised by "
          "each image's unpadded size)")
    status = 0
    if "check" in result:
        diff = result["max_abs_diff"]
        verdict = "" if diff is None else f": max |difference| {diff:.2e}"
        if diff is not None and diff > args.tolerance:
            verdict += f", above --tolerance {args.tolerance:g}"
            status = 1
        print(f"checked: {result['check']}{verdict}")
    print("run it:\n    " + result["usage"].replace("\n", "\n    "))
    return status


if __name__ == "__main__":
    sys.exit(main())
