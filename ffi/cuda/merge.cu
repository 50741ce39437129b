// CUDA handler of jax_fmha_merge_states (common/merge_ffi.h): one warp per row. The lanes
// first share the row's splits to reduce its LSE statistics, then share its columns (V
// consecutive floats a lane: one 16-byte load per partial when the head dim allows) and run
// over the splits with the loads of several splits in flight: a decode step merges few rows
// (batch x heads) of many splits, so the merge must not be a chain of dependent loads.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/errors.h"
#include "common/merge_ffi.h"
#include "cuda/common/dtypes.cuh"
#include "cuda/common/launch_check.h"

namespace jax_fmha::cuda {
namespace {

constexpr const char* kOp = "merge (CUDA)";
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

template <int V>
struct alignas(4 * V) Floats {
  float v[V];
};

template <typename OutT, int V>
__global__ void merge_kernel(const __grid_constant__ MergeProblem m,
                             const float* __restrict__ partial_out,
                             const float* __restrict__ partial_lse, OutT* __restrict__ out,
                             float* __restrict__ lse) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= m.rows) return;
  const float* row_lse = partial_lse + row;  // split s at row_lse[s * m.rows]

  float max_lse = -INFINITY;
  bool nan = false;
  for (int64_t s = lane; s < m.num_splits; s += 32) {
    const float x = row_lse[s * m.rows];
    nan |= x != x;
    max_lse = fmaxf(max_lse, x);
  }
  for (int offset = 16; offset > 0; offset /= 2)
    max_lse = fmaxf(max_lse, __shfl_xor_sync(kFullMask, max_lse, offset));
  nan = __any_sync(kFullMask, nan);
  float sum = 0.f;
  if (!nan && max_lse != -INFINITY)
    for (int64_t s = lane; s < m.num_splits; s += 32) sum += expf(row_lse[s * m.rows] - max_lse);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  const MergeStats stats = MergeStats::make(max_lse, sum, nan);
  if (lane == 0) lse[row] = stats.lse;

  for (int64_t col0 = 0; col0 < m.head_dim; col0 += 32 * V) {
    const int64_t col = col0 + int64_t(lane) * V;
    const bool active = col < m.head_dim;
    float acc[V] = {};
    // Splits in chunks of 32: lane j holds the weight of split chunk + j, then broadcasts it.
    for (int64_t chunk = 0; chunk < m.num_splits; chunk += 32) {
      const int n = int(min(int64_t(32), m.num_splits - chunk));
      const float weight = lane < n ? stats.weight(row_lse[(chunk + lane) * m.rows]) : 0.f;
#pragma unroll 8
      for (int j = 0; j < n; ++j) {
        const float w = __shfl_sync(kFullMask, weight, j);
        if (!active) continue;
        const Floats<V> x = *reinterpret_cast<const Floats<V>*>(
            partial_out + ((chunk + j) * m.rows + row) * m.head_dim + col);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w != 0.f ? w * x.v[i] : 0.f;  // empty: no NaN
      }
    }
    if (!active) continue;
#pragma unroll
    for (int i = 0; i < V; ++i)
      out[row * m.head_dim + col + i] = from_float<OutT>(stats.lse != stats.lse ? NAN : acc[i]);
  }
}

template <typename OutT>
ffi::Error launch(cudaStream_t stream, const MergeProblem& m, const float* po, const float* pl,
                  void* out, float* lse) {
  const int64_t blocks = (m.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return ffi::Error::Success();
  if (blocks > 0x7fffffff) return invalid_argument(kOp, "too many rows");
  // Four columns a lane when rows stay 16-byte aligned (XLA's buffers are).
  const bool vectorized = m.head_dim % 4 == 0 && reinterpret_cast<uintptr_t>(po) % 16 == 0;
  const auto kernel = vectorized ? merge_kernel<OutT, 4> : merge_kernel<OutT, 1>;
  kernel<<<unsigned(blocks), kWarpsPerBlock * 32, 0, stream>>>(m, po, pl, static_cast<OutT*>(out),
                                                               lse);
  return check_launch(kOp, "launching the merge kernel");
}

ffi::Error run_merge(cudaStream_t stream, const MergeProblem& m, const float* partial_out,
                     const float* partial_lse, ffi::DataType out_dtype, void* out, float* lse) {
  switch (out_dtype) {
    case ffi::DataType::F32: return launch<float>(stream, m, partial_out, partial_lse, out, lse);
    case ffi::DataType::BF16:
      return launch<__nv_bfloat16>(stream, m, partial_out, partial_lse, out, lse);
    case ffi::DataType::F16: return launch<__half>(stream, m, partial_out, partial_lse, out, lse);
    default: return invalid_argument(kOp, "out must be float32, bfloat16 or float16");
  }
}

}  // namespace
}  // namespace jax_fmha::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaMergeCuda, (jax_fmha::merge_handler<cudaStream_t, jax_fmha::cuda::run_merge>),
    jax_fmha::bind_merge(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
