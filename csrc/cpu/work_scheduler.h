// Work scheduling for the CPU kernels.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace deformable_detr {
namespace cpu {

// Runs fn(lo, hi) over [0, total) in blocks handed out on demand rather than one equal
// share per thread: rows differ in cost (queries on coarse levels reach across the whole
// finest map and miss the cache more, and a virtual CPU may be slowed down), so fixed
// shares leave a thread idle. For blocks whose results do not depend on the order.
template <typename F>
void parallel_blocks(int64_t total, int64_t block, const F& fn) {
  const int64_t blocks = (total + block - 1) / block;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), blocks), 1,
                   [&](int64_t, int64_t) {
                     for (int64_t b = next++; b < blocks; b = next++) {
                       fn(b * block, std::min(total, (b + 1) * block));
                     }
                   });
}

}  // namespace cpu
}  // namespace deformable_detr
