"""Running a trained model on image files: what ``tools/demo.py`` and
``tools/visualize_attention.py`` share (config, weights, image list, per-image loop).

The weights are loaded by :func:`.checkpointer.load_inference_weights`: no pickled code runs,
and weights that leave the model partly random are refused.

Images run one at a time (batch 1), so a picture's detections do not depend on the other
images: in a batch, images of different sizes are padded to the largest, and the padding
changes the detections of the padded images slightly (the published model does the same).
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from ..checkpoint.safe_load import CheckpointError
from ..config import add_deformable_detr_config
from ..data import register_shapes_dataset
from ..data.dataset_mapper import build_detr_augmentation
from .checkpointer import load_inference_weights

__all__ = [
    "IMAGE_EXTENSIONS",
    "Predictor",
    "check_output_dir",
    "check_weights",
    "for_each_image",
    "get_metadata",
    "list_images",
    "output_path",
    "prepare",
    "read_image",
    "setup_cfg",
]

logger = logging.getLogger(__name__)

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
    """Fail early when ``MODEL.WEIGHTS`` names a local file that does not exist (an empty
    ``MODEL.WEIGHTS`` is refused by :func:`load_inference_weights`)."""
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")


def check_output_dir(output: str) -> None:
    """Fail before any work when ``output`` cannot be a folder for the pictures."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output {output} is a file; give a folder for the pictures (it is "
                         "created if missing)")
    parent = os.path.abspath(output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output {output} cannot be created: {parent} is a file; give "
                         "another folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--output {output}: {parent} is not writable; give another folder")


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
    (``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``), applied to one image at a time.

    Raises (on construction):
        FileNotFoundError: ``MODEL.WEIGHTS`` names a missing file.
        CheckpointError: unreadable, unsafe or non-finite weights; no weights or weights
            that leave the model partly random, unless ``allow_random_weights``.
        RuntimeError: the weights could not be fetched.
    """

    def __init__(self, cfg: CfgNode, *, allow_random_weights: bool = False):
        check_weights(cfg.MODEL.WEIGHTS)
        self.cfg = cfg
        self.model = build_model(cfg).eval()
        try:
            load_inference_weights(self.model, cfg.MODEL.WEIGHTS,
                                   allow_random_weights=allow_random_weights)
        except CheckpointError as e:
            raise CheckpointError(f"Cannot load MODEL.WEIGHTS: {e}") from None
        except OSError as e:  # a URL that cannot be fetched, an unreadable file
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


def prepare(config_file: str, opts: Sequence[str], inputs: Sequence[str], output: str,
            allow_random_weights: bool = False):
    """The set-up the drawing tools share: the config, the list of images, the model (and the
    built-in dataset's class names, registered if missing) and its metadata; makes the output
    folder. Everything that can be checked without the model is checked first. Raises
    FileNotFoundError, ValueError (CheckpointError included) or RuntimeError with a message
    for the user.

    Returns:
        (cfg, image paths, Predictor, metadata)
    """
    cfg = setup_cfg(config_file, opts)
    check_output_dir(output)
    images = list_images(inputs)
    if "shapes_val" not in DatasetCatalog.list():
        register_shapes_dataset()  # names and colours of the built-in dataset's classes
    predictor = Predictor(cfg, allow_random_weights=allow_random_weights)
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
