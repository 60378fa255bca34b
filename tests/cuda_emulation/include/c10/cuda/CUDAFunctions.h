// Emulator stand-in for c10/cuda/CUDAFunctions.h: one pretend device.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

inline DeviceIndex device_count() noexcept { return 1; }
inline DeviceIndex current_device() { return 0; }
inline void set_device(DeviceIndex) {}
inline void device_synchronize() {}

}  // namespace c10::cuda
