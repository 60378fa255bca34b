// CUDA launch emulator for tests: the CUDA built-ins that device code uses, for g++.
//
// Included before anything else in a translation unit that compiles a .cu file as C++ (the
// generated wrapper in build.py includes this header, then the .cu file unchanged). Kernels
// then run on the CPU through MSDA_LAUNCH / CUDA_EMU_LAUNCH: every thread of a block is a
// fiber, and the fibers switch at each __syncthreads, __syncwarp, shuffle and vote, in a
// seeded random order; blocks run in a seeded random order on a few OS threads (emulator.cpp,
// README.md).
//
// __CUDACC__ and __CUDA_ARCH__ stay undefined: the c10 headers must take their host paths,
// so device code that branches on them compiles its host fallback here.
#pragma once

// Included first so that CUDA_KERNEL_ASSERT can be redefined at the end of this file (the
// c10 definition would abort the whole process).
#include <c10/macros/Macros.h>

#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------------------
// CUDA runtime types and the few runtime calls host code makes around a launch.

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : "cuda emulator error";
}
// Launches are synchronous here.
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

// Vector types with CUDA's alignment (what 16-byte vector loads rely on).
#define CUDA_EMU_VECTOR_2_4(T, name)                                                     \
  struct alignas(2 * sizeof(T)) name##2 { T x, y; };                                      \
  struct alignas(4 * sizeof(T) > 16 ? 16 : 4 * sizeof(T)) name##4 { T x, y, z, w; };      \
  inline constexpr name##2 make_##name##2(T x, T y) { return {x, y}; }                    \
  inline constexpr name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }
#define CUDA_EMU_VECTOR_3(T, name)                                                       \
  struct name##3 { T x, y, z; };                                                          \
  inline constexpr name##3 make_##name##3(T x, T y, T z) { return {x, y, z}; }
CUDA_EMU_VECTOR_2_4(float, float)
CUDA_EMU_VECTOR_2_4(double, double)
CUDA_EMU_VECTOR_2_4(int, int)
CUDA_EMU_VECTOR_2_4(unsigned, uint)
CUDA_EMU_VECTOR_2_4(long long, longlong)
CUDA_EMU_VECTOR_2_4(unsigned long long, ulonglong)
CUDA_EMU_VECTOR_2_4(short, short)
CUDA_EMU_VECTOR_2_4(unsigned short, ushort)
CUDA_EMU_VECTOR_3(float, float)
CUDA_EMU_VECTOR_3(double, double)
CUDA_EMU_VECTOR_3(int, int)
#undef CUDA_EMU_VECTOR_2_4
#undef CUDA_EMU_VECTOR_3
inline constexpr uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// ---------------------------------------------------------------------------------------
// Function and variable qualifiers. Everything is host code here. (No __noinline__:
// libstdc++ uses that name in its own attributes.)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__
#define __align__(n) __attribute__((aligned(n)))
// A block runs entirely on one worker OS thread, one block at a time, so per-thread static
// storage is per-block storage shared by the block's fibers. Like CUDA shared memory it is
// not reset between blocks (it may hold the previous block's data; zeros on a fresh
// worker). Dynamic shared memory (extern __shared__ T x[]) is not supported.
#define __shared__ static thread_local

namespace cuda_emu {

namespace detail {

// What a running fiber's built-in variables read.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
// The running fiber on this OS thread (null outside kernels).
extern __thread ThreadState* current_thread;

enum class WarpOpKind : uint8_t {
  kSyncwarp,
  kShflIdx,
  kShflUp,
  kShflDown,
  kShflXor,
  kBallot,
  kAny,
  kAll,
};
enum class BarrierKind : uint8_t { kPlain, kCount, kAnd, kOr };

// The warp-synchronous operation of the calling fiber: blocks until every lane named in
// `mask` has arrived at a matching one. `in`/`out` hold the shuffled value (up to 16 bytes);
// `param` is the shuffle's srcLane/delta/laneMask, `pred` a vote's predicate. Returns the
// vote's result.
unsigned warp_op(WarpOpKind kind, unsigned mask, const void* in, unsigned size, int param,
                 int width, int pred, void* out, const std::source_location& loc);
// __syncthreads and its counting variants.
int block_barrier(BarrierKind kind, int pred, const std::source_location& loc);
// Lanes of the calling warp that have not exited.
unsigned active_mask();
// Lets the other fibers of the block run (__nanosleep: spin-wait loops make progress).
void yield_fiber(const std::source_location& loc);
[[noreturn]] void kernel_assert_fail(const char* cond, const char* file, int line,
                                     const char* func);

// Compiler barrier around the fiber switches: memory written by one fiber must be reread
// by the next (the switches are opaque calls already; this makes it explicit).
inline void compiler_barrier() { asm volatile("" ::: "memory"); }

template <class T>
T shuffle(WarpOpKind kind, unsigned mask, const T& var, int param, int width,
          const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16,
                "the emulator shuffles trivially copyable types of at most 16 bytes");
  std::array<unsigned char, sizeof(T)> out;
  compiler_barrier();
  warp_op(kind, mask, &var, sizeof(T), param, width, 0, out.data(), loc);
  compiler_barrier();
  return std::bit_cast<T>(out);
}

inline unsigned vote(WarpOpKind kind, unsigned mask, int pred,
                     const std::source_location& loc) {
  compiler_barrier();
  const unsigned r = warp_op(kind, mask, nullptr, 0, 0, 32, pred != 0, nullptr, loc);
  compiler_barrier();
  return r;
}

template <class T>
T atomic_fetch_add(T* address, T val) {
  if constexpr (std::is_floating_point_v<T>) {
    // Compare-and-swap on the bit pattern (so NaNs do not loop forever).
    T old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    T desired;
    do {
      desired = old + val;
    } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED));
    return old;
  } else {
    return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
  }
}

template <class T, class F>
T atomic_update(T* address, F f) {
  T old;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = f(old);
  } while (!__atomic_compare_exchange(address, &old, &desired, true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED));
  return old;
}

// A grid or block extent as given: dim3 or an integer (checked at launch).
struct Extent {
  int64_t x = 1, y = 1, z = 1;
};
inline Extent to_extent(const dim3& d) { return {d.x, d.y, d.z}; }
inline Extent to_extent(const uint3& d) { return {d.x, d.y, d.z}; }
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
Extent to_extent(T v) {
  if constexpr (std::is_unsigned_v<T>) {
    // Saturate: anything this large is an invalid configuration anyway.
    return {v > static_cast<T>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(v), 1, 1};
  } else {
    return {static_cast<int64_t>(v), 1, 1};
  }
}

struct LaunchRequest {
  const char* expression;  // the kernel expression at the launch site
  const char* file;
  int line;
  const void* kernel;  // for the symbol name in error messages
  const std::type_info* kernel_type;
  Extent grid, block;
  size_t shared_bytes;
  void (*invoke)(const void* body);  // runs the kernel body for the current fiber
  const void* body;
};
// Runs every block of the launch, returns when all have finished; throws std::runtime_error
// (a Python RuntimeError) if the launch is invalid or a kernel error aborted it.
void launch(const LaunchRequest& request);

template <class To, class From>
To implicit_cast(From&& v) {
  return std::forward<From>(v);
}

}  // namespace detail

// kernel(args...) on every thread of the grid; the arguments convert to the kernel's
// parameter types as in a call, and each thread gets its own copy.
template <class... P>
class Launcher {
 public:
  Launcher(void (*kernel)(P...), detail::Extent grid, detail::Extent block, size_t shared_bytes,
           const char* expression, const char* file, int line)
      : kernel_(kernel),
        grid_(grid),
        block_(block),
        shared_bytes_(shared_bytes),
        expression_(expression),
        file_(file),
        line_(line) {}

  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong argument count");
    using Params = std::tuple<std::decay_t<P>...>;
    const Params params(detail::implicit_cast<std::decay_t<P>>(std::forward<A>(args))...);
    struct Body {
      void (*kernel)(P...);
      const Params* params;
    } body{kernel_, &params};
    detail::LaunchRequest request{};
    request.expression = expression_;
    request.file = file_;
    request.line = line_;
    request.kernel = reinterpret_cast<const void*>(kernel_);
    request.kernel_type = &typeid(kernel_);
    request.grid = grid_;
    request.block = block_;
    request.shared_bytes = shared_bytes_;
    request.invoke = [](const void* b) {
      const Body& self = *static_cast<const Body*>(b);
      std::apply(self.kernel, *self.params);
    };
    request.body = &body;
    detail::launch(request);
  }

 private:
  void (*kernel_)(P...);
  detail::Extent grid_, block_;
  size_t shared_bytes_;
  const char* expression_;
  const char* file_;
  int line_;
};

// The stream is accepted and ignored: launches are synchronous.
template <class... P, class G, class B, class S>
Launcher<P...> make_launcher(void (*kernel)(P...), const G& grid, const B& block,
                             size_t shared_bytes, const S& /*stream*/, const char* expression,
                             const char* file, int line) {
  return Launcher<P...>(kernel, detail::to_extent(grid), detail::to_extent(block), shared_bytes,
                        expression, file, line);
}

// The emulator's settings and counters (also exposed to Python as ops, see control_ops.h).
struct Config {
  uint64_t seed;
  int workers;
  // CUDA lets a warp-synchronous call name lanes that have exited; by default the emulator
  // reports that as a deadlock, since a shuffle from such a lane reads garbage.
  bool allow_exited_lanes;
};
Config config();
// Both restart the worker threads (whose __shared__ storage then starts zeroed), and
// set_seed the sequence of launch seeds, so that a run from here is reproducible: exactly
// with one worker; with several, up to which worker runs which block (and so the order of
// atomics between blocks and the stale __shared__ contents a block may see).
void set_seed(uint64_t seed);
void set_workers(int workers);
void set_allow_exited_lanes(bool allow);
// Name and value of each counter (launches, blocks, threads, barriers, warp ops, ...).
std::vector<std::pair<const char*, uint64_t>> counters();
void reset_counters();

}  // namespace cuda_emu

// The launch macro of the project's .cu files (kernel<<<blocks, threads, 0, stream>>> in a
// CUDA build). Synchronous; the stream is ignored.
#define MSDA_LAUNCH(kernel, blocks, threads, stream) \
  ::cuda_emu::make_launcher(kernel, blocks, threads, 0, stream, #kernel, __FILE__, __LINE__)
// The same for emulator-only code.
#define CUDA_EMU_LAUNCH(kernel, grid, block) \
  ::cuda_emu::make_launcher(kernel, grid, block, 0, nullptr, #kernel, __FILE__, __LINE__)

// ---------------------------------------------------------------------------------------
// Built-in variables: the running fiber's indices and the launch's dimensions.

#define threadIdx (::cuda_emu::detail::current_thread->thread_idx)
#define blockIdx (::cuda_emu::detail::current_thread->block_idx)
#define blockDim (::cuda_emu::detail::current_thread->block_dim)
#define gridDim (::cuda_emu::detail::current_thread->grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------
// Barriers, shuffles and votes: each is a fiber switch (see emulator.cpp for the rules).

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  ::cuda_emu::detail::compiler_barrier();
  ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarrierKind::kPlain, 0, loc);
  ::cuda_emu::detail::compiler_barrier();
}
inline int __syncthreads_count(int pred,
                               std::source_location loc = std::source_location::current()) {
  ::cuda_emu::detail::compiler_barrier();
  const int r = ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarrierKind::kCount,
                                                  pred != 0, loc);
  ::cuda_emu::detail::compiler_barrier();
  return r;
}
inline int __syncthreads_and(int pred,
                             std::source_location loc = std::source_location::current()) {
  ::cuda_emu::detail::compiler_barrier();
  const int r =
      ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarrierKind::kAnd, pred != 0, loc);
  ::cuda_emu::detail::compiler_barrier();
  return r;
}
inline int __syncthreads_or(int pred,
                            std::source_location loc = std::source_location::current()) {
  ::cuda_emu::detail::compiler_barrier();
  const int r =
      ::cuda_emu::detail::block_barrier(::cuda_emu::detail::BarrierKind::kOr, pred != 0, loc);
  ::cuda_emu::detail::compiler_barrier();
  return r;
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       std::source_location loc = std::source_location::current()) {
  ::cuda_emu::detail::vote(::cuda_emu::detail::WarpOpKind::kSyncwarp, mask, 0, loc);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
              std::source_location loc = std::source_location::current()) {
  return ::cuda_emu::detail::shuffle(::cuda_emu::detail::WarpOpKind::kShflIdx, mask, var,
                                     srcLane, width, loc);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location loc = std::source_location::current()) {
  return ::cuda_emu::detail::shuffle(::cuda_emu::detail::WarpOpKind::kShflUp, mask, var,
                                     static_cast<int>(delta), width, loc);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location loc = std::source_location::current()) {
  return ::cuda_emu::detail::shuffle(::cuda_emu::detail::WarpOpKind::kShflDown, mask, var,
                                     static_cast<int>(delta), width, loc);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                  std::source_location loc = std::source_location::current()) {
  return ::cuda_emu::detail::shuffle(::cuda_emu::detail::WarpOpKind::kShflXor, mask, var,
                                     laneMask, width, loc);
}

inline unsigned __ballot_sync(unsigned mask, int pred,
                              std::source_location loc = std::source_location::current()) {
  return ::cuda_emu::detail::vote(::cuda_emu::detail::WarpOpKind::kBallot, mask, pred, loc);
}
inline int __any_sync(unsigned mask, int pred,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      ::cuda_emu::detail::vote(::cuda_emu::detail::WarpOpKind::kAny, mask, pred, loc));
}
inline int __all_sync(unsigned mask, int pred,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      ::cuda_emu::detail::vote(::cuda_emu::detail::WarpOpKind::kAll, mask, pred, loc));
}
// Not a synchronisation: the lanes of the warp that have not exited (on a GPU, the lanes
// converged with the caller at that instant, which the emulator does not model).
inline unsigned __activemask() { return ::cuda_emu::detail::active_mask(); }

inline void __nanosleep(unsigned,
                        std::source_location loc = std::source_location::current()) {
  ::cuda_emu::detail::compiler_barrier();
  ::cuda_emu::detail::yield_fiber(loc);
  ::cuda_emu::detail::compiler_barrier();
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------
// Atomics: real ones, since blocks run concurrently on several OS threads. Relaxed order, as
// CUDA's. They return the old value.

inline int atomicAdd(int* a, int v) { return ::cuda_emu::detail::atomic_fetch_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) {
  return ::cuda_emu::detail::atomic_fetch_add(a, v);
}
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  return ::cuda_emu::detail::atomic_fetch_add(a, v);
}
inline long long atomicAdd(long long* a, long long v) {
  return ::cuda_emu::detail::atomic_fetch_add(a, v);
}
inline float atomicAdd(float* a, float v) { return ::cuda_emu::detail::atomic_fetch_add(a, v); }
inline double atomicAdd(double* a, double v) {
  return ::cuda_emu::detail::atomic_fetch_add(a, v);
}
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* a, unsigned v) {
  return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED);
}
template <class T, std::enable_if_t<std::is_arithmetic_v<T> && (sizeof(T) == 4 ||
                                                                 sizeof(T) == 8), int> = 0>
T atomicExch(T* a, T v) {
  T old;
  __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);
  return old;
}
template <class T, std::enable_if_t<std::is_integral_v<T> && (sizeof(T) == 2 ||
                                                               sizeof(T) == 4 ||
                                                               sizeof(T) == 8), int> = 0>
T atomicCAS(T* a, T compare, T v) {
  __atomic_compare_exchange(a, &compare, &v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;  // the old value whether or not the swap happened
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T atomicMin(T* a, T v) {
  return ::cuda_emu::detail::atomic_update(a, [v](T o) { return v < o ? v : o; });
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T atomicMax(T* a, T v) {
  return ::cuda_emu::detail::atomic_update(a, [v](T o) { return v > o ? v : o; });
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T atomicAnd(T* a, T v) {
  return __atomic_fetch_and(a, v, __ATOMIC_RELAXED);
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T atomicOr(T* a, T v) {
  return __atomic_fetch_or(a, v, __ATOMIC_RELAXED);
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
T atomicXor(T* a, T v) {
  return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------------------
// Intrinsics and the integer min/max of device code.

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// CUDA's global min/max (device code calls them unqualified). One template instead of
// CUDA's overload set, limited to arithmetic types so that it never captures other calls.
template <class A, class B,
          std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B,
          std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// A failed device-side assertion aborts the launch with an error (CUDA: the launch fails
// with cudaErrorAssert) instead of aborting the process.
#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#define CUDA_KERNEL_ASSERT(cond)                                                        \
  if (C10_UNLIKELY(!(cond))) {                                                          \
    ::cuda_emu::detail::kernel_assert_fail(#cond, __FILE__, __LINE__, __func__);        \
  }
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                                               \
  if (C10_UNLIKELY(!(cond))) {                                                          \
    ::cuda_emu::detail::kernel_assert_fail(#cond ": " msg, __FILE__, __LINE__, __func__); \
  }
