// Input preparation shared by the CPU and CUDA entry points (see ms_deform_attn.h). Contains
// no operator registration, so that the CUDA emulator used in the tests can link it beside
// csrc/cuda/*.cu compiled for the CPU.
#include "ms_deform_attn.h"

#include <cstdint>
#include <limits>

namespace deformable_detr {

// The kernels' preconditions: ranks, sizes that agree, dtypes and one device. They keep the
// kernels' indexing inside the tensors on a direct call of torch.ops.deformable_detr.*.
// Which input is wrong, in a message naming it, is the job of the one implementation of the
// input checks, deformable_detr.layers.check_inputs, which both Python paths run first (the
// PyTorch path has to work without this extension); so this is one check with one message.
MSDeformAttnArgs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index,
                                const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  const auto dtype = value.scalar_type();
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto device = value.device();
  bool ok = value.dim() == 4 && sampling_loc.dim() == 6 && sampling_loc.size(5) == 2 &&
            spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2 &&
            level_start_index.dim() == 1 && at::isFloatingType(dtype) &&
            spatial_shapes.scalar_type() == at::kLong &&
            level_start_index.scalar_type() == at::kLong;
  ok = ok && sampling_loc.size(0) == value.size(0) && sampling_loc.size(2) == value.size(2) &&
       attn_weight.sizes() == sampling_loc.sizes().slice(0, 5) &&
       spatial_shapes.size(0) == sampling_loc.size(3) &&
       level_start_index.size(0) == sampling_loc.size(3);
  for (const at::Tensor* t : {&spatial_shapes, &level_start_index, &sampling_loc, &attn_weight}) {
    ok = ok && t->device() == device;
  }
  for (const at::Tensor* t : {&sampling_loc, &attn_weight}) {
    ok = ok && (t->scalar_type() == dtype || (reduced && t->scalar_type() == at::kFloat));
  }
  TORCH_CHECK_VALUE(ok,
                    "ms_deform_attn: inputs of inconsistent ranks, sizes, dtypes or devices "
                    "(value ", value.sizes(), " ", dtype, " on ", device, ", spatial_shapes ",
                    spatial_shapes.sizes(), ", level_start_index ", level_start_index.sizes(),
                    ", sampling_locations ", sampling_loc.sizes(), " ",
                    sampling_loc.scalar_type(), ", attention_weights ", attn_weight.sizes(), " ",
                    attn_weight.scalar_type(),
                    "); deformable_detr.layers.check_inputs names the problem");
  MSDeformAttnArgs a;
  Sizes& z = a.sizes;
  z.N = value.size(0);
  z.S = value.size(1);
  z.M = value.size(2);
  z.D = value.size(3);
  z.Lq = sampling_loc.size(1);
  z.L = sampling_loc.size(3);
  z.P = sampling_loc.size(4);
  // Positions are 32-bit in the kernels' inner loops.
  TORCH_CHECK_VALUE(z.S <= std::numeric_limits<int32_t>::max(),
                    "at most 2^31 - 1 value positions per image are supported, got S = ", z.S);
  const auto acc = reduced ? at::kFloat : dtype;
  a.value = value.contiguous();
  a.spatial_shapes = spatial_shapes.contiguous();
  a.level_start_index = level_start_index.contiguous();
  a.sampling_loc = sampling_loc.to(acc).contiguous();
  a.attn_weight = attn_weight.to(acc).contiguous();
  return a;
}

bool MSDeformAttnArgs::empty() const {
  return sizes.N == 0 || sizes.Lq == 0 || sizes.S == 0 || sizes.M == 0 || sizes.D == 0 ||
         sizes.L == 0 || sizes.P == 0;
}

at::Tensor forward_output(const MSDeformAttnArgs& a) {
  const Sizes& z = a.sizes;
  // The kernels write every element; only a problem without work needs the zeros.
  return a.empty() ? at::zeros({z.N, z.Lq, z.M * z.D}, a.value.options())
                   : at::empty({z.N, z.Lq, z.M * z.D}, a.value.options());
}

BackwardBuffers backward_buffers(const MSDeformAttnArgs& a, const at::Tensor& grad_output) {
  const Sizes& z = a.sizes;
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({z.N, z.Lq, z.M * z.D}),
                    "grad_output must be [N, Lq, M*D] = [", z.N, ", ", z.Lq, ", ", z.M * z.D,
                    "], got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == a.value.device(), "grad_output must be on ",
                    a.value.device(), ", got ", grad_output.device());
  const auto acc = a.sampling_loc.scalar_type();
  BackwardBuffers b;
  b.grad_output = grad_output.to(a.value.scalar_type()).contiguous();
  // Without work the kernels write nothing: then every gradient is zero.
  const auto make = [&](at::IntArrayRef sizes, const at::TensorOptions& options) {
    return a.empty() ? at::zeros(sizes, options) : at::empty(sizes, options);
  };
  b.grad_value = make(a.value.sizes(), a.value.options().dtype(acc));
  b.grad_loc = make(a.sampling_loc.sizes(), a.sampling_loc.options());
  b.grad_attn = make(a.attn_weight.sizes(), a.attn_weight.options().dtype(acc));
  return b;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_result(
    const BackwardBuffers& b, const at::Tensor& value, const at::Tensor& sampling_loc,
    const at::Tensor& attn_weight) {
  return {b.grad_value.to(value.scalar_type()), b.grad_loc.to(sampling_loc.scalar_type()),
          b.grad_attn.to(attn_weight.scalar_type())};
}

}  // namespace deformable_detr

