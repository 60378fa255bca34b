#!/usr/bin/env python
"""Draw where multi-scale deformable attention looks (the picture of the paper's Fig. 5):
the sampling points of chosen decoder queries and encoder pixels, as described in
``deformable_detr.visualization.attention``.

Example::

    python tools/visualize_attention.py --config-file configs/demo/deformable_detr_shapes.yaml \\
        --input datasets/shapes/val/000000.png --output output/demo/attention \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth

writes ``<name>_decoder.png`` and ``<name>_encoder.png`` per image. A picture has one row
per query, at most 10 (``MAX_ROWS``; ``--topk``, ``--queries``, ``--pixels``). Weights that
leave parameters of the model unloaded are refused unless ``--allow-random-weights``.

The command line of ``deformable_detr.visualization.write_attention_pictures``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, Tuple

from detectron2.utils.logger import setup_logger

from deformable_detr.engine.predictor import image_tool_parser
from deformable_detr.utils.cli import int_in
from deformable_detr.visualization import MAX_ROWS, write_attention_pictures


def _parse_pixel(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pixel is X,Y (e.g. 40,52), got {text!r}") from None
    return x, y


def get_parser() -> argparse.ArgumentParser:
    parser = image_tool_parser("Draw Deformable DETR's attention sampling points")
    parser.add_argument("--topk", type=int_in(1, MAX_ROWS, "one picture row per query"),
                        default=3, help="decoder queries of the top-k detections (default 3)")
    parser.add_argument("--queries", type=int, nargs="*", default=[],
                        help=f"decoder query indices instead of the top-k detections (at most "
                             f"{MAX_ROWS})")
    parser.add_argument("--pixels", type=_parse_pixel, nargs="*", default=[],
                        help=f"encoder query pixels X,Y of the image (default: detection "
                             f"centres; at most {MAX_ROWS})")
    parser.add_argument("--pixel-level", type=int_in(0), default=0,
                        help="feature level of the encoder queries (default 0, the finest)")
    parser.add_argument("--dpi", type=int_in(30, 300, "picture resolution"), default=110)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    for name in ("queries", "pixels"):
        if len(getattr(args, name)) > MAX_ROWS:
            parser.error(f"argument --{name}: at most {MAX_ROWS} (one picture row each), got "
                         f"{len(getattr(args, name))}; make several pictures")
    setup_logger(name="deformable_detr")
    return write_attention_pictures(
        args.config_file, args.opts, args.input, args.output, topk=args.topk,
        queries=args.queries, pixels=args.pixels, pixel_level=args.pixel_level, dpi=args.dpi,
        allow_random_weights=args.allow_random_weights)


if __name__ == "__main__":
    sys.exit(main())
