"""Pictures of a model's detections (``tools/demo.py`` is the command line of
:func:`write_detection_pictures`)."""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional, Sequence

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

__all__ = [
    "MAX_PICTURE_SIDE",
    "check_picture_size",
    "default_scale",
    "draw_detections",
    "write_detection_pictures",
]

logger = logging.getLogger(__name__)

#: The longest side of a drawn picture, in pixels (bounds the drawing scale).
MAX_PICTURE_SIDE = 8192


def draw_detections(image_rgb: np.ndarray, instances, metadata, threshold: float,
                    scale: float) -> np.ndarray:
    """An RGB uint8 picture [H * scale, W * scale, 3] of ``image_rgb`` [H, W, 3] with the
    instances of score >= ``threshold`` drawn (class names and colours from ``metadata``)."""
    keep = instances[instances.scores >= threshold]
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(keep).get_image()


def default_scale(image: np.ndarray) -> float:
    """The drawing scale of an [H, W, 3] image: small images (the shapes demo is ~150 px)
    are enlarged to ~640 px so that labels stay readable."""
    return max(1.0, 640.0 / max(image.shape[:2]))


def check_picture_size(path: str, image: np.ndarray, scale: float) -> None:
    """``ValueError`` when drawing ``image`` at ``scale`` exceeds :data:`MAX_PICTURE_SIDE`."""
    side = max(image.shape[:2]) * scale
    if side > MAX_PICTURE_SIDE:
        raise ValueError(f"{path}: --scale {scale:g} would draw a {side:.0f} px picture, more "
                         f"than {MAX_PICTURE_SIDE} px; lower --scale")


def write_detection_pictures(config_file: str, opts: Sequence[str], inputs: Sequence[str],
                             output: str, *, confidence_threshold: float = 0.5,
                             scale: Optional[float] = None, batch_size: int = 4,
                             pad_batches: bool = False,
                             allow_random_weights: bool = False) -> int:
    """What ``tools/demo.py`` does: the :class:`~deformable_detr.engine.predictor.Predictor`
    of ``config_file`` + ``opts`` (``MODEL.WEIGHTS``, loaded safely) runs on the images of
    ``inputs`` (files, folders, globs) in batches of ``batch_size``, and each image is drawn
    with its detections of score >= ``confidence_threshold`` (at ``scale``, default
    :func:`default_scale`) into ``output/<name>.png``.

    Returns:
        the exit status: 0, 1 if an image failed (reported by name), 2 if nothing could run
        (config, weights, inputs or output folder; reported).
    """
    from ..engine.predictor import for_each_batch, output_path, prepare_or_report

    prepared = prepare_or_report(config_file, opts, inputs, output, allow_random_weights,
                                 max_batch_size=batch_size, pad_batches=pad_batches)
    if prepared is None:
        return 2
    cfg, images, predictor, metadata = prepared
    used: Dict[str, int] = {}
    seconds_per_image = [0.0]

    def predict(batch):
        start = time.perf_counter()
        results = predictor(batch)
        seconds_per_image[0] = (time.perf_counter() - start) / len(batch)
        return results

    def check(path: str, image: np.ndarray) -> None:
        check_picture_size(path, image, scale or default_scale(image))

    def handle(path: str, image: np.ndarray, instances) -> None:
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        picture = draw_detections(rgb, instances, metadata, confidence_threshold,
                                  scale or default_scale(image))
        out = output_path(output, path, used)
        Image.fromarray(picture).save(out)
        n = int((instances.scores >= confidence_threshold).sum())
        logger.info(f"{path}: {n} detections >= {confidence_threshold} in "
                    f"{seconds_per_image[0]:.2f} s -> {out}")

    return for_each_batch(images, cfg.INPUT.FORMAT, batch_size, predict, handle, check)
