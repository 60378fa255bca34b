// Instruction-set dispatch for the CPU kernels: on x86 a kernel body is compiled twice, for
// the baseline the build targets and for AVX2+FMA, and the variant is picked at run time, so
// that the build stays portable (no -march flags) and still uses the wider units.
//
// A body is a struct with a static `run`. It and everything it calls must be inlined into
// the variant (MSDA_ALWAYS_INLINE): a function the compiler keeps out of line is compiled
// once, for the baseline only.
#pragma once

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
#endif

// Body::run(Args...) compiled for the best instruction set this CPU has.
template <typename Body, typename... Args>
auto select_isa() -> void (*)(Args...) {
#if MSDA_X86_DISPATCH
  if (cpu_has_avx2_fma()) return &run_avx2<Body, Args...>;
#endif
  return &run_baseline<Body, Args...>;
}

}  // namespace cpu
}  // namespace deformable_detr
