// Emulator stand-in for c10/cuda/CUDAStream.h (shadows the real header, which needs the
// CUDA runtime). Emulated launches are synchronous, so a stream is only a token.
#pragma once

#include <c10/core/Device.h>

#include "cuda_emulation.h"

namespace c10::cuda {

class CUDAStream {
 public:
  explicit CUDAStream(DeviceIndex device_index = 0) : device_index_(device_index) {}
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
  DeviceIndex device_index() const { return device_index_; }
  Device device() const { return Device(DeviceType::CUDA, device_index_); }
  bool query() const { return true; }
  void synchronize() const {}

 private:
  DeviceIndex device_index_;
};

inline CUDAStream getCurrentCUDAStream(DeviceIndex device_index = -1) {
  return CUDAStream(device_index < 0 ? 0 : device_index);
}
inline CUDAStream getDefaultCUDAStream(DeviceIndex device_index = -1) {
  return getCurrentCUDAStream(device_index);
}
inline CUDAStream getStreamFromPool(bool = false, DeviceIndex device_index = -1) {
  return getCurrentCUDAStream(device_index);
}

}  // namespace c10::cuda
