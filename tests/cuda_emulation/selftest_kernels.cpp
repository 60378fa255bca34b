// Small purpose-written kernels that test the emulator itself, registered as
// torch.ops.cuda_emu_selftest.* (tests/test_cuda_emulation.py drives them). Written as CUDA
// device code, compiled like the project's .cu files (build.py includes this file in a
// generated one).
#include "cuda_emulation.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

namespace cuda_emu::selftest {
namespace {

// ---------------------------------------------------------------------------------------
// Block reduction in shared memory. Without the barriers a thread reads partial sums that
// other threads have not written yet: under the randomised fiber order the result is wrong.

constexpr int kReduceThreads = 256;

__global__ void block_sum_kernel(const double* __restrict__ x, double* __restrict__ out,
                                 int64_t n, bool sync) {
  __shared__ double partial[kReduceThreads];
  const int t = threadIdx.x;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + t;
  partial[t] = i < n ? x[i] : 0.0;
  if (sync) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    if (sync) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

at::Tensor block_sum(const at::Tensor& x, bool sync) {
  const auto xc = x.to(at::kDouble).contiguous();
  const int64_t n = xc.numel();
  const int64_t blocks = (n + kReduceThreads - 1) / kReduceThreads;
  auto out = at::empty({blocks}, xc.options());
  if (blocks > 0) {
    CUDA_EMU_LAUNCH(&block_sum_kernel, blocks, kReduceThreads)(
        xc.data_ptr<double>(), out.data_ptr<double>(), n, sync);
  }
  return out;
}

// Each thread reads its neighbour's value through shared memory, with or without __syncwarp.
__global__ void warp_exchange_kernel(const int* __restrict__ in, int* __restrict__ out,
                                     bool sync) {
  __shared__ int slot[1024];
  const int t = threadIdx.x;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + t;
  slot[t] = in[i];
  if (sync) __syncwarp();
  out[i] = slot[t ^ 1];
}

at::Tensor warp_exchange(const at::Tensor& x, bool sync) {
  const auto xc = x.to(at::kInt).contiguous();
  TORCH_CHECK(xc.numel() % 64 == 0, "size must be a multiple of 64");
  auto out = at::empty_like(xc);
  CUDA_EMU_LAUNCH(&warp_exchange_kernel, xc.numel() / 64, 64)(
      xc.data_ptr<int>(), out.data_ptr<int>(), sync);
  return out;
}

// ---------------------------------------------------------------------------------------
// Shuffles: lane i calls the intrinsic with its own param[i]; lanes outside `mask` exit
// first (so the mask names exactly the lanes that call). kind: 0 idx, 1 up, 2 down, 3 xor.

struct Quad {
  int v[4];
};

template <typename T>
__global__ void shuffle_kernel(const T* __restrict__ in, const int* __restrict__ param,
                               T* __restrict__ out, int kind, int width, unsigned mask) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int lane = threadIdx.x % warpSize;
  if (!((mask >> lane) & 1u)) return;
  const T v = in[i];
  T r = v;
  switch (kind) {
    case 0:
      r = __shfl_sync(mask, v, param[i], width);
      break;
    case 1:
      r = __shfl_up_sync(mask, v, static_cast<unsigned>(param[i]), width);
      break;
    case 2:
      r = __shfl_down_sync(mask, v, static_cast<unsigned>(param[i]), width);
      break;
    case 3:
      r = __shfl_xor_sync(mask, v, param[i], width);
      break;
  }
  out[i] = r;
}

template <typename T>
void launch_shuffle(const at::Tensor& in, const at::Tensor& param, at::Tensor& out, int64_t kind,
                    int64_t width, int64_t mask) {
  const int64_t n = param.numel();
  const int threads = n % 64 == 0 ? 64 : 32;
  CUDA_EMU_LAUNCH(&shuffle_kernel<T>, n / threads, threads)(
      reinterpret_cast<const T*>(in.data_ptr()), param.data_ptr<int>(),
      reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(kind), static_cast<int>(width),
      static_cast<unsigned>(mask));
}

// values: [n] int32/int64/float32/float64, or [n, 4] int32 (a 16-byte struct per lane).
at::Tensor shuffle(const at::Tensor& values, const at::Tensor& param, int64_t kind,
                   int64_t width, int64_t mask) {
  const auto in = values.contiguous();
  const auto p = param.to(at::kInt).contiguous();
  TORCH_CHECK(p.numel() % 32 == 0 && in.size(0) == p.numel(), "one param per lane, full warps");
  // Lanes that exit keep their input, so the result is defined everywhere.
  auto out = in.clone();
  if (in.dim() == 2) {
    TORCH_CHECK(in.scalar_type() == at::kInt && in.size(1) == 4, "[n, 4] int32 for structs");
    launch_shuffle<Quad>(in, p, out, kind, width, mask);
    return out;
  }
  switch (in.scalar_type()) {
    case at::kInt:
      launch_shuffle<int>(in, p, out, kind, width, mask);
      break;
    case at::kLong:
      launch_shuffle<long long>(in, p, out, kind, width, mask);
      break;
    case at::kFloat:
      launch_shuffle<float>(in, p, out, kind, width, mask);
      break;
    case at::kDouble:
      launch_shuffle<double>(in, p, out, kind, width, mask);
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", in.scalar_type());
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Votes and counting barriers. Lanes outside `mask` exit first; out[i] = (ballot, any, all,
// __syncthreads_count, __syncthreads_and, __syncthreads_or) for the block's predicates.

__global__ void vote_kernel(const int* __restrict__ pred, int* __restrict__ out,
                            unsigned mask) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int lane = threadIdx.x % warpSize;
  const int p = pred[i];
  // All threads take part in the block barriers before the lanes outside the mask leave.
  out[6 * i + 3] = __syncthreads_count(p);
  out[6 * i + 4] = __syncthreads_and(p);
  out[6 * i + 5] = __syncthreads_or(p);
  if (!((mask >> lane) & 1u)) return;
  out[6 * i] = static_cast<int>(__ballot_sync(mask, p));
  out[6 * i + 1] = __any_sync(mask, p);
  out[6 * i + 2] = __all_sync(mask, p);
}

at::Tensor vote(const at::Tensor& pred, int64_t mask, int64_t threads) {
  const auto p = pred.to(at::kInt).contiguous();
  TORCH_CHECK(p.numel() % threads == 0, "whole blocks only");
  auto out = at::full({p.numel(), 6}, -7, p.options());
  CUDA_EMU_LAUNCH(&vote_kernel, p.numel() / threads, threads)(
      p.data_ptr<int>(), out.data_ptr<int>(), static_cast<unsigned>(mask));
  return out;
}

// ---------------------------------------------------------------------------------------
// Broken kernels: each mode is a bug the emulator must report instead of hanging.

__global__ void fault_kernel(int mode, int* __restrict__ out) {
  const int t = threadIdx.x;
  const int lane = t % warpSize;
  int v = t;
  switch (mode) {
    case 0:  // a lane exits before a full-mask shuffle
      if (t == 5) return;
      v = __shfl_sync(0xffffffffu, v, 0);
      break;
    case 1:  // half the warp shuffles, the other half votes, both with the full mask
      if (lane < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      } else {
        v = static_cast<int>(__ballot_sync(0xffffffffu, 1));
      }
      break;
    case 2:  // lane 0 names lanes 0-1 while the others name the whole warp
      v = __shfl_down_sync(lane == 0 ? 0x3u : 0xffffffffu, v, 1);
      break;
    case 3:  // warp 0 lane 0 waits at __syncwarp while the rest of the block syncs
      if (t == 0) {
        __syncwarp();
      } else {
        __syncthreads();
      }
      break;
    case 4:  // a mask without the calling lane
      v = __shfl_sync(lane == 0 ? 0x2u : 0xffffffffu, v, 0);
      break;
    case 5:  // an invalid width
      v = __shfl_xor_sync(0xffffffffu, v, 1, 3);
      break;
    case 6:  // a failed device-side assertion
      CUDA_KERNEL_ASSERT(t != 7);
      break;
    case 7:  // the full mask in a partial last warp (the block has 48 threads)
      v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 8:  // a shuffle operand of a different size on half the warp
      if (lane < 16) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
      } else {
        v = static_cast<int>(__shfl_xor_sync(0xffffffffu, static_cast<long long>(v), 1));
      }
      break;
    default:
      break;
  }
  out[t] = v;
}

at::Tensor fault(int64_t mode, int64_t threads) {
  auto out = at::full({threads}, -1, at::kInt);
  CUDA_EMU_LAUNCH(&fault_kernel, 1, threads)(static_cast<int>(mode), out.data_ptr<int>());
  return out;
}

// ---------------------------------------------------------------------------------------
// Atomics from many blocks at once (several OS threads): counts must be exact, and the old
// values returned by one counter must be a permutation of 0..n-1.

__global__ void atomic_kernel(float* f, double* d, int* i32, unsigned* u32,
                              unsigned long long* u64, long long* i64, int* ticket_counter,
                              int* __restrict__ tickets, int iters) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int k = 0; k < iters; ++k) {
    atomicAdd(f, 1.0f);
    atomicAdd(d, 0.5);
    atomicAdd(i32, 1);
    atomicAdd(u32, 2u);
    atomicAdd(u64, 3ull);
    atomicAdd(i64, -1ll);
  }
  tickets[t] = atomicAdd(ticket_counter, 1);
}

std::tuple<at::Tensor, at::Tensor> atomic_counts(int64_t blocks, int64_t threads,
                                                 int64_t iters) {
  float f = 0;
  double d = 0;
  int i32 = 0, ticket = 0;
  unsigned u32 = 0;
  unsigned long long u64 = 0;
  long long i64 = 0;
  auto tickets = at::full({blocks * threads}, -1, at::kInt);
  CUDA_EMU_LAUNCH(&atomic_kernel, blocks, threads)(&f, &d, &i32, &u32, &u64, &i64, &ticket,
                                                   tickets.data_ptr<int>(),
                                                   static_cast<int>(iters));
  auto counts = at::tensor({static_cast<double>(f), d, static_cast<double>(i32),
                            static_cast<double>(u32), static_cast<double>(u64),
                            static_cast<double>(i64)},
                           at::kDouble);
  return {counts, tickets};
}

// ---------------------------------------------------------------------------------------
// Every thread of a 3-D grid of 3-D blocks runs once, with consistent built-in variables;
// order[b] is the rank at which block b started (a permutation of the blocks).

__global__ void coverage_kernel(int* __restrict__ hits, int* __restrict__ order,
                                int* started) {
  const int64_t block = blockIdx.x + static_cast<int64_t>(gridDim.x) *
                                         (blockIdx.y + static_cast<int64_t>(gridDim.y) *
                                                           blockIdx.z);
  const int64_t per_block = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  const int64_t thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  // The first thread of the block to reach the barrier takes a ticket for the block.
  if (__syncthreads_count(1) == per_block && thread == 0) {
    order[block] = atomicAdd(started, 1);
  }
  atomicAdd(&hits[block * per_block + thread], 1);
}

at::Tensor coverage(std::vector<int64_t> grid, std::vector<int64_t> block) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "3-D grid and block");
  const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
  const int64_t blocks = grid[0] * grid[1] * grid[2];
  auto hits = at::zeros({blocks * block[0] * block[1] * block[2] + blocks}, at::kInt);
  int started = 0;
  int* h = hits.data_ptr<int>();
  CUDA_EMU_LAUNCH(&coverage_kernel, g, b)(h, h + (hits.numel() - blocks), &started);
  return hits;
}

}  // namespace
}  // namespace cuda_emu::selftest

TORCH_LIBRARY(cuda_emu_selftest, m) {
  using namespace cuda_emu::selftest;
  m.def("block_sum(Tensor x, bool sync) -> Tensor", &block_sum);
  m.def("warp_exchange(Tensor x, bool sync) -> Tensor", &warp_exchange);
  m.def("shuffle(Tensor values, Tensor param, int kind, int width, int mask) -> Tensor",
        &shuffle);
  m.def("vote(Tensor pred, int mask, int threads) -> Tensor", &vote);
  m.def("fault(int mode, int threads) -> Tensor", &fault);
  m.def("atomic_counts(int blocks, int threads, int iters) -> (Tensor, Tensor)",
        &atomic_counts);
  m.def("coverage(int[] grid, int[] block) -> Tensor", &coverage);
}
