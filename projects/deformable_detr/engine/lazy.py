"""Training and evaluation from a detectron2 LazyConfig (``configs/lazy/``).

The layout of detectron2's ``tools/lazyconfig_train_net.py`` (``cfg.model``,
``cfg.dataloader.{train,test,evaluator}``, ``cfg.optimizer``, ``cfg.lr_multiplier``,
``cfg.train``), with what ``train_net.py`` gives yacs configs: the checkpointer that runs no
pickled code, writes atomically, resumes from the newest readable checkpoint and fits class
heads of other classes (:class:`SafeDetectionCheckpointer`); evaluation that refuses
weights leaving the model partly random (:func:`load_inference_weights`); DDP on CPU
processes (gloo, see :func:`.launch.launch`). ``tools/lazyconfig_train_net.py`` is its
command line.

``cfg.train`` keys: those of detectron2's ``configs/common/train.py`` (``output_dir``,
``init_checkpoint``, ``max_iter``, ``amp.enabled``, ``ddp``, ``checkpointer``,
``eval_period``, ``log_period``, ``device``), ``class_head_init`` ("by_name" or
"reinit", as ``MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT``) and ``model_ema`` (``enabled``,
``decay``, ``warmup_iters``, as ``MODEL_EMA``: :class:`.model_ema.ModelEMA`).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.engine import default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..checkpoint.checkpointer import SafeDetectionCheckpointer, load_inference_weights
from .cpu_autocast import trainer_class
from .model_ema import ModelEMA

__all__ = ["build_lazy_model", "do_test", "do_train", "lazy_class_names", "load_lazy_config"]

logger = logging.getLogger("detectron2")


def load_lazy_config(path: str, overrides: List[str] = ()):
    """A LazyConfig file with ``key=value`` overrides applied; ``train.device`` "cuda"
    becomes "cpu" on a machine without CUDA (the shipped configs say cuda, as detectron2's)."""
    cfg = LazyConfig.load(path)
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    if str(cfg.train.device).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    return cfg


def _dataset_names(node) -> List[str]:
    names = node.dataset.names if "dataset" in node and "names" in node.dataset else []
    return [names] if isinstance(names, str) else list(names)


def lazy_class_names(cfg) -> Optional[List[str]]:
    """The model's class names: the ``thing_classes`` of the first training dataset (else
    of the first test dataset) when it has ``cfg.model.num_classes`` of them; else None.
    Datasets read from a COCO json get their names when the json is read."""
    num_classes = cfg.model.get("num_classes")
    for node in (cfg.dataloader.get("train"), cfg.dataloader.get("test")):
        if node is None:
            continue
        for name in _dataset_names(node)[:1]:
            names = MetadataCatalog.get(name).get("thing_classes", None)
            if names is not None and (num_classes is None or len(names) == num_classes):
                return list(names)
    return None


def _checkpointer_options(cfg) -> Dict[str, Any]:
    return {"class_names": lambda: lazy_class_names(cfg),
            "class_head_init": cfg.train.get("class_head_init", "by_name")}


def build_lazy_model(cfg) -> torch.nn.Module:
    """``instantiate(cfg.model)`` on ``cfg.train.device``."""
    device = str(cfg.train.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but CUDA is not available; run with "
                           "train.device=cpu")
    model = instantiate(cfg.model)
    model.to(device)
    return model


def do_test(cfg, model) -> Optional[dict]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``;
    None when the config has no evaluator."""
    if "evaluator" not in cfg.dataloader:
        return None
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                               instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def evaluate(cfg, *, resume: bool = False, allow_random_weights: bool = False) -> Optional[dict]:
    """Load ``cfg.train.init_checkpoint`` (with ``resume``: the newest readable checkpoint
    of ``cfg.train.output_dir``) into the model, refusing weights that leave it partly
    random unless ``allow_random_weights``, and evaluate it."""
    model = build_lazy_model(cfg)
    load_inference_weights(model, cfg.train.init_checkpoint, save_dir=cfg.train.output_dir,
                           resume=resume, allow_random_weights=allow_random_weights,
                           **_checkpointer_options(cfg))
    model = create_ddp_model(model, **_ddp_kwargs(cfg, ddp_options=False))
    return do_test(cfg, model)


def _ddp_kwargs(cfg, ddp_options: bool = True) -> Dict[str, Any]:
    kwargs = dict(cfg.train.get("ddp", {})) if ddp_options else {}
    if not str(cfg.train.device).startswith("cuda"):
        # detectron2 passes the local rank as a GPU id; CPU processes have none.
        kwargs["device_ids"] = None
    return kwargs


def do_train(cfg, *, resume: bool = False) -> None:
    """Train as ``cfg`` says: the model, its optimizer (``cfg.optimizer.params.model`` is
    set here), data, lr schedule, periodic checkpoints, evaluation and logs in
    ``cfg.train.output_dir``; with ``resume``, continue from the newest readable checkpoint
    there, else start from ``cfg.train.init_checkpoint``."""
    # AMP: detectron2's AMPTrainer on CUDA, bfloat16 autocast on the CPU (cpu_autocast).
    trainer_cls = trainer_class(cfg.train.amp.enabled, str(cfg.train.device),
                                amp_key="train.amp.enabled", device_key="train.device")
    model = build_lazy_model(cfg)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **_ddp_kwargs(cfg))
    trainer = trainer_cls(model, train_loader, optimizer)
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer,
                                             **_checkpointer_options(cfg))
    max_iter = cfg.train.max_iter
    ema_cfg = cfg.train.get("model_ema", None) or {}
    ema = (ModelEMA(ema_cfg.get("decay", 0.999), ema_cfg.get("warmup_iters", 0))
           if ema_cfg.get("enabled", False) else None)

    def test():
        # Evaluations during training see the averaged weights (see ModelEMA).
        with ema.applied() if ema is not None else contextlib.nullcontext():
            return do_test(cfg, model)

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        ema,
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, test),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, max_iter),
                             period=cfg.train.log_period)
        if comm.is_main_process() else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    # The checkpoint holds the iteration that had just finished.
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    if start_iter >= max_iter:
        # No iteration will run, so the periodic checkpointer would never write it.
        checkpointer.ensure_final_model(start_iter - 1, max_iter)
        return
    trainer.train(start_iter, max_iter)
