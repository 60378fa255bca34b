"""Mixed-precision training on the CPU: the forward pass and the losses under
``torch.autocast("cpu", dtype=torch.bfloat16)``.

detectron2's ``AMPTrainer`` autocasts on CUDA only. On a CPU with bfloat16 instructions
(AVX512-BF16 or AMX) the matrix products and convolutions then run in bfloat16 with float32
accumulation; the parameters, their gradients and the optimizer stay float32. No gradient
scaler is needed: bfloat16 has float32's exponent range, so small gradients do not flush to
zero as they do in float16. Without those instructions oneDNN and MKL emulate bfloat16 and a
training iteration is several times slower than in float32 (docs/training.md), so the trainer
refuses to start there.
"""
from __future__ import annotations

import logging
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["CPUAutocastTrainer", "cpu_has_native_bfloat16", "trainer_class"]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def trainer_class(amp: bool, device: str, *, amp_key: str, device_key: str) -> type:
    """The detectron2 trainer class for training on ``device`` (a torch device string):
    ``SimpleTrainer`` without ``amp``; with it, detectron2's ``AMPTrainer`` on CUDA (float16
    and a gradient scaler) and :class:`CPUAutocastTrainer` on the CPU.

    Raises:
        ValueError: naming ``amp_key`` (and ``device_key``) when AMP is asked for on another
            device, or on a CPU without bfloat16 instructions.
    """
    if not amp:
        return SimpleTrainer
    kind = torch.device(device).type
    if kind == "cuda":
        return AMPTrainer
    if kind != "cpu":
        raise ValueError(f"{amp_key} trains with autocast on cuda or cpu, got {device_key} "
                         f"{device!r}")
    if not cpu_has_native_bfloat16():
        raise ValueError(
            f"{amp_key} on the CPU trains under bfloat16 autocast, but this CPU has no bfloat16 "
            "instructions (AVX512-BF16 or AMX): bfloat16 would be emulated, several times "
            f"slower than float32. Turn {amp_key} off to train in float32."
        )
    return CPUAutocastTrainer


class CPUAutocastTrainer(SimpleTrainer):
    """:class:`SimpleTrainer` with the forward pass and the losses under CPU autocast.

    Each step: the next batch, ``model(batch)`` (a dict of losses) under
    ``torch.autocast("cpu", dtype)``, ``zero_grad``, ``backward`` of their sum outside
    autocast (backward ops run in the dtypes of their forward ops), metrics, optimizer step.
    """

    def __init__(self, model, data_loader, optimizer, *, dtype: torch.dtype = torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.dtype = dtype
        logging.getLogger(__name__).info(f"Training under CPU autocast to {dtype}")

    def run_step(self):
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast("cpu", dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()
        after_backward = getattr(self, "after_backward", None)  # detectron2 > 0.6 has hooks
        if after_backward is not None:
            after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()
