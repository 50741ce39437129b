// The attention forward kernel: one CTA = one tile of kBlockM packed query rows of one
// (sequence, KV head, split). Grid: (row tiles of the longest sequence, KV heads,
// batch x splits); tiles past their sequence's rows exit at once.
//
// Main loop over key blocks, K/V in kStages shared-memory stages filled by cp.async, one
// barrier a block: after the barrier that publishes block n, every warp is done with block
// n - 1, so block n + kStages - 1 is issued into that stage at once and has kStages - 1
// blocks' worth of arithmetic to land. Per block:
// S = Q K^T (tensor cores), softcap if any, mask only when the block is not seen whole by
// every row, online softmax (scale folded into the exponent), O += P V (tensor cores).
#pragma once

#include "common/attention_problem.h"
#include "cuda/common/cta_tile.cuh"
#include "cuda/common/epilogue.cuh"
#include "cuda/common/mask.cuh"
#include "cuda/common/softmax.cuh"
#include "cuda/common/tile_load.cuh"
#include "cuda/sm80/kernel_traits.cuh"
#include "cuda/sm80/warp_mma.cuh"
#include "cuda/sm80/warp_mma_fp8.cuh"

namespace jax_fmha::cuda {

template <class Traits, typename OutT>
__global__ void __launch_bounds__(Traits::kThreads)
    attention_forward_kernel(const __grid_constant__ AttentionProblem p,
                             const typename Traits::QElement* __restrict__ q,
                             const typename Traits::KvElement* __restrict__ k,
                             const typename Traits::KvElement* __restrict__ v,
                             OutT* __restrict__ out, float* __restrict__ lse) {
  using KvElement = typename Traits::KvElement;
  constexpr int kBlockN = Traits::kBlockN;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* smem_q = reinterpret_cast<typename Traits::QElement*>(smem);
  float* q_row_factor = reinterpret_cast<float*>(smem_q + Traits::kQElems);  // FP8 K/V
  KvElement* smem_k = reinterpret_cast<KvElement*>(smem + Traits::kQBytes);  // [stages]
  KvElement* smem_v = smem_k + Traits::kStages * Traits::kKvTileElems;       // [stages]

  CtaTile t;
  if (!place_tile<Traits::kBlockM, kBlockN>(p, out, lse, t)) return;
  const TileKeys& keys = t.keys;
  const int warp_row = (threadIdx.x / 32) * Traits::kWarpRows;
  // Warps whose rows are all past the sequence (few queries) skip the arithmetic.
  const bool warp_has_rows = warp_row < t.rows;
  // The thread's first packed row: 32-bit, the grid keeps rows under 2^31.
  const int first_row = int(t.row_begin) + warp_row + (threadIdx.x % 32) / 4;
  const RowKeyLimits<Traits> row_limits(p, t.split_range, first_row, int(t.rows_in_seq), t.sq,
                                        t.sk);
  // FP8 K/V: k_scale joins the score scale (docs/design/fp8_kv_cache.md).
  const ScoreTransform transform = ScoreTransform::make(p.score_scale(t.b, t.kv_head), p.softcap);
  const bool contiguous_rows = p.kv.runs_contiguous(kBlockN);

  float o[Traits::kMmaM][Traits::kDimAtoms][4];
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[m][d][e] = 0.f;
  OnlineSoftmax<Traits> softmax;

  load_q_tile<Traits>(smem_q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows);
  if constexpr (Traits::kFp8) {  // the query tile is rewritten before the first product
    cute::cp_async_fence();
    cute::cp_async_wait<0>();
    __syncthreads();
    prepare_q_fp8<Traits>(smem_q, q_row_factor);
  }
  const Fp8Scales<Traits> fp8(q_row_factor, warp_row, p.value_scale(t.b, t.kv_head));
  if (!keys.empty()) {
    constexpr int kStages = Traits::kStages;
    // Blocks start at multiples of kBlockN (split ranges and whole pages align with them).
    const int first_block = keys.begin / kBlockN * kBlockN;
    // Block n goes to stage n % kStages, issued kStages - 1 blocks ahead of its use. Every
    // thread commits one cp.async group per block, empty past the last, so "block n has
    // landed" is always "at most kStages - 2 newer groups are pending".
    const auto issue = [&](int block) {
      const int key_begin = first_block + block * kBlockN;
      if (key_begin < keys.end) {
        const int stage = block % kStages;
        load_kv_tile<Traits, kBlockN, Traits::kThreads>(
            smem_k + stage * Traits::kKvTileElems, smem_v + stage * Traits::kKvTileElems, k, v, p,
            t.b, t.kv_head, key_begin, keys.end, contiguous_rows, key_row(p, t.b, key_begin),
            threadIdx.x);
      }
      cute::cp_async_fence();  // (the first group also holds Q)
    };
#pragma unroll
    for (int block = 0; block < kStages - 1; ++block) issue(block);
    for (int block = 0, key_begin = first_block; key_begin < keys.end;
         ++block, key_begin += kBlockN) {
      cute::cp_async_wait<kStages - 2>();
      __syncthreads();             // block n visible to all; every warp is past block n - 1
      issue(block + kStages - 1);  // into the stage of block n - 1
      const int stage = block % kStages;
      if (warp_has_rows) {
        float s[Traits::kMmaM][Traits::kKeyAtoms][4];
        if constexpr (Traits::kFp8) {
          warp_qk_fp8<Traits>(
              reinterpret_cast<const __half*>(smem_q) + warp_row * Traits::kRowPitch,
              smem_k + stage * Traits::kKvTileElems, s);
          fp8.scale_scores(s);
        } else {
          warp_qk<Traits>(smem_q + warp_row * Traits::kRowPitch,
                          smem_k + stage * Traits::kKvTileElems, s);
        }
        if (transform.explicit_pass()) transform.apply<Traits>(s);
        if (keys.block_needs_mask(key_begin, kBlockN)) row_limits.mask(s, key_begin);
        softmax.update(s, o, transform.fold());
        if constexpr (Traits::kFp8)
          warp_pv_fp8<Traits>(s, smem_v + stage * Traits::kKvTileElems, o);
        else
          warp_pv<Traits>(s, smem_v + stage * Traits::kKvTileElems, o);
      }
    }
  }
  if constexpr (Traits::kFp8) fp8.finish_output(o);
  cute::cp_async_wait<0>();
  __syncthreads();  // shared memory is reused for the output tile
  store_tile<Traits, OutT>(o, softmax, smem, out, lse, t.output(p), t.row_begin, t.rows, warp_row,
                           [] { __syncthreads(); });
}

// The kernel of ForwardKernel::kPortable (forward_plan.h), for the launcher.
template <>
struct ForwardKernelOf<ForwardKernel::kPortable> {
  template <typename Element, int kHeadDim, typename Kv>
  using TraitsOf = KernelTraits<Element, kHeadDim, Kv>;
  template <class Traits, typename OutT>
  static constexpr auto kernel = attention_forward_kernel<Traits, OutT>;
};

}  // namespace jax_fmha::cuda
