"""Pictures of what a trained model detects and looks at (the paper's visualisation
section): detections, attention sampling points and gradient maps."""
import matplotlib

# Before any module here imports pyplot: pictures go to files, no display is needed.
matplotlib.use("Agg")

from .attention import (  # noqa: E402
    MAX_ROWS,
    AttentionRecord,
    draw_attention,
    encoder_query_index,
    run_with_recording,
    sampling_of,
    top_detections,
    visualize_image,
    write_attention_pictures,
)
from .detections import (  # noqa: E402
    MAX_PICTURE_SIDE,
    check_picture_size,
    default_scale,
    draw_detections,
    write_detection_pictures,
)
from .gradients import (  # noqa: E402
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
    "MAX_PICTURE_SIDE",
    "MAX_ROWS",
    "AttentionRecord",
    "GradientMaps",
    "check_picture_size",
    "default_scale",
    "draw_attention",
    "draw_detections",
    "draw_gradient_maps",
    "encoder_query_index",
    "gradient_maps",
    "image_gradient_maps",
    "run_with_recording",
    "sampling_of",
    "save_gradient_maps",
    "select_queries",
    "top_detections",
    "visualize_image",
    "write_attention_pictures",
    "write_detection_pictures",
    "write_gradient_pictures",
]
