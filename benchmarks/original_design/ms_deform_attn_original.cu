// Baseline for the benchmarks: multi-scale deformable attention in the design of the original
// Deformable DETR CUDA kernels (Zhu et al., 2021), re-implemented here. It is what our kernels
// (csrc/cuda) are measured against; it is never used by the model.
//
// The design, kept as it was:
// - forward: one thread per output element (n, q, m, d) in blocks of 1024 threads; each thread
//   loops over levels and points, reads the bilinear corners of its channel and sums
//   weight * sample;
// - backward: one thread per (n, q, m, d) as well, in blocks of D threads, so that a block
//   holds the D channels of one (query, head). For each (level, point) every thread adds its
//   channel's value gradient to the four corners with atomicAdd, and puts its channel's share
//   of the location and weight gradients in shared memory; after a barrier the block sums the
//   D shares (thread 0 serially for D <= 32, a tree reduction above, as the original picked
//   by block size) and thread 0 writes them; then another barrier. That is 2 barriers and a
//   reduction per sample, and D separate atomics per corner;
// - 32-bit index arithmetic, float32 and float64 only, zero-filled outputs.
//
// Not kept: the im2col_step batching (a loop over batch chunks on the host; it only matters
// for N > 64) and the original's separate code paths per block size (one template with a
// run-time block size here, the same work). The sampling convention is the one of
// csrc/ms_deform_attn_sampling.h (grid_sample, align_corners=False, zero padding); like the
// original, these kernels trust spatial_shapes and level_start_index (benchmark inputs only).
#include <cuda_runtime.h>

#include "ms_deform_attn_original.h"

namespace original_design {
namespace {

constexpr int kForwardThreads = 1024;  // the original's CUDA_NUM_THREADS

inline int num_blocks(int64_t n, int threads) {
  return static_cast<int>((n + threads - 1) / threads);
}

// Grid-stride loop over n work items, 32-bit like the original's CUDA_KERNEL_LOOP.
#define ORIGINAL_KERNEL_LOOP(i, n) \
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

// Bilinear sample of channel c of head m at pixel coordinates (h, w) of one level whose
// value rows start at `level`; corners outside the map count as zero.
template <typename scalar_t>
__device__ scalar_t im2col_bilinear(const scalar_t* __restrict__ level, int height, int width,
                                    int nheads, int channels, scalar_t h, scalar_t w, int m,
                                    int c) {
  const int h_low = floor(h);
  const int w_low = floor(w);
  const int h_high = h_low + 1;
  const int w_high = w_low + 1;
  const scalar_t lh = h - h_low;
  const scalar_t lw = w - w_low;
  const scalar_t hh = 1 - lh, hw = 1 - lw;
  const int w_stride = nheads * channels;
  const int h_stride = width * w_stride;
  const int h_low_off = h_low * h_stride, h_high_off = h_low_off + h_stride;
  const int w_low_off = w_low * w_stride, w_high_off = w_low_off + w_stride;
  const int base = m * channels + c;

  scalar_t v1 = 0, v2 = 0, v3 = 0, v4 = 0;
  if (h_low >= 0 && w_low >= 0) v1 = level[h_low_off + w_low_off + base];
  if (h_low >= 0 && w_high <= width - 1) v2 = level[h_low_off + w_high_off + base];
  if (h_high <= height - 1 && w_low >= 0) v3 = level[h_high_off + w_low_off + base];
  if (h_high <= height - 1 && w_high <= width - 1) v4 = level[h_high_off + w_high_off + base];
  return hh * hw * v1 + hh * lw * v2 + lh * hw * v3 + lh * lw * v4;
}

// One channel's share of the backward of one sample: atomicAdd into the value gradient at the
// four corners, and this channel's terms of the location and weight gradients into `grad_loc`
// (2 entries) and `grad_attn` (1), which are this thread's shared-memory slots.
template <typename scalar_t>
__device__ void col2im_bilinear(const scalar_t* __restrict__ level, int height, int width,
                                int nheads, int channels, scalar_t h, scalar_t w, int m, int c,
                                scalar_t top_grad, scalar_t attn_weight,
                                scalar_t* __restrict__ grad_level, scalar_t* grad_loc,
                                scalar_t* grad_attn) {
  const int h_low = floor(h);
  const int w_low = floor(w);
  const int h_high = h_low + 1;
  const int w_high = w_low + 1;
  const scalar_t lh = h - h_low;
  const scalar_t lw = w - w_low;
  const scalar_t hh = 1 - lh, hw = 1 - lw;
  const int w_stride = nheads * channels;
  const int h_stride = width * w_stride;
  const int h_low_off = h_low * h_stride, h_high_off = h_low_off + h_stride;
  const int w_low_off = w_low * w_stride, w_high_off = w_low_off + w_stride;
  const int base = m * channels + c;
  const scalar_t w1 = hh * hw, w2 = hh * lw, w3 = lh * hw, w4 = lh * lw;
  const scalar_t top_grad_value = top_grad * attn_weight;
  scalar_t grad_h = 0, grad_w = 0;

  scalar_t v1 = 0, v2 = 0, v3 = 0, v4 = 0;
  if (h_low >= 0 && w_low >= 0) {
    const int ptr = h_low_off + w_low_off + base;
    v1 = level[ptr];
    grad_h -= hw * v1;
    grad_w -= hh * v1;
    atomicAdd(grad_level + ptr, w1 * top_grad_value);
  }
  if (h_low >= 0 && w_high <= width - 1) {
    const int ptr = h_low_off + w_high_off + base;
    v2 = level[ptr];
    grad_h -= lw * v2;
    grad_w += hh * v2;
    atomicAdd(grad_level + ptr, w2 * top_grad_value);
  }
  if (h_high <= height - 1 && w_low >= 0) {
    const int ptr = h_high_off + w_low_off + base;
    v3 = level[ptr];
    grad_h += hw * v3;
    grad_w -= lh * v3;
    atomicAdd(grad_level + ptr, w3 * top_grad_value);
  }
  if (h_high <= height - 1 && w_high <= width - 1) {
    const int ptr = h_high_off + w_high_off + base;
    v4 = level[ptr];
    grad_h += lw * v4;
    grad_w += lh * v4;
    atomicAdd(grad_level + ptr, w4 * top_grad_value);
  }
  const scalar_t val = w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4;
  *grad_attn = top_grad * val;
  grad_loc[0] = width * grad_w * top_grad_value;
  grad_loc[1] = height * grad_h * top_grad_value;
}

template <typename scalar_t>
__global__ void forward_kernel(int n, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out,
                               Sizes z) {
  ORIGINAL_KERNEL_LOOP(index, n) {
    int t = index;
    const int c = t % z.D;
    t /= z.D;
    const int sampling_index = t;  // (n * Lq + q) * M + m
    const int m = t % z.M;
    t /= z.M;
    t /= z.Lq;
    const int b = t;
    int weight_ptr = sampling_index * z.L * z.P;
    int loc_ptr = weight_ptr << 1;
    const int qid_stride = z.M * z.D;
    const int value_offset = b * z.S * qid_stride;
    scalar_t col = 0;
    for (int l = 0; l < z.L; ++l) {
      const int start = starts[l];
      const int height = shapes[2 * l];
      const int width = shapes[2 * l + 1];
      const scalar_t* level = value + (value_offset + start * qid_stride);
      for (int p = 0; p < z.P; ++p) {
        const scalar_t loc_w = loc[loc_ptr];
        const scalar_t loc_h = loc[loc_ptr + 1];
        const scalar_t weight = attn[weight_ptr];
        const scalar_t h_im = loc_h * height - scalar_t(0.5);
        const scalar_t w_im = loc_w * width - scalar_t(0.5);
        if (h_im > -1 && w_im > -1 && h_im < height && w_im < width) {
          col += im2col_bilinear(level, height, width, z.M, z.D, h_im, w_im, m, c) * weight;
        }
        weight_ptr += 1;
        loc_ptr += 2;
      }
    }
    out[index] = col;
  }
}

// Blocks of D threads: one block is the D channels of one (n, q, m). kTree selects the
// shared-memory tree reduction (the original's choice for blocks of more than 32 threads)
// over thread 0 summing the D shares alone.
template <typename scalar_t, bool kTree>
__global__ void backward_kernel(int n, const scalar_t* __restrict__ grad_col,
                                const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc,
                                const scalar_t* __restrict__ attn,
                                scalar_t* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn, Sizes z) {
  extern __shared__ unsigned char shared_bytes[];
  scalar_t* cache_loc = reinterpret_cast<scalar_t*>(shared_bytes);  // [2 * D]
  scalar_t* cache_attn = cache_loc + 2 * blockDim.x;                  // [D]
  const unsigned int tid = threadIdx.x;
  ORIGINAL_KERNEL_LOOP(index, n) {
    int t = index;
    const int c = t % z.D;
    t /= z.D;
    const int sampling_index = t;
    const int m = t % z.M;
    t /= z.M;
    t /= z.Lq;
    const int b = t;
    const scalar_t top_grad = grad_col[index];
    int weight_ptr = sampling_index * z.L * z.P;
    int loc_ptr = weight_ptr << 1;
    scalar_t* grad_loc_ptr = grad_loc + (weight_ptr << 1);
    scalar_t* grad_attn_ptr = grad_attn + weight_ptr;
    const int qid_stride = z.M * z.D;
    const int value_offset = b * z.S * qid_stride;
    for (int l = 0; l < z.L; ++l) {
      const int start = starts[l];
      const int height = shapes[2 * l];
      const int width = shapes[2 * l + 1];
      const int level_offset = value_offset + start * qid_stride;
      const scalar_t* level = value + level_offset;
      scalar_t* grad_level = grad_value + level_offset;
      for (int p = 0; p < z.P; ++p) {
        const scalar_t loc_w = loc[loc_ptr];
        const scalar_t loc_h = loc[loc_ptr + 1];
        const scalar_t weight = attn[weight_ptr];
        const scalar_t h_im = loc_h * height - scalar_t(0.5);
        const scalar_t w_im = loc_w * width - scalar_t(0.5);
        cache_loc[2 * tid] = 0;
        cache_loc[2 * tid + 1] = 0;
        cache_attn[tid] = 0;
        if (h_im > -1 && w_im > -1 && h_im < height && w_im < width) {
          col2im_bilinear(level, height, width, z.M, z.D, h_im, w_im, m, c, top_grad, weight,
                          grad_level, cache_loc + 2 * tid, cache_attn + tid);
        }
        __syncthreads();
        if (kTree) {
          // Entries [0, span) are still to be summed; each step folds the upper half onto
          // the lower (for an odd span the middle entry waits a step), so any D works, not
          // only powers of two. The loop bounds are the same in every thread of the block.
          unsigned int span = blockDim.x;
          while (span > 1) {
            const unsigned int half = (span + 1) / 2;
            if (tid < span / 2) {
              cache_attn[tid] += cache_attn[tid + half];
              cache_loc[2 * tid] += cache_loc[2 * (tid + half)];
              cache_loc[2 * tid + 1] += cache_loc[2 * (tid + half) + 1];
            }
            __syncthreads();
            span = half;
          }
          if (tid == 0) {
            grad_loc_ptr[0] = cache_loc[0];
            grad_loc_ptr[1] = cache_loc[1];
            grad_attn_ptr[0] = cache_attn[0];
          }
        } else if (tid == 0) {
          scalar_t gw = cache_loc[0], gh = cache_loc[1], ga = cache_attn[0];
          for (unsigned int i = 1; i < blockDim.x; ++i) {
            gw += cache_loc[2 * i];
            gh += cache_loc[2 * i + 1];
            ga += cache_attn[i];
          }
          grad_loc_ptr[0] = gw;
          grad_loc_ptr[1] = gh;
          grad_attn_ptr[0] = ga;
        }
        __syncthreads();
        weight_ptr += 1;
        loc_ptr += 2;
        grad_attn_ptr += 1;
        grad_loc_ptr += 2;
      }
    }
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t forward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out, Sizes z,
                    cudaStream_t stream) {
  const int64_t n = int64_t(z.N) * z.Lq * z.M * z.D;
  if (n == 0) return cudaSuccess;
  forward_kernel<scalar_t><<<num_blocks(n, kForwardThreads), kForwardThreads, 0, stream>>>(
      static_cast<int>(n), value, shapes, starts, loc, attn, out, z);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t backward(const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                     const scalar_t* loc, const scalar_t* attn, const scalar_t* grad_out,
                     scalar_t* grad_value, scalar_t* grad_loc, scalar_t* grad_attn, Sizes z,
                     cudaStream_t stream) {
  const int64_t n = int64_t(z.N) * z.Lq * z.M * z.D;
  if (n == 0) return cudaSuccess;
  // The original's launch: blocks of D threads (the binding refuses D > 1024).
  const int threads = z.D;
  const size_t shared = 3 * sizeof(scalar_t) * threads;
  const int blocks = num_blocks(n, threads);
  if (threads > 32) {
    backward_kernel<scalar_t, true><<<blocks, threads, shared, stream>>>(
        static_cast<int>(n), grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc,
        grad_attn, z);
  } else {
    backward_kernel<scalar_t, false><<<blocks, threads, shared, stream>>>(
        static_cast<int>(n), grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc,
        grad_attn, z);
  }
  return cudaGetLastError();
}

#define ORIGINAL_INSTANTIATE(T)                                                               \
  template cudaError_t forward<T>(const T*, const int64_t*, const int64_t*, const T*, const T*, \
                                  T*, Sizes, cudaStream_t);                                   \
  template cudaError_t backward<T>(const T*, const int64_t*, const int64_t*, const T*,         \
                                   const T*, const T*, T*, T*, T*, Sizes, cudaStream_t);

ORIGINAL_INSTANTIATE(float)
ORIGINAL_INSTANTIATE(double)

}  // namespace original_design
