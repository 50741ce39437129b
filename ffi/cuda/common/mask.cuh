// Which keys the rows of a tile see (causal bottom-right, sliding window, split-KV range),
// all derived from visible_keys / split_keys of the shared problem definition.
//
// A row's visible interval [lo, hi) only moves right as the query index grows, so the tile's
// first and last queries bound every row: keys in [first.lo, last.hi) are loaded, and a key
// block inside [last.lo, first.hi) is seen by every row of the tile (no mask math at all).
#pragma once

#include <cmath>

#include "common/attention_problem.h"

namespace jax_fmha::cuda {

// Keys of query i that split `split` handles.
__device__ __forceinline__ KeyRange row_keys(const AttentionProblem& p, const KeyRange& split,
                                             int64_t i, int64_t sq, int64_t sk) {
  KeyRange keys = visible_keys(p, i, sq, sk);
  keys.lo = keys.lo > split.lo ? keys.lo : split.lo;
  keys.hi = keys.hi < split.hi ? keys.hi : split.hi;
  return keys;
}

struct TileKeys {
  int begin, end;            // keys any row of the tile sees: [begin, end)
  int full_begin, full_end;  // keys every row of the tile sees

  __device__ __forceinline__ bool empty() const { return end <= begin; }
  __device__ __forceinline__ bool block_needs_mask(int key_begin, int block) const {
    return key_begin < full_begin || key_begin + block > full_end;
  }
};

// first_i, last_i: the first and last query of the tile.
__device__ __forceinline__ TileKeys tile_keys(const AttentionProblem& p, const KeyRange& split,
                                              int64_t first_i, int64_t last_i, int64_t sq,
                                              int64_t sk) {
  const KeyRange first = row_keys(p, split, first_i, sq, sk);
  const KeyRange last = row_keys(p, split, last_i, sq, sk);
  return {int(first.lo), int(last.hi), int(last.lo), int(first.hi)};
}

// The keys each of a thread's rows sees, [lo, hi), found once per tile: the integer
// division and 64-bit arithmetic of visible_keys stay out of the key loop, where they
// raised the register pressure of every kernel (docs/design/cuda_attention.md). Rows in the
// mma accumulator layout: element (m, n, e) of a key block is packed row first_row + 16 m +
// 8 (e / 2) (first_row: the thread's first row, lane / 4 into its warp's rows), key
// key_begin + 8 n + 2 t + e % 2. Rows at or past rows_in_seq see nothing.
template <class Traits>
struct RowKeyLimits {
  int lo[Traits::kMmaM][2], hi[Traits::kMmaM][2];

  __device__ __forceinline__ RowKeyLimits(const AttentionProblem& p, const KeyRange& split,
                                          int first_row, int rows_in_seq, int64_t sq, int64_t sk) {
    const int group = int(p.group());
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int packed_row = first_row + 16 * m + 8 * half;
        KeyRange keys{0, 0};
        if (packed_row < rows_in_seq) keys = row_keys(p, split, packed_row / group, sq, sk);
        lo[m][half] = int(keys.lo), hi[m][half] = int(keys.hi);
      }
  }

  // Sets the scores of keys a row does not see to -inf; for the blocks that need it
  // (TileKeys::block_needs_mask).
  __device__ __forceinline__ void mask(float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4],
                                       int key_begin) const {
    const int key0 = key_begin + 2 * (threadIdx.x % 4);
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int n = 0; n < Traits::kKeyAtoms; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + 8 * n + e % 2;
          if (key < lo[m][e / 2] || key >= hi[m][e / 2]) s[m][n][e] = -INFINITY;
        }
  }
};

}  // namespace jax_fmha::cuda
