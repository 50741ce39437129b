// Decoding of the attention forward custom call, shared by the CPU and CUDA handlers.
//
// The Python primitive always passes the same operands; absent ones are empty arrays:
//   q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table, k_scale, v_scale
//     ->  out, lse
// k and v have q's dtype, or are an FP8 cache (float8_e4m3fn or float8_e5m2) with float32
// dequantization scales k_scale, v_scale [Hkv] (empty otherwise): key j of KV head h stands
// for k[j, h] * k_scale[h]. Backends fold the scales into the scores and the output.
// Python validates everything at trace time; the checks here guard against a custom call
// emitted by something other than our lowering, so a mismatch can never index out of bounds.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "common/attention_problem.h"
#include "common/constants.h"
#include "common/errors.h"
#include "xla/ffi/api/ffi.h"

namespace jax_fmha {

namespace ffi = xla::ffi;

// The attributes of the custom call, in the order of the binding below.
struct AttentionAttrs {
  float scale;
  float softcap;
  int32_t window_left;
  int32_t window_right;
  int32_t kv_layout;
  int32_t num_splits;
  int32_t max_seqlen_q;
};

// Binds operands, results and attributes shared by every backend; the caller adds its
// context (thread pool or stream) first.
template <typename Binding>
auto bind_attention(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()         // q
      .template Arg<ffi::AnyBuffer>()         // k
      .template Arg<ffi::AnyBuffer>()         // v
      .template Arg<ffi::Buffer<ffi::S32>>()  // cu_seqlens_q
      .template Arg<ffi::Buffer<ffi::S32>>()  // cu_seqlens_k
      .template Arg<ffi::Buffer<ffi::S32>>()  // seq_lens
      .template Arg<ffi::Buffer<ffi::S32>>()  // block_table
      .template Arg<ffi::Buffer<ffi::F32>>()  // k_scale
      .template Arg<ffi::Buffer<ffi::F32>>()  // v_scale
      .template Ret<ffi::AnyBuffer>()         // out
      .template Ret<ffi::Buffer<ffi::F32>>()  // lse
      .template Attr<float>("scale")
      .template Attr<float>("softcap")
      .template Attr<int32_t>("window_left")
      .template Attr<int32_t>("window_right")
      .template Attr<int32_t>("kv_layout")
      .template Attr<int32_t>("num_splits")
      .template Attr<int32_t>("max_seqlen_q");
}

inline bool is_fp8(ffi::DataType dtype) {
  return dtype == ffi::DataType::F8E4M3FN || dtype == ffi::DataType::F8E5M2;
}

// The dequantization scales of keys and values of `kv_dtype` with `num_kv_heads` heads:
// [Hkv] each for FP8 keys and values, empty otherwise. `op` names the custom call in errors.
inline ffi::Error decode_kv_scales(const char* op, ffi::DataType kv_dtype, int64_t num_kv_heads,
                                   const ffi::Buffer<ffi::F32>& k_scale,
                                   const ffi::Buffer<ffi::F32>& v_scale) {
  const int64_t want = is_fp8(kv_dtype) ? num_kv_heads : 0;
  if (int64_t(k_scale.element_count()) != want || int64_t(v_scale.element_count()) != want)
    return invalid_argument(op, is_fp8(kv_dtype)
                                    ? "FP8 k/v need k_scale and v_scale of [Hkv] elements"
                                    : "k_scale/v_scale are only for FP8 k/v");
  return ffi::Error::Success();
}

// Rows of B sequences: `x` is dense [B, S, H, D] (cu_seqlens empty) or packed [T, H, D].
// `op` names the custom call in errors.
inline ffi::Error decode_seq_rows(const char* op, const ffi::AnyBuffer& x,
                                  const ffi::Buffer<ffi::S32>& cu_seqlens, int64_t max_len,
                                  const char* name, SeqRows& rows) {
  const auto d = x.dimensions();
  rows.packed = d.size() == 3;
  if (rows.packed) {
    if (cu_seqlens.element_count() < 1)
      return invalid_argument(op, std::string("packed ") + name + " needs cu_seqlens");
    rows.cu_seqlens = cu_seqlens.typed_data();
    rows.rows = d[0];
  } else {
    rows.uniform_len = d[1];
    rows.rows = d[0] * d[1];
  }
  rows.max_len = max_len;
  return ffi::Error::Success();
}

// Keys or values `x` of `batch` sequences in `layout` (see KvLayout); `op` names the custom
// call in errors.
inline ffi::Error decode_kv_view(const char* op, const ffi::AnyBuffer& x, KvLayout layout,
                                 int64_t batch, const ffi::Buffer<ffi::S32>& cu_seqlens,
                                 const ffi::Buffer<ffi::S32>& seq_lens,
                                 const ffi::Buffer<ffi::S32>& block_table, KvView& kv) {
  const auto d = x.dimensions();
  kv.layout = layout;
  const bool needs_lens = layout == KvLayout::kCache || layout == KvLayout::kPaged;
  if (needs_lens) {
    if (int64_t(seq_lens.element_count()) != batch)
      return invalid_argument(op, "seq_lens must be [B]");
    kv.seq_lens = seq_lens.typed_data();
  }
  switch (layout) {
    case KvLayout::kUniform:
    case KvLayout::kCache:
      if (d.size() != 4 || d[0] != batch) return invalid_argument(op, "k/v batch differs from q's");
      kv.seqs.uniform_len = d[1];
      kv.seqs.max_len = d[1];
      kv.rows = d[0] * d[1];
      return ffi::Error::Success();
    case KvLayout::kPacked:
      if (d.size() != 3) return invalid_argument(op, "packed k/v must have rank 3");
      if (int64_t(cu_seqlens.element_count()) != batch + 1)
        return invalid_argument(op, "cu_seqlens_k must have batch + 1 entries");
      kv.seqs.packed = true;
      kv.seqs.cu_seqlens = cu_seqlens.typed_data();
      kv.seqs.rows = kv.rows = d[0];
      kv.seqs.max_len = d[0];
      return ffi::Error::Success();
    case KvLayout::kPaged: {
      const auto td = block_table.dimensions();
      if (d.size() != 4) return invalid_argument(op, "k/v pages must have rank 4");
      if (td.size() != 2 || td[0] != batch)
        return invalid_argument(op, "block_table must be [B, M]");
      kv.pages.num_pages = d[0];
      kv.pages.page_size = d[1];
      kv.rows = d[0] * d[1];
      kv.pages.pages_per_seq = td[1];
      kv.pages.block_table = block_table.typed_data();
      if (kv.pages.page_size <= 0) return invalid_argument(op, "page_size must be positive");
      // Key positions within a sequence are 32-bit (common/page_table.h).
      if (kv.pages.capacity() > INT32_MAX)
        return invalid_argument(op, "pages_per_seq * page_size must be below 2^31");
      return ffi::Error::Success();
    }
  }
  return invalid_argument(op, "unknown kv_layout");
}

// Fills `p` from the buffers and attributes, checking every size the kernels rely on.
inline ffi::Error decode_attention(
    const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v,
    const ffi::Buffer<ffi::S32>& cu_seqlens_q, const ffi::Buffer<ffi::S32>& cu_seqlens_k,
    const ffi::Buffer<ffi::S32>& seq_lens, const ffi::Buffer<ffi::S32>& block_table,
    const ffi::Buffer<ffi::F32>& k_scale, const ffi::Buffer<ffi::F32>& v_scale,
    const ffi::AnyBuffer& out, const ffi::Buffer<ffi::F32>& lse, const AttentionAttrs& a,
    AttentionProblem& p) {
  constexpr const char* kOp = "attention";
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 3 && qd.size() != 4) return invalid_argument(kOp, "q must have rank 3 or 4");
  if (is_fp8(q.element_type())) return invalid_argument(kOp, "q must not be FP8 (k and v may)");
  if (v.element_type() != k.element_type() ||
      (k.element_type() != q.element_type() && !is_fp8(k.element_type())))
    return invalid_argument(kOp, "k and v must share one dtype: q's, or an FP8 format");
  if (k.dimensions().size() != v.dimensions().size())
    return invalid_argument(kOp, "k and v ranks differ");
  for (size_t i = 0; i < kd.size(); ++i)
    if (k.dimensions()[i] != v.dimensions()[i])
      return invalid_argument(kOp, "k and v shapes differ");

  p.num_q_heads = qd[qd.size() - 2];
  p.head_dim = qd[qd.size() - 1];
  p.num_kv_heads = kd[kd.size() - 2];
  if (kd[kd.size() - 1] != p.head_dim) return invalid_argument(kOp, "k head_dim differs from q's");
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0)
    return invalid_argument(kOp, "num_q_heads must be a multiple of num_kv_heads");
  if (p.head_dim > kMaxHeadDim)
    return invalid_argument(kOp, "head_dim must be at most " + std::to_string(kMaxHeadDim));
  if (auto err = decode_kv_scales(kOp, k.element_type(), p.num_kv_heads, k_scale, v_scale);
      !err.success())
    return err;
  if (is_fp8(k.element_type())) p.k_scale = k_scale.typed_data(), p.v_scale = v_scale.typed_data();

  if (auto err = decode_seq_rows(kOp, q, cu_seqlens_q, a.max_seqlen_q, "q", p.q); !err.success())
    return err;
  p.batch = p.q.packed ? int64_t(cu_seqlens_q.element_count()) - 1 : qd[0];
  if (auto err = decode_kv_view(kOp, k, static_cast<KvLayout>(a.kv_layout), p.batch, cu_seqlens_k,
                                seq_lens, block_table, p.kv);
      !err.success())
    return err;

  p.scale = a.scale;
  p.softcap = a.softcap;
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  p.num_splits = a.num_splits;
  if (p.num_splits < 1) return invalid_argument(kOp, "num_splits must be at least 1");

  // Results: out is q's shape (q's dtype), or float32 [num_splits, ...q] partials.
  const auto od = out.dimensions();
  const size_t lead = p.num_splits > 1 ? 1 : 0;
  if (od.size() != qd.size() + lead) return invalid_argument(kOp, "out has an unexpected rank");
  if (lead && (od[0] != p.num_splits || out.element_type() != ffi::DataType::F32))
    return invalid_argument(kOp, "split outputs must be float32 [num_splits, ...q.shape]");
  if (!lead && out.element_type() != q.element_type())
    return invalid_argument(kOp, "out must have q's dtype");
  for (size_t i = 0; i < qd.size(); ++i)
    if (od[i + lead] != qd[i]) return invalid_argument(kOp, "out shape differs from q's");
  if (int64_t(lse.element_count()) != p.num_splits * p.lse_size())
    return invalid_argument(kOp, "lse has an unexpected size");
  return ffi::Error::Success();
}

// Buffers of one attention call, after decoding.
struct AttentionData {
  ffi::DataType dtype;     // of q
  ffi::DataType kv_dtype;  // of k and v: q's, or FP8
  const void* q;
  const void* k;
  const void* v;
  void* out;  // q's dtype, or float32 split-KV partials
  float* lse;
};

// The handler of every backend: decodes and checks the call, then `Run` computes. Context is
// what the backend binds first: ffi::ThreadPool on the CPU, cudaStream_t on CUDA.
template <typename Context,
          ffi::Error (*Run)(Context, const AttentionProblem&, const AttentionData&)>
ffi::Error attention_handler(Context context, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                             ffi::Buffer<ffi::S32> cu_seqlens_q, ffi::Buffer<ffi::S32> cu_seqlens_k,
                             ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> block_table,
                             ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale,
                             ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale, float softcap,
                             int32_t window_left, int32_t window_right, int32_t kv_layout,
                             int32_t num_splits, int32_t max_seqlen_q) {
  AttentionProblem p;
  const AttentionAttrs attrs{scale,     softcap,    window_left, window_right,
                             kv_layout, num_splits, max_seqlen_q};
  if (auto err = decode_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table,
                                  k_scale, v_scale, *out, *lse, attrs, p);
      !err.success())
    return err;
  const AttentionData data{q.element_type(), k.element_type(), q.untyped_data(),
                           k.untyped_data(), v.untyped_data(), out->untyped_data(),
                           lse->typed_data()};
  return Run(context, p, data);
}

}  // namespace jax_fmha
