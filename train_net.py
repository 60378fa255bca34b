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

The work is done by :mod:`deformable_detr.engine.defaults` (``main`` here is its
``train_net_main``, what each process runs).
"""
from deformable_detr.engine.defaults import default_argument_parser, invoke_main, setup
from deformable_detr.engine.defaults import train_net_main as main

__all__ = ["default_argument_parser", "invoke_main", "main", "setup"]

if __name__ == "__main__":
    invoke_main()
