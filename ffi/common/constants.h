// The constants Python shares with the kernels, defined here or next to their enum and read
// by Python from the extension (module.cc's constants()).
#pragma once

#include <cstdint>

#include "common/attention_problem.h"
#include "common/enum_names.h"

namespace jax_fmha {

// The "kv_layout" attribute of the attention and cache-update custom calls.
inline constexpr EnumName<KvLayout> kKvLayoutNames[] = {{"uniform", KvLayout::kUniform},
                                                        {"packed", KvLayout::kPacked},
                                                        {"cache", KvLayout::kCache},
                                                        {"paged", KvLayout::kPaged}};

// The widest head dim the kernels take (the CPU kernels size their stack rows by it).
inline constexpr int64_t kMaxHeadDim = 256;

// A platform as JAX's lowering names it, and as jax.ffi.register_ffi_target wants it.
struct PlatformName {
  const char* lowering;
  const char* ffi;
};
inline constexpr PlatformName kPlatformNames[] = {{"cpu", "cpu"}, {"cuda", "CUDA"}};

}  // namespace jax_fmha
