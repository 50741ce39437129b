// Around every kernel launch: the device's attributes a launcher sizes the grid by, the shared
// memory a kernel is granted, and the check after the launch: a launch error (bad
// configuration, no kernel image for the device) becomes the handler's internal error instead
// of a later, unrelated one.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <string_view>

#include "common/errors.h"

namespace jax_fmha::cuda {

// An attribute of the current device, queried once per device; 0 if the query fails.
template <cudaDeviceAttr kAttribute>
int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static int value[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) return 0;
  std::call_once(once[device], [&] {
    if (cudaDeviceGetAttribute(&value[device], kAttribute, device) != cudaSuccess)
      value[device] = 0;
  });
  return value[device];
}

// Shared memory above 48 KB must be granted per kernel and per device; once each. (The
// statics belong to one instantiation: each kernel has its own.)
template <auto kKernel, size_t kSmemBytes>
cudaError_t allow_shared_memory() {
  const auto set = [] {
    return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                int(kSmemBytes));
  };
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cudaError_t result[kMaxDevices];
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device >= kMaxDevices) return set();
  std::call_once(once[device], [&] { result[device] = set(); });
  return result[device];
}

// "jax_fmha <op>: <what>: <CUDA's message>" if the last launch failed, else success.
inline xla::ffi::Error check_launch(std::string_view op, std::string_view what) {
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return internal_error(op, what, cudaGetErrorString(err));
  return xla::ffi::Error::Success();
}

}  // namespace jax_fmha::cuda
