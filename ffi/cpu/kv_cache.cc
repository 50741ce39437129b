// CPU KV-cache append: copies each new token's K and V rows into its cache slot, or, for
// FP8 caches, quantizes them there (common/kv_cache_ffi.h). The cache results alias the
// cache operands, so this writes in place (XLA copies first only when the caller did not
// donate the cache).
#include <cstring>

#include "common/kv_cache_ffi.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

// Calls write(b, src_row, dst_row) for every new token of sequence b whose write is not
// dropped.
template <typename Write>
void for_each_new_token(xla::ffi::ThreadPool& pool, const KvCacheUpdate& u, const Write& write) {
  parallel_for(pool, u.batch, [&](int64_t b) {
    if (!u.new_tokens.valid(b)) return;
    for (int64_t t = 0; t < u.new_tokens.len(b); ++t) {
      const int64_t dst = u.target_row(b, t);
      if (dst < 0) continue;  // outside the sequence's capacity or pages: dropped
      write(b, u.new_tokens.begin(b) + t, dst);
    }
  });
}

// One token's row [Hkv, D] of sequence b into an FP8 cache: value * (1 / scale[b, head]),
// saturating.
template <typename New, typename Cache>
void quantize_row(const New* src, Cache* dst, const float* scale, int64_t b,
                  const KvCacheUpdate& u) {
  for (int64_t h = 0; h < u.num_kv_heads; ++h) {
    const float inv_scale = 1.f / scale[u.scale_index(b, h)];
    for (int64_t d = h * u.head_dim; d < (h + 1) * u.head_dim; ++d)
      dst[d] = from_float<Cache>(to_float(src[d]) * inv_scale);
  }
}

template <typename New, typename Cache>
void quantize_update(xla::ffi::ThreadPool& pool, const KvCacheUpdate& u, const void* k_new,
                     const void* v_new, void* k_cache, void* v_cache) {
  const int64_t n = u.row_elements;
  for_each_new_token(pool, u, [&](int64_t b, int64_t src, int64_t dst) {
    quantize_row(static_cast<const New*>(k_new) + src * n, static_cast<Cache*>(k_cache) + dst * n,
                 u.k_scale, b, u);
    quantize_row(static_cast<const New*>(v_new) + src * n, static_cast<Cache*>(v_cache) + dst * n,
                 u.v_scale, b, u);
  });
}

template <typename Cache>
ffi::Error quantize_into(xla::ffi::ThreadPool& pool, const KvCacheUpdate& u, const void* k_new,
                         const void* v_new, void* k_cache, void* v_cache) {
  switch (u.new_dtype) {
    case ffi::DataType::F32:
      quantize_update<float, Cache>(pool, u, k_new, v_new, k_cache, v_cache);
      break;
    case ffi::DataType::BF16:
      quantize_update<bf16, Cache>(pool, u, k_new, v_new, k_cache, v_cache);
      break;
    case ffi::DataType::F16:
      quantize_update<f16, Cache>(pool, u, k_new, v_new, k_cache, v_cache);
      break;
    default: return invalid_argument("update_kv_cache", "unsupported new-token dtype");
  }
  return ffi::Error::Success();
}

ffi::Error run_update(xla::ffi::ThreadPool pool, const KvCacheUpdate& u, const void* k_new,
                      const void* v_new, void* k_cache, void* v_cache) {
  switch (u.cache_dtype) {
    case ffi::DataType::F8E4M3FN:
      return quantize_into<f8e4m3fn>(pool, u, k_new, v_new, k_cache, v_cache);
    case ffi::DataType::F8E5M2:
      return quantize_into<f8e5m2>(pool, u, k_new, v_new, k_cache, v_cache);
    default: break;
  }
  const auto* k_src = static_cast<const char*>(k_new);
  const auto* v_src = static_cast<const char*>(v_new);
  auto* k_dst = static_cast<char*>(k_cache);
  auto* v_dst = static_cast<char*>(v_cache);
  const int64_t row_bytes = u.row_elements * u.elem_bytes;
  for_each_new_token(pool, u, [&](int64_t, int64_t src, int64_t dst) {
    std::memcpy(k_dst + dst * row_bytes, k_src + src * row_bytes, row_bytes);
    std::memcpy(v_dst + dst * row_bytes, v_src + src * row_bytes, row_bytes);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaUpdateKvCacheCpu,
    (jax_fmha::kv_cache_update_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_update>),
    jax_fmha::bind_kv_cache_update(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
