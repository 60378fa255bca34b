// CUDA kernels of multi-scale deformable attention.
//
// Forward: one thread per output element (n, q, m, d), so a warp reads consecutive channels
// of a value row (coalesced). Backward: one thread per sample (n, q, m, l, p); it loops over
// the D channels, sums the weight and location gradients itself (no cross-thread reduction,
// any D) and scatters the value gradient with atomicAdd into a buffer in the accumulation
// dtype (float32 for half inputs). Any batch size; 64-bit indexing throughout. The bilinear
// maths is shared with the CPU kernels (ms_deform_attn_sampling.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

// The launch, library and dispatch key are macros so that the test-only CUDA emulator
// (tests/cuda_emulation) can compile this file unchanged for the CPU.
#ifndef MSDA_LAUNCH
#define MSDA_LAUNCH(kernel, blocks, threads, stream) kernel<<<blocks, threads, 0, stream>>>
#endif
#ifndef MSDA_CUDA_LIBRARY
#define MSDA_CUDA_LIBRARY deformable_detr
#endif
#ifndef MSDA_CUDA_DISPATCH_KEY
#define MSDA_CUDA_DISPATCH_KEY CUDA
#endif

namespace deformable_detr {
namespace {

constexpr int kThreads = 256;

int64_t num_blocks(int64_t total) {
  // Grid-stride loops cover the rest when the work exceeds the grid limit.
  return std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 30);
}

#define MSDA_GRID_STRIDE_LOOP(i, total)                                              \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (total); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                               scalar_t* __restrict__ out, Sizes z) {
  const int64_t total = z.N * z.Lq * z.M * z.D;
  const int64_t row = z.M * z.D;
  MSDA_GRID_STRIDE_LOOP(i, total) {
    const int64_t d = i % z.D;
    const int64_t nqm = i / z.D;  // (n * Lq + q) * M + m
    const int64_t m = nqm % z.M;
    const int64_t n = nqm / (z.M * z.Lq);
    const scalar_t* v_nm = value + n * z.S * row + m * z.D + d;
    acc_t acc = 0;
    for (int64_t l = 0; l < z.L; ++l) {
      const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
      const scalar_t* v_l = v_nm + starts[l] * row;
      for (int64_t p = 0; p < z.P; ++p) {
        const int64_t s = (nqm * z.L + l) * z.P + p;
        BilinearCorners<acc_t> c;
        if (!bilinear_corners<acc_t>(loc[2 * s], loc[2 * s + 1], H, W, c)) continue;
        acc_t sample = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.index[k] >= 0) sample += c.weight[k] * static_cast<acc_t>(v_l[c.index[k] * row]);
        }
        acc += static_cast<acc_t>(attn[s]) * sample;
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const acc_t* __restrict__ loc,
                                const acc_t* __restrict__ attn,
                                const scalar_t* __restrict__ grad_out,
                                acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc,
                                acc_t* __restrict__ grad_attn, Sizes z) {
  const int64_t total = z.N * z.Lq * z.M * z.L * z.P;
  const int64_t row = z.M * z.D;
  MSDA_GRID_STRIDE_LOOP(s, total) {
    const int64_t l = (s / z.P) % z.L;
    const int64_t nqm = s / (z.L * z.P);
    const int64_t m = nqm % z.M;
    const int64_t n = nqm / (z.M * z.Lq);
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    BilinearCorners<acc_t> c;
    if (!bilinear_corners<acc_t>(loc[2 * s], loc[2 * s + 1], H, W, c)) {
      grad_attn[s] = 0;  // the buffers are not zero-filled
      grad_loc[2 * s] = grad_loc[2 * s + 1] = 0;
      continue;
    }
    const acc_t a = static_cast<acc_t>(attn[s]);
    const scalar_t* go = grad_out + nqm * z.D;
    const int64_t offset = (n * z.S + starts[l]) * row + m * z.D;
    acc_t dot[4] = {0, 0, 0, 0};
    for (int k = 0; k < 4; ++k) {
      if (c.index[k] < 0) continue;
      const scalar_t* v = value + offset + c.index[k] * row;
      acc_t* gv = grad_value + offset + c.index[k] * row;
      const acc_t wk = a * c.weight[k];
      acc_t dk = 0;
      for (int64_t d = 0; d < z.D; ++d) {
        const acc_t g = static_cast<acc_t>(go[d]);
        dk += g * static_cast<acc_t>(v[d]);
        atomicAdd(gv + d, wk * g);
      }
      dot[k] = dk;
    }
    grad_attn[s] = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] +
                   c.weight[3] * dot[3];
    acc_t d_h, d_w;
    bilinear_grad_hw<acc_t>(c, dot, d_h, d_w);
    grad_loc[2 * s] = a * d_w * static_cast<acc_t>(W);
    grad_loc[2 * s + 1] = a * d_h * static_cast<acc_t>(H);
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight) {
  const c10::cuda::CUDAGuard guard(value.device());
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  auto out = forward_output(a);
  if (a.empty()) return out;
  const Sizes& z = a.sizes;
  const int64_t total = z.N * z.Lq * z.M * z.D;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const auto kernel = &forward_kernel<scalar_t, acc_t>;
        MSDA_LAUNCH(kernel, num_blocks(total), kThreads, stream)(
            a.value.data_ptr<scalar_t>(), a.spatial_shapes.data_ptr<int64_t>(),
            a.level_start_index.data_ptr<int64_t>(), a.sampling_loc.data_ptr<acc_t>(),
            a.attn_weight.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), z);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  const c10::cuda::CUDAGuard guard(value.device());
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  auto b = backward_buffers(a, grad_output);
  if (!a.empty()) {
    b.grad_value.zero_();  // the kernel sums into it with atomicAdd
    const Sizes& z = a.sizes;
    const int64_t total = z.N * z.Lq * z.M * z.L * z.P;
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const auto kernel = &backward_kernel<scalar_t, acc_t>;
          MSDA_LAUNCH(kernel, num_blocks(total), kThreads, stream)(
              a.value.data_ptr<scalar_t>(), a.spatial_shapes.data_ptr<int64_t>(),
              a.level_start_index.data_ptr<int64_t>(), a.sampling_loc.data_ptr<acc_t>(),
              a.attn_weight.data_ptr<acc_t>(), b.grad_output.data_ptr<scalar_t>(),
              b.grad_value.data_ptr<acc_t>(), b.grad_loc.data_ptr<acc_t>(),
              b.grad_attn.data_ptr<acc_t>(), z);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return backward_result(b, value, sampling_loc, attn_weight);
}

}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(MSDA_CUDA_LIBRARY, MSDA_CUDA_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cuda);
}
