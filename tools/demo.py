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
skipped; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from deformable_detr import add_deformable_detr_config
from deformable_detr.data import register_shapes_dataset
from deformable_detr.data.dataset_mapper import build_detr_augmentation
from deformable_detr.modeling import slim_resnet  # noqa: F401  (the demo configs' backbone)

logger = logging.getLogger("deformable_detr.demo")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def setup_cfg(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2 config with the Deformable DETR keys, ``config_file`` and ``opts`` merged;
    ``MODEL.DEVICE`` falls back to the CPU when CUDA is not available."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file not found: {config_file}")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def check_weights(weights: str) -> None:
    """Fail early and clearly when ``MODEL.WEIGHTS`` is empty or a missing local file."""
    if not weights:
        raise ValueError("No weights: set MODEL.WEIGHTS (e.g. --opts MODEL.WEIGHTS "
                         "output/demo/model_final.pth); a randomly initialised model detects "
                         "nothing useful")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")


def list_images(inputs: Sequence[str]) -> List[str]:
    """Expand files, folders (their images, sorted) and glob patterns to image paths."""
    paths: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {item}")
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"No files match {item!r}")
        elif os.path.isfile(item):
            found = [item]
        else:
            raise FileNotFoundError(f"Input image not found: {item}")
        paths.extend(found)
    return paths


def read_image(path: str, image_format: str) -> np.ndarray:
    """[H, W, 3] uint8 in ``image_format``; ``ValueError`` naming the file if unreadable."""
    try:
        return utils.read_image(path, format=image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"Cannot read image {path}: corrupt or not an image "
                         f"({type(e).__name__}: {e})") from e


def output_path(output_dir: str, image_path: str, used: Dict[str, int], suffix: str = "") -> str:
    """``output_dir/<stem><suffix>.png``, numbered when two inputs share a stem."""
    stem = os.path.splitext(os.path.basename(image_path))[0] + suffix
    n = used.get(stem, 0)
    used[stem] = n + 1
    return os.path.join(output_dir, f"{stem}{'_' + str(n) if n else ''}.png")


def get_metadata(cfg: CfgNode):
    """Metadata of the first test (else train) dataset, for class names and colours; a
    stand-in with "class i" names when none matches ``NUM_CLASSES``."""
    num_classes = cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        meta = MetadataCatalog.get(name)
        if len(meta.get("thing_classes", [])) == num_classes:
            return meta
    meta = MetadataCatalog.get("__deformable_detr_demo_unnamed")
    if meta.get("thing_classes") is None:
        meta.thing_classes = [f"class {i}" for i in range(num_classes)]
    return meta


class Predictor:
    """A model in eval mode with its weights and the test-time resize of the data mapper
    (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``), applied to one image at a time."""

    def __init__(self, cfg: CfgNode):
        check_weights(cfg.MODEL.WEIGHTS)
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        try:
            DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        except Exception as e:  # unreadable file, wrong format, refused pickle, ...
            raise RuntimeError(f"Cannot load MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from e
        self.augmentations = T.AugmentationList(build_detr_augmentation(cfg, is_train=False))
        self.image_format = cfg.INPUT.FORMAT

    def make_input(self, image: np.ndarray) -> dict:
        """The model's input dict for an [H, W, 3] image in ``INPUT.FORMAT``."""
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        resized = aug_input.image
        return {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": image.shape[0],
            "width": image.shape[1],
        }

    @torch.no_grad()
    def __call__(self, image: np.ndarray):
        """Instances in the original image's pixels (boxes XYXY), sorted by score."""
        return self.model([self.make_input(image)])[0]["instances"].to("cpu")


def draw_detections(image_rgb: np.ndarray, instances, metadata, threshold: float,
                    scale: float):
    """An RGB uint8 picture of the instances with score >= ``threshold``."""
    keep = instances[instances.scores >= threshold]
    vis = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return vis.draw_instance_predictions(keep).get_image()


def default_scale(image: np.ndarray) -> float:
    # Small images (the shapes demo is ~150 px) are enlarged so that labels stay readable.
    return max(1.0, 640.0 / max(image.shape[:2]))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Draw Deformable DETR detections on images")
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders or glob patterns (quote the globs)")
    parser.add_argument("--output", required=True, help="folder for the pictures")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument("--scale", type=float, default=None,
                        help="drawing scale (default: enlarge to ~640 px)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def prepare(config_file: str, opts: Sequence[str], inputs: Sequence[str], output: str):
    """The set-up the drawing tools share: the config, the list of images, the model (and the
    built-in dataset's class names, registered if missing) and its metadata; makes the output
    folder. Raises FileNotFoundError, ValueError or RuntimeError with a message for the user.

    Returns:
        (cfg, image paths, Predictor, metadata)
    """
    cfg = setup_cfg(config_file, opts)
    images = list_images(inputs)
    if "shapes_val" not in DatasetCatalog.list():
        register_shapes_dataset()  # names and colours of the built-in dataset's classes
    predictor = Predictor(cfg)
    metadata = get_metadata(cfg)
    PathManager.mkdirs(output)
    return cfg, images, predictor, metadata


def for_each_image(images: Sequence[str], image_format: str,
                   handle: Callable[[str, np.ndarray], None]) -> int:
    """Call ``handle(path, image)`` on each image; an image that cannot be read or handled
    (FileNotFoundError, ValueError) is reported by name and skipped. Returns the exit status:
    1 if any image failed, else 0."""
    failed = 0
    for path in images:
        try:
            handle(path, read_image(path, image_format))
        except (FileNotFoundError, ValueError) as e:
            logger.error(str(e))
            failed += 1
    if failed:
        logger.error(f"{failed} of {len(images)} images failed")
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="deformable_detr")
    setup_logger(name="fvcore")
    try:
        cfg, images, predictor, metadata = prepare(args.config_file, args.opts, args.input,
                                                   args.output)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error(str(e))
        return 2
    used: Dict[str, int] = {}

    def handle(path: str, image: np.ndarray) -> None:
        start = time.perf_counter()
        instances = predictor(image)
        elapsed = time.perf_counter() - start
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        picture = draw_detections(rgb, instances, metadata, args.confidence_threshold,
                                  args.scale or default_scale(rgb))
        out = output_path(args.output, path, used)
        Image.fromarray(picture).save(out)
        n = int((instances.scores >= args.confidence_threshold).sum())
        logger.info(f"{path}: {n} detections >= {args.confidence_threshold} in "
                    f"{elapsed:.2f} s -> {out}")

    return for_each_image(images, cfg.INPUT.FORMAT, handle)


if __name__ == "__main__":
    sys.exit(main())
