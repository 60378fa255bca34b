"""Shims for detectron2 0.6, the last release (what ``tools/install_detectron2.py`` installs).

Every workaround for an older detectron2 lives here, and each one steps aside where
detectron2 itself has the feature. They test for the feature, never for a version:
detectron2 built from its current source still calls itself 0.6.

What each shim stands in for, missing from detectron2 0.6:

- :func:`create_local_process_group`: ``comm.create_local_process_group`` (0.6: every
  process creates every machine's group itself).
- :func:`image_list_from_tensors`: ``ImageList.from_tensors(..., padding_constraints=)``
  (square padding, asked for by ViT backbones through ``Backbone.padding_constraints``).
- :func:`default_trainer_saves_state`: ``DefaultTrainer.state_dict`` with its inner
  trainer's state, i.e. the optimizer's (AdamW moments); 0.6 leaves it out of checkpoints.

Remove a shim, and its use, once detectron2 0.6 is no longer supported.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.structures import ImageList
from detectron2.utils import comm

__all__ = [
    "HAS_PADDING_CONSTRAINTS",
    "create_local_process_group",
    "default_trainer_saves_state",
    "image_list_from_tensors",
]

#: detectron2 > 0.6: ``ImageList.from_tensors(..., padding_constraints=...)``.
HAS_PADDING_CONSTRAINTS = (
    "padding_constraints" in inspect.signature(ImageList.from_tensors).parameters
)


def default_trainer_saves_state() -> bool:
    """True where ``DefaultTrainer.state_dict()`` holds its inner trainer's state (the
    optimizer's) under ``"_trainer"`` and ``load_state_dict`` restores it (detectron2 > 0.6)."""
    # Imported here: detectron2.engine is heavy, and the model code needs none of it.
    from detectron2.engine import DefaultTrainer

    return "load_state_dict" in DefaultTrainer.__dict__


def create_local_process_group(num_processes_per_machine: int) -> None:
    """Create the group of the processes on this machine, which ``comm.get_local_rank()``
    and ``comm.get_local_size()`` use; call it in every process right after
    ``init_process_group``."""
    if hasattr(comm, "create_local_process_group"):  # detectron2 > 0.6
        comm.create_local_process_group(num_processes_per_machine)
        return
    # detectron2 0.6: every process must create every machine's group, in the same order.
    assert comm._LOCAL_PROCESS_GROUP is None
    num_machines = dist.get_world_size() // num_processes_per_machine
    machine_rank = dist.get_rank() // num_processes_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
        group = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


def image_list_from_tensors(tensors: List[torch.Tensor], size_divisibility: int = 0,
                            pad_value: float = 0.0,
                            padding_constraints: Optional[Dict[str, int]] = None) -> ImageList:
    """``ImageList.from_tensors`` with ``padding_constraints`` (``{"size_divisibility": d,
    "square_size": s}``) on every detectron2: the batch is padded to an ``s`` x ``s``
    square when ``s > 0``, then up to a multiple of ``d`` (which replaces
    ``size_divisibility``). Every image must fit in the square."""
    if HAS_PADDING_CONSTRAINTS or not padding_constraints:
        kwargs = {"padding_constraints": padding_constraints} if padding_constraints else {}
        return ImageList.from_tensors(tensors, size_divisibility, pad_value, **kwargs)
    # detectron2 0.6: the same arithmetic as later versions' from_tensors.
    size_divisibility = padding_constraints.get("size_divisibility", size_divisibility)
    square = padding_constraints.get("square_size", 0)
    images = ImageList.from_tensors(tensors, size_divisibility, pad_value)
    if square <= 0:
        return images
    side = square
    if size_divisibility > 1:
        side = -(-side // size_divisibility) * size_divisibility
    h, w = images.tensor.shape[-2:]
    if h > side or w > side:
        raise ValueError(f"images of up to {h}x{w} do not fit the square padding {side}x{side}")
    padded = F.pad(images.tensor, [0, side - w, 0, side - h], value=pad_value)
    return ImageList(padded, images.image_sizes)
