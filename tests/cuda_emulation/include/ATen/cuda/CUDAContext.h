// Emulator stand-in for ATen/cuda/CUDAContext.h: the current stream and the properties of a
// pretend device (what host code sizes launches with).
#pragma once

#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace at::cuda {

struct DeviceProp {
  char name[256] = "cuda emulator";
  int major = 9, minor = 0;
  int multiProcessorCount = 4;
  int warpSize = 32;
  int maxThreadsPerBlock = 1024;
  int maxThreadsPerMultiProcessor = 2048;
  int maxGridSize[3] = {2147483647, 65535, 65535};
  int maxThreadsDim[3] = {1024, 1024, 64};
  size_t sharedMemPerBlock = 48 * 1024;
  size_t sharedMemPerBlockOptin = 48 * 1024;
  int regsPerBlock = 65536;
  size_t totalGlobalMem = size_t(1) << 34;
};

inline DeviceProp* getCurrentDeviceProperties() {
  static DeviceProp prop;
  return &prop;
}
inline DeviceProp* getDeviceProperties(c10::DeviceIndex) { return getCurrentDeviceProperties(); }
inline int warp_size() { return 32; }

using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
using c10::cuda::getStreamFromPool;

}  // namespace at::cuda
