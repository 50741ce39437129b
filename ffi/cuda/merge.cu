// CUDA handler of jax_fmha_merge_states (common/merge_ffi.h): one warp per row; the lanes
// share the row's LSE statistics and split the head dim, so the partial outputs are read
// coalesced, each once.
#include <cuda_runtime.h>

#include <string>

#include "common/merge_ffi.h"
#include "cuda/dtypes.cuh"

namespace jax_fmha::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename OutT>
__global__ void merge_kernel(const __grid_constant__ MergeProblem m,
                             const float* __restrict__ partial_out,
                             const float* __restrict__ partial_lse, OutT* __restrict__ out,
                             float* __restrict__ lse) {
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= m.rows) return;
  const MergeStats stats = merge_stats(partial_lse + row, m.rows, m.num_splits);
  for (int64_t d = lane; d < m.head_dim; d += 32) {
    float acc = 0.f;
    for (int64_t s = 0; s < m.num_splits; ++s) {
      const float w = stats.weight(partial_lse[s * m.rows + row]);
      if (w != 0.f) acc += w * partial_out[(s * m.rows + row) * m.head_dim + d];
    }
    out[row * m.head_dim + d] = from_float<OutT>(stats.lse != stats.lse ? stats.lse : acc);
  }
  if (lane == 0) lse[row] = stats.lse;
}

template <typename OutT>
ffi::Error launch(cudaStream_t stream, const MergeProblem& m, const float* po, const float* pl,
                  void* out, float* lse) {
  const int64_t blocks = (m.rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return ffi::Error::Success();
  if (blocks > 0x7fffffff) return shape_error("merge: too many rows");
  merge_kernel<OutT><<<unsigned(blocks), kWarpsPerBlock * 32, 0, stream>>>(
      m, po, pl, static_cast<OutT*>(out), lse);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_fmha merge (CUDA): launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error merge_cuda(cudaStream_t stream, ffi::Buffer<ffi::F32> partial_out,
                      ffi::Buffer<ffi::F32> partial_lse, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  MergeProblem m;
  if (auto err = decode_merge(partial_out, partial_lse, *out, *lse, m); !err.success()) return err;
  const float* po = partial_out.typed_data();
  const float* pl = partial_lse.typed_data();
  void* o = out->untyped_data();
  float* l = lse->typed_data();
  switch (out->element_type()) {
    case ffi::DataType::F32: return launch<float>(stream, m, po, pl, o, l);
    case ffi::DataType::BF16: return launch<__nv_bfloat16>(stream, m, po, pl, o, l);
    case ffi::DataType::F16: return launch<__half>(stream, m, po, pl, o, l);
    default: return shape_error("merge: out must be float32, bfloat16 or float16");
  }
}

}  // namespace
}  // namespace jax_fmha::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFmhaMergeCuda, jax_fmha::cuda::merge_cuda,
                              jax_fmha::bind_merge(
                                  xla::ffi::Ffi::Bind()
                                      .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
                              {xla::ffi::Traits::kCmdBufferCompatible});
