"""Checks of a config against the datasets it names, run before training or evaluation."""
from __future__ import annotations

import logging
from typing import Sequence

from detectron2.data import MetadataCatalog

__all__ = ["check_num_classes"]

logger = logging.getLogger(__name__)


def check_num_classes(num_classes: int, dataset_names: Sequence[str]) -> None:
    """Raise ``ValueError`` if a dataset's ``thing_classes`` count differs from
    ``num_classes`` (``MODEL.DEFORMABLE_DETR.NUM_CLASSES``).

    A COCO-format dataset registered with ``register_coco_instances`` gets ``thing_classes``
    when its json is read, so call this after the dataset was loaded (e.g. after the data
    loader was built). Datasets without ``thing_classes`` are not checked.
    """
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is None:
            logger.warning(f"Dataset '{name}' has no thing_classes in its metadata; cannot "
                           f"check MODEL.DEFORMABLE_DETR.NUM_CLASSES={num_classes} against it")
            continue
        if len(classes) != num_classes:
            raise ValueError(
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES is {num_classes} but dataset '{name}' has "
                f"{len(classes)} classes (MetadataCatalog thing_classes); set "
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES {len(classes)}"
            )
