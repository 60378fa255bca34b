// CPU kernels of multi-scale deformable attention.
//
// Forward: parallel over (n, q) rows; each (n, q, m) accumulates its D channels in a local
// buffer. Backward: parallel over (n, m) pairs. Every write of a task goes to memory only
// that task owns: grad_value[n, :, m, :] and the (n, :, m) slices of the location and weight
// gradients. So the backward needs no atomics and sums in a fixed order: results are
// bit-identical from run to run and for any number of threads.
//
// Speed: the channel loops are where the time goes. For the common D (32, 64) the channel
// count is a compile-time constant so the accumulators live in registers, and on x86 the
// loops are compiled a second time for AVX2+FMA and picked at run time (the build itself
// stays portable: no -march flags).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MSDA_X86_DISPATCH 1
#else
#define MSDA_X86_DISPATCH 0
#endif

#if defined(__GNUC__)
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

namespace deformable_detr {
namespace {

template <typename scalar_t, typename acc_t>
struct KernelArgs {
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const acc_t* loc;
  const scalar_t* attn;
  scalar_t* out;             // forward
  const scalar_t* grad_out;  // backward
  acc_t* grad_value;         // backward, in acc_t so scattered sums keep precision
  acc_t* grad_loc;
  acc_t* grad_attn;
  Sizes z;
};

// kD > 0: the channel count, fixed at compile time; kD == 0: read at run time.
template <int kD, typename acc_t>
struct ChannelBuffer {
  explicit ChannelBuffer(int64_t) {}
  acc_t* data() { return buf; }
  acc_t buf[kD];
};
template <typename acc_t>
struct ChannelBuffer<0, acc_t> {
  explicit ChannelBuffer(int64_t d) : buf(d) {}
  acc_t* data() { return buf.data(); }
  std::vector<acc_t> buf;
};

template <int kD, typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void forward_rows(int64_t begin, int64_t end,
                                     const KernelArgs<scalar_t, acc_t>& a) {
  const Sizes z = a.z;
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t row = z.M * D;  // stride of one value position
  ChannelBuffer<kD, acc_t> buffer(D);
  acc_t* __restrict__ acc = buffer.data();
  for (int64_t nq = begin; nq < end; ++nq) {
    const int64_t n = nq / z.Lq;
    for (int64_t m = 0; m < z.M; ++m) {
      for (int64_t d = 0; d < D; ++d) acc[d] = 0;
      const scalar_t* v_nm = a.value + n * z.S * row + m * D;
      const int64_t base = (nq * z.M + m) * z.L * z.P;
      for (int64_t l = 0; l < z.L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const scalar_t* v_l = v_nm + a.starts[l] * row;
        for (int64_t p = 0; p < z.P; ++p) {
          const int64_t s = base + l * z.P + p;
          BilinearCorners<acc_t> c;
          if (!bilinear_corners<acc_t>(a.loc[2 * s], a.loc[2 * s + 1], H, W, c)) continue;
          const acc_t w = static_cast<acc_t>(a.attn[s]);
          for (int k = 0; k < 4; ++k) {
            if (c.index[k] < 0) continue;
            const acc_t wk = w * c.weight[k];
            const scalar_t* __restrict__ v = v_l + c.index[k] * row;
            for (int64_t d = 0; d < D; ++d) acc[d] += wk * static_cast<acc_t>(v[d]);
          }
        }
      }
      scalar_t* o = a.out + (nq * z.M + m) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
    }
  }
}

template <int kD, typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void backward_heads(int64_t begin, int64_t end,
                                       const KernelArgs<scalar_t, acc_t>& a) {
  const Sizes z = a.z;
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t row = z.M * D;
  ChannelBuffer<kD, acc_t> buffer(D);
  acc_t* __restrict__ g = buffer.data();
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / z.M, m = nm % z.M;
    const scalar_t* v_nm = a.value + n * z.S * row + m * D;
    acc_t* gv_nm = a.grad_value + n * z.S * row + m * D;
    for (int64_t q = 0; q < z.Lq; ++q) {
      const int64_t nqm = (n * z.Lq + q) * z.M + m;
      const scalar_t* go = a.grad_out + nqm * D;
      for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(go[d]);
      for (int64_t l = 0; l < z.L; ++l) {
        const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
        const int64_t offset = a.starts[l] * row;
        for (int64_t p = 0; p < z.P; ++p) {
          const int64_t s = (nqm * z.L + l) * z.P + p;
          BilinearCorners<acc_t> c;
          if (!bilinear_corners<acc_t>(a.loc[2 * s], a.loc[2 * s + 1], H, W, c)) continue;
          const acc_t w = static_cast<acc_t>(a.attn[s]);
          // dot[k] = <grad_out, value at corner k>: enough for both the weight and the
          // location gradients.
          acc_t dot[4] = {0, 0, 0, 0};
          for (int k = 0; k < 4; ++k) {
            if (c.index[k] < 0) continue;
            const scalar_t* __restrict__ v = v_nm + offset + c.index[k] * row;
            acc_t* __restrict__ gv = gv_nm + offset + c.index[k] * row;
            const acc_t wk = w * c.weight[k];
            acc_t dk = 0;
#pragma omp simd reduction(+ : dk)
            for (int64_t d = 0; d < D; ++d) {
              dk += g[d] * static_cast<acc_t>(v[d]);
              gv[d] += wk * g[d];
            }
            dot[k] = dk;
          }
          a.grad_attn[s] = c.weight[0] * dot[0] + c.weight[1] * dot[1] +
                           c.weight[2] * dot[2] + c.weight[3] * dot[3];
          acc_t d_h, d_w;
          bilinear_grad_hw<acc_t>(c, dot, d_h, d_w);
          // h = y * H - 0.5 and w = x * W - 0.5.
          a.grad_loc[2 * s] = w * d_w * static_cast<acc_t>(W);
          a.grad_loc[2 * s + 1] = w * d_h * static_cast<acc_t>(H);
        }
      }
    }
  }
}

enum class Pass { kForward, kBackward };

template <Pass pass, int kD, typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void run_range(int64_t begin, int64_t end,
                                  const KernelArgs<scalar_t, acc_t>& a) {
  if constexpr (pass == Pass::kForward) {
    forward_rows<kD>(begin, end, a);
  } else {
    backward_heads<kD>(begin, end, a);
  }
}

template <Pass pass, int kD, typename scalar_t, typename acc_t>
void run_range_default(int64_t begin, int64_t end, const KernelArgs<scalar_t, acc_t>& a) {
  run_range<pass, kD>(begin, end, a);
}

#if MSDA_X86_DISPATCH
template <Pass pass, int kD, typename scalar_t, typename acc_t>
__attribute__((target("avx2,fma"))) void run_range_avx2(int64_t begin, int64_t end,
                                                         const KernelArgs<scalar_t, acc_t>& a) {
  run_range<pass, kD>(begin, end, a);
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename scalar_t, typename acc_t>
using RangeFn = void (*)(int64_t, int64_t, const KernelArgs<scalar_t, acc_t>&);

template <Pass pass, int kD, typename scalar_t, typename acc_t>
RangeFn<scalar_t, acc_t> select_isa() {
#if MSDA_X86_DISPATCH
  if (cpu_has_avx2_fma()) return &run_range_avx2<pass, kD, scalar_t, acc_t>;
#endif
  return &run_range_default<pass, kD, scalar_t, acc_t>;
}

template <Pass pass, typename scalar_t, typename acc_t>
RangeFn<scalar_t, acc_t> select_kernel(int64_t D) {
  switch (D) {
    case 32:
      return select_isa<pass, 32, scalar_t, acc_t>();
    case 64:
      return select_isa<pass, 64, scalar_t, acc_t>();
    default:
      return select_isa<pass, 0, scalar_t, acc_t>();
  }
}

template <typename scalar_t, typename acc_t>
KernelArgs<scalar_t, acc_t> kernel_args(const MSDeformAttnArgs& a) {
  KernelArgs<scalar_t, acc_t> k{};
  k.value = a.value.data_ptr<scalar_t>();
  k.shapes = a.spatial_shapes.data_ptr<int64_t>();
  k.starts = a.level_start_index.data_ptr<int64_t>();
  k.loc = a.sampling_loc.data_ptr<acc_t>();
  k.attn = a.attn_weight.data_ptr<scalar_t>();
  k.z = a.sizes;
  return k;
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
  const Sizes& z = a.sizes;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto k = kernel_args<scalar_t, acc_t>(a);
        k.out = out.data_ptr<scalar_t>();
        const auto fn = select_kernel<Pass::kForward, scalar_t, acc_t>(z.D);
        // Rows are cheap to split: aim for a few thousand samples per task.
        const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, z.M * z.L * z.P));
        at::parallel_for(0, z.N * z.Lq, grain, [&](int64_t lo, int64_t hi) { fn(lo, hi, k); });
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
    const Sizes& z = a.sizes;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          auto k = kernel_args<scalar_t, acc_t>(a);
          k.grad_out = b.grad_output.data_ptr<scalar_t>();
          k.grad_value = b.grad_value.data_ptr<acc_t>();
          k.grad_loc = b.grad_loc.data_ptr<acc_t>();
          k.grad_attn = b.grad_attn.data_ptr<acc_t>();
          const auto fn = select_kernel<Pass::kBackward, scalar_t, acc_t>(z.D);
          at::parallel_for(0, z.N * z.M, 1, [&](int64_t lo, int64_t hi) { fn(lo, hi, k); });
        });
  }
  return backward_result(b, value, sampling_loc, attn_weight);
}

}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cpu);
}
