// The tile a CTA computes, from its place in the grid (x: row tile, y: KV head,
// z: batch x splits), shared by the forward and the decode kernels: which sequence, split
// and KV head, which packed query rows, which keys, and the early exits.
#pragma once

#include "common/attention_problem.h"
#include "cuda/common/epilogue.cuh"
#include "cuda/common/mask.cuh"
#include "cuda/common/tile_load.cuh"

namespace jax_fmha::cuda {

struct CtaTile {
  int64_t b, split;
  int kv_head;
  int64_t sq, sk;        // queries and keys of sequence b
  int64_t q_begin;       // the sequence's first query row of q
  int64_t rows_in_seq;   // packed rows of the sequence: sq * group
  int64_t row_begin;     // the tile's first packed row
  int rows;              // the tile's packed rows inside the sequence (<= kBlockM)
  KeyRange split_range;  // the keys of the split
  TileKeys keys;         // the keys the tile's rows see, within the split

  __device__ __forceinline__ OutputRows output(const AttentionProblem& p) const {
    return {p, split, b, q_begin, kv_head};
  }
};

// The tile of kBlockM packed rows at (row tile, KV head, z = split x batch + sequence), the
// splits cut at multiples of kBlockN keys. Returns false when there is nothing to compute:
// its rows lie past its sequence or the query sequence is invalid (the fill kernel writes
// those rows). Reads no page id (kv_keys_valid does).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ bool locate_tile(const AttentionProblem& p, int64_t row_tile,
                                            int kv_head, int64_t z, CtaTile& t) {
  t.b = z % p.batch;
  t.split = z / p.batch;
  t.kv_head = kv_head;
  if (!p.q.valid(t.b)) return false;
  t.sq = p.q.len(t.b);
  t.q_begin = p.q.begin(t.b);
  t.rows_in_seq = t.sq * p.group();
  t.row_begin = row_tile * kBlockM;
  if (t.row_begin >= t.rows_in_seq) return false;
  t.rows = int(min(int64_t(kBlockM), t.rows_in_seq - t.row_begin));
  t.sk = p.kv.len(t.b);
  t.split_range = split_keys(t.sk, t.split, p.num_splits, kBlockN);
  t.keys = tile_keys(p, t.split_range, t.row_begin / p.group(),
                     (t.row_begin + t.rows - 1) / p.group(), t.sq, t.sk);
  return true;
}

// Places the CTA's tile (grid x: row tile, y: KV head, z: split x batch + sequence).
// Returns false when the CTA has nothing more to do: locate_tile found no rows, or its keys
// lie outside the K/V arrays (it has written its rows as NaN). Every thread of the CTA must
// call it: each condition is uniform over the CTA, and the page-id check synchronizes.
template <int kBlockM, int kBlockN, typename OutT>
__device__ __forceinline__ bool place_tile(const AttentionProblem& p, OutT* out, float* lse,
                                           CtaTile& t) {
  if (!locate_tile<kBlockM, kBlockN>(p, blockIdx.x, blockIdx.y, blockIdx.z, t)) return false;
  if (!kv_keys_valid(p.kv, t.b, t.split_range, threadIdx.x, blockDim.x,
                     [](bool bad) { return __syncthreads_or(bad); })) {
    store_nan_rows(out, lse, t.output(p), t.row_begin, t.rows, threadIdx.x, blockDim.x);
    return false;
  }
  return true;
}

}  // namespace jax_fmha::cuda
