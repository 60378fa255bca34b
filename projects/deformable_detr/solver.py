"""Optimizer of the released Deformable DETR models: AdamW with three learning rates and
gradient clipping by the global norm over the whole model."""
from __future__ import annotations

import itertools
import logging
from typing import Any, Dict, List, Sequence, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping

__all__ = [
    "build_clipped_optimizer",
    "build_optimizer",
    "get_param_groups",
    "maybe_add_full_model_gradient_clipping",
    "OPTIMIZERS",
]

logger = logging.getLogger(__name__)

#: Values of ``SOLVER.OPTIMIZER``. The released models use AdamW.
OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {"ADAMW": torch.optim.AdamW}


def get_param_groups(
    model: torch.nn.Module,
    *,
    base_lr: float,
    backbone_multiplier: float,
    linear_proj_multiplier: float,
    linear_proj_names: Sequence[str],
    backbone_prefix: str = "backbone.",
) -> List[Dict[str, Any]]:
    """Split the trainable parameters into the reference's three groups.

    - parameters whose name starts with ``backbone_prefix``: ``base_lr * backbone_multiplier``;
    - names containing any of ``linear_proj_names`` (the deformable attention's
      ``sampling_offsets`` and the decoder's ``reference_points``):
      ``base_lr * linear_proj_multiplier``;
    - everything else: ``base_lr``.

    Frozen parameters (``requires_grad=False``) are left out; a parameter shared by several
    modules appears once. Empty groups are dropped. Each group has a ``"name"`` for logs.
    """
    groups = {
        "backbone": {"params": [], "lr": base_lr * backbone_multiplier, "name": "backbone"},
        "linear_proj": {
            "params": [], "lr": base_lr * linear_proj_multiplier, "name": "linear_proj"
        },
        "base": {"params": [], "lr": base_lr, "name": "base"},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(backbone_prefix):
            key = "backbone"
        elif any(k in name for k in linear_proj_names):
            key = "linear_proj"
        else:
            key = "base"
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]


def maybe_add_full_model_gradient_clipping(
    optimizer_type: Type[torch.optim.Optimizer], clip_norm: float
) -> Type[torch.optim.Optimizer]:
    """Return a subclass of ``optimizer_type`` whose ``step()`` first clips all gradients of
    the optimizer's parameters together to a global L2 norm of at most ``clip_norm``
    (``torch.nn.utils.clip_grad_norm_``, as the reference does over ``model.parameters()``);
    ``optimizer_type`` itself when ``clip_norm <= 0``.

    detectron2's ``SOLVER.CLIP_GRADIENTS`` clips each parameter on its own, which is a
    different rule.

    Mixed precision: ``GradScaler.step(optimizer)`` (used by detectron2's ``AMPTrainer``)
    unscales the gradients before it calls ``optimizer.step()``, and skips the call when
    they hold inf/nan, so the clipping here always sees true, finite gradients. This holds
    The subclass never takes the scale into its step (fused optimizers otherwise do, and
    would be handed still-scaled gradients).
    """
    if clip_norm <= 0:
        return optimizer_type

    def __init__(self, *args, **kwargs):
        super(cls, self).__init__(*args, **kwargs)
        # GradScaler then unscales, and skips steps on inf, before calling step().
        self._step_supports_amp_scaling = False

    def step(self, closure=None):
        params = itertools.chain(*[g["params"] for g in self.param_groups])
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
        return super(cls, self).step(closure=closure)

    cls = type(optimizer_type.__name__ + "WithFullModelGradientClip", (optimizer_type,),
               {"__init__": __init__, "step": step})
    return cls


def _log_groups(groups: List[Dict[str, Any]]) -> None:
    for g in groups:
        logger.info(f"Optimizer group {g.get('name', '?')}: {len(g['params'])} tensors, "
                    f"{sum(p.numel() for p in g['params'])} parameters, lr {g['lr']:g}")


def build_clipped_optimizer(
    params: List[Dict[str, Any]],
    *,
    optimizer: Type[torch.optim.Optimizer] = torch.optim.AdamW,
    clip_norm: float = 0.1,
    foreach: bool = True,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer(params, **kwargs)`` whose ``step()`` first clips the gradients of all its
    parameters together to a global norm of ``clip_norm`` (none when ``clip_norm <= 0``):
    :func:`build_optimizer` for LazyConfigs, where ``params`` comes from
    :func:`get_param_groups` and the training script sets the model, as
    ``tools/lazyconfig_train_net.py`` does::

        optimizer = L(build_clipped_optimizer)(
            params=L(get_param_groups)(model=None, base_lr="${..lr}", backbone_multiplier=0.1,
                                       linear_proj_multiplier=0.1,
                                       linear_proj_names=["sampling_offsets",
                                                          "reference_points"]),
            lr=2e-4, weight_decay=1e-4, clip_norm=0.1)
        ...
        cfg.optimizer.params.model = model
        optim = instantiate(cfg.optimizer)

    ``foreach``: one call per step for all tensors, also on the CPU (see
    :func:`build_optimizer`).
    """
    params = list(params)
    if not params:
        raise ValueError("The model has no trainable parameters")
    if isinstance(params[0], dict):
        _log_groups(params)
    optimizer_type = maybe_add_full_model_gradient_clipping(optimizer, clip_norm)
    return optimizer_type(params, foreach=foreach, **kwargs)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer from ``SOLVER.*``: ``SOLVER.OPTIMIZER`` (see :data:`OPTIMIZERS`)
    with ``BASE_LR`` and ``WEIGHT_DECAY`` on every parameter group, the groups of
    :func:`get_param_groups` (``BACKBONE_MULTIPLIER``, ``LINEAR_PROJ_MULTIPLIER``,
    ``LINEAR_PROJ_NAMES``), and global-norm clipping at ``FULL_MODEL_CLIP_NORM``.

    Works with detectron2's ``build_lr_scheduler``, which scales each group's own lr.
    """
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not supported; "
                         f"choose one of {sorted(OPTIMIZERS)}")
    if cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.FULL_MODEL_CLIP_NORM > 0:
        raise ValueError("SOLVER.CLIP_GRADIENTS (per-parameter clipping) and "
                         "SOLVER.FULL_MODEL_CLIP_NORM (global clipping) are both enabled; "
                         "set SOLVER.FULL_MODEL_CLIP_NORM to 0 to use the former")
    groups = get_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER,
        linear_proj_multiplier=cfg.SOLVER.LINEAR_PROJ_MULTIPLIER,
        linear_proj_names=cfg.SOLVER.LINEAR_PROJ_NAMES,
    )
    if not groups:
        raise ValueError("The model has no trainable parameters")
    _log_groups(groups)
    optimizer_type = maybe_add_full_model_gradient_clipping(
        OPTIMIZERS[name], cfg.SOLVER.FULL_MODEL_CLIP_NORM
    )
    # detectron2's per-parameter clipping, only when asked for instead of the global one.
    optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(groups, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                          **_multi_tensor_kwargs())


def _multi_tensor_kwargs() -> Dict[str, bool]:
    """How the optimizer updates all tensors at once (the same update, to float rounding):
    ``fused`` (one kernel for all tensors: CUDA, and CPU from torch 2.4) or ``foreach`` (a
    few calls per step, instead of torch's default Python loop on the CPU)."""
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 4):
        return {"fused": True}
    return {"foreach": True}
