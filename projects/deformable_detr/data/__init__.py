"""Datasets and the dataset mapper. Importing this registers the synthetic "shapes" datasets
(``shapes_train``, ``shapes_val``) under ``$DETECTRON2_DATASETS/shapes`` unless datasets of
those names are registered already (:func:`register_shapes_dataset` points them elsewhere)."""
from .dataset_mapper import (  # noqa: F401
    DeformableDetrDatasetMapper,
    DetrResizeShortestEdge,
    build_detr_augmentation,
    read_image_checked,
)
from .shapes_dataset import (  # noqa: F401
    SHAPES_CATEGORIES,
    default_shapes_root,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_default_shapes_dataset,
    register_shapes_dataset,
)

register_default_shapes_dataset()
