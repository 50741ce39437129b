// The decode kernel: one CTA = one tile of 16 packed query rows (DecodeTraits) of one
// (sequence, KV head, split), for problems with few query rows per KV head (decode, short
// speculative chunks): the whole packed group of a query fits one m16 tile, and the work
// that remains is reading K and V, so the tile is built for bytes in flight.
//
// The 4 warps split the keys, not the rows: warp w streams the 16-key blocks w, w + 4, ...
// of the tile's key range through its own kStages-deep cp.async pipeline (its own lanes
// copy, wait and __syncwarp: no CTA barrier in the main loop), and keeps its own online
// softmax state and O for all 16 rows. At the end the four partial states are merged in
// shared memory in a fixed order (deterministic) and the tile is written once.
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

// Merges the warps' partial states (rows: the tile's valid rows) and writes O and the LSE.
// Every thread calls it once the K/V stages are free; it reuses them as float32 scratch.
template <class Traits, typename OutT>
__device__ __forceinline__ void combine_and_store(float (&o)[1][Traits::kDimAtoms][4],
                                                  const OnlineSoftmax<Traits>& softmax,
                                                  float* scratch, OutT* out, float* lse,
                                                  const OutputRows& dst, int64_t row_begin,
                                                  int rows) {
  constexpr int kWarps = Traits::kWarps, kRows = Traits::kBlockM;
  constexpr int kPitch = Traits::kCombinePitch;
  constexpr float kLn2 = 0.6931471805599453f;
  float* warp_o = scratch;                           // [warp][row][kPitch]
  float* stats = scratch + kWarps * kRows * kPitch;  // [warp][row] max, then sum
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float row_sum[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] = quad_sum(softmax.row_sum[0][h]);
    if (lane % 4 == 0) {
      const int r = 8 * h + lane / 4;
      stats[warp * kRows + r] = softmax.row_max[0][h];
      stats[(kWarps + warp) * kRows + r] = row_sum[h];
    }
  }
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = 8 * h + lane / 4;
    float row_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) row_max = fmaxf(row_max, stats[w * kRows + r]);
    // A row no warp saw a key of keeps max -inf: base 0 gives weights exp2(-inf) = 0.
    const float base = row_max == -INFINITY ? 0.f : row_max;
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w)
      total += stats[(kWarps + w) * kRows + r] * exp2_approx(stats[w * kRows + r] - base);
    const float weight = total > 0.f ? exp2_approx(softmax.row_max[0][h] - base) / total : 0.f;
#pragma unroll
    for (int d = 0; d < Traits::kDimAtoms; ++d)
      *reinterpret_cast<float2*>(warp_o + (warp * kRows + r) * kPitch + 8 * d + 2 * (lane % 4)) =
          make_float2(o[0][d][2 * h] * weight, o[0][d][2 * h + 1] * weight);
    if (warp == 0 && lane % 4 == 0 && r < rows)
      lse[dst.lse_offset(row_begin + r)] =
          total > 0.f ? (row_max + log2f(total)) * kLn2 : -INFINITY;
  }
  __syncthreads();
  // Sum the warps' weighted O, 4 columns a thread, and store whole rows.
  constexpr int kQuadsPerRow = Traits::kHeadDim / 4;
  for (int c = threadIdx.x; c < kRows * kQuadsPerRow; c += Traits::kThreads) {
    const int r = c / kQuadsPerRow, col = (c % kQuadsPerRow) * 4;
    if (r >= rows || col >= dst.p.head_dim) continue;
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(warp_o + (w * kRows + r) * kPitch + col);
      sum.x += x.x, sum.y += x.y, sum.z += x.z, sum.w += x.w;
    }
    OutT* dst_row = out + dst.out_offset(row_begin + r) + col;
    store_pair(dst_row, sum.x, sum.y);
    store_pair(dst_row + 2, sum.z, sum.w);
  }
}

template <class Traits, typename OutT>
__global__ void __launch_bounds__(Traits::kThreads)
    attention_decode_kernel(const __grid_constant__ AttentionProblem p,
                            const typename Traits::QElement* __restrict__ q,
                            const typename Traits::KvElement* __restrict__ k,
                            const typename Traits::KvElement* __restrict__ v,
                            OutT* __restrict__ out, float* __restrict__ lse) {
  using KvElement = typename Traits::KvElement;
  constexpr int kBlockN = Traits::kBlockN, kWarps = Traits::kWarps, kStages = Traits::kStages;
  extern __shared__ __align__(16) unsigned char smem[];
  auto* smem_q = reinterpret_cast<typename Traits::QElement*>(smem);
  float* q_row_factor = reinterpret_cast<float*>(smem_q + Traits::kQElems);  // FP8 K/V
  unsigned char* smem_stages = smem + Traits::kQBytes;

  CtaTile t;
  if (!place_tile<Traits::kBlockM, kBlockN>(p, out, lse, t)) return;
  const TileKeys& keys = t.keys;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowKeyLimits<Traits> row_limits(p, t.split_range, int(t.row_begin) + lane / 4,
                                        int(t.rows_in_seq), t.sq, t.sk);
  // FP8 K/V: k_scale joins the score scale (docs/design/fp8_kv_cache.md).
  const ScoreTransform transform = ScoreTransform::make(p.score_scale(t.b, t.kv_head), p.softcap);
  const bool contiguous_rows = p.kv.runs_contiguous(kBlockN);

  // The warp's K/V stages: stage s holds K then V of one 16-key block.
  KvElement* warp_stages =
      reinterpret_cast<KvElement*>(smem_stages) + warp * kStages * 2 * Traits::kKvTileElems;
  const auto stage_k = [&](int s) { return warp_stages + s * 2 * Traits::kKvTileElems; };
  const int first_block = keys.begin / kBlockN * kBlockN;
  const int num_blocks = keys.empty() ? 0 : (keys.end - first_block + kBlockN - 1) / kBlockN;
  const int warp_blocks = num_blocks > warp ? (num_blocks - warp + kWarps - 1) / kWarps : 0;
  const auto block_key = [&](int j) { return first_block + (warp + kWarps * j) * kBlockN; };
  const auto load_block = [&](int j) {
    KvElement* dst_k = stage_k(j % kStages);
    const int key_begin = block_key(j);
    load_kv_tile<Traits, kBlockN, 32>(dst_k, dst_k + Traits::kKvTileElems, k, v, p, t.b, t.kv_head,
                                      key_begin, keys.end, contiguous_rows,
                                      key_row(p, t.b, key_begin), lane);
  };

  load_q_tile<Traits>(smem_q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows);
  cute::cp_async_fence();
  // Fill the pipeline: blocks 0 .. kStages - 2 (empty groups keep the wait count uniform).
#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (j < warp_blocks) load_block(j);
    cute::cp_async_fence();
  }
  cute::cp_async_wait<kStages - 1>();  // the Q group (the oldest) has landed ...
  __syncthreads();                     // ... for every thread
  if constexpr (Traits::kFp8) prepare_q_fp8<Traits>(smem_q, q_row_factor);
  const Fp8Scales<Traits> fp8(q_row_factor, 0, p.value_scale(t.b, t.kv_head));

  float o[1][Traits::kDimAtoms][4];
#pragma unroll
  for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
  OnlineSoftmax<Traits> softmax;

  for (int j = 0; j < warp_blocks; ++j) {
    cute::cp_async_wait<kStages - 2>();  // block j has landed (this lane's copies) ...
    __syncwarp();  // ... for the whole warp, which is also done reading block j - 1's stage
    if (j + kStages - 1 < warp_blocks) load_block(j + kStages - 1);
    cute::cp_async_fence();
    const KvElement* tile_k = stage_k(j % kStages);
    float s[1][Traits::kKeyAtoms][4];
    if constexpr (Traits::kFp8) {
      warp_qk_fp8<Traits>(reinterpret_cast<const __half*>(smem_q), tile_k, s);
      fp8.scale_scores(s);
    } else {
      warp_qk<Traits>(smem_q, tile_k, s);
    }
    if (transform.explicit_pass()) transform.apply<Traits>(s);
    const int key_begin = block_key(j);
    if (keys.block_needs_mask(key_begin, kBlockN)) row_limits.mask(s, key_begin);
    softmax.update(s, o, transform.fold());
    if constexpr (Traits::kFp8)
      warp_pv_fp8<Traits>(s, tile_k + Traits::kKvTileElems, o);
    else
      warp_pv<Traits>(s, tile_k + Traits::kKvTileElems, o);
  }
  if constexpr (Traits::kFp8) fp8.finish_output(o);
  cute::cp_async_wait<0>();
  __syncthreads();  // every warp is done with its stages: they become the combine scratch
  combine_and_store<Traits, OutT>(o, softmax, reinterpret_cast<float*>(smem_stages), out, lse,
                                  t.output(p), t.row_begin, t.rows);
}

// The kernel of ForwardKernel::kDecode (forward_plan.h), for the launcher.
template <>
struct ForwardKernelOf<ForwardKernel::kDecode> {
  template <typename Element, int kHeadDim, typename Kv>
  using TraitsOf = DecodeTraits<Element, kHeadDim, Kv>;
  template <class Traits, typename OutT>
  static constexpr auto kernel = attention_decode_kernel<Traits, OutT>;
};

}  // namespace jax_fmha::cuda
