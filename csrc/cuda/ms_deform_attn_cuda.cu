// CUDA kernels of multi-scale deformable attention.
//
// Work layout, forward and backward: each (n, q, m), one head of one query, is served by a
// group of G lanes of a warp (G a power of two, at most 32). The D channels of a head are
// split into chunks of VEC consecutive channels (one 16-byte load where D and the pointers
// allow, else one channel), and lane j of the group owns chunks j, j + G, ... (in rounds of
// G chunks). So the lanes of a group read one value row as consecutive, coalesced loads.
//
// A sample's corners are computed once per group: lane j locates sample i0 + j of the head's
// L*P samples, and the group then walks those samples one by one, the owner broadcasting
// what the others need to rebuild the corners (SampleMessage) with warp shuffles. Shuffles need every lane named in
// their mask, so the loops are uniform across a warp: a warp iterates over its first group's
// index and lanes past the end stay in the loop with nothing to do.
//
// Backward: each lane forms, over its channels, the sample's weight gradient and its
// derivatives along h and w (all linear in the corners' grad_out . value); a butterfly of
// shuffles within the group sums them for the sample's owner, which writes the location and
// weight gradients (no atomics, no shared memory).
// The value gradient is a scatter:
// - by default, atomicAdd of whole contiguous row chunks (coalesced across the group) into a
//   buffer in the accumulation dtype (float32 for half inputs); the order of the additions
//   varies from run to run, so the last bits do too;
// - when torch.use_deterministic_algorithms(True) is on, a two-pass formulation: the backward
//   kernel writes each (sample, corner) contribution's target row and coefficient, a stable
//   sort groups the contributions by row (keeping the sample order inside a row), and a second
//   kernel sums each row's contributions in that fixed order. Bit-identical from run to run,
//   at the cost of 28 bytes of scratch per (sample, corner) and a sort.
//
// Accumulation is in float32 for half inputs (at::opmath_type), 32-bit index arithmetic where
// the sizes allow. Any D, L, P and batch size. Levels whose (H, W, start) do not fit inside
// [0, S) are empty (level_in_bounds), so no contents of spatial_shapes / level_start_index
// can make a kernel address memory outside its tensors. The bilinear maths is shared with the
// CPU kernels (ms_deform_attn_sampling.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

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
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Grid-stride loops cover work beyond this many blocks.
constexpr int64_t kMaxBlocks = int64_t(1) << 16;
// Deterministic backward: the key of a (sample, corner) that adds nothing.
constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();

// VEC consecutive elements, loaded and stored as one access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc_t (&out)[VEC]) {
  const Vec<scalar_t, VEC> x = *reinterpret_cast<const Vec<scalar_t, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = static_cast<acc_t>(x.v[e]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc_t (&in)[VEC]) {
  Vec<scalar_t, VEC> x;
#pragma unroll
  for (int e = 0; e < VEC; ++e) x.v[e] = static_cast<scalar_t>(in[e]);
  *reinterpret_cast<Vec<scalar_t, VEC>*>(p) = x;
}

// The lanes serving one (n, q, m), and the loop over all such groups.
template <typename index_t>
struct GroupLoop {
  int G;                 // lanes per group
  int lane;              // this thread's lane in its group, [0, G)
  index_t num_groups;    // N * Lq * M, or the number of entries of the gather kernel
  index_t warp_first;    // the first group of this thread's warp in the first iteration
  index_t stride;        // groups per grid
  int group_in_warp;     // this thread's group within its warp

  __device__ __forceinline__ GroupLoop(int G_, index_t num_groups_)
      : G(G_), lane(threadIdx.x & (G_ - 1)), num_groups(num_groups_) {
    const index_t thread = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    warp_first = (thread - (threadIdx.x & (kWarp - 1))) / G;
    stride = static_cast<index_t>(gridDim.x) * (blockDim.x / G);
    group_in_warp = (threadIdx.x & (kWarp - 1)) / G;
  }
};

// One (n, q, m) of the forward and backward kernels, as one lane of its group sees it.
template <typename index_t>
struct QueryGroup {
  bool active;           // false past the last group: the lane still joins the shuffles
  index_t nqm;           // (n * Lq + q) * M + m; 0 where inactive, so reads stay in bounds
  index_t n, m;
  index_t value_offset;  // of value[n, 0, m, 0]: (n * S * M + m) * D
};

// The groups of the forward and backward kernels, one per (n, q, m), and the sizes both use.
// Both loop as
//   for (first = warp_first; first < num_groups; first += stride) { group = at(first); ... }
// the bound being the warp's first group, so all lanes of a warp run the same iterations and
// join every shuffle: a lane whose group lies past the end gets active false and must stay in
// the loop (leaving it would leave its group's shuffles waiting on it).
template <typename index_t, int VEC>
struct QueryGroups : GroupLoop<index_t> {
  int LP;          // samples per (n, q, m): L * P
  index_t D, M, S, LqM;
  index_t chunks;  // VEC-channel chunks of a head
  index_t row;     // stride of one value position: M * D

  __device__ __forceinline__ QueryGroups(const Sizes& z, int G)
      : GroupLoop<index_t>(G, static_cast<index_t>(z.N * z.Lq * z.M)),
        LP(static_cast<int>(z.L * z.P)),
        D(z.D),
        M(z.M),
        S(z.S),
        LqM(z.Lq * z.M),
        chunks(D / VEC),
        row(M * D) {}

  // This lane's group in the iteration whose warp starts at group `first`.
  __device__ __forceinline__ QueryGroup<index_t> at(index_t first) const {
    QueryGroup<index_t> r;
    const index_t g = first + this->group_in_warp;  // (n * Lq + q) * M + m
    r.active = g < this->num_groups;
    r.nqm = r.active ? g : 0;
    r.n = r.nqm / LqM;
    r.m = r.nqm % M;
    r.value_offset = (r.n * S * M + r.m) * D;
    return r;
  }
};

// A lane without a sample: no corners, zero weights.
template <typename acc_t>
__device__ __forceinline__ void no_sample(BilinearCorners<acc_t>& c, int32_t (&pos)[4]) {
  c.lh = c.lw = acc_t(0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    pos[k] = -1;
    c.weight[k] = acc_t(0);
  }
}

// Locates sample (x, y) on level l: the positions in [0, S) of its four corners (-1 outside
// the map), the bilinear corners and the level's width. Returns false when the sample
// contributes nothing (it lies outside its level, or the level does not fit inside [0, S)).
template <typename acc_t>
__device__ __forceinline__ bool locate(const int64_t* __restrict__ shapes,
                                       const int64_t* __restrict__ starts, int64_t S, int64_t l,
                                       acc_t x, acc_t y, BilinearCorners<acc_t>& c,
                                       int32_t (&pos)[4], int32_t& width) {
  const int64_t H = shapes[2 * l], W = shapes[2 * l + 1], start = starts[l];
  width = 0;
  if (!level_in_bounds(H, W, start, S) || !bilinear_corners<acc_t>(x, y, H, W, c)) {
    no_sample(c, pos);
    return false;
  }
  width = static_cast<int32_t>(W);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    pos[k] = c.index[k] >= 0 ? static_cast<int32_t>(start + c.index[k]) : -1;
  }
  return true;
}

// What the group needs of one sample, sent from its owner in six shuffles (rather than four
// positions and four weights): the position of corner (h0, w0), the others being +1, +W and
// +W+1; the level width W; which corners lie in the map; the fractional parts, from which
// every lane rebuilds the bilinear weights; and the attention weight.
template <typename acc_t>
struct SampleMessage {
  int32_t base, width, mask;
  acc_t lh, lw, a;
};

template <typename acc_t>
__device__ __forceinline__ SampleMessage<acc_t> make_message(const BilinearCorners<acc_t>& c,
                                                             const int32_t (&pos)[4],
                                                             int32_t width, acc_t a) {
  SampleMessage<acc_t> m{0, width, 0, c.lh, c.lw, a};
  const int32_t offset[4] = {0, 1, width, width + 1};
#pragma unroll
  for (int k = 3; k >= 0; --k) {
    if (pos[k] >= 0) {
      m.mask |= 1 << k;
      m.base = pos[k] - offset[k];
    }
  }
  return m;
}

// Lane `src` of each group's message, in every lane of the group.
template <typename acc_t>
__device__ __forceinline__ SampleMessage<acc_t> broadcast(const SampleMessage<acc_t>& m, int src,
                                                          int G) {
  SampleMessage<acc_t> r;
  r.base = __shfl_sync(kFullMask, m.base, src, G);
  r.width = __shfl_sync(kFullMask, m.width, src, G);
  r.mask = __shfl_sync(kFullMask, m.mask, src, G);
  r.lh = __shfl_sync(kFullMask, m.lh, src, G);
  r.lw = __shfl_sync(kFullMask, m.lw, src, G);
  r.a = __shfl_sync(kFullMask, m.a, src, G);
  return r;
}

// The corners of a received sample: positions (-1 outside the map) and bilinear weights.
template <typename acc_t>
__device__ __forceinline__ void corners(const SampleMessage<acc_t>& m, BilinearCorners<acc_t>& c,
                                        int32_t (&pos)[4]) {
  c.lh = m.lh;
  c.lw = m.lw;
  bilinear_weights<acc_t>(c);
  const int32_t offset[4] = {0, 1, m.width, m.width + 1};
#pragma unroll
  for (int k = 0; k < 4; ++k) pos[k] = (m.mask >> k) & 1 ? m.base + offset[k] : -1;
}

template <typename scalar_t, typename acc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                   const acc_t* __restrict__ attn, scalar_t* __restrict__ out, Sizes z, int G) {
  const QueryGroups<index_t, VEC> groups(z, G);
  for (index_t first = groups.warp_first; first < groups.num_groups; first += groups.stride) {
    const QueryGroup<index_t> group = groups.at(first);
    const scalar_t* v_nm = value + group.value_offset;
    for (index_t round = 0; round < groups.chunks; round += G) {
      const index_t chunk = round + groups.lane;
      const bool has_chunk = group.active && chunk < groups.chunks;
      const index_t channel = chunk * VEC;
      acc_t acc[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
      for (int i0 = 0; i0 < groups.LP; i0 += G) {
        // This lane locates sample i0 + lane; the group reads them in turn.
        const int i = i0 + groups.lane;
        int32_t pos[4];
        int32_t width = 0;
        BilinearCorners<acc_t> c;
        acc_t a = acc_t(0);
        if (group.active && i < groups.LP) {
          const index_t s = group.nqm * groups.LP + i;
          locate<acc_t>(shapes, starts, z.S, i / z.P, loc[2 * s], loc[2 * s + 1], c, pos, width);
          a = attn[s];
        } else {
          no_sample(c, pos);
        }
        const SampleMessage<acc_t> mine = make_message(c, pos, width, a);
        const int count = min(G, groups.LP - i0);
        for (int k = 0; k < count; ++k) {
          const SampleMessage<acc_t> m = broadcast(mine, k, G);
          BilinearCorners<acc_t> ck;
          int32_t pk[4];
          corners(m, ck, pk);
          if (!has_chunk) continue;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (pk[j] < 0) continue;
            const acc_t w = m.a * ck.weight[j];
            acc_t v[VEC];
            load_vec<VEC>(v_nm + pk[j] * groups.row + channel, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[e] += w * v[e];
          }
        }
      }
      if (has_chunk) store_vec<VEC>(out + group.nqm * groups.D + channel, acc);
    }
  }
}

// Sums v over the G lanes of each group (a butterfly: every lane gets the sum).
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, int G) {
  for (int offset = G / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset, G);
  }
  return v;
}

// Location and weight gradients of every sample, and the value gradient: summed with
// atomicAdd into grad_value, or (row_key non-null, deterministic mode) written as each
// (sample, corner)'s target row and coefficient for gather_value_grad_kernel.
template <typename scalar_t, typename acc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                    const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                    const acc_t* __restrict__ attn, const scalar_t* __restrict__ grad_out,
                    acc_t* __restrict__ grad_value, acc_t* __restrict__ grad_loc,
                    acc_t* __restrict__ grad_attn, int64_t* __restrict__ row_key,
                    acc_t* __restrict__ row_coef, Sizes z, int G) {
  const QueryGroups<index_t, VEC> groups(z, G);
  for (index_t first = groups.warp_first; first < groups.num_groups; first += groups.stride) {
    const QueryGroup<index_t> group = groups.at(first);
    const scalar_t* v_nm = value + group.value_offset;
    acc_t* gv_nm = grad_value + group.value_offset;
    const scalar_t* go = grad_out + group.nqm * groups.D;
    for (int i0 = 0; i0 < groups.LP; i0 += G) {
      const int i = i0 + groups.lane;
      const bool owns = group.active && i < groups.LP;  // this lane's sample: s
      const index_t s = group.nqm * groups.LP + i;
      int32_t pos[4];
      int32_t width = 0;
      BilinearCorners<acc_t> c;
      acc_t a = acc_t(0);
      bool inside = false;
      if (owns) {
        inside = locate<acc_t>(shapes, starts, z.S, i / z.P, loc[2 * s], loc[2 * s + 1], c, pos,
                               width);
        a = attn[s];
      } else {
        no_sample(c, pos);
      }
      const SampleMessage<acc_t> mine = make_message(c, pos, width, a);
      // The owned sample's weight gradient and d(sample)/dh, d(sample)/dw, summed over all D
      // channels: each is linear in the corners' <grad_out, value>, so every lane forms them
      // from its own channels and the group sums three numbers instead of four.
      acc_t sum_attn = acc_t(0), sum_h = acc_t(0), sum_w = acc_t(0);
      const int count = min(G, groups.LP - i0);
      for (index_t round = 0; round < groups.chunks; round += G) {
        const index_t chunk = round + groups.lane;
        const bool has_chunk = group.active && chunk < groups.chunks;
        const index_t channel = chunk * VEC;
        acc_t gout[VEC];
        if (has_chunk) {
          load_vec<VEC>(go + channel, gout);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) gout[e] = acc_t(0);
        }
        for (int k = 0; k < count; ++k) {
          const SampleMessage<acc_t> m = broadcast(mine, k, G);
          BilinearCorners<acc_t> ck;
          int32_t pk[4];
          corners(m, ck, pk);
          acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
          if (has_chunk) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              if (pk[j] < 0) continue;
              acc_t v[VEC];
              load_vec<VEC>(v_nm + pk[j] * groups.row + channel, v);
#pragma unroll
              for (int e = 0; e < VEC; ++e) dot[j] += gout[e] * v[e];
              if (row_key == nullptr) {
                const acc_t w = m.a * ck.weight[j];
                acc_t* gv = gv_nm + pk[j] * groups.row + channel;
#pragma unroll
                for (int e = 0; e < VEC; ++e) atomicAdd(gv + e, w * gout[e]);
              }
            }
          }
          acc_t d_h, d_w;
          bilinear_grad_hw<acc_t>(ck, dot, d_h, d_w);
          const acc_t g_attn = group_sum(ck.weight[0] * dot[0] + ck.weight[1] * dot[1] +
                                             ck.weight[2] * dot[2] + ck.weight[3] * dot[3],
                                         G);
          d_h = group_sum(d_h, G);
          d_w = group_sum(d_w, G);
          if (groups.lane == k) {
            sum_attn += g_attn;
            sum_h += d_h;
            sum_w += d_w;
          }
        }
      }
      if (!owns) continue;
      if (!inside) {
        grad_attn[s] = acc_t(0);
        grad_loc[2 * s] = grad_loc[2 * s + 1] = acc_t(0);
      } else {
        grad_attn[s] = sum_attn;
        // h = y * H - 0.5 and w = x * W - 0.5.
        const int64_t l = i / z.P;
        grad_loc[2 * s] = a * sum_w * static_cast<acc_t>(width);
        grad_loc[2 * s + 1] = a * sum_h * static_cast<acc_t>(shapes[2 * l]);
      }
      if (row_key != nullptr) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // grad_value[n, p, m, :] is row (n * S + p) * M + m of D channels.
          row_key[4 * s + j] =
              pos[j] >= 0 ? (static_cast<int64_t>(group.n) * z.S + pos[j]) * z.M + group.m
                          : kNoRow;
          row_coef[4 * s + j] = a * c.weight[j];
        }
      }
    }
  }
}

// Deterministic value gradient: `keys` sorted (stable), `order` the entry (4 * sample +
// corner) of each sorted key. The group at the first entry of each run of equal keys sums
// the run's contributions, in entry order, into its row of grad_value (zero-filled). No
// shuffles here, so groups may leave the loop independently.
template <typename scalar_t, typename acc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads)
    gather_value_grad_kernel(const int64_t* __restrict__ keys, const int64_t* __restrict__ order,
                             const acc_t* __restrict__ coef, const scalar_t* __restrict__ grad_out,
                             acc_t* __restrict__ grad_value, index_t entries, Sizes z, int G) {
  const GroupLoop<index_t> loop(G, entries);
  const index_t D = z.D;
  const index_t chunks = D / VEC;
  const index_t LP4 = z.L * z.P * 4;
  for (index_t first = loop.warp_first; first < entries; first += loop.stride) {
    const index_t e = first + loop.group_in_warp;
    if (e >= entries) continue;
    const int64_t key = keys[e];
    if (key == kNoRow || (e > 0 && keys[e - 1] == key)) continue;
    acc_t* gv = grad_value + key * D;
    for (index_t chunk = loop.lane; chunk < chunks; chunk += G) {
      acc_t acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
      for (index_t f = e; f < entries && keys[f] == key; ++f) {
        const index_t entry = static_cast<index_t>(order[f]);
        const acc_t w = coef[entry];
        acc_t g[VEC];
        load_vec<VEC>(grad_out + (entry / LP4) * D + chunk * VEC, g);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += w * g[k];
      }
      store_vec<VEC>(gv + chunk * VEC, acc);
    }
  }
}

// Lanes per (query, head): enough for one round over the chunks, a power of two <= 32.
int group_size(int64_t chunks) {
  int G = 1;
  while (G < kWarp && G < chunks) G *= 2;
  return G;
}

int64_t num_blocks(int64_t groups, int G) {
  return std::max<int64_t>(1, std::min((groups * G + kThreads - 1) / kThreads, kMaxBlocks));
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// 16-byte accesses where D and every pointer allow, one element otherwise.
template <typename scalar_t>
bool use_vectors(int64_t D, std::initializer_list<const void*> pointers) {
  constexpr int64_t kVec = 16 / sizeof(scalar_t);
  if (D % kVec != 0) return false;
  for (const void* p : pointers) {
    if (!aligned(p, 16)) return false;
  }
  return true;
}

// Whether every element offset the kernels form fits in int32.
bool fits_int32(const Sizes& z) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2;
  const int64_t samples = z.N * z.Lq * z.M * z.L * z.P;
  return z.N * z.S * z.M * z.D <= kMax && z.N * z.Lq * z.M * z.D <= kMax &&
         4 * samples <= kMax;
}

// Calls f(scalar, vec, index, G) for the value's dtype (scalar: a scalar_t value), 16-byte
// vectors where D and every pointer allow (vec: std::integral_constant<int, VEC>), 32-bit
// indices where the sizes allow (index: an int32_t or int64_t value) and G lanes per group.
template <typename F>
void dispatch_kernel(const MSDeformAttnArgs& a, std::initializer_list<const void*> pointers,
                     const F& f) {
  const Sizes& z = a.sizes;
  const bool small = fits_int32(z);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.value.scalar_type(), "ms_deform_attn_cuda", [&] {
        constexpr int kVec = 16 / sizeof(scalar_t);
        const auto run = [&](auto vec) {
          const int G = group_size(z.D / decltype(vec)::value);
          small ? f(scalar_t(), vec, int32_t(0), G) : f(scalar_t(), vec, int64_t(0), G);
        };
        use_vectors<scalar_t>(z.D, pointers) ? run(std::integral_constant<int, kVec>())
                                             : run(std::integral_constant<int, 1>());
      });
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_loc,
                                       const at::Tensor& attn_weight) {
  // Checked before the guard, which would reject a CPU value less clearly than the device
  // check does (the inputs' ATen ops guard their own devices).
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = forward_output(a);
  if (a.empty()) return out;
  const Sizes& z = a.sizes;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_kernel(a, {a.value.data_ptr(), out.data_ptr()}, [&](auto scalar, auto vec,
                                                                auto index, int G) {
    using scalar_t = decltype(scalar);
    using acc_t = at::opmath_type<scalar_t>;
    const auto kernel = &forward_kernel<scalar_t, acc_t, decltype(vec)::value, decltype(index)>;
    MSDA_LAUNCH(kernel, num_blocks(z.N * z.Lq * z.M, G), kThreads, stream)(
        a.value.data_ptr<scalar_t>(), a.spatial_shapes.data_ptr<int64_t>(),
        a.level_start_index.data_ptr<int64_t>(), a.sampling_loc.data_ptr<acc_t>(),
        a.attn_weight.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), z, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  // Checked before the guard, which would reject a CPU value less clearly than the device
  // check does (the inputs' ATen ops guard their own devices).
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const c10::cuda::CUDAGuard guard(value.device());
  auto b = backward_buffers(a, grad_output);
  if (a.empty()) return backward_result(b, value, sampling_loc, attn_weight);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  if (!deterministic) {
    // The atomicAdd scatter: declared as PyTorch ops declare theirs (a no-op here, since
    // deterministic mode takes the two-pass path instead).
    at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  }
  b.grad_value.zero_();
  const Sizes& z = a.sizes;
  const int64_t entries = 4 * z.N * z.Lq * z.M * z.L * z.P;
  at::Tensor keys, coef;
  if (deterministic) {
    keys = at::empty({entries}, a.value.options().dtype(at::kLong));
    coef = at::empty({entries}, b.grad_value.options());
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  const std::initializer_list<const void*> pointers = {
      a.value.data_ptr(), b.grad_output.data_ptr(), b.grad_value.data_ptr()};
  dispatch_kernel(a, pointers, [&](auto scalar, auto vec, auto index, int G) {
    using scalar_t = decltype(scalar);
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int VEC = decltype(vec)::value;
    using index_t = decltype(index);
    const auto kernel = &backward_kernel<scalar_t, acc_t, VEC, index_t>;
    MSDA_LAUNCH(kernel, num_blocks(z.N * z.Lq * z.M, G), kThreads, stream)(
        a.value.data_ptr<scalar_t>(), a.spatial_shapes.data_ptr<int64_t>(),
        a.level_start_index.data_ptr<int64_t>(), a.sampling_loc.data_ptr<acc_t>(),
        a.attn_weight.data_ptr<acc_t>(), b.grad_output.data_ptr<scalar_t>(),
        b.grad_value.data_ptr<acc_t>(), b.grad_loc.data_ptr<acc_t>(),
        b.grad_attn.data_ptr<acc_t>(), deterministic ? keys.data_ptr<int64_t>() : nullptr,
        deterministic ? coef.data_ptr<acc_t>() : nullptr, z, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!deterministic) return;
    // Stable: equal rows keep their entries' order, so each row sums in a fixed order.
    const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    const auto gather = &gather_value_grad_kernel<scalar_t, acc_t, VEC, index_t>;
    MSDA_LAUNCH(gather, num_blocks(entries, G), kThreads, stream)(
        std::get<0>(sorted).data_ptr<int64_t>(), std::get<1>(sorted).data_ptr<int64_t>(),
        coef.data_ptr<acc_t>(), b.grad_output.data_ptr<scalar_t>(),
        b.grad_value.data_ptr<acc_t>(), static_cast<index_t>(entries), z, G);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return backward_result(b, value, sampling_loc, attn_weight);
}

}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(MSDA_CUDA_LIBRARY, MSDA_CUDA_DISPATCH_KEY, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cuda);
}
