// A cache of huge-page blocks for large CPU tensors, installed as PyTorch's CPU allocator on
// request (deformable_detr.utils.cpu_memory.enable_cpu_memory_cache).
//
// Why: PyTorch's CPU allocator hands every tensor of more than a few MiB to glibc, which maps
// fresh pages for it and unmaps them when it is freed. At 800x1333 an inference allocates
// about 1 GiB in such tensors (feature maps, the encoder's [S, 1024] activations), so every
// pass takes ~300,000 page faults (the kernel zeroing each 4 KiB page) and then runs its
// matrix products on 4 KiB pages (TLB misses). Here blocks of 2 MiB and more are 2 MiB-aligned,
// advised as transparent huge pages (MADV_HUGEPAGE; used where the kernel's THP setting is
// "madvise" or "always"), and kept when freed, for the next tensor of the same size class.
//
// Sizes of at least kMinBlock are rounded up to a multiple of 2 MiB (the size class); smaller
// ones go to the allocator that was installed before. Freed blocks are cached while the
// cached total stays within the limit; beyond it a freed block goes back to the system.
#pragma once

#include <cstdint>

namespace deformable_detr {

struct HugePageCacheStats {
  int64_t reserved_bytes = 0;  // blocks held, in use or cached
  int64_t cached_bytes = 0;    // blocks held and free
  int64_t hits = 0;            // allocations served from the cache
  int64_t misses = 0;          // allocations that took a new block from the system
};

// Installs the cache as the CPU allocator (again: updates the limit). False where another
// allocator of a higher priority is installed (then nothing changes). Thread-safe.
bool enable_huge_page_cache(int64_t max_cached_bytes);
// Puts the previous allocator back. Blocks handed out stay valid and return to the cache.
void disable_huge_page_cache();
bool huge_page_cache_enabled();
// Returns every cached (free) block to the system.
void empty_huge_page_cache();
HugePageCacheStats huge_page_cache_stats();

}  // namespace deformable_detr
