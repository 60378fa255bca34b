"""Start one process per GPU (NCCL) or several CPU processes (gloo).

detectron2's ``launch`` picks NCCL whenever the machine has a GPU (0.6: always, asserting
CUDA), so processes that train on the CPU (``MODEL.DEVICE cpu``) need this.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import launch as d2_launch
from detectron2.utils import comm

from ..compat import create_local_process_group

__all__ = ["launch", "DEFAULT_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _find_free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def launch(
    main_func: Callable,
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    *,
    device: str = "cuda",
):
    """Run ``main_func(*args)`` in ``num_processes_per_machine * num_machines`` processes.

    Args:
        main_func: called in every process once the process group exists.
        num_processes_per_machine: processes on this machine (one per GPU on CUDA).
        num_machines, machine_rank, dist_url, timeout: as in ``detectron2.engine.launch``;
            ``dist_url="auto"`` picks a free local port (single machine only).
        device: the device the processes train on (``MODEL.DEVICE``). "cuda" (with CUDA
            available) delegates to detectron2's launch (NCCL, one GPU per process); anything
            else, or no CUDA, starts the processes with the gloo backend and sets no CUDA
            device.
    """
    use_cuda = device.startswith("cuda") and torch.cuda.is_available()
    if use_cuda:
        return d2_launch(main_func, num_processes_per_machine, num_machines=num_machines,
                         machine_rank=machine_rank, dist_url=dist_url, args=args,
                         timeout=timeout)
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url is None:
        raise ValueError("dist_url is needed to start several processes; use 'auto' on one "
                         "machine or tcp://HOST:PORT")
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("dist_url='auto' works on one machine only")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(
        _gloo_worker,
        nprocs=num_processes_per_machine,
        args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, args,
              timeout),
        daemon=False,
    )


def _gloo_worker(local_rank, main_func, world_size, num_processes_per_machine, machine_rank,
                 dist_url, args, timeout):
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error(f"Process group URL: {dist_url}")
        raise
    create_local_process_group(num_processes_per_machine)
    comm.synchronize()
    main_func(*args)
    # Without this, gloo may report "connection closed by peer" from processes exiting early.
    comm.synchronize()
    dist.destroy_process_group()

