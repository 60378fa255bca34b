// Registers multi-scale deformable attention as the PyTorch operators
// deformable_detr::ms_deform_attn_forward / ms_deform_attn_backward. Backend kernels register
// themselves in cpu/ and cuda/; autograd, autocast and the fake (meta) kernel are registered
// from Python (deformable_detr/layers/ms_deform_attn_op.py).
#include <torch/extension.h>
#include <torch/library.h>

#include "ms_deform_attn.h"

TORCH_LIBRARY(deformable_detr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef DEFORMABLE_DETR_CUDA_ARCHS
  info["cuda_archs"] = std::string(DEFORMABLE_DETR_CUDA_ARCHS);
#else
  info["cuda_archs"] = std::string("");
#endif
  info["torch_version"] = std::string(DEFORMABLE_DETR_TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "What this extension was compiled with.");
}
