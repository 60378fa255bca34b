// Input preparation shared by the CPU and CUDA entry points (see ms_deform_attn.h). Contains
// no operator registration, so that the CUDA emulator used in the tests can link it beside
// csrc/cuda/*.cu compiled for the CPU.
#include "ms_deform_attn.h"

#include <cstdint>
#include <limits>
#include <string>
#include <utility>

namespace deformable_detr {
namespace {

// A dtype as Python spells it ("torch.float32"), so that these messages read as those of the
// PyTorch path (deformable_detr/layers/ms_deform_attn_op.py).
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return "torch.float64";
    case at::kFloat:
      return "torch.float32";
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace

// The compiled op's only input checks: the Python wrapper leaves ranks, sizes, dtypes and
// devices to these, and adds just the level contents (see check_inputs there). The messages
// are those of the PyTorch path, which cannot rely on the extension and checks for itself.
MSDeformAttnArgs prepare_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index,
                                const at::Tensor& sampling_loc, const at::Tensor& attn_weight) {
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK_VALUE(sampling_loc.dim() == 6 && sampling_loc.size(5) == 2,
                    "sampling_locations must be [N, Lq, M, L, P, 2], got ",
                    sampling_loc.sizes());
  TORCH_CHECK_VALUE(attn_weight.dim() == 5, "attention_weights must be [N, Lq, M, L, P], got ",
                    attn_weight.sizes());
  TORCH_CHECK_VALUE(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
                    "spatial_shapes must be [L, 2] (H, W), got ", spatial_shapes.sizes());
  TORCH_CHECK_VALUE(level_start_index.dim() == 1, "level_start_index must be [L], got ",
                    level_start_index.sizes());
  MSDeformAttnArgs a;
  Sizes& z = a.sizes;
  z.N = value.size(0);
  z.S = value.size(1);
  z.M = value.size(2);
  z.D = value.size(3);
  z.Lq = sampling_loc.size(1);
  z.L = sampling_loc.size(3);
  z.P = sampling_loc.size(4);
  TORCH_CHECK_VALUE(sampling_loc.size(0) == z.N, "batch size: value has N=", z.N,
                    ", sampling_locations ", sampling_loc.sizes());
  TORCH_CHECK_VALUE(sampling_loc.size(2) == z.M, "heads: value has M=", z.M,
                    ", sampling_locations has M=", sampling_loc.size(2));
  const auto loc_sizes = sampling_loc.sizes();
  TORCH_CHECK_VALUE(attn_weight.sizes() == loc_sizes.slice(0, 5), "attention_weights ",
                    attn_weight.sizes(), " must be sampling_locations' [N, Lq, M, L, P] = ",
                    loc_sizes.slice(0, 5));
  TORCH_CHECK_VALUE(spatial_shapes.size(0) == z.L && level_start_index.size(0) == z.L,
                    "levels: sampling_locations has L=", z.L, ", spatial_shapes ",
                    spatial_shapes.sizes(), ", level_start_index ", level_start_index.sizes());
  for (const auto& [t, name] :
       {std::pair<const at::Tensor*, const char*>{&spatial_shapes, "spatial_shapes"},
        {&level_start_index, "level_start_index"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be int64, got ",
                     dtype_name(t->scalar_type()));
  }
  const auto dtype = value.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "value must be floating point, got ",
                   dtype_name(dtype));
  const auto device = value.device();
  TORCH_CHECK_VALUE(spatial_shapes.device() == device && level_start_index.device() == device &&
                        sampling_loc.device() == device && attn_weight.device() == device,
                    "all inputs must be on one device, got value on ", device,
                    ", spatial_shapes on ", spatial_shapes.device(), ", level_start_index on ",
                    level_start_index.device(), ", sampling_locations on ",
                    sampling_loc.device(), ", attention_weights on ", attn_weight.device());
  const bool reduced = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto acc = reduced ? at::kFloat : dtype;
  for (const auto& [t, name] :
       {std::pair<const at::Tensor*, const char*>{&attn_weight, "attention_weights"},
        {&sampling_loc, "sampling_locations"}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == dtype || (reduced && t->scalar_type() == at::kFloat),
                     name, " dtype ", dtype_name(t->scalar_type()), " must equal the value dtype ",
                     dtype_name(dtype), " (or be float32 when the value is float16/bfloat16)");
  }
  // Positions are 32-bit in the kernels' inner loops.
  TORCH_CHECK_VALUE(z.S <= std::numeric_limits<int32_t>::max(),
                    "at most 2^31 - 1 value positions per image are supported, got S = ", z.S);
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

