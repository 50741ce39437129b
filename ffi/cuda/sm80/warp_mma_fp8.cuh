// The two matrix products of a warp over FP8 keys and values (warp_mma.cuh's layouts and
// names), on fp16 tensor cores. K and V stay FP8 in shared memory (half the bytes of every
// copy) and are converted in registers: ldmatrix reads FP8 rows as b16 pairs, 4 FP8 columns
// of one row a lane, and each lane converts its bytes to the fp16 pairs the mma expects. The
// reduction and output columns the mma sees are permutations of the real ones, set up once
// per tile: the query tile's columns (prepare_q_fp8) and O's (unpermute_o). Why, and the
// conversion costs: docs/design/fp8_kv_cache.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

#include "cuda/common/dtypes.cuh"
#include "cuda/common/fp8.cuh"
#include "cuda/sm80/warp_mma.cuh"

namespace jax_fmha::cuda {

// Whether FP8 K/V's queries are rescaled into fp16 (bfloat16 ones); fp16 queries are taken
// as is.
template <class Traits>
inline constexpr bool kRescalesQ =
    Traits::kFp8 && !std::is_same_v<typename Traits::QElement, __half>;

// The power of two that brings a row of largest magnitude `row_max` into [2^14, 2^15) (fp16
// then holds every bfloat16 value of the row exactly down to 2^-28 of that magnitude); 0 for
// a row of zeros or with a non-finite value.
__device__ __forceinline__ int fp16_exponent_shift(float row_max) {
  if (!(row_max > 0.f) || !(row_max < INFINITY)) return 0;
  int exponent;
  frexpf(row_max, &exponent);  // row_max < 2^exponent
  return max(-126, min(126, 15 - exponent));
}

// Rewrites the landed query tile for warp_qk_fp8, in place, once per tile; every thread of the
// CTA calls it after a barrier that published Q, and it ends with one:
//  - in fp16: bfloat16 rows scaled by a power of two each, whose inverse goes to
//    row_factor[row] (the scores are multiplied by it), fp16 rows unchanged (factor 1);
//  - each 16-column k step's column pairs reordered from (0, 1, ..., 7) to
//    (0, 2, 4, 6, 1, 3, 5, 7): the pair in A's columns 2t, 2t + 1 is then columns 4t, 4t + 1
//    and the one in 2t + 8, 2t + 9 columns 4t + 2, 4t + 3, which are the four FP8 columns a
//    lane of the key's ldmatrix holds.
template <class Traits>
__device__ __forceinline__ void prepare_q_fp8(typename Traits::QElement* smem_q,
                                              float* row_factor) {
  using QElement = typename Traits::QElement;
  constexpr int kSteps = Traits::kHeadDim / 16;
  constexpr int kItems = Traits::kBlockM * kSteps;
  const auto step_words = [&](int item) {
    return reinterpret_cast<uint4*>(smem_q + Traits::q_offset(item / kSteps, item % kSteps * 16));
  };
  if constexpr (kRescalesQ<Traits>) {  // row_factor first gathers each row's max |q|
    for (int r = threadIdx.x; r < Traits::kBlockM; r += Traits::kThreads) row_factor[r] = 0.f;
    __syncthreads();
    for (int item = threadIdx.x; item < kItems; item += Traits::kThreads) {
      const QElement* x = reinterpret_cast<const QElement*>(step_words(item));
      float row_max = 0.f;
#pragma unroll
      for (int c = 0; c < 16; ++c) row_max = fmaxf(row_max, fabsf(to_float(x[c])));
      // Non-negative floats order as their bit patterns.
      atomicMax(reinterpret_cast<int*>(row_factor + item / kSteps), __float_as_int(row_max));
    }
    __syncthreads();
  }
  for (int item = threadIdx.x; item < kItems; item += Traits::kThreads) {
    uint4* words = step_words(item);
    uint32_t in[8];
    *reinterpret_cast<uint4*>(in) = words[0];
    *reinterpret_cast<uint4*>(in + 4) = words[1];
    if constexpr (kRescalesQ<Traits>) {
      const int shift = fp16_exponent_shift(row_factor[item / kSteps]);
#pragma unroll
      for (int w = 0; w < 8; ++w) {
        const QElement* pair = reinterpret_cast<const QElement*>(in + w);
        in[w] = pack2<__half>(ldexpf(to_float(pair[0]), shift), ldexpf(to_float(pair[1]), shift));
      }
    }
    words[0] = make_uint4(in[0], in[2], in[4], in[6]);
    words[1] = make_uint4(in[1], in[3], in[5], in[7]);
  }
  __syncthreads();  // every row's max has been read
  if constexpr (kRescalesQ<Traits>) {
    for (int r = threadIdx.x; r < Traits::kBlockM; r += Traits::kThreads)
      row_factor[r] = exp2f(float(-fp16_exponent_shift(row_factor[r])));
    __syncthreads();
  }
}

// S = Q K^T for the warp's rows, K in FP8. smem_q: the warp's first row of the prepared
// query tile (prepare_q_fp8).
template <class Traits>
__device__ __forceinline__ void warp_qk_fp8(const __half* smem_q,
                                            const typename Traits::KvElement* smem_k,
                                            float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4]) {
  using Kv = typename Traits::KvElement;
  constexpr int P = Traits::kRowPitch, PK = Traits::kKvRowPitch;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int n = 0; n < Traits::kKeyAtoms; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[m][n][e] = 0.f;

  const __half* q_lane = smem_q + (lane % 16) * P + (lane / 16) * 8;
  // K: matrix j of an ldmatrix.x4 is keys 8 (j % 2) .. + 7 of a key-tile pair and the 16
  // columns of k step j / 2 of a k-step pair. Its b16 elements are FP8 column pairs: lane
  // (g, t) gets columns 4t .. 4t + 3 of key g, b0 (4t, 4t + 1) and b1 (4t + 2, 4t + 3).
  const Kv* k_lane = smem_k + ((lane % 8) + ((lane / 8) % 2) * 8) * PK + (lane / 16) * 16;
#pragma unroll
  for (int kk = 0; kk < Traits::kHeadDim / 16; kk += 2) {
    uint32_t a[Traits::kMmaM][2][4];
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int step = 0; step < 2; ++step)
        ldmatrix_x4(q_lane + m * 16 * P + (kk + step) * 16, a[m][step]);
#pragma unroll
    for (int n = 0; n < Traits::kKeyAtoms; n += 2) {
      uint32_t r[4];
      ldmatrix_x4(k_lane + n * 8 * PK + kk * 16, r);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t b0 = fp8x2_to_half2<Kv, 0, 1>(r[j]);
        const uint32_t b1 = fp8x2_to_half2<Kv, 2, 3>(r[j]);
#pragma unroll
        for (int m = 0; m < Traits::kMmaM; ++m) mma<Traits>(s[m][n + j % 2], a[m][j / 2], b0, b1);
      }
    }
  }
}

// O += P V, V in FP8. O's n8 tiles 2c and 2c + 1 hold the even and the odd columns of 16-column
// step c, until unpermute_o.
template <class Traits>
__device__ __forceinline__ void warp_pv_fp8(const float (&p)[Traits::kMmaM][Traits::kKeyAtoms][4],
                                            const typename Traits::KvElement* smem_v,
                                            float (&o)[Traits::kMmaM][Traits::kDimAtoms][4]) {
  using Kv = typename Traits::KvElement;
  constexpr int PK = Traits::kKvRowPitch;
  const int lane = threadIdx.x % 32;
  // V, transposed: matrix j of an ldmatrix.x4.trans is keys 8 (j % 2) .. + 7 of the k step and
  // the 16 columns of column step j / 2 of a pair. As b16 column pairs, lane (g, t) gets keys
  // 2t and 2t + 1 of columns 2g and 2g + 1: b0 (keys 0-7) or b1 (keys 8-15) of the even and
  // of the odd columns' n8 tile.
  const Kv* v_lane = smem_v + ((lane % 8) + ((lane / 8) % 2) * 8) * PK + (lane / 16) * 16;
#pragma unroll
  for (int kk = 0; kk < Traits::kBlockN / 16; ++kk) {
    uint32_t a[Traits::kMmaM][4];
    pack_probabilities<Traits>(p, kk, a);
#pragma unroll
    for (int c = 0; c < Traits::kHeadDim / 16; c += 2) {
      uint32_t r[4];
      ldmatrix_x4_trans(v_lane + kk * 16 * PK + c * 16, r);
#pragma unroll
      for (int step = 0; step < 2; ++step) {
        // Bytes: (key 2t, column 2g), (2t, 2g + 1), (2t + 1, 2g), (2t + 1, 2g + 1).
        const uint32_t keys_lo = r[2 * step], keys_hi = r[2 * step + 1];
        const uint32_t even_b0 = fp8x2_to_half2<Kv, 0, 2>(keys_lo);
        const uint32_t even_b1 = fp8x2_to_half2<Kv, 0, 2>(keys_hi);
        const uint32_t odd_b0 = fp8x2_to_half2<Kv, 1, 3>(keys_lo);
        const uint32_t odd_b1 = fp8x2_to_half2<Kv, 1, 3>(keys_hi);
        const int tile = 2 * (c + step);
#pragma unroll
        for (int m = 0; m < Traits::kMmaM; ++m) {
          mma<Traits>(o[m][tile], a[m], even_b0, even_b1);
          mma<Traits>(o[m][tile + 1], a[m], odd_b0, odd_b1);
        }
      }
    }
  }
}

// O of warp_pv_fp8 -> the mma accumulator layout the epilogues store, once per tile. Lane t of
// a quad holds columns 4t .. 4t + 3 of each 16-column step as (tile 2c: 4t, tile 2c + 1: 4t + 1,
// tile 2c: 4t + 2, tile 2c + 1: 4t + 3); the layout wants 2t, 2t + 1 in tile 2c and 2t + 8,
// 2t + 9 in tile 2c + 1, held by lanes t / 2 and 2 + t / 2 of the quad.
template <class Traits>
__device__ __forceinline__ void unpermute_o(float (&o)[Traits::kMmaM][Traits::kDimAtoms][4]) {
  const int lane = threadIdx.x % 32, t = lane % 4;
  const int low_source = (lane & ~3) | (t / 2), high_source = low_source + 2;
  const bool odd = t % 2 != 0;
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int c = 0; c < Traits::kDimAtoms / 2; ++c)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float held[4] = {o[m][2 * c][2 * h], o[m][2 * c + 1][2 * h], o[m][2 * c][2 * h + 1],
                               o[m][2 * c + 1][2 * h + 1]};
        float low[4], high[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          low[e] = __shfl_sync(0xffffffffu, held[e], low_source);
          high[e] = __shfl_sync(0xffffffffu, held[e], high_source);
        }
        o[m][2 * c][2 * h] = odd ? low[2] : low[0];
        o[m][2 * c][2 * h + 1] = odd ? low[3] : low[1];
        o[m][2 * c + 1][2 * h] = odd ? high[2] : high[0];
        o[m][2 * c + 1][2 * h + 1] = odd ? high[3] : high[1];
      }
}

// The scales of FP8 K/V, per tile, after prepare_q_fp8: the query rows' factors and the
// output's (v_scale); k_scale is in the score scale. Holds nothing for 16-bit K/V.
template <class Traits>
struct Fp8Scales {
  float q_row[Traits::kMmaM][2];  // rows 16 m + 8 h + g of the warp (bfloat16 queries)
  float v;

  // row_factor: prepare_q_fp8's; warp_row: the warp's first row of the tile.
  __device__ __forceinline__ Fp8Scales(const float* row_factor, int warp_row, float v_scale)
      : v(v_scale) {
    const int g = threadIdx.x % 32 / 4;
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        q_row[m][h] = kRescalesQ<Traits> ? row_factor[warp_row + 16 * m + 8 * h + g] : 1.f;
  }

  __device__ __forceinline__ void scale_scores(
      float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4]) const {
    if constexpr (kRescalesQ<Traits>) {
#pragma unroll
      for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
        for (int n = 0; n < Traits::kKeyAtoms; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[m][n][e] *= q_row[m][e / 2];
    }
  }

  // O in the epilogues' layout (after unpermute_o), times v_scale.
  __device__ __forceinline__ void finish_output(
      float (&o)[Traits::kMmaM][Traits::kDimAtoms][4]) const {
    unpermute_o<Traits>(o);
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[m][d][e] *= v;
  }
};

}  // namespace jax_fmha::cuda
