// Emulator stand-in for c10/cuda/CUDAGuard.h: there is one (pretend) device and nothing to
// switch. The emulated kernels run on CPU tensors, so the guards accept any device.
#pragma once

#include <c10/core/Device.h>

#include <optional>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard() = delete;
  explicit CUDAGuard(DeviceIndex device_index) : original_(device_index) {}
  explicit CUDAGuard(Device device) : original_(device.index()) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
  void set_device(Device) {}
  void reset_device(Device) {}
  void set_index(DeviceIndex) {}
  Device original_device() const { return Device(DeviceType::CUDA, original_ < 0 ? 0 : original_); }
  Device current_device() const { return original_device(); }

 private:
  DeviceIndex original_;
};

struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<Device>) {}
  explicit OptionalCUDAGuard(std::optional<DeviceIndex>) {}
  void set_device(Device) {}
  void reset_device(Device) {}
  void set_index(DeviceIndex) {}
  void reset() {}
};

}  // namespace c10::cuda
