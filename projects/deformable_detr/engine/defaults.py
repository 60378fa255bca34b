"""The set-up that ``train_net.py`` and the tools share: the config from a file and
``KEY VALUE`` options (with errors that say what to fix, and the CPU when CUDA is missing),
and what ``train_net.py`` runs (:func:`train_net_main`, :func:`invoke_main`), so that other
code (``tools/run_demo.py``, tests) trains in its own process the same way.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from typing import List, Optional, Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser as d2_default_argument_parser
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import CheckpointError, class_head_options, load_inference_weights
from ..config import add_deformable_detr_config
from ..utils.cpu_memory import enable_cpu_memory_cache
from .launch import launch
from .trainer import Trainer

__all__ = [
    "default_argument_parser",
    "invoke_main",
    "merge_opts",
    "setup",
    "setup_cfg",
    "train_net_main",
]

logger = logging.getLogger("detectron2")


def setup_cfg(config_file: str, opts: Sequence[str] = (), *, freeze: bool = True) -> CfgNode:
    """detectron2 config with the Deformable DETR keys, ``config_file`` (none when empty) and
    ``opts`` merged; ``MODEL.DEVICE`` falls back to the CPU when CUDA is not available (the
    released configs say cuda, detectron2's default).

    Raises:
        FileNotFoundError: no such config file.
        ValueError: ``opts`` is not KEY VALUE pairs, names a key the config does not have
            (with the closest keys as suggestions) or gives a value of the wrong type.
    """
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"Config file not found: {config_file}")
        cfg.merge_from_file(config_file)
    merge_opts(cfg, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    return cfg


def _config_keys(cfg: CfgNode, prefix: str = "") -> List[str]:
    keys = []
    for k, v in cfg.items():
        keys += (_config_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode)
                 else [f"{prefix}{k}"])
    return keys


def merge_opts(cfg: CfgNode, opts: Sequence[str]) -> None:
    """``cfg.merge_from_list(opts)`` with errors that say what to fix (a ValueError)."""
    opts = list(opts)
    if len(opts) % 2:
        raise ValueError(f"config options must be KEY VALUE pairs, got an odd number "
                         f"({len(opts)}): {' '.join(map(str, opts))}")
    keys = _config_keys(cfg)
    for key in opts[0::2]:
        if key not in keys:
            close = difflib.get_close_matches(str(key), keys, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"unknown config key {key!r}{hint}")
    try:
        cfg.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"bad config option: {e}") from None


def default_argument_parser() -> argparse.ArgumentParser:
    """detectron2's command line plus ``--allow-random-weights``."""
    parser = d2_default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with --eval-only: evaluate even when MODEL.WEIGHTS is empty or "
                             "leaves parameters of the model unloaded (random)")
    return parser


def setup(args: argparse.Namespace) -> CfgNode:
    """The frozen config of ``args`` (``--config-file`` and the trailing options), with
    detectron2's ``default_setup`` (logs, config copy in ``OUTPUT_DIR``, seeds) done, and on
    the CPU :func:`~deformable_detr.utils.cpu_memory.enable_cpu_memory_cache`."""
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    if cfg.MODEL.DEVICE == "cpu":
        enable_cpu_memory_cache()
    # The package's own messages (checkpoint fallbacks, dropped annotations) in the log too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deformable_detr")
    if not torch.cuda.is_available():
        logger.warning("CUDA is not available: training on CPU (MODEL.DEVICE cpu)")
    return cfg


def train_net_main(args: argparse.Namespace):
    """What ``train_net.py`` runs in each process: train (resuming with ``--resume``), or with
    ``--eval-only`` evaluate ``MODEL.WEIGHTS`` (refused when it leaves the model partly
    random, unless ``--allow-random-weights``).

    Returns:
        the evaluation results with ``--eval-only``, else what ``Trainer.train`` returns.

    Raises:
        CheckpointError: unreadable, unsafe or incomplete weights.
    """
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_inference_weights(
            model, cfg.MODEL.WEIGHTS, save_dir=cfg.OUTPUT_DIR, resume=args.resume,
            allow_random_weights=getattr(args, "allow_random_weights", False),
            **class_head_options(cfg),
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main(argv: Optional[Sequence[str]] = None) -> None:
    """``train_net.py``: parse ``argv`` and run :func:`train_net_main` in ``--num-gpus``
    processes (CPU processes with gloo when the config's device is not CUDA). A config or
    checkpoint error exits with its message (status 2 and 1), without a traceback."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    try:
        device = setup_cfg(args.config_file, args.opts).MODEL.DEVICE
    except (FileNotFoundError, ValueError) as e:
        logger.error(str(e))
        sys.exit(2)
    try:
        launch(
            train_net_main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            device=device,
        )
    except CheckpointError as e:
        # The message names the file, the problem and the fix; a traceback adds nothing.
        logger.error(str(e))
        sys.exit(1)
