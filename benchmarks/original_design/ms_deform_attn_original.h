// Launchers of the original-design baseline kernels (ms_deform_attn_original.cu). Plain C++
// types only, so that the binding (binding.cpp) is the one file that includes the torch
// headers and nvcc compiles the kernels in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace original_design {

// Problem sizes, as in csrc/ms_deform_attn.h: N batch, S value positions, M heads, D channels
// per head, Lq queries, L levels, P points per level. 32-bit, like the original: the binding
// refuses problems whose element counts do not fit.
struct Sizes {
  int N, S, M, D, Lq, L, P;
};

// value [N, S, M, D], shapes [L, 2] int64 (H, W), starts [L] int64, loc [N, Lq, M, L, P, 2],
// attn [N, Lq, M, L, P] -> out [N, Lq, M * D]. All device pointers, contiguous.
template <typename scalar_t>
cudaError_t forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out, Sizes z,
                    cudaStream_t stream);

// grad_value must be zero-filled (the kernel adds into it); grad_loc and grad_attn are
// written in full.
template <typename scalar_t>
cudaError_t backward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                     scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn, Sizes z,
                     cudaStream_t stream);

}  // namespace original_design
