// The launch of one attention forward kernel (forward_plan.h) for one query dtype, K/V storage
// type, head dim and output type. Defined in forward_launch.cuh and instantiated by one file per
// (kernel, head dim) that CMake generates from forward_instance.cu.in, so that the kernels compile
// in parallel; attention.cu sees only this declaration.
#pragma once

#include <cuda_runtime.h>

#include "common/attention_problem.h"
#include "cuda/forward_plan.h"
#include "xla/ffi/api/ffi.h"

namespace jax_fmha::cuda {

// One launch over the grid (row tiles of the longest sequence, KV heads, batch x splits);
// q holds Element, k and v Kv (Element, or an FP8 format: p.k_scale and p.v_scale are then
// set), out holds OutT (float32 for split-KV partial outputs). FP8 queries (kHopper only):
// Element is float8_e4m3fn, k holds it too, and Kv is v's 16-bit type.
template <ForwardKernel kKernel, typename Element, typename Kv, int kHeadDim, typename OutT>
xla::ffi::Error launch_forward(cudaStream_t stream, const AttentionProblem& p, const void* q,
                               const void* k, const void* v, OutT* out, float* lse);

}  // namespace jax_fmha::cuda
