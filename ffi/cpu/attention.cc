// CPU flash-attention forward: blocked, online softmax, float32 statistics and accumulators,
// O(block) extra memory (the Sq x Sk score matrix is never formed).
//
// Work item = (split, sequence, KV head, block of query rows). The query heads that share a
// KV head are interleaved into the rows of one tile (row r -> query r / group, head
// r % group), so each key and value row converted to float32 serves every head of the group:
// decoding (one query, GQA) fills a tile instead of running one row per item.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/attention_ffi.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

constexpr int64_t kBlockRows = 32;  // query rows (of all heads of a group) per tile
constexpr int64_t kBlockKeys = 64;  // keys per step of the online softmax
constexpr int64_t kMaxHeadDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
}

template <typename T, typename OutT>
struct Kernel {
  const AttentionProblem& p;
  const T* q;
  const T* k;
  const T* v;
  OutT* out;  // [num_splits?] x q shape
  float* lse;
  int64_t group;   // query heads per KV head
  int64_t blocks;  // row blocks per (sequence, KV head)

  int64_t items() const { return p.num_splits * p.batch * p.num_kv_heads * blocks; }

  void operator()(int64_t item) const {
    const int64_t block = item % blocks;
    const int64_t kvh = (item / blocks) % p.num_kv_heads;
    const int64_t b = (item / blocks / p.num_kv_heads) % p.batch;
    const int64_t split = item / blocks / p.num_kv_heads / p.batch;
    if (!p.q.valid(b)) return;  // see write_rows_outside_sequences
    const int64_t sq = p.q.len(b);
    const int64_t row_begin = block * kBlockRows;
    const int64_t rows = std::min(kBlockRows, sq * group - row_begin);
    if (rows <= 0) return;
    if (!p.kv.valid(b)) return write_nan(split, b, kvh, row_begin, rows);
    run_tile(split, b, kvh, row_begin, rows);
  }

  // Element offset of (split, query row, head) in out, and of the matching LSE entry.
  int64_t out_offset(int64_t split, int64_t row, int64_t h) const {
    return (split * p.q.rows + row) * p.q_row_stride() + h * p.head_dim;
  }
  int64_t lse_offset(int64_t split, int64_t b, int64_t h, int64_t i) const {
    return split * p.lse_size() + p.lse_index(b, h, i);
  }

  void write_nan(int64_t split, int64_t b, int64_t kvh, int64_t row_begin, int64_t rows) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t r = row_begin; r < row_begin + rows; ++r) {
      const int64_t i = r / group, h = kvh * group + r % group;
      OutT* o = out + out_offset(split, p.q.begin(b) + i, h);
      for (int64_t d = 0; d < p.head_dim; ++d) o[d] = from_float<OutT>(nan);
      lse[lse_offset(split, b, h, i)] = nan;
    }
  }

  void run_tile(int64_t split, int64_t b, int64_t kvh, int64_t row_begin, int64_t rows) const {
    const int64_t D = p.head_dim;
    const int64_t sq = p.q.len(b), sk = p.kv.len(b);
    const KeyRange split_range = split_keys(sk, split, p.num_splits, kBlockKeys);

    alignas(64) float q_tile[kBlockRows * kMaxHeadDim];
    alignas(64) float acc[kBlockRows * kMaxHeadDim];
    alignas(64) float scores[kBlockRows * kBlockKeys];
    alignas(64) float key[kMaxHeadDim];
    float row_max[kBlockRows], row_sum[kBlockRows];
    int64_t key_lo[kBlockRows], key_hi[kBlockRows];

    // Load the tile's queries (scale folded in), their visible keys, and reset statistics.
    int64_t lo = sk, hi = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = (row_begin + r) / group, h = kvh * group + (row_begin + r) % group;
      const T* src = q + (p.q.begin(b) + i) * p.q_row_stride() + h * D;
      for (int64_t d = 0; d < D; ++d) q_tile[r * D + d] = to_float(src[d]) * p.scale;
      KeyRange keys = visible_keys(p, i, sq, sk);
      keys.lo = std::max(keys.lo, split_range.lo);
      keys.hi = std::min(keys.hi, split_range.hi);
      key_lo[r] = keys.lo;
      key_hi[r] = keys.hi;
      if (!keys.empty()) lo = std::min(lo, keys.lo), hi = std::max(hi, keys.hi);
      row_max[r] = kNegInf;
      row_sum[r] = 0.f;
      std::fill(acc + r * D, acc + (r + 1) * D, 0.f);
    }

    const int64_t kv_stride = p.kv_row_stride();
    for (int64_t j0 = lo; j0 < hi; j0 += kBlockKeys) {
      const int64_t n = std::min(kBlockKeys, hi - j0);
      // Scores of this key block for every row of the tile.
      for (int64_t j = 0; j < n; ++j) {
        load_row(k + p.kv.row(b, j0 + j) * kv_stride + kvh * D, key, D);
        for (int64_t r = 0; r < rows; ++r) scores[r * kBlockKeys + j] = dot(q_tile + r * D, key, D);
      }
      // Softcap, mask, online softmax update.
      for (int64_t r = 0; r < rows; ++r) {
        float* s = scores + r * kBlockKeys;
        float block_max = kNegInf;
        for (int64_t j = 0; j < n; ++j) {
          float x = s[j];
          if (p.softcap > 0.f) x = p.softcap * std::tanh(x / p.softcap);
          const int64_t key_pos = j0 + j;
          if (key_pos < key_lo[r] || key_pos >= key_hi[r]) x = kNegInf;
          s[j] = x;
          block_max = std::max(block_max, x);
        }
        const float new_max = std::max(row_max[r], block_max);
        if (new_max == kNegInf) {  // nothing visible yet: probabilities are all zero
          for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
          continue;
        }
        const float correction = std::exp(row_max[r] - new_max);  // exp(-inf) = 0 first time
        float block_sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = std::exp(s[j] - new_max);
          block_sum += s[j];
        }
        row_max[r] = new_max;
        row_sum[r] = row_sum[r] * correction + block_sum;
        if (correction != 1.f) {
          float* a = acc + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] *= correction;
        }
      }
      // acc += P V, one value row (converted once) at a time for all rows.
      for (int64_t j = 0; j < n; ++j) {
        load_row(v + p.kv.row(b, j0 + j) * kv_stride + kvh * D, key, D);
        for (int64_t r = 0; r < rows; ++r) {
          const float w = scores[r * kBlockKeys + j];
          if (w == 0.f) continue;
          float* a = acc + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * key[d];
        }
      }
    }

    // Normalize and store. A row that saw no key gets 0 and LSE -inf.
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = (row_begin + r) / group, h = kvh * group + (row_begin + r) % group;
      const bool seen = row_sum[r] > 0.f;
      const float inv = seen ? 1.f / row_sum[r] : 0.f;
      OutT* o = out + out_offset(split, p.q.begin(b) + i, h);
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<OutT>(acc[r * D + d] * inv);
      lse[lse_offset(split, b, h, i)] = seen ? row_max[r] + std::log(row_sum[r]) : kNegInf;
    }
  }

  // Packed queries: rows before cu_seqlens_q[0] or after cu_seqlens_q[B] belong to no
  // sequence and get 0 with LSE -inf; the rows of a sequence whose query range is invalid
  // (out of bounds, or longer than max_seqlen_q) get NaN. With non-decreasing cu_seqlens_q
  // this writes every row that no tile writes.
  void write_rows_outside_sequences() const {
    if (!p.q.packed) return;
    const auto clamp = [&](int64_t row) { return std::clamp<int64_t>(row, 0, p.q.rows); };
    fill_rows(0, clamp(p.q.cu_seqlens[0]), 0.f, kNegInf);
    fill_rows(clamp(p.q.cu_seqlens[p.batch]), p.q.rows, 0.f, kNegInf);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t b = 0; b < p.batch; ++b)
      if (!p.q.valid(b)) fill_rows(clamp(p.q.cu_seqlens[b]), clamp(p.q.cu_seqlens[b + 1]), nan, nan);
  }

  void fill_rows(int64_t row_begin, int64_t row_end, float value, float lse_value) const {
    for (int64_t split = 0; split < p.num_splits; ++split)
      for (int64_t row = row_begin; row < row_end; ++row)
        for (int64_t h = 0; h < p.num_q_heads; ++h) {
          OutT* o = out + out_offset(split, row, h);
          for (int64_t d = 0; d < p.head_dim; ++d) o[d] = from_float<OutT>(value);
          lse[split * p.lse_size() + h * p.q.rows + row] = lse_value;
        }
  }
};

template <typename T, typename OutT>
void run(xla::ffi::ThreadPool& pool, const AttentionProblem& p, const void* q, const void* k,
         const void* v, void* out, float* lse) {
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const Kernel<T, OutT> kernel{p,
                               static_cast<const T*>(q),
                               static_cast<const T*>(k),
                               static_cast<const T*>(v),
                               static_cast<OutT*>(out),
                               lse,
                               group,
                               (p.q.max_len * group + kBlockRows - 1) / kBlockRows};
  kernel.write_rows_outside_sequences();
  parallel_for(pool, kernel.items(), kernel);
}

template <typename T>
void run_for_output(xla::ffi::ThreadPool& pool, const AttentionProblem& p, const void* q,
                    const void* k, const void* v, void* out, float* lse) {
  // Split-KV partial outputs are float32; otherwise the output has the input dtype.
  if (p.num_splits > 1) return run<T, float>(pool, p, q, k, v, out, lse);
  return run<T, T>(pool, p, q, k, v, out, lse);
}

xla::ffi::Error attention_cpu(xla::ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                              ffi::AnyBuffer v, ffi::Buffer<ffi::S32> cu_seqlens_q,
                              ffi::Buffer<ffi::S32> cu_seqlens_k, ffi::Buffer<ffi::S32> seq_lens,
                              ffi::Buffer<ffi::S32> block_table, ffi::Result<ffi::AnyBuffer> out,
                              ffi::Result<ffi::Buffer<ffi::F32>> lse, float scale, float softcap,
                              int32_t window_left, int32_t window_right, int32_t kv_layout,
                              int32_t num_splits, int32_t max_seqlen_q) {
  AttentionProblem p;
  const AttentionAttrs attrs{scale,     softcap,    window_left, window_right,
                             kv_layout, num_splits, max_seqlen_q};
  if (auto err = decode_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, seq_lens, block_table,
                                  *out, *lse, attrs, p);
      !err.success())
    return err;
  const void* qp = q.untyped_data();
  const void* kp = k.untyped_data();
  const void* vp = v.untyped_data();
  void* op = out->untyped_data();
  float* lp = lse->typed_data();
  switch (q.element_type()) {
    case ffi::DataType::F32: run_for_output<float>(pool, p, qp, kp, vp, op, lp); break;
    case ffi::DataType::BF16: run_for_output<bf16>(pool, p, qp, kp, vp, op, lp); break;
    case ffi::DataType::F16: run_for_output<f16>(pool, p, qp, kp, vp, op, lp); break;
    default: return shape_error("unsupported dtype (float32, bfloat16, float16)");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFmhaAttentionCpu, jax_fmha::cpu::attention_cpu,
                              jax_fmha::bind_attention(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
