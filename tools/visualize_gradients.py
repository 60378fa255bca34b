#!/usr/bin/env python
"""Draw what a detection depends on: the gradient norm of each element of its prediction
(centre x, centre y, width, height, class score) with respect to every input pixel (the
paper's Fig. 5).

Example::

    python tools/visualize_gradients.py --config-file configs/demo/deformable_detr_shapes.yaml \\
        --input datasets/shapes/val/000000.png --output output/demo/gradients \\
        MODEL.WEIGHTS output/demo/model_final.pth

writes, per image and detection (default: the ``--topk`` queries of highest class score, or
``--query Q``), ``<image>_q<Q>.png`` (the image with the detection, then one heatmap per
element, each with its colour scale) and ``<image>_q<Q>.npz`` with the [H, W] maps ``cx``,
``cy``, ``w``, ``h``, ``class`` (the L2 norm over the colour channels of the gradient of
that element with respect to the input image, float pixels in INPUT.FORMAT at the model's
input size, before normalisation; boxes normalised cxcywh, the class as the sigmoid of the
query's highest logit) and ``query``, ``label``, ``score``, ``box``. Config ``KEY VALUE``
pairs come last. Each detection costs 5 backward passes, so at most
``MAX_DETECTIONS`` per image.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

from detectron2.utils.logger import setup_logger

from deformable_detr.engine.predictor import image_tool_parser
from deformable_detr.utils.cli import int_in
from deformable_detr.visualization import MAX_DETECTIONS, write_gradient_pictures

# A config key given where an image was expected (KEY VALUE pairs must come last).
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")


def get_parser() -> argparse.ArgumentParser:
    parser = image_tool_parser(
        "Draw the gradient norm of each element of a detection with respect to the input "
        "pixels", output_help="folder for the pictures and .npz", opts_option=False)
    parser.add_argument("--query", type=int_in(0), default=None,
                        help="this query instead of the top detections")
    parser.add_argument("--topk", type=int_in(1, MAX_DETECTIONS, "5 backward passes each"),
                        default=3, help="the queries of highest class score (default 3)")
    parser.add_argument("--dpi", type=int_in(30, 300, "picture resolution"), default=110)
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="config KEY VALUE pairs, last, e.g. MODEL.WEIGHTS model.pth")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    keys = [a for a in args.input if _CONFIG_KEY.match(a) and not os.path.exists(a)]
    if keys:
        parser.error(f"argument --input: {keys[0]} is a config key, not an image; put the "
                     "KEY VALUE pairs after the other options, e.g. --input a.png --output out "
                     "MODEL.WEIGHTS model.pth")
    setup_logger(name="deformable_detr")
    setup_logger(name="fvcore")
    return write_gradient_pictures(
        args.config_file, args.opts, args.input, args.output,
        queries=[] if args.query is None else [args.query], topk=args.topk, dpi=args.dpi,
        allow_random_weights=args.allow_random_weights)


if __name__ == "__main__":
    sys.exit(main())
