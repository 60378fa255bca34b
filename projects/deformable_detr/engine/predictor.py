"""Running a trained model on images: the batched predictors and what the drawing tools
share (config, weights, image list, loops over images).

The weights are loaded by :func:`deformable_detr.checkpoint.load_inference_weights`: no
pickled code runs, and weights that leave the model partly random are refused.

:class:`Predictor` takes a list of images and returns a list of ``Instances``. By default an
image's detections do not depend on the other images of the call: images of equal resized
size run together, others separately. ``pad_batches=True`` pads images of different sizes
into one batch (faster), which changes the padded images' detections slightly, as batches do
in the published model. ``deformable_detr.export.OnnxPredictor`` does the same with an
exported ONNX model.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.file_io import PathManager

from ..checkpoint import CheckpointError, class_head_options, load_inference_weights
from ..data import build_detr_augmentation, read_image_checked
from ..utils.cpu_memory import enable_cpu_memory_cache
from .defaults import setup_cfg

__all__ = [
    "IMAGE_EXTENSIONS",
    "BatchPredictor",
    "Predictor",
    "check_output_dir",
    "check_weights",
    "for_each_batch",
    "for_each_image",
    "get_metadata",
    "image_tool_parser",
    "list_images",
    "load_model",
    "output_path",
    "prepare",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


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


class BatchPredictor:
    """Images in, detections out, in batches: what :class:`Predictor` (the PyTorch model) and
    ``deformable_detr.export.OnnxPredictor`` (an exported model) share.

    As detectron2's ``DefaultPredictor``, each image is resized as the test-time mapper does
    (short side ``INPUT.MIN_SIZE_TEST``, long side at most ``INPUT.MAX_SIZE_TEST``) and the
    detections come back in the original image's pixels; unlike it, a call takes a list of
    images and returns a list of ``Instances`` (one image in, one ``Instances`` out also
    works).

    Batching. By default images whose resized sizes are equal run together (no padding) and
    the others in batches of their own, so an image's detections do not depend on the other
    images of the call. With ``pad_batches`` images of different sizes are padded to one
    batch instead: fewer, larger batches, but the padding changes the detections of the
    padded images, because the backbone and the GroupNorms of the input projection see it
    (as in the published model, which trains and evaluates that way).

    Args:
        augmentations: the test-time resize.
        input_format: channel order of the images given (``INPUT.FORMAT``).
        max_batch_size: at most this many images per forward (bounds the memory).
        pad_batches: pad images of different sizes into one batch (see above).
    """

    def __init__(self, *, augmentations: Sequence[T.Augmentation], input_format: str,
                 max_batch_size: int = 8, pad_batches: bool = False):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = input_format
        self.max_batch_size = int(max_batch_size)
        self.pad_batches = bool(pad_batches)

    def make_input(self, image: np.ndarray) -> dict:
        """The model's input dict for an [H, W, 3] uint8 image in ``INPUT.FORMAT``:
        "image" uint8 [3, h, w] resized, "height"/"width" the original size."""
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
                or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            what = (f"a {image.dtype} array of shape {list(image.shape)}"
                    if isinstance(image, np.ndarray) else type(image).__name__)
            raise ValueError(f"an image must be an [H, W, 3] uint8 array in {self.image_format}"
                             f" (e.g. from read_image_checked(path, '{self.image_format}')), "
                             f"got {what}")
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        resized = aug_input.image
        return {
            "image": torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))),
            "height": image.shape[0],
            "width": image.shape[1],
        }

    def batches(self, inputs: Sequence[dict]) -> List[List[int]]:
        """Indices of ``inputs`` per forward: equal sizes together (all together with
        ``pad_batches``), in order of first appearance, at most ``max_batch_size`` each."""
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, x in enumerate(inputs):
            key = () if self.pad_batches else tuple(x["image"].shape[-2:])
            groups.setdefault(key, []).append(i)
        k = self.max_batch_size
        return [g[j:j + k] for g in groups.values() for j in range(0, len(g), k)]

    def predict_batch(self, inputs: List[dict]) -> List[Instances]:
        """Detections (CPU ``Instances`` in the original pixels) of one batch of inputs from
        :meth:`make_input`; subclasses run their model here."""
        raise NotImplementedError

    def __call__(self, images):
        """
        Args:
            images: a list of [H, W, 3] uint8 arrays in ``INPUT.FORMAT``, or one such array.

        Returns:
            a list of ``Instances`` (one per image, in order; a single ``Instances`` for a
            single array) with ``pred_boxes`` (XYXY in the original image's pixels),
            ``scores`` and ``pred_classes``, sorted by score.
        """
        single = isinstance(images, np.ndarray)
        inputs = [self.make_input(image) for image in ([images] if single else images)]
        results: List[Optional[Instances]] = [None] * len(inputs)
        for batch in self.batches(inputs):
            for i, result in zip(batch, self.predict_batch([inputs[i] for i in batch])):
                results[i] = result
        return results[0] if single else results


class Predictor(BatchPredictor):
    """The PyTorch model in eval mode with its weights (:class:`BatchPredictor` for the
    batching; ``model`` is the ``DeformableDETR``).

    Args:
        cfg: the config (``MODEL.WEIGHTS``, ``MODEL.DEVICE``, ``INPUT.*``).
        allow_random_weights: run even when the weights leave the model partly random.
        max_batch_size, pad_batches: see :class:`BatchPredictor`.

    Raises (on construction):
        FileNotFoundError: ``MODEL.WEIGHTS`` names a missing file.
        CheckpointError: unreadable, unsafe or non-finite weights; no weights or weights
            that leave the model partly random, unless ``allow_random_weights``.
        RuntimeError: the weights could not be fetched.
    """

    def __init__(self, cfg: CfgNode, *, allow_random_weights: bool = False,
                 max_batch_size: int = 8, pad_batches: bool = False):
        super().__init__(augmentations=build_detr_augmentation(cfg, is_train=False),
                         input_format=cfg.INPUT.FORMAT, max_batch_size=max_batch_size,
                         pad_batches=pad_batches)
        self.cfg = cfg
        self.model = load_model(cfg, allow_random_weights=allow_random_weights)

    @torch.no_grad()
    def predict_batch(self, inputs: List[dict]) -> List[Instances]:
        return [out["instances"].to("cpu") for out in self.model(inputs)]


def load_model(cfg: CfgNode, *, allow_random_weights: bool = False) -> torch.nn.Module:
    """The model of ``cfg`` in eval mode with ``MODEL.WEIGHTS`` loaded by
    :func:`deformable_detr.checkpoint.load_inference_weights` (errors as :class:`Predictor`).
    On the CPU it turns on :func:`~deformable_detr.utils.cpu_memory.enable_cpu_memory_cache`."""
    check_weights(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.DEVICE == "cpu":
        enable_cpu_memory_cache()
    model = build_model(cfg).eval()
    try:
        load_inference_weights(model, cfg.MODEL.WEIGHTS,
                               allow_random_weights=allow_random_weights,
                               **class_head_options(cfg))
    except CheckpointError as e:
        raise CheckpointError(f"Cannot load MODEL.WEIGHTS: {e}") from None
    except OSError as e:  # a URL that cannot be fetched, an unreadable file
        raise RuntimeError(f"Cannot load MODEL.WEIGHTS {cfg.MODEL.WEIGHTS}: {e}") from e
    return model


def image_tool_parser(description: str, output_help: str = "folder for the pictures",
                      opts_option: bool = True) -> argparse.ArgumentParser:
    """A parser for a drawing tool with the arguments of :func:`prepare`: ``--config-file``,
    ``--input``, ``--output``, ``--allow-random-weights`` and the config KEY VALUE pairs
    (``--opts``; without ``opts_option`` the tool adds its own). The tool adds the others."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders or glob patterns (quote the globs)")
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS is empty or leaves parameters of the "
                             "model unloaded (random)")
    if opts_option:
        parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                            help="config KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def prepare(config_file: str, opts: Sequence[str], inputs: Sequence[str], output: str,
            allow_random_weights: bool = False, *, max_batch_size: int = 8,
            pad_batches: bool = False):
    """The set-up the drawing tools share: the config, the list of images, the model and
    its metadata (class names and colours); makes the output
    folder. Everything that can be checked without the model is checked first. Raises
    FileNotFoundError, ValueError (CheckpointError included) or RuntimeError with a message
    for the user.

    Returns:
        (cfg, image paths, Predictor, metadata)
    """
    cfg = setup_cfg(config_file, opts)
    check_output_dir(output)
    images = list_images(inputs)
    predictor = Predictor(cfg, allow_random_weights=allow_random_weights,
                          max_batch_size=max_batch_size, pad_batches=pad_batches)
    metadata = get_metadata(cfg)
    PathManager.mkdirs(output)
    return cfg, images, predictor, metadata


def prepare_or_report(*args, **kwargs):
    """:func:`prepare`, or None after logging why nothing can run (the tools then exit with
    status 2)."""
    try:
        return prepare(*args, **kwargs)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        logger.error(str(e))
        return None


def run_on_images(config_file: str, opts: Sequence[str], inputs: Sequence[str], output: str,
                  allow_random_weights: bool, make_handler: Callable) -> int:
    """The per-image drawing tools: the model of ``config_file`` + ``opts`` (``MODEL.WEIGHTS``,
    loaded safely), then ``make_handler(cfg, predictor, metadata)``'s handler called as
    ``handle(path, image)`` on each image of ``inputs`` (files, folders, globs).

    Returns:
        the exit status: 0, 1 if an image failed (reported by name), 2 if nothing could run
        (config, weights, inputs or output folder; reported).
    """
    prepared = prepare_or_report(config_file, opts, inputs, output, allow_random_weights)
    if prepared is None:
        return 2
    cfg, images, predictor, metadata = prepared
    return for_each_image(images, cfg.INPUT.FORMAT, make_handler(cfg, predictor, metadata))


def for_each_image(images: Sequence[str], image_format: str,
                   handle: Callable[[str, np.ndarray], None]) -> int:
    """Call ``handle(path, image)`` on each image; an image that cannot be read or handled
    (FileNotFoundError, ValueError) is reported by name and skipped. Returns the exit status:
    1 if any image failed, else 0."""
    return for_each_batch(images, image_format, 1, lambda batch: [None] * len(batch),
                          lambda path, image, _: handle(path, image))


def for_each_batch(images: Sequence[str], image_format: str, batch_size: int,
                   predictor: Callable[[List[np.ndarray]], List[Instances]],
                   handle: Callable[[str, np.ndarray, Instances], None],
                   check: Optional[Callable[[str, np.ndarray], None]] = None) -> int:
    """Read ``batch_size`` images at a time, run ``predictor`` on them in one call and call
    ``handle(path, image, instances)`` for each. An image that cannot be read, fails
    ``check(path, image)`` (run before the prediction) or ``handle`` (FileNotFoundError,
    ValueError) is reported by name and skipped. Returns the exit status: 1 if any image
    failed, else 0."""
    failed = 0
    for start in range(0, len(images), batch_size):
        batch = []
        for path in images[start:start + batch_size]:
            try:
                image = read_image_checked(path, image_format)
                if check is not None:
                    check(path, image)
                batch.append((path, image))
            except (FileNotFoundError, ValueError) as e:
                logger.error(str(e))
                failed += 1
        if not batch:
            continue
        results = predictor([image for _, image in batch])
        for (path, image), instances in zip(batch, results):
            try:
                handle(path, image, instances)
            except (FileNotFoundError, ValueError) as e:
                logger.error(str(e))
                failed += 1
    if failed:
        logger.error(f"{failed} of {len(images)} images failed")
    return 1 if failed else 0
