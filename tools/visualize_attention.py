#!/usr/bin/env python
"""Draw where multi-scale deformable attention looks (the picture of the paper's Fig. 5).

For chosen object queries of the last decoder layer (default: the top-k detections) and
chosen pixels of the last encoder layer (default: the centres of those detections), the
sampling points of every head on every feature level are drawn on the image, coloured and
sized by their attention weight; the reference point (or box, with box refinement) is marked
with a star (dashed box), the detection with its box. Each row of a picture is one query:
all levels together, then one panel per level with that level's feature-map grid.

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

from deformable_detr.utils.cli import int_in
from deformable_detr.visualization import MAX_ROWS, write_attention_pictures


def _parse_pixel(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a pixel is X,Y (e.g. 40,52), got {text!r}") from None
    return x, y


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw Deformable DETR's attention sampling "
                                                 "points")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders or glob patterns (quote the globs)")
    parser.add_argument("--output", required=True, help="folder for the pictures")
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
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS is empty or leaves parameters of the "
                             "model unloaded (random)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
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
