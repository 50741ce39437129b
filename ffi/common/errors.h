// The errors every handler returns, one spelling for all: "jax_fmha <op>: <what>", where op
// names the custom call (and the backend, where it matters: "attention (CUDA)").
#pragma once

#include <string>
#include <string_view>

#include "xla/ffi/api/ffi.h"

namespace jax_fmha {

// A custom call whose operands or attributes the kernels cannot take. Python validates
// every argument at trace time; this guards calls emitted by something else.
inline xla::ffi::Error invalid_argument(std::string_view op, std::string_view what) {
  return xla::ffi::Error::InvalidArgument("jax_fmha " + std::string(op) + ": " + std::string(what));
}

// A failure of the runtime under the kernel (a launch, an attribute), with its own message.
inline xla::ffi::Error internal_error(std::string_view op, std::string_view what,
                                      std::string_view cause) {
  return xla::ffi::Error::Internal("jax_fmha " + std::string(op) + ": " + std::string(what) + ": " +
                                   std::string(cause));
}

}  // namespace jax_fmha
