// CUDA handler of jax_fmha_update_kv_cache (common/kv_cache_ffi.h): one warp per new token
// copies its K and V rows into the cache slot KvCacheUpdate::target_row picks (dropped
// writes are skipped there), or quantizes them into an FP8 cache. The cache results alias
// the cache operands: in place.
#include <cuda_runtime.h>

#include "common/errors.h"
#include "common/kv_cache_ffi.h"
#include "cuda/common/dtypes.cuh"
#include "cuda/common/fp8.cuh"
#include "cuda/common/launch_check.h"

namespace jax_fmha::cuda {
namespace {

constexpr const char* kOp = "update_kv_cache (CUDA)";
constexpr int kTokensPerBlock = 8;  // one warp each

// The new token of this warp (grid: token blocks of the longest new sequence, batch): its row
// in the new tokens and in the cache; false when there is none or its write is dropped.
__device__ __forceinline__ bool warp_token_rows(const KvCacheUpdate& u, int64_t& src,
                                                int64_t& dst) {
  const int64_t b = blockIdx.y;
  const int64_t t = int64_t(blockIdx.x) * kTokensPerBlock + threadIdx.x / 32;
  if (!u.new_tokens.valid(b) || t >= u.new_tokens.len(b)) return false;
  dst = u.target_row(b, t);
  src = u.new_tokens.begin(b) + t;
  return dst >= 0;  // else outside the sequence's capacity or pages: dropped
}

// Grid: (token blocks of the longest new sequence, batch). Rows are copied in 16-byte
// words (every supported row, Hkv * D elements with D a multiple of 8, is a multiple).
__global__ void update_kv_cache_kernel(const __grid_constant__ KvCacheUpdate u,
                                       const uint4* __restrict__ k_new,
                                       const uint4* __restrict__ v_new, uint4* k_cache,
                                       uint4* v_cache, int64_t row_words) {
  int64_t src, dst;
  if (!warp_token_rows(u, src, dst)) return;
  for (int64_t w = threadIdx.x % 32; w < row_words; w += 32) {
    k_cache[dst * row_words + w] = k_new[src * row_words + w];
    v_cache[dst * row_words + w] = v_new[src * row_words + w];
  }
}

// Grid as above. FP8 caches: each lane quantizes groups of 8 elements of one head (the
// head dim is a multiple of 8) as value * (1 / scale[b, head]) (quantize_fp8), 8 bytes a
// store.
template <typename New, typename Cache>
__global__ void quantize_kv_cache_kernel(const __grid_constant__ KvCacheUpdate u,
                                         const New* __restrict__ k_new,
                                         const New* __restrict__ v_new, uint2* k_cache,
                                         uint2* v_cache) {
  int64_t src, dst;
  if (!warp_token_rows(u, src, dst)) return;
  const int64_t groups = u.row_elements / 8;
  const auto quantize = [&](const New* x, float scale) {
    const float inv_scale = 1.f / scale;  // rounded to float32, as the CPU kernel does
    uint32_t word[2] = {0, 0};
#pragma unroll
    for (int e = 0; e < 8; ++e)
      word[e / 4] |= uint32_t(quantize_fp8<Cache>(x[e], inv_scale)) << (8 * (e % 4));
    return make_uint2(word[0], word[1]);
  };
  for (int64_t g = threadIdx.x % 32; g < groups; g += 32) {
    const int64_t head = g * 8 / u.head_dim;
    const int64_t element = src * u.row_elements + g * 8;
    const int64_t scale = u.scale_index(blockIdx.y, head);  // grid y: the sequence
    k_cache[dst * groups + g] = quantize(k_new + element, u.k_scale[scale]);
    v_cache[dst * groups + g] = quantize(v_new + element, u.v_scale[scale]);
  }
}

// The FP8 cache's launch for new tokens of type New.
template <typename New, typename Cache>
void launch_quantize(cudaStream_t stream, dim3 grid, const KvCacheUpdate& u, const void* k_new,
                     const void* v_new, void* k_cache, void* v_cache) {
  quantize_kv_cache_kernel<New, Cache><<<grid, kTokensPerBlock * 32, 0, stream>>>(
      u, static_cast<const New*>(k_new), static_cast<const New*>(v_new),
      static_cast<uint2*>(k_cache), static_cast<uint2*>(v_cache));
}

template <typename Cache>
ffi::Error quantize_into(cudaStream_t stream, dim3 grid, const KvCacheUpdate& u, const void* k_new,
                         const void* v_new, void* k_cache, void* v_cache) {
  if (u.head_dim % 8 != 0)
    return invalid_argument(kOp, "an FP8 cache needs head_dim a multiple of 8");
  switch (u.new_dtype) {
    case ffi::DataType::F32:
      launch_quantize<float, Cache>(stream, grid, u, k_new, v_new, k_cache, v_cache);
      break;
    case ffi::DataType::BF16:
      launch_quantize<__nv_bfloat16, Cache>(stream, grid, u, k_new, v_new, k_cache, v_cache);
      break;
    case ffi::DataType::F16:
      launch_quantize<__half, Cache>(stream, grid, u, k_new, v_new, k_cache, v_cache);
      break;
    default: return invalid_argument(kOp, "new tokens must be float32, bfloat16 or float16");
  }
  return check_launch(kOp, "launching the cache quantization");
}

ffi::Error run_update(cudaStream_t stream, const KvCacheUpdate& u, const void* k_new,
                      const void* v_new, void* k_cache, void* v_cache) {
  const int64_t row_bytes = u.row_elements * u.elem_bytes;
  if (u.k_scale == nullptr && row_bytes % 16 != 0)
    return invalid_argument(kOp, "a token's row must be a multiple of 16 bytes");
  const int64_t token_blocks = (u.new_tokens.max_len + kTokensPerBlock - 1) / kTokensPerBlock;
  if (token_blocks == 0 || u.batch == 0) return ffi::Error::Success();
  if (token_blocks > 0x7fffffff || u.batch > 65535)
    return invalid_argument(kOp, "too many new tokens or sequences");
  const dim3 grid(unsigned(token_blocks), unsigned(u.batch));
  switch (u.cache_dtype) {
    case ffi::DataType::F8E4M3FN:
      return quantize_into<__nv_fp8_e4m3>(stream, grid, u, k_new, v_new, k_cache, v_cache);
    case ffi::DataType::F8E5M2:
      return quantize_into<__nv_fp8_e5m2>(stream, grid, u, k_new, v_new, k_cache, v_cache);
    default: break;
  }
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
