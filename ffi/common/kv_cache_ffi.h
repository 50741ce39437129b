// The KV-cache append custom call, shared by the CPU and CUDA handlers:
//   k_cache, v_cache, k_new, v_new, block_table, cache_seqlens, cu_seqlens_new, k_scale,
//   v_scale  -> k_cache, v_cache   (results aliased to the cache operands: in place when
//   donated)
// New tokens have the caches' dtype and are copied (k_scale, v_scale empty), or the caches
// are FP8 and the float32/bfloat16/float16 new tokens are quantized: a value of sequence b
// and KV head h becomes value / scale[b, h] (as value * (1 / scale) in float32), rounded to nearest
// even, saturated to the largest finite FP8 value (+-inf too); NaN stays NaN. New token t of
// sequence b goes to cache position cache_seqlens[b] + t, through the block table for pages. A
// write that falls outside the sequence's capacity, or onto an invalid page id, or whose
// cache_seqlens[b] is negative, is dropped: never out of bounds.
#pragma once

#include <utility>

#include "common/attention_ffi.h"
#include "common/errors.h"

namespace jax_fmha {

template <typename Binding>
auto bind_kv_cache_update(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()         // k_cache
      .template Arg<ffi::AnyBuffer>()         // v_cache
      .template Arg<ffi::AnyBuffer>()         // k_new
      .template Arg<ffi::AnyBuffer>()         // v_new
      .template Arg<ffi::Buffer<ffi::S32>>()  // block_table
      .template Arg<ffi::Buffer<ffi::S32>>()  // cache_seqlens
      .template Arg<ffi::Buffer<ffi::S32>>()  // cu_seqlens_new
      .template Arg<ffi::Buffer<ffi::F32>>()  // k_scale
      .template Arg<ffi::Buffer<ffi::F32>>()  // v_scale
      .template Ret<ffi::AnyBuffer>()         // k_cache (aliased)
      .template Ret<ffi::AnyBuffer>()         // v_cache (aliased)
      .template Attr<int32_t>("kv_layout");
}

struct KvCacheUpdate {
  int64_t batch = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t row_elements = 0;  // Hkv * D: one token of one cache
  int64_t elem_bytes = 0;    // of the caches
  ffi::DataType cache_dtype = ffi::DataType::INVALID;
  ffi::DataType new_dtype = ffi::DataType::INVALID;  // the caches', or a float for FP8 caches
  const float* k_scale = nullptr;  // FP8 caches: quantization scales [B, Hkv]; else nullptr
  const float* v_scale = nullptr;
  SeqRows new_tokens;  // rows of k_new / v_new
  KvView cache;        // seq_lens = cache_seqlens (lengths before the append)

  // Index of sequence b's scale of KV head h in k_scale, v_scale.
  FMHA_HOST_DEVICE int64_t scale_index(int64_t b, int64_t h) const { return b * num_kv_heads + h; }

  // Cache row of new token t of sequence b, or -1 when the write must be dropped.
  FMHA_HOST_DEVICE int64_t target_row(int64_t b, int64_t t) const {
    const int64_t start = cache.seq_lens[b];
    const int64_t pos = start + t;
    if (start < 0 || pos >= cache.capacity(b)) return -1;
    if (cache.layout == KvLayout::kPaged && !cache.pages.id_valid(cache.pages.page_id(b, int(pos))))
      return -1;
    return cache.row(b, pos);
  }
};

inline ffi::Error decode_kv_cache_update(
    const ffi::AnyBuffer& k_cache, const ffi::AnyBuffer& v_cache, const ffi::AnyBuffer& k_new,
    const ffi::AnyBuffer& v_new, const ffi::Buffer<ffi::S32>& block_table,
    const ffi::Buffer<ffi::S32>& cache_seqlens, const ffi::Buffer<ffi::S32>& cu_seqlens_new,
    const ffi::Buffer<ffi::F32>& k_scale, const ffi::Buffer<ffi::F32>& v_scale,
    const ffi::AnyBuffer& k_out, const ffi::AnyBuffer& v_out, int32_t kv_layout, KvCacheUpdate& u) {
  constexpr const char* kOp = "update_kv_cache";
  const auto cd = k_cache.dimensions();
  const auto nd = k_new.dimensions();
  u.cache_dtype = k_cache.element_type();
  u.new_dtype = k_new.element_type();
  if (v_cache.element_type() != u.cache_dtype || v_new.element_type() != u.new_dtype)
    return invalid_argument(kOp, "k and v dtypes differ");
  const bool float_new = u.new_dtype == ffi::DataType::F32 || u.new_dtype == ffi::DataType::BF16 ||
                         u.new_dtype == ffi::DataType::F16;
  if (is_fp8(u.cache_dtype) ? !float_new : u.new_dtype != u.cache_dtype)
    return invalid_argument(kOp,
                            "new tokens must have the caches' dtype, or be float32, bfloat16 or "
                            "float16 for FP8 caches (which quantize them)");
  if (k_cache.element_count() != v_cache.element_count() ||
      k_out.element_count() != k_cache.element_count() ||
      v_out.element_count() != v_cache.element_count() ||
      k_new.element_count() != v_new.element_count())
    return invalid_argument(kOp, "k and v shapes differ");
  if (cd.size() != 4 || (nd.size() != 3 && nd.size() != 4))
    return invalid_argument(kOp, "unexpected ranks");
  if (nd[nd.size() - 2] != cd[2] || nd[nd.size() - 1] != cd[3])
    return invalid_argument(kOp, "new tokens' heads/head_dim differ from the cache's");
  u.num_kv_heads = cd[2];
  u.head_dim = cd[3];
  u.row_elements = cd[2] * cd[3];
  u.elem_bytes = int64_t(ffi::ByteWidth(k_cache.element_type()));
  u.batch = int64_t(cache_seqlens.element_count());
  if (auto err = decode_scale(kOp, "k_scale", u.cache_dtype, u.batch * cd[2], k_scale, u.k_scale);
      !err.success())
    return err;
  if (auto err = decode_scale(kOp, "v_scale", u.cache_dtype, u.batch * cd[2], v_scale, u.v_scale);
      !err.success())
    return err;
  if (auto err = decode_seq_rows(kOp, k_new, cu_seqlens_new, 0, "k_new", u.new_tokens);
      !err.success())
    return err;
  u.new_tokens.max_len = u.new_tokens.packed ? u.new_tokens.rows : u.new_tokens.uniform_len;
  if (u.new_tokens.packed ? int64_t(cu_seqlens_new.element_count()) != u.batch + 1
                          : nd[0] != u.batch)
    return invalid_argument(kOp, "new tokens' batch differs from cache_seqlens'");
  const auto layout = static_cast<KvLayout>(kv_layout);
  if (layout != KvLayout::kCache && layout != KvLayout::kPaged)
    return invalid_argument(kOp, "kv_layout must be a cache or pages");
  return decode_kv_view(kOp, k_cache, layout, u.batch, cu_seqlens_new, cache_seqlens, block_table,
                        u.cache);
}

// The handler of every backend: decodes and checks the call, then `Run` copies (or
// quantizes) the new tokens from `k_new`/`v_new` into `k_cache`/`v_cache` (the aliased
// results).
template <typename Context, ffi::Error (*Run)(Context, const KvCacheUpdate&, const void* k_new,
                                              const void* v_new, void* k_cache, void* v_cache)>
ffi::Error kv_cache_update_handler(Context context, ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                                   ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                                   ffi::Buffer<ffi::S32> block_table,
                                   ffi::Buffer<ffi::S32> cache_seqlens,
                                   ffi::Buffer<ffi::S32> cu_seqlens_new,
                                   ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                                   ffi::Result<ffi::AnyBuffer> k_out,
                                   ffi::Result<ffi::AnyBuffer> v_out, int32_t kv_layout) {
  KvCacheUpdate u;
  if (auto err =
          decode_kv_cache_update(k_cache, v_cache, k_new, v_new, block_table, cache_seqlens,
                                 cu_seqlens_new, k_scale, v_scale, *k_out, *v_out, kv_layout, u);
      !err.success())
    return err;
  return Run(context, u, k_new.untyped_data(), v_new.untyped_data(), k_out->untyped_data(),
             v_out->untyped_data());
}

}  // namespace jax_fmha
