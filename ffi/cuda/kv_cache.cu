// CUDA handler of jax_fmha_update_kv_cache (common/kv_cache_ffi.h): one warp per new token
// copies its K and V rows into the cache slot KvCacheUpdate::target_row picks (dropped
// writes are skipped there). The cache results alias the cache operands: in place.
#include <cuda_runtime.h>

#include "common/errors.h"
#include "common/kv_cache_ffi.h"
#include "cuda/common/launch_check.h"

namespace jax_fmha::cuda {
namespace {

constexpr const char* kOp = "update_kv_cache (CUDA)";
constexpr int kTokensPerBlock = 8;  // one warp each

// Grid: (token blocks of the longest new sequence, batch). Rows are copied in 16-byte
// words (every supported row, Hkv * D elements with D a multiple of 8, is a multiple).
__global__ void update_kv_cache_kernel(const __grid_constant__ KvCacheUpdate u,
                                       const uint4* __restrict__ k_new,
                                       const uint4* __restrict__ v_new, uint4* k_cache,
                                       uint4* v_cache, int64_t row_words) {
  const int64_t b = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * kTokensPerBlock + threadIdx.x / 32;
  if (!u.new_tokens.valid(b) || t >= u.new_tokens.len(b)) return;
  const int64_t dst = u.target_row(b, t);
  if (dst < 0) return;  // outside the sequence's capacity or pages: dropped
  const int64_t src = u.new_tokens.begin(b) + t;
  for (int64_t w = threadIdx.x % 32; w < row_words; w += 32) {
    k_cache[dst * row_words + w] = k_new[src * row_words + w];
    v_cache[dst * row_words + w] = v_new[src * row_words + w];
  }
}

ffi::Error run_update(cudaStream_t stream, const KvCacheUpdate& u, const void* k_new,
                      const void* v_new, void* k_cache, void* v_cache) {
  if (u.k_scale != nullptr) return fp8_kv_unsupported(kOp);
  const int64_t row_bytes = u.row_elements * u.elem_bytes;
  if (row_bytes % 16 != 0)
    return invalid_argument(kOp, "a token's row must be a multiple of 16 bytes");
  const int64_t token_blocks = (u.new_tokens.max_len + kTokensPerBlock - 1) / kTokensPerBlock;
  if (token_blocks == 0 || u.batch == 0) return ffi::Error::Success();
  if (token_blocks > 0x7fffffff || u.batch > 65535)
    return invalid_argument(kOp, "too many new tokens or sequences");
  const dim3 grid(unsigned(token_blocks), unsigned(u.batch));
  update_kv_cache_kernel<<<grid, kTokensPerBlock * 32, 0, stream>>>(
      u, static_cast<const uint4*>(k_new), static_cast<const uint4*>(v_new),
      static_cast<uint4*>(k_cache), static_cast<uint4*>(v_cache), row_bytes / 16);
  return check_launch(kOp, "launching the cache update");
}

}  // namespace
}  // namespace jax_fmha::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaUpdateKvCacheCuda,
    (jax_fmha::kv_cache_update_handler<cudaStream_t, jax_fmha::cuda::run_update>),
    jax_fmha::bind_kv_cache_update(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
