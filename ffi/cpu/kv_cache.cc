// CPU KV-cache append: copies each new token's K and V rows into its cache slot. The cache
// results alias the cache operands, so this writes in place (XLA copies first only when
// the caller did not donate the cache).
#include <cstring>

#include "common/kv_cache_ffi.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

xla::ffi::Error update_kv_cache_cpu(xla::ffi::ThreadPool pool, ffi::AnyBuffer k_cache,
                                    ffi::AnyBuffer v_cache, ffi::AnyBuffer k_new,
                                    ffi::AnyBuffer v_new, ffi::Buffer<ffi::S32> block_table,
                                    ffi::Buffer<ffi::S32> cache_seqlens,
                                    ffi::Buffer<ffi::S32> cu_seqlens_new,
                                    ffi::Result<ffi::AnyBuffer> k_out,
                                    ffi::Result<ffi::AnyBuffer> v_out, int32_t kv_layout) {
  KvCacheUpdate u;
  if (auto err = decode_kv_cache_update(k_cache, v_cache, k_new, v_new, block_table,
                                        cache_seqlens, cu_seqlens_new, *k_out, *v_out, kv_layout,
                                        u);
      !err.success())
    return err;
  auto* k_dst = static_cast<char*>(k_out->untyped_data());
  auto* v_dst = static_cast<char*>(v_out->untyped_data());
  const auto* k_src = static_cast<const char*>(k_new.untyped_data());
  const auto* v_src = static_cast<const char*>(v_new.untyped_data());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFmhaUpdateKvCacheCpu, jax_fmha::cpu::update_kv_cache_cpu,
                              jax_fmha::bind_kv_cache_update(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
