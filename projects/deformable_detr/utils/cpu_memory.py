"""A cache of huge-page memory blocks for large CPU tensors (opt-in, process-wide).

PyTorch's CPU allocator takes every tensor of more than a few MiB from the system as fresh
pages and gives them back when the tensor is freed: at 800x1333 one inference of the published
model allocates about 1 GiB that way, i.e. ~300,000 page faults per image, and its matrix
products then run on 4 KiB pages. :func:`enable_cpu_memory_cache` installs the extension's
allocator (csrc/cpu/huge_page_cache.cpp) as PyTorch's CPU allocator: tensors of 2 MiB and more
get 2 MiB-aligned blocks advised as transparent huge pages, kept when freed for the next tensor
of the same size class (sizes rounded up to 2 MiB); smaller ones go to PyTorch's allocator
as before. The tools, the predictor and the CPU trainer call it; set
``DEFORMABLE_DETR_CPU_MEMORY_CACHE=0`` to keep PyTorch's allocator.

Memory: the process keeps up to ``max_cached_bytes`` of freed blocks (its peak tensor memory
at most, for a fixed input size) instead of returning them at once;
:func:`empty_cpu_memory_cache` returns them. Huge pages need the kernel's transparent huge
page setting at ``madvise`` or ``always`` (``/sys/kernel/mm/transparent_hugepage/enabled``);
without it the cache still saves the page faults.
"""
from __future__ import annotations

import os

from ..layers.ms_deform_attn_op import _C  # the extension, None where it is not built

__all__ = [
    "ENV_VAR",
    "cpu_memory_cache_enabled",
    "cpu_memory_cache_stats",
    "disable_cpu_memory_cache",
    "empty_cpu_memory_cache",
    "enable_cpu_memory_cache",
]

#: Set to "0" to make :func:`enable_cpu_memory_cache` a no-op.
ENV_VAR = "DEFORMABLE_DETR_CPU_MEMORY_CACHE"
#: Default limit of the freed blocks kept.
DEFAULT_MAX_CACHED_BYTES = 4 << 30


def enable_cpu_memory_cache(max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES) -> bool:
    """Serve CPU tensors of 2 MiB and more from the huge-page cache; returns whether it is on.

    Idempotent (a second call only sets the limit). Off, returning False, without the compiled
    extension, when ``DEFORMABLE_DETR_CPU_MEMORY_CACHE=0``, or when another library installed
    a CPU allocator of a higher priority. Tensors allocated before keep working, as do those
    allocated while it was on after :func:`disable_cpu_memory_cache`.
    """
    if not isinstance(max_cached_bytes, int) or max_cached_bytes < 0:
        raise ValueError(f"max_cached_bytes must be an int >= 0, got {max_cached_bytes!r}")
    if _C is None or os.environ.get(ENV_VAR, "1") == "0":
        return False
    return bool(_C.enable_huge_page_cache(max_cached_bytes))


def disable_cpu_memory_cache() -> None:
    """Put PyTorch's CPU allocator back (cached blocks stay until
    :func:`empty_cpu_memory_cache`)."""
    if _C is not None:
        _C.disable_huge_page_cache()


def cpu_memory_cache_enabled() -> bool:
    return _C is not None and bool(_C.huge_page_cache_enabled())


def empty_cpu_memory_cache() -> None:
    """Return every cached (free) block to the system."""
    if _C is not None:
        _C.empty_huge_page_cache()


def cpu_memory_cache_stats() -> dict:
    """``{"reserved_bytes", "cached_bytes", "hits", "misses"}`` (zeros without the extension):
    bytes held in blocks (in use or free), bytes free in the cache, allocations served from it
    and allocations that took a new block."""
    if _C is None:
        return {"reserved_bytes": 0, "cached_bytes": 0, "hits": 0, "misses": 0}
    return dict(_C.huge_page_cache_stats())
