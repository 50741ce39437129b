// The split-KV policy of the CUDA forward kernels (common/split_policy.h): the chosen
// kernel's tile rows and CTAs per SM (forward_plan.h), one wave of splits of at least 1024
// keys. Plain C++, for the planner in module.cc. Why one wave: docs/design/split_kv.md.
#pragma once

#include <cstdint>

#include "common/enum_names.h"
#include "common/split_policy.h"
#include "cuda/forward_plan.h"

namespace jax_fmha::cuda {

inline constexpr EnumName<ForwardKernel> kForwardKernelNames[] = {
    {"decode", ForwardKernel::kDecode},
    {"portable", ForwardKernel::kPortable},
    {"hopper", ForwardKernel::kHopper}};

// The policy of `kernel` on a device of `sms` multiprocessors.
inline SplitPolicy split_policy(ForwardKernel kernel, int64_t sms) {
  const KernelShape shape = kernel_shape(kernel);
  return SplitPolicy{shape.block_m, shape.ctas_per_sm * sms, /*waves=*/1, /*min_keys=*/1024};
}

}  // namespace jax_fmha::cuda
