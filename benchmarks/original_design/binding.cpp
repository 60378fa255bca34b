// Python binding of the original-design baseline (ms_deform_attn_original.cu): checks the
// inputs, allocates zero-filled outputs as the original did, and launches on the current
// stream. The only file of the baseline that includes the torch headers (c10's CUDA headers,
// not ATen/cuda/CUDAContext.h, which needs the cuSPARSE/cuBLAS headers of a full toolkit).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <limits>
#include <vector>

#include "ms_deform_attn_original.h"

namespace {

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (the original kernels need it)");
}

original_design::Sizes sizes_of(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_loc,
                                 const at::Tensor& attn_weight) {
  check_tensor(value, "value");
  check_tensor(spatial_shapes, "spatial_shapes");
  check_tensor(level_start_index, "level_start_index");
  check_tensor(sampling_loc, "sampling_locations");
  check_tensor(attn_weight, "attention_weights");
  TORCH_CHECK(value.dim() == 4 && sampling_loc.dim() == 6 && attn_weight.dim() == 5,
              "expected value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] and "
              "attention_weights [N, Lq, M, L, P]");
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "the original design has float32 and float64 kernels only, got ",
              value.scalar_type());
  TORCH_CHECK(sampling_loc.scalar_type() == value.scalar_type() &&
                  attn_weight.scalar_type() == value.scalar_type(),
              "sampling_locations and attention_weights must have the value's dtype");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  const int64_t D = value.size(3);
  TORCH_CHECK(D >= 1 && D <= 1024, "the original backward runs D threads per block: D must "
              "be in [1, 1024], got ", D);
  // 32-bit index arithmetic, as in the original.
  const int64_t limit = std::numeric_limits<int>::max();
  TORCH_CHECK(value.numel() <= limit && sampling_loc.numel() <= limit &&
                  sampling_loc.size(0) * sampling_loc.size(1) * value.size(2) * D <= limit,
              "problem too large for the original design's 32-bit indexing");
  original_design::Sizes z;
  z.N = static_cast<int>(value.size(0));
  z.S = static_cast<int>(value.size(1));
  z.M = static_cast<int>(value.size(2));
  z.D = static_cast<int>(D);
  z.Lq = static_cast<int>(sampling_loc.size(1));
  z.L = static_cast<int>(sampling_loc.size(3));
  z.P = static_cast<int>(sampling_loc.size(4));
  TORCH_CHECK(sampling_loc.size(0) == z.N && sampling_loc.size(2) == z.M &&
                  attn_weight.sizes() == sampling_loc.sizes().slice(0, 5) &&
                  spatial_shapes.size(0) == z.L && level_start_index.size(0) == z.L,
              "inconsistent input shapes");
  return z;
}

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                   const at::Tensor& level_start_index, const at::Tensor& sampling_loc,
                   const at::Tensor& attn_weight) {
  const auto z = sizes_of(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const c10::cuda::CUDAGuard guard(value.device());
  auto out = at::zeros({z.N, z.Lq, z.M * z.D}, value.options());
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "original_design_forward", [&] {
    const cudaError_t err = original_design::forward<scalar_t>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
        attn_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), z,
        c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "original_design forward: ", cudaGetErrorString(err));
  });
  return out;
}

std::vector<at::Tensor> backward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                 const at::Tensor& level_start_index,
                                 const at::Tensor& sampling_loc, const at::Tensor& attn_weight,
                                 const at::Tensor& grad_output) {
  const auto z = sizes_of(value, spatial_shapes, level_start_index, sampling_loc, attn_weight);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto grad_out = grad_output.contiguous();
  TORCH_CHECK(grad_out.scalar_type() == value.scalar_type() && grad_out.dim() == 3 &&
                  grad_out.size(0) == z.N && grad_out.size(1) == z.Lq &&
                  grad_out.size(2) == z.M * z.D,
              "grad_output must be [N, Lq, M * D] in the value's dtype");
  auto grad_value = at::zeros_like(value);
  auto grad_loc = at::zeros_like(sampling_loc);
  auto grad_attn = at::zeros_like(attn_weight);
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "original_design_backward", [&] {
    const cudaError_t err = original_design::backward<scalar_t>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
        level_start_index.data_ptr<int64_t>(), sampling_loc.data_ptr<scalar_t>(),
        attn_weight.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
        grad_value.data_ptr<scalar_t>(), grad_loc.data_ptr<scalar_t>(),
        grad_attn.data_ptr<scalar_t>(), z, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "original_design backward: ", cudaGetErrorString(err));
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention in the original Deformable DETR CUDA design "
            "(benchmark baseline)";
  m.def("forward", &forward, "value, spatial_shapes, level_start_index, sampling_locations, "
        "attention_weights -> output [N, Lq, M * D]");
  m.def("backward", &backward, "... , grad_output -> [grad_value, grad_locations, "
        "grad_weights]");
}
