// Bilinear sampling for multi-scale deformable attention, written once for the CPU and the
// CUDA kernels.
//
// Convention (grid_sample with align_corners=False and zero padding): a normalised location
// (x, y) in [0, 1] maps to the pixel coordinates w = x * W - 0.5, h = y * H - 0.5, so pixel
// centres sit at (i + 0.5) / size. A location whose h is not in (-1, H) or whose w is not in
// (-1, W) contributes nothing; corners outside the map count as zero. The corner index uses
// floor, not a cast to int, because h and w can lie in (-1, 0).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace deformable_detr {

// Problem sizes: N batch, S value positions, M heads, D channels per head, Lq queries,
// L levels, P points per level.
struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// Whether a level of size H x W starting at position `start` lies inside [0, S). The kernels
// treat any other level as empty, whatever spatial_shapes and level_start_index hold, so that
// they never address memory outside the value. Overflow-free for any int64 inputs.
MSDA_HOST_DEVICE bool level_in_bounds(int64_t H, int64_t W, int64_t start, int64_t S) {
  return H > 0 && W > 0 && start >= 0 && start <= S && H <= S && W <= S && H * W <= S - start;
}

// The four corners of one bilinear sample: flat spatial indices into a level (row-major
// h * W + w, -1 where the corner is outside the map) and their interpolation weights.
template <typename acc_t>
struct BilinearCorners {
  int64_t index[4];  // (h0, w0), (h0, w1), (h1, w0), (h1, w1)
  acc_t weight[4];
  // Fractional parts, kept for the derivatives with respect to the location.
  acc_t lh, lw;
};

// Pixel coordinates of the normalised location (x, y) on a level of size H x W.
template <typename acc_t>
MSDA_HOST_DEVICE void pixel_coords(acc_t x, acc_t y, acc_t H, acc_t W, acc_t& h, acc_t& w) {
  h = y * H - acc_t(0.5);
  w = x * W - acc_t(0.5);
}

// The four interpolation weights from the fractional parts c.lh and c.lw.
template <typename acc_t>
MSDA_HOST_DEVICE void bilinear_weights(BilinearCorners<acc_t>& c) {
  const acc_t hh = acc_t(1) - c.lh;
  const acc_t hw = acc_t(1) - c.lw;
  c.weight[0] = hh * hw;
  c.weight[1] = hh * c.lw;
  c.weight[2] = c.lh * hw;
  c.weight[3] = c.lh * c.lw;
}

// Fills `c` for the normalised location (x, y) on a level of size H x W. Returns false when
// the sample lies wholly outside the map (then it contributes nothing, not even gradient).
template <typename acc_t>
MSDA_HOST_DEVICE bool bilinear_corners(acc_t x, acc_t y, int64_t H, int64_t W,
                                       BilinearCorners<acc_t>& c) {
  acc_t h, w;
  pixel_coords<acc_t>(x, y, static_cast<acc_t>(H), static_cast<acc_t>(W), h, w);
  if (!(h > acc_t(-1) && w > acc_t(-1) && h < static_cast<acc_t>(H) &&
        w < static_cast<acc_t>(W))) {
    return false;
  }
  // floor(h) for h > -1, without a libm call: truncation, one lower for negative fractions.
  int64_t h0 = static_cast<int64_t>(h);
  int64_t w0 = static_cast<int64_t>(w);
  h0 -= static_cast<acc_t>(h0) > h;
  w0 -= static_cast<acc_t>(w0) > w;
  const int64_t h1 = h0 + 1;
  const int64_t w1 = w0 + 1;
  c.lh = h - static_cast<acc_t>(h0);
  c.lw = w - static_cast<acc_t>(w0);
  const bool h0_in = h0 >= 0;
  const bool h1_in = h1 <= H - 1;
  const bool w0_in = w0 >= 0;
  const bool w1_in = w1 <= W - 1;
  c.index[0] = (h0_in && w0_in) ? h0 * W + w0 : -1;
  c.index[1] = (h0_in && w1_in) ? h0 * W + w1 : -1;
  c.index[2] = (h1_in && w0_in) ? h1 * W + w0 : -1;
  c.index[3] = (h1_in && w1_in) ? h1 * W + w1 : -1;
  bilinear_weights<acc_t>(c);
  return true;
}

// Derivatives of the sampled value with respect to the pixel coordinates h and w, given
// the four corner values v[k] (zero for corners outside the map):
//   d/dh = -(1 - lw) v0 - lw v1 + (1 - lw) v2 + lw v3
//   d/dw = -(1 - lh) v0 + (1 - lh) v1 - lh v2 + lh v3
template <typename acc_t>
MSDA_HOST_DEVICE void bilinear_grad_hw(const BilinearCorners<acc_t>& c, const acc_t v[4],
                                       acc_t& d_h, acc_t& d_w) {
  const acc_t hh = acc_t(1) - c.lh;
  const acc_t hw = acc_t(1) - c.lw;
  d_h = hw * (v[2] - v[0]) + c.lw * (v[3] - v[1]);
  d_w = hh * (v[1] - v[0]) + c.lh * (v[3] - v[2]);
}

}  // namespace deformable_detr
