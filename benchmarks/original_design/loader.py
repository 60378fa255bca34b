#!/usr/bin/env python
"""Build and load the original-design baseline kernels (``ms_deform_attn_original.cu``).

JIT-compiled with ``torch.utils.cpp_extension.load`` into ``output/original_design_build``
(``$ORIGINAL_DESIGN_BUILD_DIR`` overrides it); a second load with unchanged sources only
checks the build. ``python benchmarks/original_design/loader.py --build`` compiles ahead of
time (``gpu_check.py`` does that while the extension builds, so the benchmark finds it ready).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = [os.path.join(HERE, "binding.cpp"), os.path.join(HERE, "ms_deform_attn_original.cu")]
NAME = "ms_deform_attn_original"


def build_dir() -> str:
    return os.environ.get("ORIGINAL_DESIGN_BUILD_DIR") or os.path.join(
        ROOT, "output", "original_design_build")


def _cuda_home():
    """The CUDA toolkit root (bin/nvcc and lib*/libcudart), as setup.py finds it: torch's own
    guess is wrong when the nvcc on PATH is a launcher script outside the toolkit."""
    import torch.utils.cpp_extension as cpp_ext

    for c in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_ext.CUDA_HOME,
              "/usr/local/cuda"):
        if c and os.path.exists(os.path.join(c, "bin", "nvcc")) and any(
            glob.glob(os.path.join(c, lib, "libcudart.so*")) for lib in ("lib", "lib64")
        ):
            return c
    return None


def load(verbose: bool = False, arch: str | None = None):
    """Compile (if needed) and import the baseline extension.

    ``arch`` (e.g. "9.0") defaults to ``$TORCH_CUDA_ARCH_LIST``, else the current GPU's
    compute capability: one architecture keeps the JIT build short.
    """
    import torch.utils.cpp_extension as cpp_ext

    if arch is None and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():
            raise RuntimeError("the original-design baseline needs a CUDA GPU (or an explicit "
                               "arch to only build it)")
        arch = "%d.%d" % torch.cuda.get_device_capability()
    if arch is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    cuda_home = _cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (bin/nvcc and lib/libcudart): set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home
    cpp_ext.CUDA_HOME = cuda_home
    path = build_dir()
    os.makedirs(path, exist_ok=True)
    return cpp_ext.load(
        name=NAME,
        sources=SOURCES,
        extra_include_paths=[HERE],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=path,
        verbose=verbose,
    )


def ms_deform_attn_original(ext):
    """``ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
    attention_weights)`` on the baseline kernels, differentiable in value, locations and
    weights."""

    class _Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial_shapes, level_start_index, loc, attn):
            ctx.save_for_backward(value, spatial_shapes, level_start_index, loc, attn)
            return ext.forward(value, spatial_shapes, level_start_index, loc, attn)

        @staticmethod
        def backward(ctx, grad_output):
            value, shapes, starts, loc, attn = ctx.saved_tensors
            grad_value, grad_loc, grad_attn = ext.backward(value, shapes, starts, loc, attn,
                                                           grad_output.contiguous())
            return grad_value, None, None, grad_loc, grad_attn

    def fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return _Function.apply(value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights)

    return fn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="store_true", help="compile (and import) it now")
    parser.add_argument("--arch", help="compute capability to build for, e.g. 9.0 (default: "
                        "$TORCH_CUDA_ARCH_LIST, else the local GPU's)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if not args.build:
        parser.print_help()
        return 0
    start = time.perf_counter()
    load(verbose=args.verbose, arch=args.arch)
    print(f"original-design baseline built in {build_dir()} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
