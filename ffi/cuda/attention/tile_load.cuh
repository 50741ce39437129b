// Global -> shared memory: the query tile and the K/V tiles (cp.async, 16 bytes a thread,
// zero-filled where a row or column lies outside the problem), and the check that a
// sequence's keys lie inside the arrays before any of them is read.
#pragma once

#include <cute/arch/copy_sm80.hpp>

#include "common/attention_problem.h"
#include "cuda/attention/kernel_traits.cuh"

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
  bool bad_page = false;
  const int first = int(keys.lo / kv.page_size);
  const int last = keys.empty() ? first : int((keys.hi + kv.page_size - 1) / kv.page_size);
  const int32_t* ids = kv.block_table + b * kv.pages_per_seq;
#pragma unroll 4
  for (int page = first + int(threadIdx.x); page < last; page += blockDim.x)
    bad_page |= !kv.page_id_valid(ids[page]);
  return !__syncthreads_or(bad_page);
}

// Where the tile's packed query rows live: row r of the tile is packed row row_begin + r of
// the sequence, i.e. query (row_begin + r) / group, head kv_head * group + (row_begin + r) %
// group. Rows at or past `rows` and columns past head_dim are zero-filled.
template <class Traits>
__device__ __forceinline__ void load_q_tile(typename Traits::Element* smem_q,
                                            const typename Traits::Element* q,
                                            const AttentionProblem& p, int64_t q_begin,
                                            int kv_head, int64_t row_begin, int rows) {
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

// Keys [key_begin, key_begin + kRows) of sequence b into one K and one V tile, the copies
// shared by kCopyThreads threads (this one is `tid`): the whole CTA for the prefill tile, one
// warp for a decode warp's own block. Keys at or past key_end (the last key any row of the
// tile sees, at most the sequence length) are zero-filled, so that masked probabilities
// (exact zeros) never meet garbage values. `contiguous_rows`: the block's keys are
// consecutive rows of the array (every layout but pages smaller than the block, one page
// lookup a block); otherwise each row is looked up through the block table. kPart: K and V,
// or only one of them (the other pointer is then unused).
template <class Traits, int kRows, int kCopyThreads, KvPart kPart = KvPart::kBoth>
__device__ __forceinline__ void load_kv_tile(typename Traits::Element* smem_k,
                                             typename Traits::Element* smem_v,
                                             const typename Traits::Element* k,
                                             const typename Traits::Element* v,
                                             const AttentionProblem& p, int64_t b, int kv_head,
                                             int key_begin, int key_end, bool contiguous_rows,
                                             int tid) {
  using Element = typename Traits::Element;
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kCopies = kRows * kChunksPerRow / kCopyThreads;
  static_assert(kRows * kChunksPerRow % kCopyThreads == 0, "copies must split evenly");
  // This runs once per key block of the main loop with every register taken, so its
  // integer work is kept small: 32-bit page and bounds arithmetic (keys and page sizes are
  // below 2^31; a 64-bit division would cost a subroutine call), one 64-bit product per
  // block, and, where a copy pass covers whole rows, one pointer step per copy.
  const int head_dim = int(p.head_dim);
  const int64_t row_stride = p.kv_row_stride();
  const int64_t head_offset = int64_t(kv_head) * head_dim;
  const int page_size = int(p.kv.page_size);
  const int32_t* pages = p.kv.block_table + b * p.kv.pages_per_seq;
  const auto row_of_key = [&](int key) {
    return p.kv.layout == KvLayout::kPaged
               ? int64_t(pages[key / page_size]) * page_size + key % page_size
               : p.kv.row(b, key);
  };
  if constexpr (kCopyThreads % kChunksPerRow == 0) {
    if (contiguous_rows) {  // a pass of the copy threads covers kRowsPerPass whole rows
      constexpr int kRowsPerPass = kCopyThreads / kChunksPerRow;
      const int r = tid / kChunksPerRow;
      const int col = (tid % kChunksPerRow) * Traits::kChunk;
      const int64_t offset = (row_of_key(key_begin) + r) * row_stride + head_offset + col;
      const int64_t pass_stride = kRowsPerPass * row_stride;
      const bool col_in_bounds = col < head_dim;
#pragma unroll
      for (int it = 0; it < kCopies; ++it) {
        const bool in_bounds = col_in_bounds && key_begin + r + it * kRowsPerPass < key_end;
        // Out of bounds nothing is read (zero fill); the address stays the array's start.
        const int64_t src = in_bounds ? offset + it * pass_stride : 0;
        const int dst = Traits::kv_offset(r + it * kRowsPerPass, col);
        if constexpr (kPart != KvPart::kValues) copy_chunk(smem_k + dst, k + src, in_bounds);
        if constexpr (kPart != KvPart::kKeys) copy_chunk(smem_v + dst, v + src, in_bounds);
      }
      return;
    }
  }
  // General case: rows gathered through the block table one by one (pages smaller than
  // the block), or head dims whose rows do not split evenly over the copy threads.
  // (Fully unrolled, every copy's address is computed ahead and held: Traits::kGatherUnroll
  // bounds that where registers are short.)
  const int64_t first_row = contiguous_rows ? row_of_key(key_begin) : 0;
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
      src = (contiguous_rows ? first_row + r : row_of_key(key)) * row_stride + head_offset + col;
    const int dst = Traits::kv_offset(r, col);
    if constexpr (kPart != KvPart::kValues) copy_chunk(smem_k + dst, k + src, in_bounds);
    if constexpr (kPart != KvPart::kKeys) copy_chunk(smem_v + dst, v + src, in_bounds);
  }
}

}  // namespace jax_fmha::cuda
