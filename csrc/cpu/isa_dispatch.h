// Instruction-set dispatch for the CPU kernels: on x86 a kernel body is compiled twice, for
// the baseline the build targets and for AVX2+FMA, and the variant is picked at run time, so
// that the build stays portable (no -march flags) and still uses the wider units.
//
// A body is a struct with a static `run`. It and everything it calls must be inlined into
// the variant (MSDA_ALWAYS_INLINE): a function the compiler keeps out of line is compiled
// once, for the baseline only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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
namespace cpu {

template <typename Body, typename... Args>
void run_baseline(Args... args) {
  Body::run(args...);
}

#if MSDA_X86_DISPATCH
template <typename Body, typename... Args>
__attribute__((target("avx2,fma"))) void run_avx2(Args... args) {
  Body::run(args...);
}

// Asked once per process.
inline bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

// The AVX-512 subset that a kernel compiled with target(MSDA_AVX512_TARGET) needs;
// cpu_has_avx512() asks for exactly these (once per process).
#define MSDA_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
#endif

// Body::run(Args...) compiled for the best instruction set this CPU has.
template <typename Body, typename... Args>
auto select_isa() -> void (*)(Args...) {
#if MSDA_X86_DISPATCH
  if (cpu_has_avx2_fma()) return &run_avx2<Body, Args...>;
#endif
  return &run_baseline<Body, Args...>;
}

// Fresh outputs of tens of MiB: where Linux gives transparent huge pages on request, first
// writing them costs a page fault per 2 MiB instead of per 4 KiB. Only a hint: errors are
// ignored. For the op run with PyTorch's own allocator; blocks of the CPU memory cache
// (huge_page_cache.h) are advised when made, and advising them again costs one system call.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

}  // namespace cpu
}  // namespace deformable_detr
