// Software prefetching for the CPU kernels.
//
// The kernels walk one head at a time: along its queries they read the locations, weights
// (and output gradients) of consecutive queries M*L*P samples apart, and a head copy reads
// value rows M*D apart. The hardware prefetchers lose such strides at every page boundary
// (the load of a row's first weight then stalls on memory at every page), so each step
// asks for the data of the step kPrefetchRows ahead.
#pragma once

#include <cstdint>

#include "cpu/isa_dispatch.h"

namespace deformable_detr {
namespace cpu {

constexpr int64_t kPrefetchRows = 4;

// Prefetches the cache lines of p[0, count), for reading or (kWrite) for writing.
template <bool kWrite = false, typename T>
MSDA_ALWAYS_INLINE void prefetch_range(const T* p, int64_t count) {
#if defined(__GNUC__)
  const char* begin = reinterpret_cast<const char*>(p);
  const char* end = reinterpret_cast<const char*>(p + count);
  for (const char* c = begin; c < end; c += 64) __builtin_prefetch(c, kWrite);
  __builtin_prefetch(end - 1, kWrite);
#endif
}

}  // namespace cpu
}  // namespace deformable_detr
