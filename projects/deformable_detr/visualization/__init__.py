"""Pictures of what a trained model looks at (the paper's visualisation section)."""
from .gradients import (
    ELEMENTS,
    MAX_DETECTIONS,
    GradientMaps,
    draw_gradient_maps,
    gradient_maps,
    image_gradient_maps,
    save_gradient_maps,
    select_queries,
    write_gradient_pictures,
)

__all__ = [
    "ELEMENTS",
    "MAX_DETECTIONS",
    "GradientMaps",
    "draw_gradient_maps",
    "gradient_maps",
    "image_gradient_maps",
    "save_gradient_maps",
    "select_queries",
    "write_gradient_pictures",
]
