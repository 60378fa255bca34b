// Multi-scale deformable attention: kernel entry points shared by the CPU and CUDA builds.
//
// Shapes (N batch, S = sum of H_l * W_l value positions, M heads, D channels per head,
// Lq queries, L levels, P points):
//   value               [N, S, M, D]          float64/float32/float16/bfloat16
//   spatial_shapes      [L, 2] int64 (H, W)
//   level_start_index   [L] int64
//   sampling_loc        [N, Lq, M, L, P, 2]   (x, y) in [0, 1]
//   attn_weight         [N, Lq, M, L, P]
//   output              [N, Lq, M * D]        the value dtype
//
// Dtypes: the locations and weights each have the value's dtype or, under a float16/bfloat16
// value, float32 (what autocast produces: a half-precision linear layer feeds the value, a
// float32 softmax the weights). The kernels see them in the accumulation dtype (float32 for
// half values, else the value's), and the gradients come back in each input's own dtype.
//
// Memory safety never depends on the contents of spatial_shapes and level_start_index: the
// kernels treat a level whose (H, W, start) does not fit inside [0, S) as empty (its samples
// contribute nothing), so inconsistent shapes give wrong numbers but no out-of-bounds access.
// The checks here read sizes only, never tensor contents (no device-to-host copy).
#pragma once

#include <ATen/ATen.h>

#include "ms_deform_attn_sampling.h"

#include <tuple>

namespace deformable_detr {

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output);

// Asserts what the kernels rely on for memory safety (ranks, sizes, dtypes, one device; the
// messages naming each problem come from the Python wrapper's check_inputs) and returns the
// inputs made contiguous, with the sampling locations and attention weights in the
// accumulation dtype.
struct MSDeformAttnArgs {
  at::Tensor value, spatial_shapes, level_start_index, sampling_loc, attn_weight;
  Sizes sizes;
  // Whether there is any work: no queries, batch or values means an all-zero result.
  bool empty() const;
};
MSDeformAttnArgs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index,
                                const at::Tensor& sampling_loc, const at::Tensor& attn_weight);

// The forward's output, [N, Lq, M * D] in the value dtype: uninitialised, as the kernels
// write all of it, or zeros when there is no work.
at::Tensor forward_output(const MSDeformAttnArgs& a);

// The backward's buffers: grad_output made contiguous in the value dtype, and the gradients
// in the accumulation dtype (float32 for half inputs), uninitialised where there is work
// (zeros otherwise). The kernels write every location and weight gradient; a kernel that
// sums into grad_value zeroes it first.
struct BackwardBuffers {
  at::Tensor grad_output, grad_value, grad_loc, grad_attn;
};
BackwardBuffers backward_buffers(const MSDeformAttnArgs& a, const at::Tensor& grad_output);

// The gradients cast back to the dtypes of value, sampling_loc and attn_weight as given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(
    const BackwardBuffers& b, const at::Tensor& value, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight);

}  // namespace deformable_detr
