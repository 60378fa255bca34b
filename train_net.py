#!/usr/bin/env python
"""Train or evaluate Deformable DETR with detectron2.

Examples::

    # 8 GPUs, the released multi-scale recipe (total batch 32)
    python train_net.py --config-file configs/deformable_detr_R_50_50ep.yaml --num-gpus 8

    # evaluate a checkpoint
    python train_net.py --config-file configs/deformable_detr_R_50_50ep.yaml --eval-only \\
        MODEL.WEIGHTS output/model_final.pth

    # continue a run that stopped, from OUTPUT_DIR/last_checkpoint
    python train_net.py --config-file ... --num-gpus 8 --resume

    # 2 processes on a machine without GPUs (gloo)
    python train_net.py --config-file ... --num-gpus 2 MODEL.DEVICE cpu

On a machine without CUDA, or with ``MODEL.DEVICE cpu``, ``--num-gpus N`` starts N CPU
processes that train with the gloo backend.

``--eval-only`` refuses to evaluate a model whose weights were not all loaded (no
``MODEL.WEIGHTS``, or a file that misses some of the model's tensors or has no class-head
row for some of the dataset's classes); add ``--allow-random-weights`` to evaluate it anyway.

Weights of other classes (e.g. COCO's, to fine-tune on your dataset): the class heads get
the rows of the classes named alike and the prior for the others
(``MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT``, docs/custom_dataset.md).
"""
import logging
import sys

import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser as d2_default_argument_parser
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import deformable_detr  # noqa: F401  (registers the DeformableDETR meta-architecture)
from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import CheckpointError
from deformable_detr.data import register_shapes_dataset
from deformable_detr.engine import Trainer, class_head_options, launch, load_inference_weights

logger = logging.getLogger("detectron2")


def default_argument_parser():
    """detectron2's command line plus ``--allow-random-weights``."""
    parser = d2_default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with --eval-only: evaluate even when MODEL.WEIGHTS is empty or "
                             "leaves parameters of the model unloaded (random)")
    return parser


def load_config(args):
    """The config from ``--config-file`` and the trailing ``KEY VALUE`` options."""
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and cfg.MODEL.DEVICE.startswith("cuda"):
        # The released configs say cuda (detectron2's default); without CUDA train on CPUs.
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def setup(args):
    cfg = load_config(args)
    cfg.freeze()
    default_setup(cfg, args)
    # The package's own messages (checkpoint fallbacks, dropped annotations) in the log too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deformable_detr")
    if not torch.cuda.is_available():
        logger.warning("CUDA is not available: training on CPU (MODEL.DEVICE cpu)")
    # The synthetic "shapes" datasets under $DETECTRON2_DATASETS/shapes (configs/demo),
    # unless the caller registered them elsewhere; COCO is registered by detectron2 under
    # $DETECTRON2_DATASETS/coco.
    if "shapes_train" not in DatasetCatalog.list():
        register_shapes_dataset()
    return cfg


def main(args):
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


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    device = load_config(args).MODEL.DEVICE
    try:
        launch(
            main,
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


if __name__ == "__main__":
    invoke_main()
