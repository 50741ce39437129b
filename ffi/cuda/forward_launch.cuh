// Definition of launch_forward (forward_launch.h), for the generated instantiation files:
// include the kernel's header (which specializes ForwardKernelOf) before this one.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "common/errors.h"
#include "cuda/common/launch_check.h"
#include "cuda/forward_launch.h"

namespace jax_fmha::cuda {

// Whether a kernel launches itself (ForwardKernelOf<...>::launch: kernels that take more than
// the arrays, such as tensor maps); the others take (problem, q, k, v, out, lse).
template <class Kernel, class = void>
struct LaunchesItself : std::false_type {};
template <class Kernel>
struct LaunchesItself<Kernel, std::void_t<decltype(Kernel::kLaunchesItself)>> : std::true_type {};

template <ForwardKernel kKernel, typename Element, typename Kv, int kHeadDim, typename OutT>
xla::ffi::Error launch_forward(cudaStream_t stream, const AttentionProblem& p, const void* q,
                               const void* k, const void* v, OutT* out, float* lse) {
  using Kernel = ForwardKernelOf<kKernel>;
  using Traits = typename Kernel::template TraitsOf<Element, kHeadDim, Kv>;
  static_assert(Traits::kBlockM == kernel_shape(kKernel).block_m, "tile rows of the plan");
  constexpr const char* kOp = "attention (CUDA)";
  const int64_t row_tiles = (p.q.max_len * p.group() + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t z = p.batch * p.num_splits;
  if (row_tiles == 0 || z == 0) return xla::ffi::Error::Success();
  // (The kernels count a sequence's packed rows in 32 bits.)
  if (p.q.max_len * p.group() > 0x7fffffff || p.num_kv_heads > 65535 || z > 65535)
    return invalid_argument(kOp,
                            "grid too large (max_seqlen_q * group < 2^31, KV heads <= 65535, "
                            "batch * num_splits <= 65535)");
  const dim3 grid(unsigned(row_tiles), unsigned(p.num_kv_heads), unsigned(z));
  if constexpr (LaunchesItself<Kernel>::value) {  // (which also grants its shared memory)
    if (xla::ffi::Error err = Kernel::template launch<Traits>(grid, stream, p, q, k, v, out, lse);
        !err.success())
      return err;
  } else {
    constexpr auto kernel = Kernel::template kernel<Traits, OutT>;
    if (cudaError_t err = allow_shared_memory<kernel, Traits::kSmemBytes>(); err != cudaSuccess)
      return internal_error(kOp, "raising the shared-memory limit", cudaGetErrorString(err));
    kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(
        p, static_cast<const Element*>(q), static_cast<const Kv*>(k), static_cast<const Kv*>(v),
        out, lse);
  }
  return check_launch(kOp, "launching the attention kernel");
}

}  // namespace jax_fmha::cuda
