// The check after every kernel launch: a launch error (bad configuration, no kernel image
// for the device) becomes the handler's internal error instead of a later, unrelated one.
#pragma once

#include <cuda_runtime.h>

#include <string_view>

#include "common/errors.h"

namespace jax_fmha::cuda {

// "jax_fmha <op>: <what>: <CUDA's message>" if the last launch failed, else success.
inline xla::ffi::Error check_launch(std::string_view op, std::string_view what) {
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return internal_error(op, what, cudaGetErrorString(err));
  return xla::ffi::Error::Success();
}

}  // namespace jax_fmha::cuda
