// The CUDA launch emulator's runtime: fibers, the block scheduler, barriers, warp-synchronous
// operations, the worker pool and the error reports. README.md says what is faithful.
//
// A launch hands its blocks, in a seeded random permutation, to a pool of OS worker threads.
// A worker runs one block at a time, entirely: each CUDA thread of the block is a fiber on
// its own stack, and the worker's scheduler loop resumes a randomly chosen runnable fiber
// until it blocks (at a barrier, warp-synchronous call or __nanosleep) or exits. Nothing
// preempts a fiber elsewhere, so the schedule is a pure function of the seed and the block;
// only the interleaving of blocks on different workers (and so the order of their atomics)
// depends on the OS.
//
// No exception ever crosses a fiber switch: kernel errors are recorded in the block, the
// failing fiber switches back to the scheduler, and every other started fiber is resumed
// once with `cancel` set, which throws Cancelled at its suspension point and unwinds its own
// stack up to run_kernel(). The launch then throws std::runtime_error on the calling thread.
#include "cuda_emulation.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#define CUDA_EMU_X86_64_SWITCH 1
#else
#define CUDA_EMU_X86_64_SWITCH 0
#include <ucontext.h>
#endif

#if CUDA_EMU_X86_64_SWITCH
// cuda_emu_switch(save, load): pushes the callee-saved registers and the MXCSR / x87 control
// words, stores the stack pointer in *save, then pops the same from the stack at `load` and
// returns into that context. The System V ABI makes every other register caller-saved, so
// the compiler has spilled what it needs before the call. No system call, unlike
// swapcontext (which saves the signal mask).
extern "C" void cuda_emu_switch(void** save, void* load);
// The first frame of a fiber: calls r12(r13) on a 16-byte aligned stack.
extern "C" void cuda_emu_trampoline();
asm(R"(
    .pushsection .text
    .p2align 4
    .globl cuda_emu_switch
    .hidden cuda_emu_switch
    .type cuda_emu_switch, @function
cuda_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emu_switch, .-cuda_emu_switch

    .p2align 4
    .globl cuda_emu_trampoline
    .hidden cuda_emu_trampoline
    .type cuda_emu_trampoline, @function
cuda_emu_trampoline:
    movq %r13, %rdi
    andq $-16, %rsp
    callq *%r12
    ud2
    .size cuda_emu_trampoline, .-cuda_emu_trampoline
    .popsection
)");
#endif

namespace cuda_emu {
namespace detail {

__thread ThreadState* current_thread = nullptr;

namespace {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / kWarpSize;
// Per fiber; only the touched pages cost memory. Kernels keep little on the stack, but the
// unwinding of a cancelled fiber needs a few KiB too.
constexpr size_t kStackBytes = 128 * 1024;

// ---------------------------------------------------------------------------------------
// Counters, configuration, seeds.

enum Counter {
  kLaunches,
  kBlocks,
  kThreads,
  kBarriers,
  kSyncwarps,
  kShuffles,
  kVotes,
  kWarpLaneOps,
  kUndefinedReads,
  kFiberSwitches,
  kNumCounters
};
constexpr const char* kCounterNames[kNumCounters] = {
    "launches",      "blocks", "threads",       "syncthreads",
    "syncwarp",      "shuffles", "votes",       "warp_lane_ops",
    "undefined_shuffle_reads", "fiber_switches"};

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
uint64_t mix(uint64_t x) { return splitmix64(x); }

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoi(v) : fallback;
}

class Pool;

struct Global {
  std::mutex launch_mutex;  // one launch at a time (also guards pool)
  std::atomic<uint64_t> seed{static_cast<uint64_t>(env_int("CUDA_EMU_SEED", 0))};
  std::atomic<uint64_t> launch_index{0};
  std::atomic<int> workers{std::max(1, env_int("CUDA_EMU_WORKERS", 2))};
  std::atomic<bool> allow_exited_lanes{false};
  std::atomic<uint64_t> counters[kNumCounters] = {};
  std::unique_ptr<Pool> pool;
  pid_t pool_pid = 0;  // the process that started the pool's threads
};
// Never destroyed: worker threads simply die with the process.
Global& global() {
  static Global* g = new Global;
  return *g;
}

// A bijection of [0, n) from a seed: a 4-round Feistel network on the smallest even number
// of bits covering n, with cycle walking (re-encrypt until the value lands below n).
class Permutation {
 public:
  Permutation(uint64_t n, uint64_t seed) : n_(n) {
    int bits = 2;
    while (bits < 63 && (uint64_t(1) << bits) < n) ++bits;
    bits += bits % 2;
    half_ = bits / 2;
    mask_ = (uint64_t(1) << half_) - 1;
    for (uint64_t& k : keys_) k = splitmix64(seed);
  }
  uint64_t operator()(uint64_t i) const {
    do {
      i = encrypt(i);
    } while (i >= n_);
    return i;
  }

 private:
  uint64_t encrypt(uint64_t x) const {
    uint64_t l = x >> half_, r = x & mask_;
    for (uint64_t k : keys_) {
      const uint64_t t = l ^ (mix(r ^ k) & mask_);
      l = r;
      r = t;
    }
    return (l << half_) | r;
  }
  uint64_t n_;
  int half_;
  uint64_t mask_;
  uint64_t keys_[4];
};

// ---------------------------------------------------------------------------------------
// Error messages: names of kernels, lanes and call sites.

std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string s = status == 0 && d != nullptr ? d : name;
  std::free(d);
  return s;
}

// The symbol at `addr`. Kernels usually sit in an anonymous namespace, so they are not in
// the dynamic symbol table that dladdr reads: look them up in the file's full .symtab.
std::string symbol_name(const void* addr) {
  Dl_info info{};
  if (dladdr(addr, &info) == 0 || info.dli_fname == nullptr) return {};
  if (info.dli_sname != nullptr && info.dli_saddr == addr) return demangle(info.dli_sname);
  std::string found;
#if defined(__ELF__) && defined(__LP64__)
  const int fd = open(info.dli_fname, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  struct stat st {};
  void* map = fstat(fd, &st) == 0 ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)
                                  : MAP_FAILED;
  close(fd);
  if (map == MAP_FAILED) return {};
  const auto* base = static_cast<const unsigned char*>(map);
  const size_t size = st.st_size;
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
  const uint64_t offset =
      reinterpret_cast<uintptr_t>(addr) - reinterpret_cast<uintptr_t>(info.dli_fbase);
  if (size >= sizeof(Elf64_Ehdr) && std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 &&
      eh->e_ident[EI_CLASS] == ELFCLASS64 &&
      eh->e_shoff + uint64_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= size) {
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
    for (int s = 0; s < eh->e_shnum && found.empty(); ++s) {
      if (sh[s].sh_type != SHT_SYMTAB || sh[s].sh_link >= eh->e_shnum) continue;
      const Elf64_Shdr& strtab = sh[sh[s].sh_link];
      if (sh[s].sh_offset + sh[s].sh_size > size || strtab.sh_offset + strtab.sh_size > size) {
        continue;
      }
      const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[s].sh_offset);
      const size_t count = sh[s].sh_size / sizeof(Elf64_Sym);
      for (size_t i = 0; i < count; ++i) {
        if (ELF64_ST_TYPE(syms[i].st_info) == STT_FUNC && syms[i].st_value == offset &&
            syms[i].st_name < strtab.sh_size) {
          found = demangle(reinterpret_cast<const char*>(base + strtab.sh_offset) +
                           syms[i].st_name);
          break;
        }
      }
    }
  }
  munmap(map, size);
#endif
  return found;
}

// "ns::(anonymous namespace)::kernel<float, float>(float const*, ...)" -> "ns::kernel<float,
// float>": the name a reader recognises.
std::string short_function_name(std::string s) {
  const std::string anon = "(anonymous namespace)::";
  for (size_t p; (p = s.find(anon)) != std::string::npos;) s.erase(p, anon.size());
  if (s.rfind("void ", 0) == 0) s.erase(0, 5);
  const size_t paren = s.find('(');
  if (paren != std::string::npos) s.erase(paren);
  return s;
}

std::string basename(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

std::string site(const std::source_location& loc) {
  return basename(loc.file_name()) + ":" + std::to_string(loc.line());
}

std::string format_extent(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) +
         ")";
}

std::string hex_mask(unsigned mask) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", mask);
  return buf;
}

// Lanes of a mask as ranges: "0-4,6,9-31".
std::string lane_list(unsigned mask) {
  std::string s;
  for (int i = 0; i < kWarpSize;) {
    if (!((mask >> i) & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < kWarpSize && ((mask >> (j + 1)) & 1u)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

// "lane 5" or "lanes 0-4,6-31".
std::string lanes_phrase(unsigned mask) {
  return (__builtin_popcount(mask) == 1 ? "lane " : "lanes ") + lane_list(mask);
}

// The verb for lanes_phrase(mask): one or the other form.
const char* verb(unsigned mask, const char* one, const char* many) {
  return __builtin_popcount(mask) == 1 ? one : many;
}

const char* op_name(WarpOpKind kind) {
  switch (kind) {
    case WarpOpKind::kSyncwarp:
      return "__syncwarp";
    case WarpOpKind::kShflIdx:
      return "__shfl_sync";
    case WarpOpKind::kShflUp:
      return "__shfl_up_sync";
    case WarpOpKind::kShflDown:
      return "__shfl_down_sync";
    case WarpOpKind::kShflXor:
      return "__shfl_xor_sync";
    case WarpOpKind::kBallot:
      return "__ballot_sync";
    case WarpOpKind::kAny:
      return "__any_sync";
    case WarpOpKind::kAll:
      return "__all_sync";
  }
  return "?";
}

bool is_shuffle(WarpOpKind kind) {
  return kind == WarpOpKind::kShflIdx || kind == WarpOpKind::kShflUp ||
         kind == WarpOpKind::kShflDown || kind == WarpOpKind::kShflXor;
}

// The lane a shuffle reads, per the PTX definition of shfl.sync (which the CUDA intrinsics
// compile to): lanes form segments of `width`; b is taken modulo 32. Returns -1 where the
// source falls outside the segment and the lane keeps its own value.
int shuffle_source(WarpOpKind kind, int lane, int param, int width) {
  const int first = lane & ~(width - 1);
  const int last = first + width - 1;
  const int b = param & 31;
  int j = lane;
  switch (kind) {
    case WarpOpKind::kShflIdx:
      return first | (param & (width - 1));
    case WarpOpKind::kShflUp:
      j = lane - b;
      return j >= first ? j : -1;
    case WarpOpKind::kShflDown:
      j = lane + b;
      return j <= last ? j : -1;
    case WarpOpKind::kShflXor:
      j = lane ^ b;
      return j <= last ? j : -1;
    default:
      return -1;
  }
}

// ---------------------------------------------------------------------------------------
// Fibers and blocks.

enum class State : uint8_t { kReady, kRunning, kAtBarrier, kAtWarpOp, kDone };

// Thrown at the suspension point of a fiber whose block is being abandoned.
struct Cancelled {};

struct WarpOp {
  WarpOpKind kind;
  unsigned mask;
  unsigned size;
  int param, width, pred;
  unsigned result;
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
};

struct Fiber {
  ThreadState ts;
  void* sp = nullptr;  // saved stack pointer while switched out
#if !CUDA_EMU_X86_64_SWITCH
  ucontext_t context;
#endif
  State state = State::kDone;
  bool started = false;
  bool cancel = false;
  int index = 0, warp = 0, lane = 0;
  std::source_location where;  // of the barrier or warp op it waits at
  int barrier_count = 0, barrier_total = 0;
  WarpOp op{};
};

struct Stack {
  void* base = nullptr;
  size_t bytes = 0;
  char* top() const { return static_cast<char*>(base) + bytes; }
};

struct Launch {
  Launch(const LaunchRequest& r, uint64_t launch_seed, bool allow_exited)
      : request(&r),
        grid(r.grid.x, r.grid.y, r.grid.z),
        block(r.block.x, r.block.y, r.block.z),
        num_blocks(uint64_t(grid.x) * grid.y * grid.z),
        num_threads(static_cast<int>(block.x * block.y * block.z)),
        seed(launch_seed),
        allow_exited_lanes(allow_exited),
        order(num_blocks, launch_seed) {}

  const LaunchRequest* request;
  dim3 grid, block;
  uint64_t num_blocks;
  int num_threads;
  uint64_t seed;
  bool allow_exited_lanes;
  Permutation order;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
};

std::string describe_launch(const LaunchRequest& r) {
  std::string name = symbol_name(r.kernel);
  name = name.empty() ? std::string(r.expression) + " [" + demangle(r.kernel_type->name()) + "]"
                      : short_function_name(name);
  return "kernel " + name + " launched at " + basename(r.file) + ":" + std::to_string(r.line);
}

class BlockRunner;
__thread BlockRunner* tl_runner = nullptr;

void fiber_entry(Fiber* f);
#if !CUDA_EMU_X86_64_SWITCH
void fiber_entry_ucontext(unsigned hi, unsigned lo) {
  fiber_entry(reinterpret_cast<Fiber*>((uint64_t(hi) << 32) | lo));
}
#endif

// Runs blocks on one worker OS thread. Everything here is touched only by that thread: by
// its scheduler loop and by the fibers it resumes.
class BlockRunner {
 public:
  BlockRunner() : fibers_(kMaxThreads) { runnable_.reserve(kMaxThreads); }
  ~BlockRunner() {
    for (Stack& s : stacks_) munmap(s.base, s.bytes);
  }

  void run_launch(Launch& launch) {
    tl_runner = this;
    launch_ = &launch;
    while (!launch.failed.load(std::memory_order_relaxed)) {
      const uint64_t k = launch.next.fetch_add(1, std::memory_order_relaxed);
      if (k >= launch.num_blocks) break;
      try {
        run_block(launch.order(k));
      } catch (const std::exception& e) {  // out of memory for stacks: fail the launch
        std::lock_guard<std::mutex> lock(launch.error_mutex);
        if (!launch.failed.load()) {
          launch.error = std::string("cuda emulator: ") + e.what();
          launch.failed.store(true);
        }
      }
    }
    Global& g = global();
    for (int i = 0; i < kNumCounters; ++i) {
      g.counters[i].fetch_add(local_[i], std::memory_order_relaxed);
      local_[i] = 0;
    }
    launch_ = nullptr;
    tl_runner = nullptr;
  }

  // Called on fibers -------------------------------------------------------------------

  unsigned warp_op(WarpOpKind kind, unsigned mask, const void* in, unsigned size, int param,
                   int width, int pred, void* out, const std::source_location& loc) {
    Fiber& f = *running_;
    f.where = loc;
    WarpOp& op = f.op;
    op.kind = kind;
    op.mask = mask;
    op.size = size;
    op.param = param;
    op.width = width;
    op.pred = pred;
    op.result = 0;
    if (size > 0) std::memcpy(op.in, in, size);
    if (!((mask >> f.lane) & 1u)) {
      fail(f, std::string(op_name(kind)) + " at " + site(loc) + " by lane " +
                  std::to_string(f.lane) + " of warp " + std::to_string(f.warp) + " with mask " +
                  hex_mask(mask) + ", which does not name the calling lane");
    }
    if (is_shuffle(kind) && (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)) {
      fail(f, std::string(op_name(kind)) + " at " + site(loc) + " with width " +
                  std::to_string(width) + " (must be a power of two, at most 32)");
    }
    f.state = State::kAtWarpOp;
    at_warp_op_[f.warp] |= 1u << f.lane;
    try_complete_warp_op(f);
    suspend(f);
    if (out != nullptr) std::memcpy(out, op.out, size);
    return op.result;
  }

  int block_barrier(BarrierKind kind, int pred, const std::source_location& loc) {
    Fiber& f = *running_;
    f.where = loc;
    f.state = State::kAtBarrier;
    ++arrived_;
    arrived_true_ += pred;
    try_release_barrier();
    suspend(f);
    switch (kind) {
      case BarrierKind::kCount:
        return f.barrier_count;
      case BarrierKind::kAnd:
        return f.barrier_count == f.barrier_total;
      case BarrierKind::kOr:
        return f.barrier_count > 0;
      case BarrierKind::kPlain:
        break;
    }
    return 0;
  }

  void yield(const std::source_location& loc) {
    Fiber& f = *running_;
    f.where = loc;
    f.state = State::kReady;
    runnable_.push_back(f.index);
    suspend(f);
  }

  unsigned active_mask() const {
    const Fiber& f = *running_;
    return exists_[f.warp] & ~done_[f.warp];
  }

  // Records the error and abandons the block (never returns: throws Cancelled once the
  // scheduler cancels this fiber).
  [[noreturn]] void fail(Fiber& f, const std::string& what) {
    record_failure(what);
    f.state = State::kReady;
    suspend(f);
    throw Cancelled{};  // suspend() throws already; for the compiler
  }

  bool in_kernel() const { return running_ != nullptr; }
  Fiber* running() const { return running_; }

  // The body of every fiber; never returns.
  [[noreturn]] void run_fiber(Fiber& f) {
    const bool cancelled = run_kernel(f);
    on_exit(f, cancelled);
    switch_to_scheduler(f);
    std::abort();  // a finished fiber is never resumed
  }

 private:
  // Runs the kernel body; exceptions end here, on this fiber's own stack. Returns whether
  // the fiber was cancelled.
  bool run_kernel(Fiber& f) {
    std::string error;
    try {
      launch_->request->invoke(launch_->request->body);
      return false;
    } catch (const Cancelled&) {
      return true;
    } catch (const std::exception& e) {
      error = e.what();
    } catch (...) {
      error = "unknown exception";
    }
    record_failure("exception in thread " + format_extent(dim3(f.ts.thread_idx)) + ": " +
                   error);
    return true;
  }

  void run_block(uint64_t linear) {
    const Launch& L = *launch_;
    const dim3 g = L.grid, b = L.block;
    block_idx_ = {static_cast<unsigned>(linear % g.x),
                  static_cast<unsigned>((linear / g.x) % g.y),
                  static_cast<unsigned>(linear / (uint64_t(g.x) * g.y))};
    n_ = L.num_threads;
    live_ = n_;
    arrived_ = arrived_true_ = 0;
    failed_ = false;
    error_.clear();
    for (int w = 0; w * kWarpSize < n_; ++w) {
      const int lanes = std::min(kWarpSize, n_ - w * kWarpSize);
      exists_[w] = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
      done_[w] = 0;
      at_warp_op_[w] = 0;
    }
    ensure_stacks(n_);
    runnable_.clear();
    for (int i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      f.ts.thread_idx = {i % b.x, (i / b.x) % b.y, i / (b.x * b.y)};
      f.ts.block_idx = block_idx_;
      f.ts.block_dim = b;
      f.ts.grid_dim = g;
      f.state = State::kReady;
      f.started = f.cancel = false;
      f.index = i;
      f.warp = i / kWarpSize;
      f.lane = i % kWarpSize;
      runnable_.push_back(i);
    }
    rng_ = mix(L.seed ^ mix(linear + 1));
    schedule();
    if (failed_) {
      cancel_all();
      std::lock_guard<std::mutex> lock(launch_->error_mutex);
      if (!launch_->failed.load()) {
        launch_->error = error_;
        launch_->failed.store(true);
      }
    }
    ++local_[kBlocks];
    local_[kThreads] += n_;
  }

  void schedule() {
    for (;;) {
      if (failed_) return;
      if (runnable_.empty()) {
        if (live_ > 0) record_failure(diagnose_stuck());
        return;
      }
      const size_t pick = splitmix64(rng_) % runnable_.size();
      const int i = runnable_[pick];
      runnable_[pick] = runnable_.back();
      runnable_.pop_back();
      resume(fibers_[i]);
    }
  }

  // Resumes every started, unfinished fiber once with `cancel` set: each unwinds its stack.
  void cancel_all() {
    for (int i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      if (f.state == State::kDone) continue;
      if (!f.started) {
        f.state = State::kDone;
        continue;
      }
      f.cancel = true;
      resume(f);
    }
  }

  void on_exit(Fiber& f, bool cancelled) {
    f.state = State::kDone;
    --live_;
    done_[f.warp] |= 1u << f.lane;
    if (cancelled || failed_) return;
    // Exited threads do not take part in __syncthreads; with allow_exited_lanes, nor in
    // the warp-synchronous calls that name them.
    try_release_barrier();
    if (launch_->allow_exited_lanes) {
      for (int lane = 0; lane < kWarpSize; ++lane) {
        Fiber& g = fiber(f.warp, lane);
        if (((exists_[f.warp] >> lane) & 1u) && g.state == State::kAtWarpOp) {
          try_complete_warp_op(g);
        }
      }
    }
  }

  Fiber& fiber(int warp, int lane) { return fibers_[warp * kWarpSize + lane]; }

  void try_release_barrier() {
    if (arrived_ == 0 || arrived_ != live_) return;
    for (int i = 0; i < n_; ++i) {
      Fiber& f = fibers_[i];
      if (f.state != State::kAtBarrier) continue;
      f.barrier_count = arrived_true_;
      f.barrier_total = arrived_;
      f.state = State::kReady;
      runnable_.push_back(i);
    }
    arrived_ = arrived_true_ = 0;
    ++local_[kBarriers];
  }

  // Completes f's warp-synchronous call if every lane it names waits at a matching one
  // (same intrinsic, mask and operand size). Lanes waiting at something else are not an
  // error yet: they may be in a call with other lanes that completes first. A real mismatch
  // leaves the block with nothing runnable, and diagnose_stuck() reports it.
  void try_complete_warp_op(const Fiber& f) {
    const int w = f.warp;
    const WarpOp& op = f.op;
    const unsigned present = exists_[w] & ~done_[w];
    unsigned lanes = op.mask;
    if (launch_->allow_exited_lanes) {
      lanes &= present;
    } else if ((lanes & ~present) != 0) {
      return;  // names an exited or missing lane: never completes
    }
    if ((at_warp_op_[w] & lanes) != lanes) return;  // not all there yet
    for (unsigned m = lanes; m != 0; m &= m - 1) {
      const Fiber& g = fiber(w, __builtin_ctz(m));
      if (g.op.kind != op.kind || g.op.mask != op.mask || g.op.size != op.size) return;
    }
    complete_warp_op(w, lanes, op.kind);
  }

  void complete_warp_op(int w, unsigned lanes, WarpOpKind kind) {
    if (kind == WarpOpKind::kSyncwarp) {
      ++local_[kSyncwarps];
    } else if (is_shuffle(kind)) {
      ++local_[kShuffles];
      for (unsigned m = lanes; m != 0; m &= m - 1) {
        const int lane = __builtin_ctz(m);
        WarpOp& op = fiber(w, lane).op;
        const int src = shuffle_source(kind, lane, op.param, op.width);
        if (src < 0 || src == lane) {
          std::memcpy(op.out, op.in, op.size);
        } else if ((lanes >> src) & 1u) {
          std::memcpy(op.out, fiber(w, src).op.in, op.size);
        } else {
          // CUDA: undefined (the source lane is not in the call). All-ones bytes: NaN for
          // floating point, -1 for integers, so that a use shows.
          std::memset(op.out, 0xff, op.size);
          ++local_[kUndefinedReads];
        }
      }
    } else {
      ++local_[kVotes];
      unsigned ballot = 0;
      for (unsigned m = lanes; m != 0; m &= m - 1) {
        const int lane = __builtin_ctz(m);
        if (fiber(w, lane).op.pred) ballot |= 1u << lane;
      }
      const unsigned result = kind == WarpOpKind::kBallot ? ballot
                              : kind == WarpOpKind::kAny  ? unsigned(ballot != 0)
                                                          : unsigned(ballot == lanes);
      for (unsigned m = lanes; m != 0; m &= m - 1) fiber(w, __builtin_ctz(m)).op.result = result;
    }
    local_[kWarpLaneOps] += __builtin_popcount(lanes);
    at_warp_op_[w] &= ~lanes;
    for (unsigned m = lanes; m != 0; m &= m - 1) {
      Fiber& g = fiber(w, __builtin_ctz(m));
      g.state = State::kReady;
      runnable_.push_back(g.index);
    }
  }

  // Nothing is runnable but some fibers wait. A __syncthreads alone always completes once
  // every live thread arrives, so some fiber waits at a warp-synchronous call that can never
  // complete: report the first such warp.
  std::string diagnose_stuck() {
    const Fiber* f = nullptr;
    for (int i = 0; i < n_ && f == nullptr; ++i) {
      if (fibers_[i].state == State::kAtWarpOp) f = &fibers_[i];
    }
    if (f == nullptr) {
      return "deadlock: no thread of block " + format_extent(block_idx_) + " can run";
    }
    const int w = f->warp;
    const WarpOp& op = f->op;
    unsigned waiting = 0, exited = 0, absent = 0, at_barrier = 0, elsewhere = 0;
    const Fiber* barrier_example = nullptr;
    for (unsigned m = op.mask; m != 0; m &= m - 1) {
      const int lane = __builtin_ctz(m);
      const unsigned bit = 1u << lane;
      if (!(exists_[w] & bit)) {
        absent |= bit;
        continue;
      }
      const Fiber& g = fiber(w, lane);
      if (g.state == State::kDone) {
        exited |= bit;
      } else if (g.state == State::kAtBarrier) {
        at_barrier |= bit;
        if (barrier_example == nullptr) barrier_example = &g;
      } else if (g.state == State::kAtWarpOp && g.op.kind == op.kind && g.op.mask == op.mask &&
                 g.op.size == op.size) {
        waiting |= bit;
      } else {
        elsewhere |= bit;
      }
    }
    const unsigned missing = exited | absent | at_barrier | elsewhere;
    const bool mismatch = missing == elsewhere && elsewhere != 0;
    std::ostringstream s;
    s << (mismatch ? "mismatched warp-synchronous calls" : "deadlock") << ": warp " << w
      << " of block " << format_extent(block_idx_) << ": " << lanes_phrase(waiting)
      << verb(waiting, " waits at ", " wait at ") << op_name(op.kind) << "(mask "
      << hex_mask(op.mask) << ") at " << site(f->where);
    if (missing == 0) {
      // Cannot happen: such a call completes on the last arrival.
      s << ", which cannot complete";
    } else {
      s << ", but " << lanes_phrase(missing) << " never arrived:";
      const char* sep = " ";
      if (exited) {
        s << sep << lanes_phrase(exited) << " exited";
        if (!launch_->allow_exited_lanes) {
          s << " (CUDA lets a mask name exited lanes but a shuffle from one reads garbage; "
               "allow it with allow_exited_lanes)";
        }
        sep = "; ";
      }
      if (absent) {
        s << sep << lanes_phrase(absent) << verb(absent, " does", " do")
          << " not exist (the block has " << n_ << " threads)";
        sep = "; ";
      }
      if (at_barrier) {
        s << sep << lanes_phrase(at_barrier) << verb(at_barrier, " waits", " wait")
          << " at __syncthreads at " << site(barrier_example->where);
        sep = "; ";
      }
      // Group the other lanes by the call they wait at.
      unsigned rest = elsewhere;
      while (rest != 0) {
        const Fiber& g = fiber(w, __builtin_ctz(rest));
        unsigned same = 0;
        for (unsigned m = rest; m != 0; m &= m - 1) {
          const Fiber& h = fiber(w, __builtin_ctz(m));
          if (h.state == g.state && h.op.kind == g.op.kind && h.op.mask == g.op.mask &&
              h.op.size == g.op.size && h.where.line() == g.where.line()) {
            same |= 1u << h.lane;
          }
        }
        s << sep << lanes_phrase(same) << verb(same, " waits at ", " wait at ");
        if (g.state == State::kAtWarpOp) {
          s << op_name(g.op.kind) << "(mask " << hex_mask(g.op.mask) << ")";
          if (g.op.kind == op.kind && g.op.mask == op.mask) {
            s << " with a " << g.op.size << "-byte operand instead of " << op.size;
          }
        } else {
          s << "a fiber switch";
        }
        s << " at " << site(g.where);
        sep = "; ";
        rest &= ~same;
      }
    }
    return s.str();
  }

  void record_failure(const std::string& what) {
    if (failed_) return;
    failed_ = true;
    const Launch& L = *launch_;
    error_ = "cuda emulator: " + what + " [" + describe_launch(*L.request) + ", grid " +
             format_extent(L.grid) + ", block " + format_extent(L.block) + ", block index " +
             format_extent(block_idx_) + "]";
  }

  // Scheduling ---------------------------------------------------------------------------

  void ensure_stacks(int n) {
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (static_cast<int>(stacks_.size()) < n) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("cuda emulator: cannot map a fiber stack");
      // A guard page: an overflow faults instead of overwriting the next stack.
      mprotect(p, page, PROT_NONE);
      stacks_.push_back({p, kStackBytes});
    }
  }

  void prepare(Fiber& f) {
    const Stack& stack = stacks_[f.index];
#if CUDA_EMU_X86_64_SWITCH
    // The frame cuda_emu_switch pops: control words, r15..r12, rbx, rbp, return address.
    auto* sp = reinterpret_cast<uint64_t*>(stack.top());
    *--sp = 0;  // alignment slot, never returned to
    *--sp = reinterpret_cast<uint64_t>(&cuda_emu_trampoline);
    *--sp = 0;                                           // rbp
    *--sp = 0;                                           // rbx
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry);    // r12: entry
    *--sp = reinterpret_cast<uint64_t>(&f);              // r13: its argument
    *--sp = 0;                                           // r14
    *--sp = 0;                                           // r15
    sp -= 2;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    std::memcpy(sp, &mxcsr, sizeof mxcsr);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, sizeof fpucw);
    f.sp = sp;
#else
    static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = static_cast<char*>(stack.base) + page;
    f.context.uc_stack.ss_size = stack.bytes - page;
    f.context.uc_link = nullptr;
    const uint64_t p = reinterpret_cast<uint64_t>(&f);
    makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_entry_ucontext), 2,
                static_cast<unsigned>(p >> 32), static_cast<unsigned>(p));
#endif
  }

  void resume(Fiber& f) {
    running_ = &f;
    current_thread = &f.ts;
    if (!f.started) {
      f.started = true;
      prepare(f);
    }
    if (f.state != State::kDone) f.state = State::kRunning;
    ++local_[kFiberSwitches];
#if CUDA_EMU_X86_64_SWITCH
    cuda_emu_switch(&scheduler_sp_, f.sp);
#else
    swapcontext(&scheduler_context_, &f.context);
#endif
    current_thread = nullptr;
    running_ = nullptr;
  }

  void switch_to_scheduler(Fiber& f) {
#if CUDA_EMU_X86_64_SWITCH
    cuda_emu_switch(&f.sp, scheduler_sp_);
#else
    swapcontext(&f.context, &scheduler_context_);
#endif
  }

  // Blocks the running fiber until the scheduler resumes it.
  void suspend(Fiber& f) {
    switch_to_scheduler(f);
    if (f.cancel) throw Cancelled{};
  }

  Launch* launch_ = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<Stack> stacks_;
  std::vector<int> runnable_;
  Fiber* running_ = nullptr;
#if CUDA_EMU_X86_64_SWITCH
  void* scheduler_sp_ = nullptr;
#else
  ucontext_t scheduler_context_;
#endif
  uint64_t rng_ = 0;
  uint64_t local_[kNumCounters] = {};
  // The block being run.
  uint3 block_idx_{};
  int n_ = 0, live_ = 0;
  int arrived_ = 0, arrived_true_ = 0;  // at the current __syncthreads
  unsigned exists_[kMaxWarps] = {};     // lanes that exist (the last warp may be partial)
  unsigned done_[kMaxWarps] = {};       // lanes that have exited
  unsigned at_warp_op_[kMaxWarps] = {};  // lanes waiting at a warp-synchronous call
  bool failed_ = false;
  std::string error_;
};

void fiber_entry(Fiber* f) { tl_runner->run_fiber(*f); }

// Persistent worker threads (so that fiber stacks are mapped once per worker).
class Pool {
 public:
  explicit Pool(int n) {
    for (int i = 0; i < n; ++i) threads_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()); }

  void run(Launch& launch) {
    std::unique_lock<std::mutex> lock(mutex_);
    job_ = &launch;
    ++generation_;
    busy_ = size();
    wake_.notify_all();
    done_.wait(lock, [this] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void work() {
    auto runner = std::make_unique<BlockRunner>();
    uint64_t seen = 0;
    for (;;) {
      Launch* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      runner->run_launch(*job);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--busy_ == 0) done_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  Launch* job_ = nullptr;
  uint64_t generation_ = 0;
  int busy_ = 0;
  bool stop_ = false;
};

// Ends the worker threads (joined, or in a forked child abandoned: they are the parent's).
void drop_pool(Global& g) {
  if (g.pool && g.pool_pid != getpid()) static_cast<void>(g.pool.release());
  g.pool.reset();
}

BlockRunner& runner_for(const char* what) {
  if (tl_runner == nullptr || !tl_runner->in_kernel()) {
    throw std::logic_error(std::string("cuda emulator: ") + what + " called outside a kernel");
  }
  return *tl_runner;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Entry points used by cuda_emulation.h.

unsigned warp_op(WarpOpKind kind, unsigned mask, const void* in, unsigned size, int param,
                 int width, int pred, void* out, const std::source_location& loc) {
  return runner_for(op_name(kind)).warp_op(kind, mask, in, size, param, width, pred, out, loc);
}

int block_barrier(BarrierKind kind, int pred, const std::source_location& loc) {
  return runner_for("__syncthreads").block_barrier(kind, pred, loc);
}

unsigned active_mask() { return runner_for("__activemask").active_mask(); }

void yield_fiber(const std::source_location& loc) { runner_for("__nanosleep").yield(loc); }

void kernel_assert_fail(const char* cond, const char* file, int line, const char* func) {
  const std::string what = "device-side assertion `" + std::string(cond) + "` failed at " +
                           basename(file) + ":" + std::to_string(line) + " in " + func;
  if (tl_runner == nullptr || !tl_runner->in_kernel()) {
    throw std::runtime_error("cuda emulator: " + what);
  }
  BlockRunner& r = *tl_runner;
  Fiber& f = *r.running();
  r.fail(f, what + ", thread " + format_extent(dim3(f.ts.thread_idx)));
}

void launch(const LaunchRequest& r) {
  if (tl_runner != nullptr) {
    throw std::runtime_error("cuda emulator: kernel launches from device code are not supported");
  }
  const auto bad = [&](const std::string& why) {
    return std::runtime_error("cuda emulator: invalid configuration argument: " + why + " [" +
                              describe_launch(r) + "]");
  };
  const Extent& g = r.grid;
  const Extent& b = r.block;
  if (g.x < 1 || g.y < 1 || g.z < 1 || g.x > INT32_MAX || g.y > 65535 || g.z > 65535) {
    throw bad("grid (" + std::to_string(g.x) + ", " + std::to_string(g.y) + ", " +
              std::to_string(g.z) + ")");
  }
  if (b.x < 1 || b.y < 1 || b.z < 1 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
      b.x * b.y * b.z > kMaxThreads) {
    throw bad("block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
              std::to_string(b.z) + ")");
  }
  if (r.shared_bytes != 0) throw bad("dynamic shared memory is not supported");

  Global& glob = global();
  std::lock_guard<std::mutex> lock(glob.launch_mutex);
  const uint64_t seed = mix(glob.seed.load() ^ mix(glob.launch_index.fetch_add(1) + 0x5eed));
  Launch job(r, seed, glob.allow_exited_lanes.load());
  if (glob.pool_pid != getpid()) drop_pool(glob);
  const int workers = glob.workers.load();
  if (!glob.pool || glob.pool->size() != workers) {
    glob.pool.reset();
    glob.pool = std::make_unique<Pool>(workers);
    glob.pool_pid = getpid();
  }
  glob.pool->run(job);
  glob.counters[kLaunches].fetch_add(1, std::memory_order_relaxed);
  if (job.failed.load()) throw std::runtime_error(job.error);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------
// Configuration and counters.

Config config() {
  detail::Global& g = detail::global();
  return {g.seed.load(), g.workers.load(), g.allow_exited_lanes.load()};
}

// Both restart the worker threads: their __shared__ storage (thread_local) then starts out
// zeroed instead of holding earlier blocks' data, so that a run from here is reproducible.
void set_seed(uint64_t seed) {
  detail::Global& g = detail::global();
  std::lock_guard<std::mutex> lock(g.launch_mutex);
  g.seed.store(seed);
  g.launch_index.store(0);
  detail::drop_pool(g);
}

void set_workers(int workers) {
  if (workers < 1 || workers > 256) {
    throw std::invalid_argument("cuda emulator: workers must be in [1, 256], got " +
                                std::to_string(workers));
  }
  detail::Global& g = detail::global();
  std::lock_guard<std::mutex> lock(g.launch_mutex);
  g.workers.store(workers);
  detail::drop_pool(g);
}

void set_allow_exited_lanes(bool allow) { detail::global().allow_exited_lanes.store(allow); }

std::vector<std::pair<const char*, uint64_t>> counters() {
  detail::Global& g = detail::global();
  std::vector<std::pair<const char*, uint64_t>> out;
  for (int i = 0; i < detail::kNumCounters; ++i) {
    out.emplace_back(detail::kCounterNames[i], g.counters[i].load());
  }
  return out;
}

void reset_counters() {
  for (auto& c : detail::global().counters) c.store(0);
}

}  // namespace cuda_emu
