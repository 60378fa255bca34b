"""An exponential moving average of the model's weights, kept during training (``MODEL_EMA``)."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from detectron2.engine import HookBase
from torch import nn

from ..checkpoint import CheckpointError

__all__ = ["ModelEMA"]


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel (and DataParallel) keep the model in .module.
    return getattr(model, "module", model)


class ModelEMA(HookBase):
    """Keeps ``ema = d * ema + (1 - d) * weights`` over the model's parameters and floating-point
    buffers (batch-norm statistics) after every optimizer step, with
    ``d = decay * (1 - exp(-updates / warmup_iters))`` so that the first updates are not
    dominated by the random initial weights.

    Evaluations during training (``TEST.EVAL_PERIOD``) see the averaged weights
    (:meth:`applied`); after the last iteration they replace the model's own, so that
    ``model_final.pth`` and the final evaluation hold them. Checkpoints keep the model's own
    weights and the average beside them (the trainer's ``hooks`` state), so a resumed run
    continues both. Integer buffers (batch norm's ``num_batches_tracked``) are copied.

    Register it after ``LRScheduler`` and before ``PeriodicCheckpointer``.
    """

    def __init__(self, decay: float, warmup_iters: float = 0.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY (train.model_ema.decay) must be in [0, 1), "
                             f"got {decay}")
        if warmup_iters < 0:
            raise ValueError(f"MODEL_EMA.WARMUP_ITERS (train.model_ema.warmup_iters) must be >= 0, "
                             f"got {warmup_iters}")
        self.decay = float(decay)
        self.warmup_iters = float(warmup_iters)
        self.updates = 0
        self._ema: dict[str, torch.Tensor] | None = None
        self._pending: dict | None = None

    # -- the average ----------------------------------------------------------------------
    def _model_state(self) -> dict[str, torch.Tensor]:
        return _unwrap(self.trainer.model).state_dict(keep_vars=False)

    def _init_average(self) -> None:
        state = self._model_state()
        if self._pending is not None:
            saved, self._pending = self._pending, None
            average = saved["average"]
            bad = sorted(k for k, v in state.items()
                         if k not in average or tuple(average[k].shape) != tuple(v.shape))
            if bad:
                raise CheckpointError(
                    f"the checkpoint's MODEL_EMA average does not fit this model (missing or of "
                    f"another shape: {bad[:5]}{' ...' if len(bad) > 5 else ''}); resume from a "
                    "checkpoint of this config, or start a new OUTPUT_DIR")
            self._ema = {k: average[k].to(v.device, v.dtype).clone()
                         for k, v in state.items()}
            self.updates = int(saved["updates"])
        else:
            self._ema = {k: v.detach().clone() for k, v in state.items()}

    def current_decay(self) -> float:
        """The decay of the next update."""
        if self.warmup_iters <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup_iters))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the model's current weights into the average."""
        d = self.current_decay()
        state = self._model_state()
        floats_ema, floats_model = [], []
        for name, value in state.items():
            target = self._ema[name]
            if value.is_floating_point():
                floats_ema.append(target)
                floats_model.append(value)
            else:
                target.copy_(value)
        if floats_ema:
            # ema + (1 - d) * (w - ema) == d * ema + (1 - d) * w
            torch._foreach_lerp_(floats_ema, floats_model, 1.0 - d)
        self.updates += 1

    def _load_into_model(self, state: dict[str, torch.Tensor]) -> None:
        model_state = self._model_state()
        with torch.no_grad():
            for name, value in model_state.items():
                value.copy_(state[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights; its own come back after."""
        if self._ema is None:
            yield
            return
        backup = {k: v.detach().clone() for k, v in self._model_state().items()}
        self._load_into_model(self._ema)
        try:
            yield
        finally:
            self._load_into_model(backup)

    # -- hook -----------------------------------------------------------------------------
    def before_train(self) -> None:
        self._init_average()

    def after_step(self) -> None:
        self.update()
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            # The last step: the trained model is the average.
            self._load_into_model(self._ema)

    def state_dict(self) -> dict:
        if self._ema is None:
            return self._pending or {}
        return {"average": {k: v.detach().cpu() for k, v in self._ema.items()},
                "updates": self.updates}

    def load_state_dict(self, state_dict: dict) -> None:
        # Called by resume_or_load, before before_train has the model's state to match.
        if not isinstance(state_dict, dict) or not {"average", "updates"} <= set(state_dict):
            raise CheckpointError("the checkpoint's MODEL_EMA state needs 'average' and "
                                  "'updates'")
        self._pending = state_dict
        self._ema = None
