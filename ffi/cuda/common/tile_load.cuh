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
// it. For pages, the CTA's threads check the ids together; every thread of the CTA must
// call this (it synchronizes).
__device__ __forceinline__ bool kv_keys_valid(const KvView& kv, int64_t b, const KeyRange& keys) {
  if (kv.layout != KvLayout::kPaged) return kv.valid(b);
  const int64_t n = kv.len(b);
  if (n < 0 || n > kv.capacity(b)) return false;
  const PageTable::Range pages = kv.pages.pages_of(keys.lo, keys.hi);
  const int32_t* ids = kv.pages.ids(b);
  bool bad_page = false;
#pragma unroll 4
  for (int page = pages.first + int(threadIdx.x); page < pages.last; page += blockDim.x)
    bad_page |= !kv.pages.id_valid(ids[page]);
  return !__syncthreads_or(bad_page);
}

// Where the tile's packed query rows live: row r of the tile is packed row row_begin + r of
// the sequence, i.e. query (row_begin + r) / group, head kv_head * group + (row_begin + r) %
// group. Rows at or past `rows` and columns past head_dim are zero-filled.
template <class Traits>
__device__ __forceinline__ void load_q_tile(typename Traits::Element* smem_q,
                                            const typename Traits::Element* q,
                                            const AttentionProblem& p, int64_t q_begin, int kv_head,
                                            int64_t row_begin, int rows) {
  constexpr int kChunks = Traits::kBlockM * Traits::kChunksPerRow;
  constexpr int kCopies = (kChunks + Traits::kThreads - 1) / Traits::kThreads;
  const int group = int(p.group());
#pragma unroll
  for (int it = 0; it < kCopies; ++it) {
    const int c = threadIdx.x + it * Traits::kThreads;
    if (kChunks % Traits::kThreads != 0 && c >= kChunks) break;  // (decode tile at d96)
    const int r = c / Traits::kChunksPerRow;
    const int col = (c % Traits::kChunksPerRow) * Traits::kChunk;
    const bool in_bounds = r < rows && col < p.head_dim;
    const typename Traits::Element* src = q;
    if (in_bounds) {
      const int64_t packed_row = row_begin + r;
      const int64_t i = packed_row / group;
      const int64_t head = int64_t(kv_head) * group + packed_row % group;
      src = q + ((q_begin + i) * p.num_q_heads + head) * p.head_dim + col;
    }
    copy_chunk(smem_q + Traits::q_offset(r, col), src, in_bounds);
  }
}

// Which tiles of a key block load_kv_tile copies.
enum class KvPart { kBoth, kKeys, kValues };

// The row of key `key` (below the sequence's capacity, page id valid) of sequence b in the
// K/V arrays.
__device__ __forceinline__ int64_t key_row(const AttentionProblem& p, int64_t b, int key) {
  if (p.kv.layout != KvLayout::kPaged) return p.kv.row(b, key);
  return p.kv.pages.row(b, key);
}

// Where a key block lies in the K/V arrays, for load_kv_tile: as kRuns runs of consecutive
// keys, each run in consecutive rows (run_row<kRunKeys>(i): the row of run i's first key;
// row<kRunKeys>(r): the row of the block's key r). Two kinds hold it: KeyBlockRows (below)
// and PagedRuns.
//
// KeyBlockRows: the first row of each run, in registers. One run covers the block in every
// layout but pages; pages that are a multiple of the run hold each run in one page. Looking
// the runs up a step ahead of the copies (key_block_rows) lets a kernel fetch a later
// block's page ids while it still computes, so that no copy waits for a block-table read.
template <int kRuns_>
struct KeyBlockRows {
  static constexpr int kRuns = kRuns_;
  int64_t first_row[kRuns];

  template <int kRunKeys>
  __device__ __forceinline__ int64_t run_row(int run) const {
    return first_row[run];
  }
  template <int kRunKeys>
  __device__ __forceinline__ int64_t row(int r) const {
    int64_t result = first_row[0] + r;
#pragma unroll
    for (int i = 1; i < kRuns; ++i)
      if (r >= i * kRunKeys) result = first_row[i] + (r - i * kRunKeys);
    return result;
  }
};

// PagedRuns: many runs (pages as small as a run) would take too many registers, so the page
// id of each run sits in shared memory instead, where stage_page_ids put it a step ahead.
// Reading it back costs a shared-memory load and the row arithmetic at every run's copies.
template <int kRuns_>
struct PagedRuns {
  static constexpr int kRuns = kRuns_;
  const int32_t* page_ids;  // shared memory: the page of each run of the block
  int page_size;
  int key_begin;  // the block's first key

  template <int kRunKeys>
  __device__ __forceinline__ int64_t run_row(int run) const {
    return PageTable::page_start(page_ids[run], page_size) +
           PageTable::key_in_page(key_begin + run * kRunKeys, page_size);
  }
  template <int kRunKeys>
  __device__ __forceinline__ int64_t row(int r) const {
    return run_row<kRunKeys>(r / kRunKeys) + r % kRunKeys;
  }
};

// Copies the page ids of the kRuns runs of kRunKeys keys from key_begin on (sequence b)
// into smem_ids: cp.async, 4 bytes for each of threads 0 .. kRuns - 1, in the caller's copy
// group. A run starting at or past key_end gets id 0 and is never read: its table entry
// may lie past the sequence's row of the block table, and is not touched.
template <int kRuns, int kRunKeys>
__device__ __forceinline__ void stage_page_ids(int32_t* smem_ids, const AttentionProblem& p,
                                               int64_t b, int key_begin, int key_end, int tid) {
  if (tid >= kRuns) return;
  const int key = key_begin + tid * kRunKeys;
  const bool in_bounds = key < key_end;
  const int32_t* src = p.kv.pages.block_table + (in_bounds ? p.kv.pages.entry(b, key) : 0);
  cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(
      *reinterpret_cast<const uint32_t*>(src), *reinterpret_cast<uint32_t*>(smem_ids + tid),
      in_bounds);
}

// The rows of the first keys of the runs of keys [key_begin, key_begin + kRuns * kRunKeys)
// of sequence b, key_begin below key_end (callers load only blocks that hold keys). A later
// run starting at or past key_end holds no key that is read: it is not looked up (its page
// id may lie past the block table). (Run 0 is looked up for any layout, contiguous runs or
// not: one read of a block-table entry the gather reads anyway, and ptxas allocates the
// portable kernel's registers without a spill this way.)
template <int kRuns, int kRunKeys>
__device__ __forceinline__ KeyBlockRows<kRuns> key_block_rows(const AttentionProblem& p, int64_t b,
                                                              int key_begin, int key_end) {
  KeyBlockRows<kRuns> rows;
  rows.first_row[0] = key_row(p, b, key_begin);
#pragma unroll
  for (int i = 1; i < kRuns; ++i) {
    const int key = key_begin + i * kRunKeys;
    rows.first_row[i] = key < key_end ? key_row(p, b, key) : 0;
  }
  return rows;
}

// Keys [key_begin, key_begin + kRows) of sequence b into one K and one V tile, the copies
// shared by kCopyThreads threads (this one is `tid`): the whole CTA for the prefill tile, one
// warp for a decode warp's own block. With `contiguous_runs`, `rows` says where the keys
// lie (KeyBlockRows, PagedRuns: runs of kRows / kRuns keys); otherwise each row is looked
// up through the block table as it is copied. Keys at or past key_end (the last key any
// row of the tile sees, at most the sequence length) are zero-filled, so that masked
// probabilities (exact zeros) never meet garbage values. kPart: K and V, or only one of
// them (the other pointer is then unused).
template <class Traits, int kRows, int kCopyThreads, KvPart kPart = KvPart::kBoth, class Rows>
__device__ __forceinline__ void load_kv_tile(typename Traits::Element* smem_k,
                                             typename Traits::Element* smem_v,
                                             const typename Traits::Element* k,
                                             const typename Traits::Element* v,
                                             const AttentionProblem& p, int64_t b, int kv_head,
                                             int key_begin, int key_end, bool contiguous_runs,
                                             const Rows& rows, int tid) {
  using Element = typename Traits::Element;
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kCopies = kRows * kChunksPerRow / kCopyThreads;
  constexpr int kRunKeys = kRows / Rows::kRuns;
  static_assert(kRows * kChunksPerRow % kCopyThreads == 0, "copies must split evenly");
  static_assert(kRows % Rows::kRuns == 0, "runs must split the block evenly");
  // This runs once per key block of the main loop with every register taken, so its
  // integer work is kept small: 32-bit page and bounds arithmetic, one 64-bit product per
  // run, and, where a copy pass covers whole rows of one run, one pointer step per copy.
  const int head_dim = int(p.head_dim);
  const int64_t row_stride = p.kv_row_stride();
  const int64_t head_offset = int64_t(kv_head) * head_dim;
  constexpr int kRowsPerPass = kCopyThreads / kChunksPerRow;
  if constexpr (kCopyThreads % kChunksPerRow == 0 && kRunKeys % kRowsPerPass == 0) {
    if (contiguous_runs) {  // a pass of the copy threads covers kRowsPerPass whole rows
      constexpr int kPassesPerRun = kRunKeys / kRowsPerPass;
      const int r = tid / kChunksPerRow;
      const int col = (tid % kChunksPerRow) * Traits::kChunk;
      const int64_t pass_stride = kRowsPerPass * row_stride;
      const bool col_in_bounds = col < head_dim;
      int64_t run_offset = 0;
#pragma unroll
      for (int it = 0; it < kCopies; ++it) {
        if (it % kPassesPerRun == 0)  // the thread's row in the next run
          run_offset = (rows.template run_row<kRunKeys>(it / kPassesPerRun) + r) * row_stride +
                       head_offset + col;
        const bool in_bounds = col_in_bounds && key_begin + r + it * kRowsPerPass < key_end;
        // Out of bounds nothing is read (zero fill); the address stays the array's start.
        const int64_t src = in_bounds ? run_offset + it % kPassesPerRun * pass_stride : 0;
        const int dst = Traits::kv_offset(r + it * kRowsPerPass, col);
        if constexpr (kPart != KvPart::kValues) copy_chunk(smem_k + dst, k + src, in_bounds);
        if constexpr (kPart != KvPart::kKeys) copy_chunk(smem_v + dst, v + src, in_bounds);
      }
      return;
    }
  }
  // General case: rows gathered through the block table one by one (pages smaller than a
  // run), or head dims whose rows do not split evenly over the copy threads.
  // (Fully unrolled, every copy's address is computed ahead and held: Traits::kGatherUnroll
  // bounds that where registers are short.)
  constexpr int kUnroll = Traits::kGatherUnroll < kCopies ? Traits::kGatherUnroll : kCopies;
#pragma unroll kUnroll
  for (int it = 0; it < kCopies; ++it) {
    const int c = tid + it * kCopyThreads;
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * Traits::kChunk;
    const int key = key_begin + r;
    const bool in_bounds = key < key_end && col < head_dim;
    int64_t src = 0;
    if (in_bounds)
      src = (contiguous_runs ? rows.template row<kRunKeys>(r) : key_row(p, b, key)) * row_stride +
            head_offset + col;
    const int dst = Traits::kv_offset(r, col);
    if constexpr (kPart != KvPart::kValues) copy_chunk(smem_k + dst, k + src, in_bounds);
    if constexpr (kPart != KvPart::kKeys) copy_chunk(smem_v + dst, v + src, in_bounds);
  }
}

}  // namespace jax_fmha::cuda
