// Registers multi-scale deformable attention as the PyTorch operators
// deformable_detr::ms_deform_attn_forward / ms_deform_attn_backward. Backend kernels register
// themselves in cpu/ and cuda/; autograd, autocast and the fake (meta) kernel are registered
// from Python (deformable_detr/layers/ms_deform_attn_op.py).
//
// Only pybind11 and the op registry: <torch/extension.h> (all of libtorch's C++ API) would
// make this file the slowest of the build.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "cpu/huge_page_cache.h"

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
  namespace dd = deformable_detr;
  m.def("build_info", &build_info, "What this extension was compiled with.");
  // deformable_detr.utils.cpu_memory wraps these (see csrc/cpu/huge_page_cache.h).
  m.def("enable_huge_page_cache", &dd::enable_huge_page_cache, pybind11::arg("max_cached_bytes"));
  m.def("disable_huge_page_cache", &dd::disable_huge_page_cache);
  m.def("huge_page_cache_enabled", &dd::huge_page_cache_enabled);
  m.def("empty_huge_page_cache", &dd::empty_huge_page_cache);
  m.def("huge_page_cache_stats", [] {
    const dd::HugePageCacheStats s = dd::huge_page_cache_stats();
    pybind11::dict d;
    d["reserved_bytes"] = s.reserved_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  });
}
