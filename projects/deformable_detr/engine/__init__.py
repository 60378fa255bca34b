"""Training, evaluation and inference: the trainer, the launcher, the set-up that
``train_net.py`` and the tools share, and the batched predictor."""
from .checks import check_num_classes
from .defaults import (
    default_argument_parser,
    invoke_main,
    merge_opts,
    setup,
    setup_cfg,
    train_net_main,
)
from .launch import launch
from .predictor import Predictor
from .trainer import Trainer

__all__ = ["Predictor", "Trainer", "check_num_classes", "default_argument_parser", "invoke_main",
           "launch", "merge_opts", "setup", "setup_cfg", "train_net_main"]
