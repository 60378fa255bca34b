"""detectron2 trainer for Deformable DETR."""
from __future__ import annotations

import logging
import os
import weakref

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import SafeDetectionCheckpointer, class_head_options
from ..compat import default_trainer_saves_state
from ..data.dataset_mapper import DeformableDetrDatasetMapper
from ..solver import build_optimizer
from ..utils.build_info import detectron2_has_compiled_ops
from .checks import check_num_classes
from .cpu_autocast import trainer_class
from .model_ema import ModelEMA

__all__ = ["Trainer"]


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the Deformable DETR data mapper, optimizer, COCO evaluation and
    a checkpointer that runs no pickled code, records the training dataset's class names and
    loads weights of other classes as ``MODEL.DEFORMABLE_DETR.CLASS_HEAD_INIT`` says.

    It also trains on CPUs with several processes: the model is wrapped in
    ``DistributedDataParallel`` without ``device_ids`` when ``MODEL.DEVICE`` is not CUDA
    (detectron2's ``create_ddp_model`` passes the local rank as a GPU id).
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with one change: the DDP wrapper's device_ids.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        on_cuda = cfg.MODEL.DEVICE.startswith("cuda")
        # AMP: on CUDA detectron2's AMPTrainer, whose GradScaler.step() unscales the gradients
        # before our optimizer's step() clips them (solver.maybe_add_full_model_gradient_
        # clipping); on the CPU bfloat16 autocast without a scaler (cpu_autocast).
        trainer_cls = trainer_class(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE,
                                    amp_key="SOLVER.AMP.ENABLED", device_key="MODEL.DEVICE")

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        ddp_kwargs = {} if on_cuda else {"device_ids": None}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # Reads checkpoints and MODEL.WEIGHTS without running pickled code; saves the
        # dataset's class names and fits class heads of other classes (CLASS_HEAD_INIT).
        self.checkpointer = SafeDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **class_head_options(cfg)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """detectron2's hooks, with :class:`ModelEMA` after the lr scheduler when
        ``MODEL_EMA.ENABLED`` (evaluations then see the averaged weights)."""
        ret = super().build_hooks()
        if not self.cfg.MODEL_EMA.ENABLED:
            return ret
        ema = ModelEMA(self.cfg.MODEL_EMA.DECAY, self.cfg.MODEL_EMA.WARMUP_ITERS)
        at = next(i for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)) + 1
        ret.insert(at, ema)

        def test_with_average():
            with ema.applied():
                self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        for i, h in enumerate(ret):
            if isinstance(h, hooks.EvalHook):
                ret[i] = hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, test_with_average)
        return ret

    def state_dict(self):
        ret = super().state_dict()
        if not default_trainer_saves_state():
            # detectron2 0.6 leaves the optimizer (AdamW moments) out of checkpoints, so a
            # resumed run restarted them from zero; later versions store it under this key.
            ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if not default_trainer_saves_state() and "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def resume_or_load(self, resume=True):
        """detectron2's, resuming from the newest readable checkpoint (see
        :class:`SafeDetectionCheckpointer`); when that checkpoint already reached
        ``SOLVER.MAX_ITER``, the final model is kept, or written, and the log says so."""
        super().resume_or_load(resume=resume)
        if resume and self.start_iter >= self.max_iter:
            # No iteration will run, so the periodic checkpointer would never write it.
            self.checkpointer.ensure_final_model(self.start_iter - 1, self.max_iter)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        loader = build_detection_train_loader(
            cfg, mapper=DeformableDetrDatasetMapper(cfg, is_train=True)
        )
        # The datasets were read above, so COCO-format ones now have their thing_classes.
        check_num_classes(cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, cfg.DATASETS.TRAIN)
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = build_detection_test_loader(
            cfg, dataset_name, mapper=DeformableDetrDatasetMapper(cfg, is_train=False)
        )
        check_num_classes(cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, [dataset_name])
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # The fast evaluation needs detectron2's compiled ops; pycocotools gives the same AP.
        return COCOEvaluator(
            dataset_name,
            tasks=("bbox",),
            distributed=True,
            output_dir=output_folder,
            use_fast_impl=detectron2_has_compiled_ops(),
        )

    @classmethod
    def build_model(cls, cfg):
        if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("MODEL.DEVICE is cuda but CUDA is not available; run with "
                               "MODEL.DEVICE cpu")
        return super().build_model(cfg)
