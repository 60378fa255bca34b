// CPU kernels of multi-scale deformable attention.
//
// Forward: parallel over (n, q) rows; each (n, q, m) accumulates its D channels in a small
// buffer. Backward: parallel over (n, m) pairs. Every write of a task goes to memory only
// that task owns: grad_value[n, :, m, :] and the (n, :, m) slices of the location and weight
// gradients. So the backward needs no atomics and sums in a fixed order: results are
// bit-identical from run to run and for any number of threads.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace deformable_detr {
namespace {

template <typename scalar_t, typename acc_t>
void forward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const acc_t* loc, const scalar_t* attn, scalar_t* out, Sizes z) {
  const int64_t row = z.M * z.D;  // stride of one value position
  // Rows are cheap to split: aim for a few hundred samples per task.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, z.M * z.L * z.P));
  at::parallel_for(0, z.N * z.Lq, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(z.D);
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / z.Lq;
      for (int64_t m = 0; m < z.M; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        const scalar_t* v_nm = value + n * z.S * row + m * z.D;
        const int64_t base = (nq * z.M + m) * z.L * z.P;
        for (int64_t l = 0; l < z.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const scalar_t* v_l = v_nm + starts[l] * row;
          for (int64_t p = 0; p < z.P; ++p) {
            const int64_t s = base + l * z.P + p;
            BilinearCorners<acc_t> c;
            if (!bilinear_corners<acc_t>(loc[2 * s], loc[2 * s + 1], H, W, c)) continue;
            const acc_t a = static_cast<acc_t>(attn[s]);
            for (int k = 0; k < 4; ++k) {
              if (c.index[k] < 0) continue;
              const acc_t wk = a * c.weight[k];
              const scalar_t* v = v_l + c.index[k] * row;
              acc_t* __restrict__ o = acc.data();
#pragma omp simd
              for (int64_t d = 0; d < z.D; ++d) o[d] += wk * static_cast<acc_t>(v[d]);
            }
          }
        }
        scalar_t* o = out + (nq * z.M + m) * z.D;
        for (int64_t d = 0; d < z.D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// grad_value is in acc_t (float for half inputs) so that scattered sums keep precision.
template <typename scalar_t, typename acc_t>
void backward_kernel(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const acc_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                     acc_t* grad_value, acc_t* grad_loc, acc_t* grad_attn, Sizes z) {
  const int64_t row = z.M * z.D;
  at::parallel_for(0, z.N * z.M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> g(z.D);
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / z.M, m = nm % z.M;
      const scalar_t* v_nm = value + n * z.S * row + m * z.D;
      acc_t* gv_nm = grad_value + n * z.S * row + m * z.D;
      for (int64_t q = 0; q < z.Lq; ++q) {
        const int64_t nq = n * z.Lq + q;
        const scalar_t* go = grad_out + (nq * z.M + m) * z.D;
        for (int64_t d = 0; d < z.D; ++d) g[d] = static_cast<acc_t>(go[d]);
        const int64_t base = (nq * z.M + m) * z.L * z.P;
        for (int64_t l = 0; l < z.L; ++l) {
          const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
          const int64_t offset = starts[l] * row;
          for (int64_t p = 0; p < z.P; ++p) {
            const int64_t s = base + l * z.P + p;
            BilinearCorners<acc_t> c;
            if (!bilinear_corners<acc_t>(loc[2 * s], loc[2 * s + 1], H, W, c)) continue;
            const acc_t a = static_cast<acc_t>(attn[s]);
            // dot[k] = <grad_out, value at corner k>: enough for both the weight and the
            // location gradients.
            acc_t dot[4] = {0, 0, 0, 0};
            for (int k = 0; k < 4; ++k) {
              if (c.index[k] < 0) continue;
              const scalar_t* v = v_nm + offset + c.index[k] * row;
              acc_t* __restrict__ gv = gv_nm + offset + c.index[k] * row;
              const acc_t wk = a * c.weight[k];
              acc_t dk = 0;
#pragma omp simd reduction(+ : dk)
              for (int64_t d = 0; d < z.D; ++d) {
                dk += g[d] * static_cast<acc_t>(v[d]);
                gv[d] += wk * g[d];
              }
              dot[k] = dk;
            }
            grad_attn[s] = c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] +
                           c.weight[3] * dot[3];
            acc_t d_h, d_w;
            bilinear_grad_hw<acc_t>(c, dot, d_h, d_w);
            // h = y * H - 0.5 and w = x * W - 0.5.
            grad_loc[2 * s] = a * d_w * static_cast<acc_t>(W);
            grad_loc[2 * s + 1] = a * d_h * static_cast<acc_t>(H);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight) {
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  auto out = forward_output(a);
  if (a.empty()) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        forward_kernel<scalar_t, acc_t>(
            a.value.data_ptr<scalar_t>(), a.spatial_shapes.data_ptr<int64_t>(),
            a.level_start_index.data_ptr<int64_t>(), a.sampling_loc.data_ptr<acc_t>(),
            a.attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), a.sizes);
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  auto b = backward_buffers(a, grad_output);
  if (!a.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, acc_t>(
              a.value.data_ptr<scalar_t>(), a.spatial_shapes.data_ptr<int64_t>(),
              a.level_start_index.data_ptr<int64_t>(), a.sampling_loc.data_ptr<acc_t>(),
              a.attn_weight.data_ptr<scalar_t>(), b.grad_output.data_ptr<scalar_t>(),
              b.grad_value.data_ptr<acc_t>(), b.grad_loc.data_ptr<acc_t>(),
              b.grad_attn.data_ptr<acc_t>(), a.sizes);
        });
  }
  return backward_result(b, value, sampling_loc, attn_weight);
}

}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cpu);
}
