from .checkpointer import SafeDetectionCheckpointer, load_pickle_weights
from .checks import check_num_classes
from .launch import launch
from .trainer import Trainer

__all__ = ["SafeDetectionCheckpointer", "Trainer", "check_num_classes", "launch",
           "load_pickle_weights"]
