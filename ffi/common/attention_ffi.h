// Decoding of the attention forward custom call, shared by the CPU and CUDA handlers.
//
// The Python primitive always passes the same operands; absent ones are empty arrays:
//   q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table, q_scale, k_scale, v_scale
//     ->  out, lse
// Dtypes (docs/design/fp8_kv_cache.md, fp8_attention.md): k and v have q's dtype, or are an
// FP8 cache (float8_e4m3fn or float8_e5m2) with 16-bit or float32 q; or q is FP8, k is of
// q's format, v of k's or bfloat16/float16. Each FP8 operand comes with float32
// dequantization scales [B, Hkv] (empty for the others): key j of sequence b and KV head h
// stands for k[j, h] * k_scale[b, h]. Backends fold the scales into the scores and the output.
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
      .template Arg<ffi::Buffer<ffi::F32>>()  // q_scale
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

inline bool is_16bit_float(ffi::DataType dtype) {
  return dtype == ffi::DataType::BF16 || dtype == ffi::DataType::F16;
}

// The dequantization scales `scale` (named `name`) of an operand of `dtype`: [B, Hkv]
// (`count` elements) for FP8, empty otherwise; `data` is set to them, or nullptr. `op`
// names the custom call in errors.
inline ffi::Error decode_scale(const char* op, const char* name, ffi::DataType dtype, int64_t count,
                               const ffi::Buffer<ffi::F32>& scale, const float*& data) {
  const int64_t want = is_fp8(dtype) ? count : 0;
  if (int64_t(scale.element_count()) != want)
    return invalid_argument(
        op, is_fp8(dtype) ? std::string("an FP8 operand needs ") + name + " of [B, Hkv] elements"
                          : std::string(name) + " is only for an FP8 operand");
  data = is_fp8(dtype) ? scale.typed_data() : nullptr;
  return ffi::Error::Success();
}

// The scales of q, k and v (decode_scale), [B, Hkv] each.
inline ffi::Error decode_scales(const char* op, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                const ffi::AnyBuffer& v, const ffi::Buffer<ffi::F32>& q_scale,
                                const ffi::Buffer<ffi::F32>& k_scale,
                                const ffi::Buffer<ffi::F32>& v_scale, AttentionProblem& p) {
  const int64_t count = p.batch * p.num_kv_heads;
  if (auto err = decode_scale(op, "q_scale", q.element_type(), count, q_scale, p.q_scale);
      !err.success())
    return err;
  if (auto err = decode_scale(op, "k_scale", k.element_type(), count, k_scale, p.k_scale);
      !err.success())
    return err;
  return decode_scale(op, "v_scale", v.element_type(), count, v_scale, p.v_scale);
}

// The dtypes of q, k, v and out (see the top of this file). `split` outputs are float32.
inline ffi::Error check_attention_dtypes(const char* op, ffi::DataType q, ffi::DataType k,
                                         ffi::DataType v, ffi::DataType out, bool split) {
  if (is_fp8(q)) {
    if (k != q) return invalid_argument(op, "FP8 q needs k of q's FP8 format");
    if (v != k && !is_16bit_float(v))
      return invalid_argument(op, "with FP8 q, v must have k's dtype or be bfloat16/float16");
    if (!split && out != ffi::DataType::F32 && !is_16bit_float(out))
      return invalid_argument(op, "with FP8 q, out must be float32, bfloat16 or float16");
  } else {
    if (v != k || (k != q && !is_fp8(k)))
      return invalid_argument(op, "k and v must share one dtype: q's, or an FP8 format");
    if (!split && out != q) return invalid_argument(op, "out must have q's dtype");
  }
  if (split && out != ffi::DataType::F32)
    return invalid_argument(op, "split outputs must be float32 [num_splits, ...q.shape]");
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
    const ffi::Buffer<ffi::F32>& q_scale, const ffi::Buffer<ffi::F32>& k_scale,
    const ffi::Buffer<ffi::F32>& v_scale, const ffi::AnyBuffer& out,
    const ffi::Buffer<ffi::F32>& lse, const AttentionAttrs& a, AttentionProblem& p) {
  constexpr const char* kOp = "attention";
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 3 && qd.size() != 4) return invalid_argument(kOp, "q must have rank 3 or 4");
  if (auto err = check_attention_dtypes(kOp, q.element_type(), k.element_type(), v.element_type(),
                                        out.element_type(), a.num_splits > 1);
      !err.success())
    return err;
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
  if (auto err = decode_seq_rows(kOp, q, cu_seqlens_q, a.max_seqlen_q, "q", p.q); !err.success())
    return err;
  p.batch = p.q.packed ? int64_t(cu_seqlens_q.element_count()) - 1 : qd[0];
  if (auto err = decode_kv_view(kOp, k, static_cast<KvLayout>(a.kv_layout), p.batch, cu_seqlens_k,
                                seq_lens, block_table, p.kv);
      !err.success())
    return err;
  if (auto err = decode_scales(kOp, q, k, v, q_scale, k_scale, v_scale, p); !err.success())
    return err;

  p.scale = a.scale;
  p.softcap = a.softcap;
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  p.num_splits = a.num_splits;
  if (p.num_splits < 1) return invalid_argument(kOp, "num_splits must be at least 1");

  // Results: out is q's shape (dtype checked above), or float32 [num_splits, ...q] partials.
  const auto od = out.dimensions();
  const size_t lead = p.num_splits > 1 ? 1 : 0;
  if (od.size() != qd.size() + lead) return invalid_argument(kOp, "out has an unexpected rank");
  if (lead && od[0] != p.num_splits)
    return invalid_argument(kOp, "split outputs must be float32 [num_splits, ...q.shape]");
  for (size_t i = 0; i < qd.size(); ++i)
    if (od[i + lead] != qd[i]) return invalid_argument(kOp, "out shape differs from q's");
  if (int64_t(lse.element_count()) != p.num_splits * p.lse_size())
    return invalid_argument(kOp, "lse has an unexpected size");
  return ffi::Error::Success();
}

// Buffers of one attention call, after decoding.
struct AttentionData {
  ffi::DataType dtype;      // of q
  ffi::DataType kv_dtype;   // of k: q's, or FP8
  ffi::DataType v_dtype;    // k's, or bfloat16/float16 with FP8 q
  ffi::DataType out_dtype;  // q's (not FP8), a float type with FP8 q; float32 for splits
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
};

// The handler of every backend: decodes and checks the call, then `Run` computes. Context is
// what the backend binds first: ffi::ThreadPool on the CPU, cudaStream_t on CUDA.
template <typename Context,
          ffi::Error (*Run)(Context, const AttentionProblem&, const AttentionData&)>
ffi::Error attention_handler(Context context, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                             ffi::Buffer<ffi::S32> cu_seqlens_q, ffi::Buffer<ffi::S32> cu_seqlens_k,
                             ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> block_table,
                             ffi::Buffer<ffi::F32> q_scale, ffi::Buffer<ffi::F32> k_scale,
                             ffi::Buffer<ffi::F32> v_scale, ffi::Result<ffi::AnyBuffer> out,
                             ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale, float softcap,
                             int32_t window_left, int32_t window_right, int32_t kv_layout,
                             int32_t num_splits, int32_t max_seqlen_q) {
  AttentionProblem p;
  const AttentionAttrs attrs{scale,     softcap,    window_left, window_right,
                             kv_layout, num_splits, max_seqlen_q};
  if (auto err = decode_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table,
                                  q_scale, k_scale, v_scale, *out, *lse, attrs, p);
      !err.success())
    return err;
  const AttentionData data{q.element_type(),    k.element_type(),    v.element_type(),
                           out->element_type(), q.untyped_data(),    k.untyped_data(),
                           v.untyped_data(),    out->untyped_data(), lse->typed_data()};
  return Run(context, p, data);
}

}  // namespace jax_fmha
