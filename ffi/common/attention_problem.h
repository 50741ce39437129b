// One definition of the attention forward problem, shared by every backend.
//
// Every layout the Python API accepts is reduced to the same description:
//   * queries: sequence b owns rows [q_begin(b), q_begin(b) + q_len(b)) of a packed
//     [rows, Hq, D] array (a dense [B, Sq, Hq, D] array is packed with uniform starts);
//   * keys/values: key j of sequence b lives at row kv_row(b, j) of a [rows, Hkv, D] array
//     (dense, packed, a contiguous cache with per-sequence lengths, or pages through a
//     block table).
// The mask (causal bottom-right, sliding window) is a key interval per query row.
// Backends differ only in how they compute; they call these functions for the geometry.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FMHA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FMHA_HOST_DEVICE inline
#endif

namespace jax_fmha {

enum class KvLayout : int32_t {
  kUniform = 0,  // [B, Sk, Hkv, D], every sequence has Sk keys
  kPacked = 1,   // [Tk, Hkv, D] with cu_seqlens_k
  kCache = 2,    // [B, S_max, Hkv, D] with seq_lens: the first seq_lens[b] keys count
  kPaged = 3,    // pages [P, page_size, Hkv, D] with block_table [B, M] and seq_lens
};

struct AttentionProblem {
  // ---- sizes ----
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t q_rows = 0;        // rows of the packed query view (B*Sq dense, Tq packed)
  int64_t max_seqlen_q = 0;  // static bound on q_len(b); backends size their grids with it

  // ---- queries ----
  bool q_packed = false;
  int64_t uniform_seqlen_q = 0;          // dense: Sq
  const int32_t* cu_seqlens_q = nullptr;  // packed: [B + 1]

  // ---- keys / values ----
  KvLayout kv_layout = KvLayout::kUniform;
  int64_t kv_rows = 0;                    // rows of the [rows, Hkv, D] view of k and v
  int64_t uniform_seqlen_k = 0;           // kUniform: Sk; kCache: S_max
  const int32_t* cu_seqlens_k = nullptr;  // kPacked: [B + 1]
  const int32_t* seq_lens = nullptr;      // kCache, kPaged: [B]
  const int32_t* block_table = nullptr;   // kPaged: [B, pages_per_seq]
  int64_t pages_per_seq = 0;
  int64_t page_size = 0;
  int64_t num_pages = 0;

  // ---- score transform and mask ----
  float scale = 1.f;
  float softcap = 0.f;     // > 0: s = softcap * tanh(s / softcap)
  int64_t window_left = -1;   // -1: unbounded
  int64_t window_right = -1;  // -1: unbounded; causal is window_right = 0

  // ---- split-KV ----
  int64_t num_splits = 1;

  // ---- strides of the [rows, heads, D] views (elements) ----
  int64_t q_row_stride() const { return num_q_heads * head_dim; }
  int64_t kv_row_stride() const { return num_kv_heads * head_dim; }

  FMHA_HOST_DEVICE int64_t q_begin(int64_t b) const {
    return q_packed ? cu_seqlens_q[b] : b * uniform_seqlen_q;
  }
  FMHA_HOST_DEVICE int64_t q_len(int64_t b) const {
    return q_packed ? int64_t(cu_seqlens_q[b + 1]) - cu_seqlens_q[b] : uniform_seqlen_q;
  }
  FMHA_HOST_DEVICE int64_t k_len(int64_t b) const {
    switch (kv_layout) {
      case KvLayout::kUniform: return uniform_seqlen_k;
      case KvLayout::kPacked: return int64_t(cu_seqlens_k[b + 1]) - cu_seqlens_k[b];
      default: return seq_lens[b];
    }
  }
  // Row of key j (0 <= j < k_len(b)) of sequence b in the [kv_rows, Hkv, D] view.
  FMHA_HOST_DEVICE int64_t kv_row(int64_t b, int64_t j) const {
    switch (kv_layout) {
      case KvLayout::kUniform:
      case KvLayout::kCache: return b * uniform_seqlen_k + j;
      case KvLayout::kPacked: return cu_seqlens_k[b] + j;
      default:
        return int64_t(block_table[b * pages_per_seq + j / page_size]) * page_size +
               j % page_size;
    }
  }

  // Device-side data is never trusted: a sequence whose query rows, key rows or pages fall
  // outside their arrays, or whose length exceeds the static bound, is not computed. Its
  // output rows are set to NaN (queries valid, keys not) or left to the uncovered-row pass.
  FMHA_HOST_DEVICE bool q_valid(int64_t b) const {
    const int64_t begin = q_begin(b), len = q_len(b);
    return begin >= 0 && len >= 0 && begin + len <= q_rows && len <= max_seqlen_q;
  }
  FMHA_HOST_DEVICE bool kv_valid(int64_t b) const {
    switch (kv_layout) {
      case KvLayout::kUniform: return true;
      case KvLayout::kPacked: {
        const int64_t begin = cu_seqlens_k[b], end = cu_seqlens_k[b + 1];
        return begin >= 0 && begin <= end && end <= kv_rows;
      }
      case KvLayout::kCache: return seq_lens[b] >= 0 && seq_lens[b] <= uniform_seqlen_k;
      default: {
        const int64_t len = seq_lens[b];
        if (len < 0 || len > pages_per_seq * page_size) return false;
        for (int64_t page = 0; page * page_size < len; ++page) {
          const int32_t id = block_table[b * pages_per_seq + page];
          if (id < 0 || id >= num_pages) return false;
        }
        return true;
      }
    }
  }

  // LSE layout: dense [B, Hq, Sq], packed [Hq, Tq].
  FMHA_HOST_DEVICE int64_t lse_index(int64_t b, int64_t h, int64_t i) const {
    return q_packed ? h * q_rows + cu_seqlens_q[b] + i
                    : (b * num_q_heads + h) * uniform_seqlen_q + i;
  }
  FMHA_HOST_DEVICE int64_t lse_size() const { return num_q_heads * q_rows; }
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

// Keys of sequence b handled by split s of num_splits: contiguous, nearly equal chunks of
// whole blocks of `block` keys, so that splits never share a block.
FMHA_HOST_DEVICE KeyRange split_keys(int64_t sk, int64_t split, int64_t num_splits,
                                     int64_t block) {
  const int64_t blocks = (sk + block - 1) / block;
  const int64_t per_split = (blocks + num_splits - 1) / num_splits;
  int64_t lo = split * per_split * block;
  int64_t hi = lo + per_split * block;
  lo = lo > sk ? sk : lo;
  hi = hi > sk ? sk : hi;
  return {lo, hi};
}

}  // namespace jax_fmha
