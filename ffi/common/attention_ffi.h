// Decoding of the attention forward custom call, shared by the CPU and CUDA handlers.
//
// The Python primitive always passes the same operands; absent ones are empty int32 arrays:
//   q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table  ->  out, lse
// Python validates everything at trace time; the checks here guard against a custom call
// emitted by something other than our lowering, so a mismatch can never index out of bounds.
#pragma once

#include <string>
#include <utility>

#include "common/attention_problem.h"
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
  return std::move(binding).template Arg<ffi::AnyBuffer>()  // q
      .template Arg<ffi::AnyBuffer>()            // k
      .template Arg<ffi::AnyBuffer>()            // v
      .template Arg<ffi::Buffer<ffi::S32>>()     // cu_seqlens_q
      .template Arg<ffi::Buffer<ffi::S32>>()     // cu_seqlens_k
      .template Arg<ffi::Buffer<ffi::S32>>()     // seq_lens
      .template Arg<ffi::Buffer<ffi::S32>>()     // block_table
      .template Ret<ffi::AnyBuffer>()            // out
      .template Ret<ffi::Buffer<ffi::F32>>()     // lse
      .template Attr<float>("scale")
      .template Attr<float>("softcap")
      .template Attr<int32_t>("window_left")
      .template Attr<int32_t>("window_right")
      .template Attr<int32_t>("kv_layout")
      .template Attr<int32_t>("num_splits")
      .template Attr<int32_t>("max_seqlen_q");
}

inline ffi::Error shape_error(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_fmha attention custom call: " + what);
}

// Fills `p` from the buffers and attributes, checking every size the kernels rely on.
inline ffi::Error decode_attention(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                                   const ffi::AnyBuffer& v,
                                   const ffi::Buffer<ffi::S32>& cu_seqlens_q,
                                   const ffi::Buffer<ffi::S32>& cu_seqlens_k,
                                   const ffi::Buffer<ffi::S32>& seq_lens,
                                   const ffi::Buffer<ffi::S32>& block_table,
                                   const ffi::AnyBuffer& out, const ffi::Buffer<ffi::F32>& lse,
                                   const AttentionAttrs& a, AttentionProblem& p) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  if (qd.size() != 3 && qd.size() != 4) return shape_error("q must have rank 3 or 4");
  if (kd.size() != qd.size() && !(qd.size() == 3 && kd.size() == 4))
    return shape_error("k has an unexpected rank");
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return shape_error("q, k and v must share one dtype");
  if (k.dimensions().size() != v.dimensions().size()) return shape_error("k and v ranks differ");
  for (size_t i = 0; i < kd.size(); ++i)
    if (k.dimensions()[i] != v.dimensions()[i]) return shape_error("k and v shapes differ");

  p.q_packed = qd.size() == 3;
  p.num_q_heads = qd[qd.size() - 2];
  p.head_dim = qd[qd.size() - 1];
  p.num_kv_heads = kd[kd.size() - 2];
  if (kd[kd.size() - 1] != p.head_dim) return shape_error("k head_dim differs from q's");
  if (p.num_kv_heads <= 0 || p.num_q_heads % p.num_kv_heads != 0)
    return shape_error("num_q_heads must be a multiple of num_kv_heads");
  if (p.head_dim > 256) return shape_error("head_dim must be at most 256");

  if (p.q_packed) {
    if (cu_seqlens_q.element_count() < 1) return shape_error("packed q needs cu_seqlens_q");
    p.batch = int64_t(cu_seqlens_q.element_count()) - 1;
    p.q_rows = qd[0];
    p.cu_seqlens_q = cu_seqlens_q.typed_data();
  } else {
    p.batch = qd[0];
    p.uniform_seqlen_q = qd[1];
    p.q_rows = qd[0] * qd[1];
  }
  p.max_seqlen_q = a.max_seqlen_q;

  p.kv_layout = static_cast<KvLayout>(a.kv_layout);
  switch (p.kv_layout) {
    case KvLayout::kUniform:
      if (kd.size() != 4 || kd[0] != p.batch) return shape_error("dense k batch differs from q's");
      p.uniform_seqlen_k = kd[1];
      p.kv_rows = kd[0] * kd[1];
      break;
    case KvLayout::kPacked:
      if (kd.size() != 3) return shape_error("packed k must have rank 3");
      if (int64_t(cu_seqlens_k.element_count()) != p.batch + 1)
        return shape_error("cu_seqlens_k must have batch + 1 entries");
      p.kv_rows = kd[0];
      p.cu_seqlens_k = cu_seqlens_k.typed_data();
      break;
    case KvLayout::kCache:
      if (kd.size() != 4 || kd[0] != p.batch) return shape_error("cache batch differs from q's");
      if (int64_t(seq_lens.element_count()) != p.batch) return shape_error("seq_lens must be [B]");
      p.uniform_seqlen_k = kd[1];
      p.kv_rows = kd[0] * kd[1];
      p.seq_lens = seq_lens.typed_data();
      break;
    case KvLayout::kPaged: {
      const auto td = block_table.dimensions();
      if (kd.size() != 4) return shape_error("pages must have rank 4");
      if (td.size() != 2 || td[0] != p.batch) return shape_error("block_table must be [B, M]");
      if (int64_t(seq_lens.element_count()) != p.batch) return shape_error("seq_lens must be [B]");
      p.num_pages = kd[0];
      p.page_size = kd[1];
      p.kv_rows = kd[0] * kd[1];
      p.pages_per_seq = td[1];
      p.block_table = block_table.typed_data();
      p.seq_lens = seq_lens.typed_data();
      if (p.page_size <= 0) return shape_error("page_size must be positive");
      break;
    }
    default: return shape_error("unknown kv_layout");
  }

  p.scale = a.scale;
  p.softcap = a.softcap;
  p.window_left = a.window_left;
  p.window_right = a.window_right;
  p.num_splits = a.num_splits;
  if (p.num_splits < 1) return shape_error("num_splits must be at least 1");

  // Results: out is q's shape (q's dtype), or float32 [num_splits, ...q] partials.
  const auto od = out.dimensions();
  const size_t lead = p.num_splits > 1 ? 1 : 0;
  if (od.size() != qd.size() + lead) return shape_error("out has an unexpected rank");
  if (lead && (od[0] != p.num_splits || out.element_type() != ffi::DataType::F32))
    return shape_error("split outputs must be float32 [num_splits, ...q.shape]");
  if (!lead && out.element_type() != q.element_type())
    return shape_error("out must have q's dtype");
  for (size_t i = 0; i < qd.size(); ++i)
    if (od[i + lead] != qd[i]) return shape_error("out shape differs from q's");
  if (int64_t(lse.element_count()) != p.num_splits * p.lse_size())
    return shape_error("lse has an unexpected size");
  return ffi::Error::Success();
}

}  // namespace jax_fmha
