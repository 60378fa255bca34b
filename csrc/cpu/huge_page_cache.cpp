// See huge_page_cache.h.
#include "cpu/huge_page_cache.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace deformable_detr {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Below 2 MiB a block would be mostly padding, and glibc keeps such memory for reuse.
constexpr size_t kMinBlock = kHugePage;
// Above the default allocator's priority (0), so that the cache wins until it is disabled.
constexpr uint8_t kPriority = 1;

class HugePageCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* p = nbytes >= kMinBlock ? take_block(nbytes) : previous_->raw_allocate(nbytes);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // oneDNN allocates through raw_allocate/raw_deallocate: every pointer this allocator hands
  // out, large or small, is released by this one function.
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  bool enable(int64_t max_cached_bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    max_cached_ = static_cast<size_t>(std::max<int64_t>(0, max_cached_bytes));
    trim_locked(max_cached_);
    if (!enabled()) {
      if (previous_ == nullptr) previous_ = c10::GetCPUAllocator();
      // Refused (kept as it is) where another library installed an allocator of a higher
      // priority: then this one stays out.
      c10::SetCPUAllocator(this, kPriority);
    }
    return enabled();
  }

  void disable() {
    std::lock_guard<std::mutex> guard(mutex_);
    if (enabled()) c10::SetCPUAllocator(previous_, kPriority);
  }

  // Whether PyTorch allocates CPU memory here now (another library may have replaced it).
  bool enabled() const { return c10::GetCPUAllocator() == this; }

  void empty() {
    std::lock_guard<std::mutex> guard(mutex_);
    trim_locked(0);
  }

  HugePageCacheStats stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    HugePageCacheStats s;
    s.reserved_bytes = static_cast<int64_t>(reserved_);
    s.cached_bytes = static_cast<int64_t>(cached_);
    s.hits = hits_;
    s.misses = misses_;
    return s;
  }

  // fork() while another thread holds the mutex would leave it locked in the child forever
  // (a DataLoader worker started while an intra-op thread frees a tensor): hold it across.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  static void release(void* p);

  void* take_block(size_t nbytes) {
    const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
        report_locked(p, static_cast<int64_t>(size));
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, size) != 0) {
      // Memory is short: give the cached blocks back and try once more.
      empty();
      // As PyTorch's CPU allocator: torch.OutOfMemoryError in Python.
      TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHugePage, size) == 0,
                       "DefaultCPUAllocator: not enough memory: you tried to allocate ", nbytes,
                       " bytes.");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // advice only: without THP the block still works
#endif
    std::lock_guard<std::mutex> guard(mutex_);
    block_size_[p] = size;
    reserved_ += size;
    ++misses_;
    report_locked(p, static_cast<int64_t>(size));
    return p;
  }

  void give_back(void* p) {
    // Blocks are 2 MiB-aligned; most small allocations are not, and skip the lookup.
    if (reinterpret_cast<uintptr_t>(p) % kHugePage == 0) {
      std::unique_lock<std::mutex> guard(mutex_);
      auto it = block_size_.find(p);
      if (it != block_size_.end()) {
        const size_t size = it->second;
        if (cached_ + size <= max_cached_) {
          free_[size].push_back(p);
          cached_ += size;
          report_locked(p, -static_cast<int64_t>(size));
          return;
        }
        block_size_.erase(it);
        reserved_ -= size;
        report_locked(p, -static_cast<int64_t>(size));
        guard.unlock();
        std::free(p);
        return;
      }
    }
    // A small allocation: back to the allocator it came from (set once, before any).
    previous_->raw_deallocate(p);
  }

  // As PyTorch's CPU allocator, for torch.profiler(profile_memory=True).
  void report_locked(void* p, int64_t delta) {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, reserved_ - cached_, reserved_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  // Returns cached blocks to the system until at most `target` bytes stay cached.
  void trim_locked(size_t target) {
    for (auto& [size, blocks] : free_) {
      while (cached_ > target && !blocks.empty()) {
        void* p = blocks.back();
        blocks.pop_back();
        block_size_.erase(p);
        cached_ -= size;
        reserved_ -= size;
        std::free(p);
      }
    }
  }

  std::mutex mutex_;
  c10::Allocator* previous_ = nullptr;
  size_t max_cached_ = 0;
  size_t reserved_ = 0;
  size_t cached_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  std::unordered_map<void*, size_t> block_size_;
  std::unordered_map<size_t, std::vector<void*>> free_;
};

// Never destroyed: tensors freed during interpreter shutdown still find it.
HugePageCache& cache() {
  static HugePageCache* const instance = [] {
    auto* c = new HugePageCache();
    pthread_atfork([] { cache().lock_for_fork(); }, [] { cache().unlock_after_fork(); },
                   [] { cache().unlock_after_fork(); });
    return c;
  }();
  return *instance;
}

void HugePageCache::release(void* p) { cache().give_back(p); }

}  // namespace

bool enable_huge_page_cache(int64_t max_cached_bytes) { return cache().enable(max_cached_bytes); }
void disable_huge_page_cache() { cache().disable(); }
bool huge_page_cache_enabled() { return cache().enabled(); }
void empty_huge_page_cache() { cache().empty(); }
HugePageCacheStats huge_page_cache_stats() { return cache().stats(); }

}  // namespace deformable_detr
