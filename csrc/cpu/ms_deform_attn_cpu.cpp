// CPU entry points of multi-scale deformable attention: they prepare the inputs and buffers
// and schedule the kernels of ms_deform_attn_cpu_kernels.h over the threads.
//
// Forward: one image at a time, parallel over (m, q) rows, in blocks handed out on demand.
// Where values are read many times (the encoder) it goes one head at a time, first copying
// that head's value into a contiguous [S, D] buffer in the accumulation dtype, so that a run
// of queries of the head reads only that slice, which stays in the core's cache. Each
// (n, q, m) accumulates its D channels in a local buffer.
//
// Backward: parallel over (n, m) pairs. In the encoder each works on contiguous copies of
// its head of value and of its gradient; with few queries (the decoder) it reads the value
// and sums into the zero-filled gradient in place. Every write of a task goes to memory only
// that task owns: grad_value[n, :, m, :] and the (n, :, m) slices of the location and weight
// gradients. So the backward needs no atomics and sums in a fixed order: results are
// bit-identical from run to run and for any number of threads.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/isa_dispatch.h"
#include "cpu/ms_deform_attn_cpu_kernels.h"
#include "cpu/work_scheduler.h"
#include "ms_deform_attn.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace deformable_detr {
namespace {

using cpu::Pass;

template <typename scalar_t, typename acc_t>
using RangeFn = void (*)(int64_t, int64_t, const cpu::KernelArgs<scalar_t, acc_t>&);

// The kernel of `pass` for D channels, for the best instruction set of this CPU.
template <Pass pass, typename scalar_t, typename acc_t>
RangeFn<scalar_t, acc_t> select_kernel(int64_t D) {
  using Args = const cpu::KernelArgs<scalar_t, acc_t>&;
  switch (D) {
    case 32:
      return cpu::select_isa<cpu::RunRange<pass, 32>, int64_t, int64_t, Args>();
    case 64:
      return cpu::select_isa<cpu::RunRange<pass, 64>, int64_t, int64_t, Args>();
    default:
      return cpu::select_isa<cpu::RunRange<pass, 0>, int64_t, int64_t, Args>();
  }
}

// Calls body(k, fn) for the value's dtype: k the kernel arguments of `a` (outputs and scratch
// left for the body to set), of type cpu::KernelArgs<scalar_type, acc_type>, where acc_type
// is the accumulation dtype (float32 for half inputs); fn the kernel of `pass` for D channels.
template <Pass pass, typename Body>
void with_kernel(const MSDeformAttnArgs& a, const Body& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.value.scalar_type(),
      pass == Pass::kForward ? "ms_deform_attn_forward_cpu" : "ms_deform_attn_backward_cpu",
      [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const cpu::SampleLevels<acc_t> levels(a);
        auto k = cpu::kernel_args<scalar_t, acc_t>(a, levels);
        body(k, select_kernel<pass, scalar_t, acc_t>(a.sizes.D));
      });
}

// Uninitialised scratch memory for `count` elements of T from PyTorch's CPU allocator (so
// that it shows in its memory accounting); freed with the returned pointer.
template <typename T>
at::DataPtr scratch_memory(int64_t count) {
  return c10::GetCPUAllocator()->allocate(static_cast<size_t>(count) * sizeof(T));
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_loc,
                                      const at::Tensor& attn_weight) {
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  auto out = forward_output(a);
  if (a.empty()) return out;
  cpu::advise_huge_pages(out);
  const Sizes& z = a.sizes;
  with_kernel<Pass::kForward>(a, [&](auto& k, const auto fn) {
    using scalar_t = typename std::decay_t<decltype(k)>::scalar_type;
    using acc_t = typename std::decay_t<decltype(k)>::acc_type;
    k.out = out.data_ptr<scalar_t>();
    // One head at a time: a run of queries of that head then reads a buffer the size
    // of a head's value (the encoder's: 2.8 MiB), just written by the copy and reused
    // for every head and image. A copy of all heads (22.7 MiB) would have left the
    // cache before its last head is read, and costs page faults where the allocator
    // hands out fresh pages.
    const bool copy = cpu::copies_heads(a);
    const at::DataPtr head_memory = scratch_memory<acc_t>(copy ? z.S * z.D : 0);
    acc_t* const head_value = static_cast<acc_t*>(head_memory.get());
    // Rows are cheap to split: a few thousand samples per block.
    const int64_t block = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, z.L * z.P));
    for (k.n = 0; k.n < z.N; ++k.n) {
      const scalar_t* value_n = k.value + k.n * z.S * z.M * z.D;
      if (!copy) {
        k.head_value = cpu::same_type_or_null<acc_t>(value_n);
        k.head_stride = z.D;
        k.row_stride = z.M * z.D;
        cpu::parallel_blocks(z.M * z.Lq, block, [&](int64_t lo, int64_t hi) { fn(lo, hi, k); });
        continue;
      }
      // Every head finds its values at head_value.
      k.head_value = head_value;
      k.head_stride = 0;
      k.row_stride = z.D;
      for (int64_t m = 0; m < z.M; ++m) {
        at::parallel_for(0, z.S, 2048, [&](int64_t lo, int64_t hi) {
          cpu::copy_head(value_n, m, lo, hi, z, head_value);
        });
        cpu::parallel_blocks(z.Lq, block, [&](int64_t lo, int64_t hi) {
          fn(m * z.Lq + lo, m * z.Lq + hi, k);
        });
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight, const at::Tensor& grad_output) {
  const auto a =
      prepare_inputs(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  auto b = backward_buffers(a, grad_output);
  if (!a.empty()) {
    for (const auto* t : {&b.grad_value, &b.grad_loc, &b.grad_attn}) cpu::advise_huge_pages(*t);
    const bool copy = cpu::copies_heads(a);
    // In place, the kernels sum into grad_value: zeroed here, after the advice, so that
    // zeroing it is what first touches its (huge) pages.
    if (!copy) b.grad_value.zero_();
    const Sizes& z = a.sizes;
    with_kernel<Pass::kBackward>(a, [&](auto& k, const auto fn) {
      using scalar_t = typename std::decay_t<decltype(k)>::scalar_type;
      using acc_t = typename std::decay_t<decltype(k)>::acc_type;
      k.grad_out = b.grad_output.data_ptr<scalar_t>();
      k.grad_value = b.grad_value.data_ptr<acc_t>();
      k.grad_loc = b.grad_loc.data_ptr<acc_t>();
      k.grad_attn = b.grad_attn.data_ptr<acc_t>();
      // Uninitialised: the pages of threads that get no task are never touched.
      const at::DataPtr scratch =
          scratch_memory<acc_t>(copy ? at::get_num_threads() * 2 * z.S * z.D : 0);
      k.scratch = static_cast<acc_t*>(scratch.get());
      // One (n, m) pair per block: its results do not depend on which thread runs it.
      cpu::parallel_blocks(z.N * z.M, 1, [&](int64_t lo, int64_t hi) { fn(lo, hi, k); });
    });
  }
  return backward_result(b, value, sampling_loc, attn_weight);
}

}  // namespace deformable_detr

TORCH_LIBRARY_IMPL(deformable_detr, CPU, m) {
  m.impl("ms_deform_attn_forward", &deformable_detr::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &deformable_detr::ms_deform_attn_backward_cpu);
}
