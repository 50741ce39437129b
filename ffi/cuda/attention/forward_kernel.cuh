// The attention forward kernel: one CTA = one tile of kBlockM packed query rows of one
// (sequence, KV head, split). Grid: (row tiles of the longest sequence, KV heads,
// batch x splits); tiles past their sequence's rows exit at once.
//
// Main loop over key blocks, K/V double-buffered with cp.async and one barrier a block: after
// the barrier that publishes block n, every warp is done with block n - 1, so block n + 1 is
// issued into that stage at once and lands while block n is multiplied. Per block:
// S = Q K^T (tensor cores), softcap if any, mask only when the block is not seen whole by
// every row, online softmax (scale folded into the exponent), O += P V (tensor cores).
#pragma once

#include "common/attention_problem.h"
#include "cuda/attention/epilogue.cuh"
#include "cuda/attention/kernel_traits.cuh"
#include "cuda/attention/mask.cuh"
#include "cuda/attention/softmax.cuh"
#include "cuda/attention/tile_load.cuh"
#include "cuda/attention/warp_mma.cuh"

namespace jax_fmha::cuda {

template <class Traits, typename OutT>
__global__ void __launch_bounds__(Traits::kThreads)
    attention_forward_kernel(const __grid_constant__ AttentionProblem p,
                             const typename Traits::Element* __restrict__ q,
                             const typename Traits::Element* __restrict__ k,
                             const typename Traits::Element* __restrict__ v,
                             OutT* __restrict__ out, float* __restrict__ lse) {
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];
  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_k = smem_q + Traits::kQElems;                                 // [stages]
  Element* smem_v = smem_k + Traits::kStages * Traits::kKvTileElems;          // [stages]

  const int64_t b = blockIdx.z % p.batch, split = blockIdx.z / p.batch;
  const int kv_head = blockIdx.y;
  if (!p.q.valid(b)) return;  // fill_rows_outside_sequences writes its NaN rows
  const int64_t sq = p.q.len(b), q_begin = p.q.begin(b);
  const int64_t rows_in_seq = sq * p.group();
  const int64_t row_begin = int64_t(blockIdx.x) * Traits::kBlockM;
  if (row_begin >= rows_in_seq) return;
  const int rows = int(min(int64_t(Traits::kBlockM), rows_in_seq - row_begin));
  const OutputRows dst{p, split, b, q_begin, kv_head};
  if (!kv_sequence_valid(p.kv, b)) return store_nan_rows(out, lse, dst, row_begin, rows);

  const int64_t sk = p.kv.len(b);
  const KeyRange split_range = split_keys(sk, split, p.num_splits, kBlockN);
  const TileKeys keys = tile_keys(p, split_range, row_begin / p.group(),
                                  (row_begin + rows - 1) / p.group(), sq, sk);
  const int warp_row = (threadIdx.x / 32) * Traits::kWarpRows;
  // Warps whose rows are all past the sequence (few queries: decode) skip the arithmetic.
  const bool warp_has_rows = warp_row < rows;
  // The thread's first packed row (mask_scores): 32-bit, the grid keeps rows under 2^31.
  const int first_row = int(row_begin) + warp_row + (threadIdx.x % 32) / 4;
  const ScoreTransform transform = ScoreTransform::make(p.scale, p.softcap);
  const bool contiguous_rows =
      p.kv.layout != KvLayout::kPaged || p.kv.page_size % kBlockN == 0;

  float o[Traits::kMmaM][Traits::kDimAtoms][4];
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][d][e] = 0.f;
  OnlineSoftmax<Traits> softmax;

  load_q_tile<Traits>(smem_q, q, p, q_begin, kv_head, row_begin, rows);
  if (!keys.empty()) {
    // Blocks start at multiples of kBlockN (split ranges and whole pages align with them).
    const int first_block = keys.begin / kBlockN * kBlockN;
    load_kv_tile<Traits, kBlockN, Traits::kThreads>(smem_k, smem_v, k, v, p, b, kv_head,
                                                    first_block, keys.end, contiguous_rows,
                                                    threadIdx.x);
    cute::cp_async_fence();  // Q and block 0
    int stage = 0;
    for (int key_begin = first_block; key_begin < keys.end; key_begin += kBlockN) {
      cute::cp_async_wait<0>();
      __syncthreads();  // block n visible to all; every warp is past block n - 1
      const int next = key_begin + kBlockN;
      if (next < keys.end) {
        load_kv_tile<Traits, kBlockN, Traits::kThreads>(
            smem_k + (stage ^ 1) * Traits::kKvTileElems,
            smem_v + (stage ^ 1) * Traits::kKvTileElems, k, v, p, b, kv_head, next, keys.end,
            contiguous_rows, threadIdx.x);
        cute::cp_async_fence();
      }
      if (warp_has_rows) {
        float s[Traits::kMmaM][Traits::kKeyAtoms][4];
        warp_qk<Traits>(smem_q + warp_row * Traits::kRowPitch,
                        smem_k + stage * Traits::kKvTileElems, s);
        if (transform.explicit_pass()) transform.apply<Traits>(s);
        if (keys.block_needs_mask(key_begin, kBlockN))
          mask_scores<Traits>(s, p, split_range, first_row, int(rows_in_seq), sq, sk, key_begin);
        softmax.update(s, o, transform.fold());
        warp_pv<Traits>(s, smem_v + stage * Traits::kKvTileElems, o);
      }
      stage ^= 1;
    }
  }
  cute::cp_async_wait<0>();
  __syncthreads();  // shared memory is reused for the output tile
  store_tile<Traits, OutT>(o, softmax, smem, out, lse, dst, row_begin, rows, warp_row);
}

}  // namespace jax_fmha::cuda
