// CPU kernels of multi-scale deformable attention: the forward over rows (m, q) of one image
// and the backward over (n, m) pairs. The op entry points, which schedule them, are in
// ms_deform_attn_cpu.cpp.
//
// Speed: per sample, the location arithmetic costs as much as the channel loop, so both are
// vectorised. `locate` turns the L*P locations of a (query, head) into corner positions in
// one branch-free loop (compiled with -fno-trapping-math so that the comparisons need no
// branches); the channel loop then reads all four corners in one pass. For the common D
// (32, 64) the channel count is a compile-time constant so the accumulators live in
// registers. Everything here is inlined into the per-instruction-set variants of
// isa_dispatch.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/isa_dispatch.h"
#include "cpu/prefetch.h"
#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace deformable_detr {
namespace cpu {

// Level geometry of the i-th sample of a (query, head), i in [0, L*P): the same for every
// (query, head), so computed once per call.
template <typename acc_t>
struct SampleLevels {
  explicit SampleLevels(const MSDeformAttnArgs& a) {
    const Sizes& z = a.sizes;
    const int64_t* shapes = a.spatial_shapes.data_ptr<int64_t>();
    const int64_t* starts = a.level_start_index.data_ptr<int64_t>();
    for (auto* v : {&H, &W, &H1, &W1}) v->resize(z.L * z.P);
    width.resize(z.L * z.P);
    start.resize(z.L * z.P);
    level.resize(z.L * z.P);
    for (int64_t i = 0; i < z.L * z.P; ++i) {
      const int64_t l = i / z.P;
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      level[i] = l;
      if (!level_in_bounds(h, w, starts[l], z.S)) {
        // An empty level: no h satisfies -1 < h < H = -1, so every sample is outside.
        H[i] = W[i] = H1[i] = W1[i] = acc_t(-1);
        width[i] = start[i] = 0;
        continue;
      }
      H[i] = static_cast<acc_t>(h);
      W[i] = static_cast<acc_t>(w);
      H1[i] = static_cast<acc_t>(h - 1);
      W1[i] = static_cast<acc_t>(w - 1);
      width[i] = static_cast<int32_t>(w);
      start[i] = static_cast<int32_t>(starts[l]);
    }
  }
  std::vector<acc_t> H, W, H1, W1;  // H, W and H - 1, W - 1 as numbers
  std::vector<int32_t> width, start;
  std::vector<int64_t> level;
};

template <typename scalar_t, typename acc_t>
struct KernelArgs {
  using scalar_type = scalar_t;
  using acc_type = acc_t;
  const scalar_t* value;
  const int64_t* shapes;
  const int64_t* starts;
  const acc_t* loc;
  const acc_t* attn;
  // Forward: image n's value of head m at head_value + m * head_stride, positions
  // row_stride apart: the copy of the head being worked on (head_stride 0) or, in
  // float32/64, the value itself.
  const acc_t* head_value;
  int64_t head_stride, row_stride, n;
  scalar_t* out;             // forward
  const scalar_t* grad_out;  // backward
  acc_t* grad_value;         // backward, in acc_t so scattered sums keep precision
  acc_t* grad_loc;
  acc_t* grad_attn;
  acc_t* scratch;            // backward: 2 * S * D per thread, or null to work in place
  const SampleLevels<acc_t>* levels;
  Sizes z;
};

// kD > 0: the channel count, fixed at compile time; kD == 0: read at run time.
template <int kD, typename acc_t>
struct ChannelBuffer {
  explicit ChannelBuffer(int64_t) {}
  acc_t* data() { return buf; }
  alignas(64) acc_t buf[kD];
};
template <typename acc_t>
struct ChannelBuffer<0, acc_t> {
  explicit ChannelBuffer(int64_t d) : buf(d) {}
  acc_t* data() { return buf.data(); }
  std::vector<acc_t> buf;
};

// The kernels work on the L*P samples of one (query, head) in two steps. `locate` turns
// their locations into corner positions and fractions for a batch of samples at once, in a
// branch-free loop the compiler vectorises; the gather step then only reads values. Samples
// with all four corners in the map (nearly all of them) take that fast path; the few on a
// border go through bilinear_corners with its per-corner checks.
enum SampleKind : int8_t { kOutside = 0, kInterior = 1, kBorder = 2 };

// p itself where the types agree (no conversion needed), nullptr otherwise.
template <typename acc_t, typename scalar_t>
const acc_t* same_type_or_null(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    return nullptr;
  }
}

// Whether the kernels work on per-head copies of the value: where each value is sampled
// many times (the encoder: each position about L*P times per head), not for a few queries
// (the decoder); half values are always copied, as floats, so that the kernels read one type.
inline bool copies_heads(const MSDeformAttnArgs& a) {
  const Sizes& z = a.sizes;
  return a.value.scalar_type() != a.sampling_loc.scalar_type() || z.Lq * z.L * z.P >= z.S;
}

// Positions [lo, hi) of head m of one image's value ([S, M, D]) into head ([S, D]), as
// acc_t: the kernels' contiguous working copies.
template <typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void copy_head(const scalar_t* value_n, int64_t m, int64_t lo, int64_t hi,
                                  const Sizes& z, acc_t* head) {
  for (int64_t p = lo; p < hi; ++p) {
    const scalar_t* src = value_n + (p * z.M + m) * z.D;
    if (p + kPrefetchRows < hi) prefetch_range(src + kPrefetchRows * z.M * z.D, z.D);
    for (int64_t d = 0; d < z.D; ++d) head[p * z.D + d] = static_cast<acc_t>(src[d]);
  }
}

// One batch of located samples.
template <typename acc_t>
struct SampleBatch {
  static constexpr int64_t kCapacity = 64;
  int32_t pos[kCapacity];  // kInterior: flat position (start + h0 * W + w0) of corner (h0, w0)
  int8_t kind[kCapacity];
  acc_t lh[kCapacity], lw[kCapacity];  // kInterior: fractional parts of h and w
};

// Locates samples [i0, i0 + count) of a (query, head); loc points at sample i0's (x, y).
// Interior means 0 <= h < H - 1 and 0 <= w < W - 1: then floor is truncation and all four
// corners are in the map. Positions fit in int32: the kernels check S < 2^31.
template <typename acc_t>
MSDA_ALWAYS_INLINE void locate(const acc_t* __restrict__ loc, int64_t i0, int64_t count,
                               const SampleLevels<acc_t>& lv, SampleBatch<acc_t>& b) {
  const acc_t* __restrict__ Hs = lv.H.data() + i0;
  const acc_t* __restrict__ Ws = lv.W.data() + i0;
  const acc_t* __restrict__ H1 = lv.H1.data() + i0;
  const acc_t* __restrict__ W1 = lv.W1.data() + i0;
  const int32_t* __restrict__ width = lv.width.data() + i0;
  const int32_t* __restrict__ start = lv.start.data() + i0;
  for (int64_t j = 0; j < count; ++j) {
    acc_t h, w;
    pixel_coords<acc_t>(loc[2 * j], loc[2 * j + 1], Hs[j], Ws[j], h, w);
    // `&`, not `&&`: no branches, so the loop vectorises (with -fno-trapping-math).
    const bool interior = (h >= acc_t(0)) & (w >= acc_t(0)) & (h < H1[j]) & (w < W1[j]);
    const bool inside = (h > acc_t(-1)) & (w > acc_t(-1)) & (h < Hs[j]) & (w < Ws[j]);
    // Anything but interior (also NaN) becomes 0 before the conversion to int.
    const acc_t hc = interior ? h : acc_t(0);
    const acc_t wc = interior ? w : acc_t(0);
    const int32_t h0 = static_cast<int32_t>(hc);
    const int32_t w0 = static_cast<int32_t>(wc);
    b.lh[j] = hc - static_cast<acc_t>(h0);
    b.lw[j] = wc - static_cast<acc_t>(w0);
    b.pos[j] = start[j] + h0 * width[j] + w0;
    // kInterior (1), kBorder (2) or kOutside (0).
    b.kind[j] = static_cast<int8_t>(interior | ((inside & !interior) << 1));
  }
}

template <int kD, typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void forward_rows(int64_t begin, int64_t end,
                                     const KernelArgs<scalar_t, acc_t>& a) {
  const Sizes z = a.z;
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t row = a.row_stride;
  const int64_t LP = z.L * z.P;
  const SampleLevels<acc_t>& lv = *a.levels;
  SampleBatch<acc_t> b{};
  ChannelBuffer<kD, acc_t> buffer(D);
  acc_t* __restrict__ acc = buffer.data();
  for (int64_t r = begin; r < end; ++r) {  // rows (m, q) of image a.n
    const int64_t m = r / z.Lq, nq = a.n * z.Lq + r % z.Lq;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0;
    const acc_t* v_nm = a.head_value + m * a.head_stride;
    const int64_t base = (nq * z.M + m) * LP;  // flat index of sample 0
    if (r + kPrefetchRows < end && (r + kPrefetchRows) / z.Lq == m) {
      const int64_t ahead = base + kPrefetchRows * z.M * LP;
      prefetch_range(a.loc + 2 * ahead, 2 * LP);
      prefetch_range(a.attn + ahead, LP);
    }
    for (int64_t i0 = 0; i0 < LP; i0 += SampleBatch<acc_t>::kCapacity) {
      const int64_t count = std::min(LP - i0, SampleBatch<acc_t>::kCapacity);
      locate<acc_t>(a.loc + 2 * (base + i0), i0, count, lv, b);
      for (int64_t j = 0; j < count; ++j) {
        if (b.kind[j] == kOutside) continue;
        const int64_t s = base + i0 + j;
        const acc_t w = a.attn[s];
        if (b.kind[j] == kInterior) {
          BilinearCorners<acc_t> c;
          c.lh = b.lh[j];
          c.lw = b.lw[j];
          bilinear_weights<acc_t>(c);
          const acc_t w0 = w * c.weight[0], w1 = w * c.weight[1];
          const acc_t w2 = w * c.weight[2], w3 = w * c.weight[3];
          const acc_t* __restrict__ v0 = v_nm + b.pos[j] * row;
          const acc_t* __restrict__ v2 = v0 + lv.width[i0 + j] * row;
          // The corner sum is formed before it meets acc, so consecutive samples do not
          // wait on each other's additions.
          for (int64_t d = 0; d < D; ++d) {
            acc[d] += (w0 * v0[d] + w1 * v0[d + row]) + (w2 * v2[d] + w3 * v2[d + row]);
          }
          continue;
        }
        const int64_t l = lv.level[i0 + j];
        BilinearCorners<acc_t> c;
        // locate may round h or w differently (contracted multiply-add): its verdict
        // "on a border" is re-checked here.
        if (!bilinear_corners<acc_t>(a.loc[2 * s], a.loc[2 * s + 1], a.shapes[2 * l],
                                     a.shapes[2 * l + 1], c)) {
          continue;
        }
        const acc_t* v_l = v_nm + a.starts[l] * row;
        for (int k = 0; k < 4; ++k) {
          if (c.index[k] < 0) continue;
          const acc_t wk = w * c.weight[k];
          const acc_t* __restrict__ v = v_l + c.index[k] * row;
          for (int64_t d = 0; d < D; ++d) acc[d] += wk * v[d];
        }
      }
    }
    scalar_t* o = a.out + (nq * z.M + m) * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }
}

template <int kD, typename scalar_t, typename acc_t>
MSDA_ALWAYS_INLINE void backward_heads(int64_t begin, int64_t end,
                                       const KernelArgs<scalar_t, acc_t>& a) {
  const Sizes z = a.z;
  const int64_t D = kD > 0 ? kD : z.D;
  const int64_t LP = z.L * z.P;
  const SampleLevels<acc_t>& lv = *a.levels;
  SampleBatch<acc_t> b{};
  ChannelBuffer<kD, acc_t> buffer(D);
  acc_t* __restrict__ g = buffer.data();
  // With scratch (see copies_heads), the task's head of value and its gradient are
  // contiguous [S, D] copies. In the [S, M, D] layout every position of one head sits in its
  // own M*D row, so the scattered reads and sums would touch M times more cache lines and
  // pages than they use (TLB misses dominate at the encoder shape).
  // Where there are few samples (the decoder) the copies cost more than they save, and the
  // task reads value and sums into the zero-filled grad_value in place.
  acc_t* head_value = a.scratch ? a.scratch + at::get_thread_num() * 2 * z.S * D : nullptr;
  acc_t* head_grad = a.scratch ? head_value + z.S * D : nullptr;
  const int64_t row = a.scratch ? D : z.M * D;  // stride of one position
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / z.M, m = nm % z.M;
    const int64_t offset_nm = n * z.S * z.M * D + m * D;  // value[n, 0, m, 0]
    const acc_t* v_nm = a.scratch ? head_value : same_type_or_null<acc_t>(a.value) + offset_nm;
    acc_t* gv_nm = a.scratch ? head_grad : a.grad_value + offset_nm;
    if (a.scratch) {
      copy_head(a.value + n * z.S * z.M * D, m, 0, z.S, z, head_value);
      std::fill_n(head_grad, z.S * D, acc_t(0));
    }
    for (int64_t q = 0; q < z.Lq; ++q) {
      const int64_t nqm = (n * z.Lq + q) * z.M + m;
      if (q + kPrefetchRows < z.Lq) {
        const int64_t ahead = nqm + kPrefetchRows * z.M;
        prefetch_range(a.grad_out + ahead * D, D);
        prefetch_range(a.loc + 2 * ahead * LP, 2 * LP);
        prefetch_range(a.attn + ahead * LP, LP);
        prefetch_range<true>(a.grad_loc + 2 * ahead * LP, 2 * LP);
        prefetch_range<true>(a.grad_attn + ahead * LP, LP);
      }
      const scalar_t* go = a.grad_out + nqm * D;
      for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(go[d]);
      const int64_t base = nqm * LP;
      for (int64_t i0 = 0; i0 < LP; i0 += SampleBatch<acc_t>::kCapacity) {
        const int64_t count = std::min(LP - i0, SampleBatch<acc_t>::kCapacity);
        locate<acc_t>(a.loc + 2 * (base + i0), i0, count, lv, b);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t s = base + i0 + j;
          const int64_t l = lv.level[i0 + j];
          const int64_t H = a.shapes[2 * l], W = a.shapes[2 * l + 1];
          BilinearCorners<acc_t> c{};
          // A sample outside the map has no value and no gradient (the buffers start
          // empty). locate's verdict "on a border" is re-checked, as it may round h or w
          // differently (contracted multiply-add).
          if (b.kind[j] != kInterior &&
              (b.kind[j] == kOutside ||
               !bilinear_corners<acc_t>(a.loc[2 * s], a.loc[2 * s + 1], H, W, c))) {
            a.grad_attn[s] = 0;
            a.grad_loc[2 * s] = a.grad_loc[2 * s + 1] = 0;
            continue;
          }
          const acc_t w = a.attn[s];
          // dot[k] = <grad_out, value at corner k>: enough for both the weight and the
          // location gradients.
          acc_t dot[4] = {0, 0, 0, 0};
          if (b.kind[j] == kInterior) {
            c.lh = b.lh[j];
            c.lw = b.lw[j];
            bilinear_weights<acc_t>(c);
            // One pass over the channels for all four corners; distinct corners are
            // distinct rows, so the four scatters never overlap.
            const int64_t p0 = b.pos[j] * row, p2 = p0 + lv.width[i0 + j] * row;
            const acc_t* __restrict__ v0 = v_nm + p0;
            const acc_t* __restrict__ v2 = v_nm + p2;
            acc_t* __restrict__ gv0 = gv_nm + p0;
            acc_t* __restrict__ gv2 = gv_nm + p2;
            const acc_t w0 = w * c.weight[0], w1 = w * c.weight[1];
            const acc_t w2 = w * c.weight[2], w3 = w * c.weight[3];
            acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int64_t d = 0; d < D; ++d) {
              const acc_t gd = g[d];
              d0 += gd * v0[d];
              d1 += gd * v0[d + row];
              d2 += gd * v2[d];
              d3 += gd * v2[d + row];
              gv0[d] += w0 * gd;
              gv0[d + row] += w1 * gd;
              gv2[d] += w2 * gd;
              gv2[d + row] += w3 * gd;
            }
            dot[0] = d0;
            dot[1] = d1;
            dot[2] = d2;
            dot[3] = d3;
          } else {
            const int64_t offset = a.starts[l] * row;
            for (int k = 0; k < 4; ++k) {
              if (c.index[k] < 0) continue;
              const acc_t* __restrict__ v = v_nm + offset + c.index[k] * row;
              acc_t* __restrict__ gv = gv_nm + offset + c.index[k] * row;
              const acc_t wk = w * c.weight[k];
              acc_t dk = 0;
#pragma omp simd reduction(+ : dk)
              for (int64_t d = 0; d < D; ++d) {
                dk += g[d] * v[d];
                gv[d] += wk * g[d];
              }
              dot[k] = dk;
            }
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
    if (!a.scratch) continue;
    acc_t* grad_nm = a.grad_value + offset_nm;
    for (int64_t p = 0; p < z.S; ++p) {
      std::copy_n(head_grad + p * D, D, grad_nm + p * z.M * D);
    }
  }
}

// The kernel of one pass with a compile-time channel count, as a body for select_isa.
enum class Pass { kForward, kBackward };

template <Pass pass, int kD>
struct RunRange {
  template <typename scalar_t, typename acc_t>
  static MSDA_ALWAYS_INLINE void run(int64_t begin, int64_t end,
                                     const KernelArgs<scalar_t, acc_t>& a) {
    if constexpr (pass == Pass::kForward) {
      forward_rows<kD>(begin, end, a);
    } else {
      backward_heads<kD>(begin, end, a);
    }
  }
};

template <typename scalar_t, typename acc_t>
KernelArgs<scalar_t, acc_t> kernel_args(const MSDeformAttnArgs& a,
                                        const SampleLevels<acc_t>& levels) {
  KernelArgs<scalar_t, acc_t> k{};
  k.value = a.value.data_ptr<scalar_t>();
  k.shapes = a.spatial_shapes.data_ptr<int64_t>();
  k.starts = a.level_start_index.data_ptr<int64_t>();
  k.loc = a.sampling_loc.data_ptr<acc_t>();
  k.attn = a.attn_weight.data_ptr<acc_t>();
  k.levels = &levels;
  k.z = a.sizes;
  return k;
}

}  // namespace cpu
}  // namespace deformable_detr
