"""Dataset mapper with the augmentation of the released Deformable DETR models."""
from __future__ import annotations

import copy
import logging
import math
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

__all__ = [
    "INVALID_ANNOTATION_POLICIES",
    "DeformableDetrDatasetMapper",
    "DetrResizeShortestEdge",
    "box_problem",
    "build_detr_augmentation",
    "read_image_checked",
]

logger = logging.getLogger(__name__)

#: Values of ``INPUT.INVALID_ANNOTATIONS``.
INVALID_ANNOTATION_POLICIES = ("drop", "error")


def read_image_checked(path: str, image_format: str) -> np.ndarray:
    """detectron2's ``read_image`` with errors that name the file.

    Returns:
        [H, W, C] uint8 in ``image_format`` (EXIF orientation applied).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is truncated, corrupt or not an image.
    """
    try:
        return utils.read_image(path, format=image_format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"Image file not found: {path}") from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncated or corrupt files with OSError/SyntaxError/ValueError.
        raise ValueError(f"Cannot read image file {path}: corrupt or not an image "
                         f"({type(e).__name__}: {e})") from e


def box_problem(bbox, bbox_mode, image_hw: Tuple[int, int]) -> Optional[str]:
    """What makes an annotation's box unusable, or None if it is fine.

    A box is unusable if its coordinates are not 4 finite numbers, its width or height is
    zero or negative, or it is far outside the image: no overlap with it, or reaching
    further out than the image's own width (height) on a side. Boxes partly outside within
    that margin are clipped to the image, as by detectron2 and the reference code.

    Args:
        bbox, bbox_mode: as in a detectron2 dataset dict.
        image_hw: (height, width) of the image the box belongs to.
    """
    try:
        coords = [float(v) for v in bbox]
    except (TypeError, ValueError):
        return f"coordinates {bbox!r} are not numbers"
    if len(coords) != 4:
        return f"{len(coords)} coordinates instead of 4"
    if not all(math.isfinite(v) for v in coords):
        return "NaN or infinite coordinates"
    # Before any transform: transforms take the min and max of the corners, which would
    # turn a negative size into another, valid-looking box.
    x0, y0, x1, y1 = BoxMode.convert(coords, bbox_mode, BoxMode.XYXY_ABS)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return "coordinates too large"
    if x1 <= x0 or y1 <= y0:
        return f"width {x1 - x0:g} and height {y1 - y0:g} (both must be > 0)"
    h, w = image_hw
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
        return f"outside the {w}x{h} image"
    if x0 < -w or y0 < -h or x1 > 2 * w or y1 > 2 * h:
        return f"far outside the {w}x{h} image"
    return None


class DetrResizeShortestEdge(T.ResizeShortestEdge):
    """:class:`ResizeShortestEdge` with the output size arithmetic of the reference code.

    detectron2 scales both sides by one float factor and rounds each; the reference
    (DETR's ``get_size_with_aspect_ratio``) first lowers the requested short side to
    ``round(max_size * short / long)`` when the long side would exceed ``max_size``, then sets
    the short side exactly and truncates the long one. The two differ by one pixel on many
    images (480x640 at 800: reference 800x1066, detectron2 800x1067), which changes the
    pixels a released model sees at test time.
    """

    def get_transform(self, image):
        h, w = image.shape[:2]
        if self.is_range:
            size = np.random.randint(self.short_edge_length[0], self.short_edge_length[1] + 1)
        else:
            size = np.random.choice(self.short_edge_length)
        if size == 0:
            return T.NoOpTransform()
        newh, neww = self.get_output_shape(h, w, int(size), self.max_size)
        return T.ResizeTransform(h, w, newh, neww, self.interp)

    @staticmethod
    def get_output_shape(
        oldh: int, oldw: int, short_edge_length: int, max_size: int
    ) -> Tuple[int, int]:
        """Output (h, w) for an input of (oldh, oldw), as the reference computes it."""
        size = short_edge_length
        if max_size is not None and max_size < sys.maxsize:
            short, long = float(min(oldh, oldw)), float(max(oldh, oldw))
            if long / short * size > max_size:
                # Python's round (half to even), as in the reference.
                size = int(round(max_size * short / long))
        if (oldw <= oldh and oldw == size) or (oldh <= oldw and oldh == size):
            return oldh, oldw
        if oldw < oldh:
            return int(size * oldh / oldw), size
        return size, int(size * oldw / oldh)


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """The augmentations of the released models.

    Training: horizontal flip (p=0.5); then with p=0.5 the crop branch (short side resized to
    one of ``INPUT.DETR_CROP.RESIZE_SHORT`` with no long-side limit, then a random crop whose
    height and width are each uniform in [CROP_SIZE_MIN, min(side, CROP_SIZE_MAX)]); then the
    multi-scale resize (short side one of ``INPUT.MIN_SIZE_TRAIN``, long side at most
    ``INPUT.MAX_SIZE_TRAIN``). This is the reference's
    ``RandomSelect(resize, Compose([resize_short, crop, resize]))``: both branches end with
    the same resize. Test: short side ``INPUT.MIN_SIZE_TEST``, long side at most
    ``INPUT.MAX_SIZE_TEST``.
    """
    if not is_train:
        return [DetrResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    augs: List[T.Augmentation] = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    crop = cfg.INPUT.DETR_CROP
    if crop.ENABLED:
        if not 0 < crop.CROP_SIZE_MIN <= crop.CROP_SIZE_MAX:
            raise ValueError(
                "INPUT.DETR_CROP needs 0 < CROP_SIZE_MIN <= CROP_SIZE_MAX, got "
                f"{crop.CROP_SIZE_MIN} and {crop.CROP_SIZE_MAX}"
            )
        augs.append(
            T.RandomApply(
                T.AugmentationList(
                    [
                        DetrResizeShortestEdge(list(crop.RESIZE_SHORT), sample_style="choice"),
                        T.RandomCrop("absolute_range", (crop.CROP_SIZE_MIN, crop.CROP_SIZE_MAX)),
                    ]
                ),
                prob=0.5,
            )
        )
    augs.append(
        DetrResizeShortestEdge(
            cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        )
    )
    return augs


class DeformableDetrDatasetMapper:
    """Map a detectron2 dataset dict to the model's input.

    Output: the input dict plus ``"image"``, a uint8 tensor [3, H, W] in ``image_format``
    (the transformed image), and in training ``"instances"`` with ``gt_boxes`` (absolute
    XYXY in the transformed image, clipped to it) and ``gt_classes`` (contiguous ids).
    Crowd annotations are dropped, and so are boxes left empty by the transforms (e.g.
    cropped away). Annotations whose box is unusable (see :func:`box_problem`) are
    reported with the image id, once per image (per data-loader worker), and dropped; with
    ``invalid_annotations="error"`` they raise ``ValueError``. ``"height"``/``"width"`` keep
    the original size, to which inference results are rescaled. At test time annotations
    are removed.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str,
        invalid_annotations: str = "drop",
    ):
        """
        Args:
            is_train: whether to keep and transform annotations.
            augmentations: applied in order to the image and the boxes.
            image_format: a PIL mode or "BGR"; the released models use "RGB".
            invalid_annotations: "drop" (report and drop unusable boxes) or "error".
        """
        if invalid_annotations not in INVALID_ANNOTATION_POLICIES:
            raise ValueError(f"INPUT.INVALID_ANNOTATIONS must be one of "
                             f"{INVALID_ANNOTATION_POLICIES}, got {invalid_annotations!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.invalid_annotations = invalid_annotations
        # Images whose bad annotations were reported; each epoch maps them again.
        self._reported = set()
        mode = "training" if is_train else "inference"
        logger.info(f"[DeformableDetrDatasetMapper] Augmentations in {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {
            "is_train": is_train,
            "augmentations": build_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "invalid_annotations": cfg.INPUT.INVALID_ANNOTATIONS,
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        image_hw = image.shape[:2]

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        # A tensor, not a numpy array: the data loader moves tensors through shared memory.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        # An image without annotations gets empty instances: it still teaches "no object".
        annos = [obj for obj in dataset_dict.pop("annotations", [])
                 if obj.get("iscrowd", 0) == 0]
        annos = [
            utils.transform_instance_annotations(self._boxes_only(obj), transforms, image_shape)
            for obj in self._usable(annos, image_hw, dataset_dict)
        ]
        # annotations_to_instances clips the boxes to the image; empty ones go after.
        instances = utils.annotations_to_instances(annos, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)
        return dataset_dict

    def _usable(self, annos: List[dict], image_hw: Tuple[int, int],
                dataset_dict: dict) -> List[dict]:
        """``annos`` without those with unusable boxes, which are reported or raised."""
        kept, problems = [], []
        for i, obj in enumerate(annos):
            problem = box_problem(obj["bbox"], obj["bbox_mode"], image_hw)
            if problem is None:
                kept.append(obj)
            else:
                problems.append(f"annotation {obj.get('id', f'#{i}')} bbox {obj['bbox']}: "
                                f"{problem}")
        if not problems:
            return kept
        image_id = dataset_dict.get("image_id")
        where = f"image id {image_id} ({dataset_dict['file_name']})"
        listing = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                             if len(problems) > 5 else "")
        if self.invalid_annotations == "error":
            raise ValueError(f"{where} has {len(problems)} unusable box annotation(s): "
                             f"{listing}. Fix them in the dataset, or set "
                             "INPUT.INVALID_ANNOTATIONS drop to train without them")
        key = dataset_dict["file_name"] if image_id is None else image_id
        if key not in self._reported:
            self._reported.add(key)
            logger.warning(f"{where}: dropped {len(problems)} unusable box annotation(s): "
                           f"{listing}. Fix them in the dataset (INPUT.INVALID_ANNOTATIONS "
                           "error makes this an error)")
        return kept

    @staticmethod
    def _boxes_only(obj: dict) -> dict:
        # Masks and keypoints are not used by the detector; transforming them costs time.
        return {k: v for k, v in obj.items() if k not in ("segmentation", "keypoints")}
