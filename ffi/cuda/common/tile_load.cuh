// Global -> shared memory: the query tile and the K/V tiles (cp.async, 16 bytes a thread,
// zero-filled where a row or column lies outside the problem), and the check that a
// sequence's keys lie inside the arrays before any of them is read.
#pragma once

#include <cute/arch/copy_sm80.hpp>

#include "common/attention_problem.h"

namespace jax_fmha::cuda {

// Copies 16 bytes, or writes 16 zero bytes when `in_bounds` is false (nothing is read then).
template <typename Element>
__device__ __forceinline__ void copy_chunk(Element* smem_dst, const Element* gmem_src,
                                           bool in_bounds) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(gmem_src),
      *reinterpret_cast<cute::uint128_t*>(smem_dst), in_bounds);
}

// Whether sequence b fits its storage (KvView::valid), checking the page ids of the keys in
// `keys` only: a split reads the pages of its own keys, not the 8192 ids of a 128k-key
// sequence at page 16. A bad page id in another split's keys still turns every row of the
// sequence into NaN, as on the CPU: that split's partial LSE is NaN, and the merge spreads
// it. For pages, `threads` threads (this one is `tid`) check the ids together and any_of
// (a barrier or a warp vote over them) combines their verdicts; each of them must call this.
template <class AnyOf>
__device__ __forceinline__ bool kv_keys_valid(const KvView& kv, int64_t b, const KeyRange& keys,
                                              int tid, int threads, AnyOf any_of) {
  if (kv.layout != KvLayout::kPaged) return kv.valid(b);
  const int64_t n = kv.len(b);
  if (n < 0 || n > kv.capacity(b)) return false;
  const PageTable::Range pages = kv.pages.pages_of(keys.lo, keys.hi);
  const int32_t* ids = kv.pages.ids(b);
  bool bad_page = false;
#pragma unroll 4
  for (int page = pages.first + tid; page < pages.last; page += threads)
    bad_page |= !kv.pages.id_valid(ids[page]);
  return !any_of(bad_page);
}

// Whether the query tile's shared-memory offsets repeat every `rows` rows, one fixed number of
// elements further, for every row and chunk column of the tile (padded rows: any `rows`; a
// swizzled tile: a multiple of the swizzle pattern's rows).
template <class Traits>
__host__ __device__ constexpr bool q_rows_repeat(int rows) {
  const int step = Traits::q_offset(rows, 0) - Traits::q_offset(0, 0);
  for (int r = 0; r + rows < Traits::kBlockM; ++r)
    for (int col = 0; col < Traits::kChunksPerRow * Traits::kChunk; col += Traits::kChunk)
      if (Traits::q_offset(r + rows, col) != Traits::q_offset(r, col) + step) return false;
  return true;
}

// The fewest copy passes of kRowsPerPass rows after which the offsets repeat (q_rows_repeat),
// at most kPasses; 0 if none.
template <class Traits, int kRowsPerPass, int kPasses>
__host__ __device__ constexpr int q_offset_period() {
  for (int passes = 1; passes <= kPasses && kRowsPerPass * passes < Traits::kBlockM; ++passes)
    if (q_rows_repeat<Traits>(kRowsPerPass * passes)) return passes;
  return 0;
}

// Where the tile's packed query rows live: row r of the tile is packed row row_begin + r of
// the sequence, i.e. query (row_begin + r) / group, head kv_head * group + (row_begin + r) %
// group. Rows at or past `rows` and columns past head_dim are zero-filled. The caller's
// kCopyThreads threads (this one is `tid`) copy kRows rows of the tile from row first_row on.
template <class Traits, int kRows = Traits::kBlockM, int kCopyThreads = Traits::kThreads,
          typename QElement>
__device__ __forceinline__ void load_q_tile(QElement* smem_q, const QElement* q,
                                            const AttentionProblem& p, int64_t q_begin, int kv_head,
                                            int64_t row_begin, int rows, int first_row = 0,
                                            int tid = threadIdx.x) {
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kChunks = kRows * kChunksPerRow;
  constexpr int kCopies = (kChunks + kCopyThreads - 1) / kCopyThreads;
  const int group = int(p.group());
  constexpr int kRowsPerPass = kCopyThreads / kChunksPerRow;
  constexpr bool kWholeRows = kCopyThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0;
  if constexpr (kWholeRows && q_offset_period<Traits, kRowsPerPass, kCopies>() > 0) {
    // A pass of the copy threads covers kRowsPerPass whole rows, and this thread copies the
    // same column of a row kRowsPerPass rows further each pass: its shared-memory offsets are
    // kPeriod bases plus a compile-time step, and its source is one pointer moved a packed
    // row step at a time (no division or 64-bit product per copy).
    constexpr int kPeriod = q_offset_period<Traits, kRowsPerPass, kCopies>();
    constexpr int kStep = Traits::q_offset(kRowsPerPass * kPeriod, 0) - Traits::q_offset(0, 0);
    const int r = first_row + tid / kChunksPerRow;
    const int col = (tid % kChunksPerRow) * Traits::kChunk;
    QElement* dst[kPeriod];
#pragma unroll
    for (int j = 0; j < kPeriod; ++j) dst[j] = smem_q + Traits::q_offset(r + j * kRowsPerPass, col);
    // 32-bit division: packed rows stay under 2^31 (launch_forward checks).
    const int packed_row = int(row_begin) + r;
    int head = packed_row % group;  // within the group
    const int64_t head_stride = p.head_dim, query_stride = p.num_q_heads * p.head_dim;
    const QElement* src =
        q +
        ((q_begin + packed_row / group) * p.num_q_heads + kv_head * group + head) * head_stride +
        col;
    // A pass moves kRowsPerPass packed rows on: pass_queries queries and pass_heads heads,
    // one query more (and group heads fewer) where the heads wrap.
    const int pass_queries = kRowsPerPass / group, pass_heads = kRowsPerPass % group;
    const int64_t pass_step = pass_queries * query_stride + pass_heads * head_stride;
    const int64_t wrap_step = query_stride - group * head_stride;
    const bool col_in_bounds = col < p.head_dim;
#pragma unroll
    for (int it = 0; it < kCopies; ++it) {
      const bool in_bounds = col_in_bounds && r + it * kRowsPerPass < rows;
      // Out of bounds nothing is read (zero fill); the address stays the array's start.
      copy_chunk(dst[it % kPeriod] + it / kPeriod * kStep, in_bounds ? src : q, in_bounds);
      src += pass_step;
      head += pass_heads;
      if (head >= group) {
        head -= group;
        src += wrap_step;
      }
    }
  } else {
#pragma unroll
    for (int it = 0; it < kCopies; ++it) {
      const int c = tid + it * kCopyThreads;
      if (kChunks % kCopyThreads != 0 && c >= kChunks) break;  // (decode tile at d96)
      const int r = first_row + c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * Traits::kChunk;
      const bool in_bounds = r < rows && col < p.head_dim;
      const QElement* src = q;
      if (in_bounds) {
        // 32-bit division: packed rows stay under 2^31 (launch_forward checks).
        const int packed_row = int(row_begin) + r;
        const int i = packed_row / group;
        const int head = kv_head * group + packed_row % group;
        src = q + ((q_begin + i) * p.num_q_heads + head) * p.head_dim + col;
      }
      copy_chunk(smem_q + Traits::q_offset(r, col), src, in_bounds);
    }
  }
}

// The row of key `key` (below the sequence's capacity, page id valid) of sequence b in the
// K/V arrays.
__device__ __forceinline__ int64_t key_row(const AttentionProblem& p, int64_t b, int key) {
  if (p.kv.layout != KvLayout::kPaged) return p.kv.row(b, key);
  return p.kv.pages.row(b, key);
}

// Keys [key_begin, key_begin + kRows) of sequence b into one K and one V tile (of the K/V
// storage type: 16 bytes are 8 bfloat16/float16 or 16 FP8 elements of a row), the copies
// shared by kCopyThreads threads (this one is `tid`): the whole CTA for the prefill tile, one
// warp for a decode warp's own block. With `contiguous_rows`, the block's keys lie in
// consecutive rows from first_row on (every layout but pages smaller than the block);
// otherwise each row is looked up through the block table as it is copied. (Callers look
// first_row up for any layout: one read of a block-table entry the gather reads anyway, and
// ptxas allocates the portable kernel's registers without a spill this way.) Keys at or past
// key_end (the last key any row of the tile sees, at most the sequence length) are
// zero-filled, so that masked probabilities (exact zeros) never meet garbage values.
template <class Traits, int kRows, int kCopyThreads>
__device__ __forceinline__ void load_kv_tile(typename Traits::KvElement* smem_k,
                                             typename Traits::KvElement* smem_v,
                                             const typename Traits::KvElement* k,
                                             const typename Traits::KvElement* v,
                                             const AttentionProblem& p, int64_t b, int kv_head,
                                             int key_begin, int key_end, bool contiguous_rows,
                                             int64_t first_row, int tid) {
  constexpr int kChunksPerRow = Traits::kKvChunksPerRow;
  constexpr int kCopies = kRows * kChunksPerRow / kCopyThreads;
  static_assert(kRows * kChunksPerRow % kCopyThreads == 0, "copies must split evenly");
  // This runs once per key block of the main loop with every register taken, so its
  // integer work is kept small: 32-bit page and bounds arithmetic, one 64-bit product per
  // block, and, where a copy pass covers whole rows, one pointer step per copy.
  const int head_dim = int(p.head_dim);
  const int64_t row_stride = p.kv_row_stride();
  const int64_t head_offset = int64_t(kv_head) * head_dim;
  constexpr int kRowsPerPass = kCopyThreads / kChunksPerRow;
  if constexpr (kCopyThreads % kChunksPerRow == 0 && kRows % kRowsPerPass == 0) {
    if (contiguous_rows) {  // a pass of the copy threads covers kRowsPerPass whole rows
      const int r = tid / kChunksPerRow;
      const int col = (tid % kChunksPerRow) * Traits::kKvChunk;
      const int64_t pass_stride = kRowsPerPass * row_stride;
      const bool col_in_bounds = col < head_dim;
      const int64_t offset = (first_row + r) * row_stride + head_offset + col;
#pragma unroll
      for (int it = 0; it < kCopies; ++it) {
        const bool in_bounds = col_in_bounds && key_begin + r + it * kRowsPerPass < key_end;
        // Out of bounds nothing is read (zero fill); the address stays the array's start.
        const int64_t src = in_bounds ? offset + it * pass_stride : 0;
        const int dst = Traits::kv_offset(r + it * kRowsPerPass, col);
        copy_chunk(smem_k + dst, k + src, in_bounds);
        copy_chunk(smem_v + dst, v + src, in_bounds);
      }
      return;
    }
  }
  // General case: rows gathered through the block table one by one (pages smaller than the
  // block), or head dims whose rows do not split evenly over the copy threads.
#pragma unroll kCopies
  for (int it = 0; it < kCopies; ++it) {
    const int c = tid + it * kCopyThreads;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * Traits::kKvChunk;
    const int key = key_begin + r;
    const bool in_bounds = key < key_end && col < head_dim;
    int64_t src = 0;
    if (in_bounds)
      src = (contiguous_rows ? first_row + r : key_row(p, b, key)) * row_stride + head_offset + col;
    const int dst = Traits::kv_offset(r, col);
    copy_chunk(smem_k + dst, k + src, in_bounds);
    copy_chunk(smem_v + dst, v + src, in_bounds);
  }
}

}  // namespace jax_fmha::cuda
