// One definition of the attention problem, shared by every backend and every op.
//
// Every layout the Python API accepts is reduced to two views:
//   * SeqRows: B sequences stored as rows of a [rows, heads, D] array, either dense (a
//     [B, S, heads, D] array: uniform starts) or packed (cu_seqlens prefix sums). Queries,
//     packed keys and newly appended tokens are all SeqRows.
//   * KvView: where key j of sequence b lives: dense, packed, a contiguous cache with
//     per-sequence lengths, or pages through a block table.
// The mask (causal bottom-right, sliding window) is a key interval per query row.
// Backends differ only in how they compute; they call these functions for the geometry.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/page_table.h"

namespace jax_fmha {

// Sequences as rows of a [rows, heads, D] array.
struct SeqRows {
  bool packed = false;
  int64_t uniform_len = 0;              // dense: S (sequence b owns rows b*S ... b*S + S)
  const int32_t* cu_seqlens = nullptr;  // packed: [B + 1]
  int64_t rows = 0;                     // rows of the array
  int64_t max_len = 0;                  // static bound on len(b)

  FMHA_HOST_DEVICE int64_t begin(int64_t b) const {
    return packed ? cu_seqlens[b] : b * uniform_len;
  }
  FMHA_HOST_DEVICE int64_t len(int64_t b) const {
    return packed ? int64_t(cu_seqlens[b + 1]) - cu_seqlens[b] : uniform_len;
  }
  // Device-side data is never trusted: rows out of the array, or a length over the static
  // bound (backends size their grids with it), make the sequence invalid.
  FMHA_HOST_DEVICE bool valid(int64_t b) const {
    const int64_t first = begin(b), n = len(b);
    return first >= 0 && n >= 0 && first + n <= rows && n <= max_len;
  }
};

enum class KvLayout : int32_t {
  kUniform = 0,  // [B, Sk, Hkv, D], every sequence has Sk keys
  kPacked = 1,   // [Tk, Hkv, D] with cu_seqlens_k
  kCache = 2,    // [B, S_max, Hkv, D] with seq_lens: the first seq_lens[b] keys count
  kPaged = 3,    // pages [P, page_size, Hkv, D] with block_table [B, M] and seq_lens
};

// Keys (and values: same layout) of B sequences.
struct KvView {
  KvLayout layout = KvLayout::kUniform;
  SeqRows seqs;                       // kUniform, kPacked; kCache: uniform_len = S_max
  const int32_t* seq_lens = nullptr;  // kCache, kPaged: [B]
  PageTable pages;                    // kPaged
  int64_t rows = 0;  // rows of the [rows, Hkv, D] view of the array (num_pages * page_size)

  FMHA_HOST_DEVICE bool has_seq_lens() const {
    return layout == KvLayout::kCache || layout == KvLayout::kPaged;
  }
  FMHA_HOST_DEVICE int64_t len(int64_t b) const {
    return has_seq_lens() ? int64_t(seq_lens[b]) : seqs.len(b);
  }
  // Keys sequence b can hold (caches); its length for the other layouts.
  FMHA_HOST_DEVICE int64_t capacity(int64_t b) const {
    if (layout == KvLayout::kPaged) return pages.capacity();
    if (layout == KvLayout::kCache) return seqs.uniform_len;
    return seqs.len(b);
  }
  // A bound on len(b) over the valid sequences.
  FMHA_HOST_DEVICE int64_t max_len() const {
    if (layout == KvLayout::kPaged) return pages.capacity();
    return layout == KvLayout::kPacked ? seqs.max_len : seqs.uniform_len;
  }
  // Row of key j (0 <= j < capacity(b), page id valid) of sequence b.
  FMHA_HOST_DEVICE int64_t row(int64_t b, int64_t j) const {
    if (layout == KvLayout::kPaged) return pages.row(b, int(j));
    return seqs.begin(b) + j;
  }
  // Whether keys [i n, i n + n) lie in consecutive rows for every i (all but small pages).
  FMHA_HOST_DEVICE bool runs_contiguous(int64_t n) const {
    return layout != KvLayout::kPaged || pages.runs_contiguous(n);
  }
  // Whether every key of sequence b lies inside the array. Reads the page ids of the
  // sequence: a backend calls it once per sequence (or shares the work across a block).
  FMHA_HOST_DEVICE bool valid(int64_t b) const {
    switch (layout) {
      case KvLayout::kUniform: return true;
      case KvLayout::kPacked: {
        const int64_t first = seqs.begin(b), n = seqs.len(b);
        return first >= 0 && n >= 0 && first + n <= rows;
      }
      case KvLayout::kCache: return seq_lens[b] >= 0 && seq_lens[b] <= seqs.uniform_len;
      default: {
        const int64_t n = seq_lens[b];
        return n >= 0 && n <= capacity(b) && pages.ids_valid(b, n);
      }
    }
  }
};

struct AttentionProblem {
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  SeqRows q;
  KvView kv;

  // Score transform and mask.
  float scale = 1.f;
  float softcap = 0.f;        // > 0: s = softcap * tanh(s / softcap)
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded; causal is window_right = 0

  int64_t num_splits = 1;  // split-KV: partial outputs and LSEs per split

  // FP8 q, k, v: float32 [B, Hkv] dequantization scales (common/attention_ffi.h); nullptr
  // for an operand that is not FP8. A tile is one sequence and KV head: one scale each.
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;

  FMHA_HOST_DEVICE int64_t group() const { return num_q_heads / num_kv_heads; }
  // The score scale of sequence b and KV head h: scale times the FP8 scales of q and k
  // (docs/design/fp8_attention.md).
  FMHA_HOST_DEVICE float score_scale(int64_t b, int64_t h) const {
    float s = scale;
    if (q_scale != nullptr) s *= q_scale[b * num_kv_heads + h];
    if (k_scale != nullptr) s *= k_scale[b * num_kv_heads + h];
    return s;
  }
  // The factor of the output of sequence b and KV head h: FP8 v's scale, else 1.
  FMHA_HOST_DEVICE float value_scale(int64_t b, int64_t h) const {
    return v_scale != nullptr ? v_scale[b * num_kv_heads + h] : 1.f;
  }
  FMHA_HOST_DEVICE int64_t q_row_stride() const { return num_q_heads * head_dim; }
  FMHA_HOST_DEVICE int64_t kv_row_stride() const { return num_kv_heads * head_dim; }

  // LSE layout: dense [B, Hq, Sq], packed [Hq, Tq]; per split, lse_size() apart.
  FMHA_HOST_DEVICE int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return q.packed ? h * q.rows + q.cu_seqlens[b] + i : (b * num_q_heads + h) * q.uniform_len + i;
  }
  FMHA_HOST_DEVICE int64_t lse_size() const { return num_q_heads * q.rows; }
};

// Keys visible to query i of a sequence with sq queries and sk keys: [lo, hi), clipped to
// [0, sk). Bottom-right alignment: query i sits at key position i + sk - sq.
struct KeyRange {
  int64_t lo, hi;
  FMHA_HOST_DEVICE bool empty() const { return hi <= lo; }
};

FMHA_HOST_DEVICE KeyRange visible_keys(const AttentionProblem& p, int64_t i, int64_t sq,
                                       int64_t sk) {
  const int64_t diag = i + sk - sq;
  int64_t lo = p.window_left < 0 ? 0 : diag - p.window_left;
  int64_t hi = p.window_right < 0 ? sk : diag + p.window_right + 1;
  lo = lo < 0 ? 0 : lo;
  hi = hi > sk ? sk : hi;
  return {lo, hi};
}

// Keys of a sequence with sk keys handled by split s of num_splits: contiguous, nearly
// equal chunks of whole blocks of `block` keys, so that splits never share a block. Splits
// past the end are empty (their partial LSE is -inf and weighs nothing in the merge).
FMHA_HOST_DEVICE KeyRange split_keys(int64_t sk, int64_t split, int64_t num_splits, int64_t block) {
  const int64_t blocks = (sk + block - 1) / block;
  const int64_t per_split = (blocks + num_splits - 1) / num_splits;
  int64_t lo = split * per_split * block;
  int64_t hi = lo + per_split * block;
  lo = lo > sk ? sk : lo;
  hi = hi > sk ? sk : hi;
  return {lo, hi};
}

}  // namespace jax_fmha
