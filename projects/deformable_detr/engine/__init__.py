from .checkpointer import (
    ALLOWED_MISSING,
    SafeDetectionCheckpointer,
    class_head_options,
    dataset_class_names,
    load_inference_weights,
    load_pickle_weights,
    read_checkpoint,
)
from .checks import check_num_classes
from .launch import launch
from .trainer import Trainer

__all__ = ["ALLOWED_MISSING", "SafeDetectionCheckpointer", "Trainer", "check_num_classes",
           "class_head_options", "dataset_class_names", "launch", "load_inference_weights",
           "load_pickle_weights", "read_checkpoint"]
