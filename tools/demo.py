#!/usr/bin/env python
"""Draw the detections of a Deformable DETR model on images.

Examples::

    python tools/demo.py --config-file configs/demo/deformable_detr_shapes.yaml \\
        --input datasets/shapes/val --output output/demo/detections \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth

    # files, folders and quoted globs can be mixed
    python tools/demo.py --config-file CONFIG --input a.jpg 'photos/*.jpg' --output out \\
        --confidence-threshold 0.3 --opts MODEL.WEIGHTS model.pth MODEL.DEVICE cpu

Each image is written to ``--output`` as ``<name>.png``. Unreadable images are reported and
skipped; the exit status is 1 if any failed, 2 if nothing could run (bad arguments, config,
weights or output folder). Weights that leave parameters of the model unloaded are refused
unless ``--allow-random-weights`` is given. Images run in batches of ``--batch-size``
(``deformable_detr.engine.predictor.Predictor``): images of equal resized size together, so an
image's detections do not depend on the others; ``--pad-batches`` pads different sizes into
one batch (faster; the padding changes the padded images' detections slightly).

The command line of ``deformable_detr.visualization.write_detection_pictures``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from detectron2.utils.logger import setup_logger

from deformable_detr.engine.predictor import image_tool_parser
from deformable_detr.utils.cli import float_in, int_in
from deformable_detr.visualization import write_detection_pictures


def get_parser() -> argparse.ArgumentParser:
    parser = image_tool_parser("Draw Deformable DETR detections on images")
    parser.add_argument("--confidence-threshold", type=float_in(0, 1, "a score"), default=0.5,
                        help="draw detections with at least this score (default 0.5)")
    parser.add_argument("--scale", type=float_in(0, 64, "drawing scale", lo_open=True),
                        default=None, help="drawing scale (default: enlarge to ~640 px)")
    parser.add_argument("--batch-size", type=int_in(1, 64, "images per forward"), default=4,
                        help="images per forward (default 4)")
    parser.add_argument("--pad-batches", action="store_true",
                        help="pad images of different sizes into one batch (faster; changes "
                             "their detections slightly)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="deformable_detr")
    setup_logger(name="fvcore")
    return write_detection_pictures(
        args.config_file, args.opts, args.input, args.output,
        confidence_threshold=args.confidence_threshold, scale=args.scale,
        batch_size=args.batch_size, pad_batches=args.pad_batches,
        allow_random_weights=args.allow_random_weights)


if __name__ == "__main__":
    sys.exit(main())
