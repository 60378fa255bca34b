#!/usr/bin/env python
"""Draw the detections of a Deformable DETR model on images.

Examples::

    python tools/demo.py --config-file configs/demo/shapes_deformable_detr.yaml \\
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
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from deformable_detr.engine.predictor import (
    Predictor,
    for_each_batch,
    output_path,
    prepare,
    setup_cfg,
)
from deformable_detr.utils.cli import float_in, int_in

__all__ = ["Predictor", "default_scale", "draw_detections", "get_parser", "main", "setup_cfg"]

logger = logging.getLogger("deformable_detr.demo")

#: The longest side of a drawn picture, in pixels (bounds --scale).
MAX_PICTURE_SIDE = 8192


def draw_detections(image_rgb: np.ndarray, instances, metadata, threshold: float,
                    scale: float):
    """An RGB uint8 picture of the instances with score >= ``threshold``."""
    keep = instances[instances.scores >= threshold]
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(keep).get_image()


def default_scale(image: np.ndarray) -> float:
    # Small images (the shapes demo is ~150 px) are enlarged so that labels stay readable.
    return max(1.0, 640.0 / max(image.shape[:2]))


def check_picture_size(path: str, image: np.ndarray, scale: float) -> None:
    """``ValueError`` when drawing ``image`` at ``scale`` exceeds :data:`MAX_PICTURE_SIDE`."""
    side = max(image.shape[:2]) * scale
    if side > MAX_PICTURE_SIDE:
        raise ValueError(f"{path}: --scale {scale:g} would draw a {side:.0f} px picture, more "
                         f"than {MAX_PICTURE_SIDE} px; lower --scale")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw Deformable DETR detections on images")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders or glob patterns (quote the globs)")
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--confidence-threshold", type=float_in(0, 1, "a score"), default=0.5,
                        help="draw detections with at least this score (default 0.5)")
    parser.add_argument("--scale", type=float_in(0, 64, "drawing scale", lo_open=True),
                        default=None, help="drawing scale (default: enlarge to ~640 px)")
    parser.add_argument("--batch-size", type=int_in(1, 64, "images per forward"), default=4,
                        help="images per forward (default 4)")
    parser.add_argument("--pad-batches", action="store_true",
                        help="pad images of different sizes into one batch (faster; changes "
                             "their detections slightly)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS is empty or leaves parameters of the "
                             "model unloaded (random)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="deformable_detr")
    setup_logger(name="fvcore")
    try:
        cfg, images, predictor, metadata = prepare(
            args.config_file, args.opts, args.input, args.output, args.allow_random_weights,
            max_batch_size=args.batch_size, pad_batches=args.pad_batches)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error(str(e))
        return 2
    used: Dict[str, int] = {}
    seconds_per_image = [0.0]

    def predict(batch):
        start = time.perf_counter()
        results = predictor(batch)
        seconds_per_image[0] = (time.perf_counter() - start) / len(batch)
        return results

    def check(path: str, image: np.ndarray) -> None:
        check_picture_size(path, image, args.scale or default_scale(image))

    def handle(path: str, image: np.ndarray, instances) -> None:
        scale = args.scale or default_scale(image)
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        picture = draw_detections(rgb, instances, metadata, args.confidence_threshold, scale)
        out = output_path(args.output, path, used)
        Image.fromarray(picture).save(out)
        n = int((instances.scores >= args.confidence_threshold).sum())
        logger.info(f"{path}: {n} detections >= {args.confidence_threshold} in "
                    f"{seconds_per_image[0]:.2f} s -> {out}")

    return for_each_batch(images, cfg.INPUT.FORMAT, args.batch_size, predict, handle, check)

if __name__ == "__main__":
    sys.exit(main())
