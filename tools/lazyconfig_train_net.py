#!/usr/bin/env python
"""Train or evaluate Deformable DETR from a LazyConfig (configs/lazy/), as detectron2's
tools/lazyconfig_train_net.py does, with the project's safe checkpointer and CPU training.

Examples::

    # 8 GPUs, the released recipe
    python tools/lazyconfig_train_net.py --config-file configs/lazy/deformable_detr_R_50_50ep.py \\
        --num-gpus 8

    # ViT-B + SimpleFeaturePyramid (detectron2 built from source, with timm)
    python tools/lazyconfig_train_net.py \\
        --config-file configs/lazy/deformable_detr_ViTDet_B_50ep.py --num-gpus 8

    # overrides are key=value; continue a run from train.output_dir
    python tools/lazyconfig_train_net.py --config-file ... --resume train.max_iter=200000

    # evaluate a checkpoint
    python tools/lazyconfig_train_net.py --config-file ... --eval-only \\
        train.init_checkpoint=output/model_final.pth

Without CUDA, ``train.device`` becomes cpu and ``--num-gpus N`` starts N CPU processes
(gloo). ``--eval-only`` refuses weights that leave the model partly random unless
``--allow-random-weights``.
"""
import logging
import sys

from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import deformable_detr.data  # noqa: F401  (registers the model and the shapes datasets)
from deformable_detr.checkpoint import CheckpointError
from deformable_detr.engine import launch
from deformable_detr.engine.lazy import do_train, evaluate, load_lazy_config

logger = logging.getLogger("detectron2")


def main(args):
    cfg = load_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    # The package's own messages (checkpoint fallbacks, dropped annotations) in the log too.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="deformable_detr")
    if args.eval_only:
        return evaluate(cfg, resume=args.resume, allow_random_weights=args.allow_random_weights)
    do_train(cfg, resume=args.resume)


def invoke_main() -> None:
    parser = default_argument_parser()
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="with --eval-only: evaluate even when the weights leave "
                             "parameters of the model unloaded (random)")
    args = parser.parse_args()
    print("Command Line Args:", args)
    device = str(load_lazy_config(args.config_file, args.opts).train.device)
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
               device=device)
    except CheckpointError as e:
        # The message names the file, the problem and the fix; a traceback adds nothing.
        logger.error(str(e))
        sys.exit(1)


if __name__ == "__main__":
    invoke_main()
