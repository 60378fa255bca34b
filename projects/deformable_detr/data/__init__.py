from .dataset_mapper import (  # noqa: F401
    DeformableDetrDatasetMapper,
    DetrResizeShortestEdge,
    build_detr_augmentation,
)
from .shapes_dataset import (  # noqa: F401
    SHAPES_CATEGORIES,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_shapes_dataset,
)
