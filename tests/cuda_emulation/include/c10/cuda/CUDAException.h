// Emulator stand-in for c10/cuda/CUDAException.h. An emulated launch reports its errors by
// throwing at the launch itself, so the launch check has nothing left to do.
#pragma once

#include <c10/util/Exception.h>

#include "cuda_emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                            \
  do {                                                                                  \
    const cudaError_t __err = (EXPR);                                                   \
    TORCH_CHECK(__err == cudaSuccess, "CUDA error: ", cudaGetErrorString(__err));       \
  } while (0)
#define C10_CUDA_CHECK_WARN(EXPR) static_cast<void>(EXPR)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
