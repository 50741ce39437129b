// CPU KV-cache append: copies each new token's K and V rows into its cache slot. The cache
// results alias the cache operands, so this writes in place (XLA copies first only when
// the caller did not donate the cache).
#include <cstring>

#include "common/kv_cache_ffi.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

ffi::Error run_update(xla::ffi::ThreadPool pool, const KvCacheUpdate& u, const void* k_new,
                      const void* v_new, void* k_cache, void* v_cache) {
  const auto* k_src = static_cast<const char*>(k_new);
  const auto* v_src = static_cast<const char*>(v_new);
  auto* k_dst = static_cast<char*>(k_cache);
  auto* v_dst = static_cast<char*>(v_cache);
  const int64_t row_bytes = u.row_elements * u.elem_bytes;
  parallel_for(pool, u.batch, [&](int64_t b) {
    if (!u.new_tokens.valid(b)) return;
    for (int64_t t = 0; t < u.new_tokens.len(b); ++t) {
      const int64_t dst = u.target_row(b, t);
      if (dst < 0) continue;  // outside the sequence's capacity or pages: dropped
      const int64_t src = u.new_tokens.begin(b) + t;
      std::memcpy(k_dst + dst * row_bytes, k_src + src * row_bytes, row_bytes);
      std::memcpy(v_dst + dst * row_bytes, v_src + src * row_bytes, row_bytes);
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaUpdateKvCacheCpu,
    (jax_fmha::kv_cache_update_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_update>),
    jax_fmha::bind_kv_cache_update(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
