// Online softmax over key blocks, fp32, in base 2: with no softcap the raw scores go in and
// scale * log2(e) is folded into the max and into one FFMA before each ex2 (no separate
// multiply pass); with a softcap the scores are first mapped to softcap * tanh(.) * log2(e).
// Each thread holds 2 * kMmaM rows (rows g and g + 8 of each m16 tile); a row's 4 owner
// threads (one quad) combine their maxima every block and their sums only at the end.
#pragma once

#include <cmath>

namespace jax_fmha::cuda {

__device__ __forceinline__ float exp2_approx(float x) {  // ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Raw q.k -> log2-domain score: scale (and softcap) folded into one or two constants.
struct ScoreTransform {
  float scale_log2;   // no softcap: scale * log2(e)
  float softcap_in;   // softcap: scale / softcap
  float softcap_out;  // softcap: softcap * log2(e)
  bool softcap;

  __host__ __device__ static ScoreTransform make(float scale, float softcap) {
    constexpr float kLog2e = 1.4426950408889634f;
    return {scale * kLog2e, softcap > 0.f ? scale / softcap : 0.f, softcap * kLog2e, softcap > 0.f};
  }
  // Whether apply() must run before the softmax: softcap, or a scale whose sign would turn
  // the max of raw scores into the min of scaled ones (or, at 0, make -inf * 0 a NaN).
  __host__ __device__ bool explicit_pass() const { return softcap || !(scale_log2 > 0.f); }
  // The multiplier the softmax applies to the scores it is given.
  __device__ __forceinline__ float fold() const { return explicit_pass() ? 1.f : scale_log2; }
  template <class Traits>
  __device__ __forceinline__ void apply(float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4]) const {
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int n = 0; n < Traits::kKeyAtoms; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          s[m][n][e] =
              softcap ? softcap_out * tanhf(s[m][n][e] * softcap_in) : s[m][n][e] * scale_log2;
  }
};

// The max a row's probabilities are taken against moves only when a block's max exceeds
// it by more than this (log2 units). Probabilities then stay below 2^8 (no overflow in
// the fp32 sums, nor in bf16/fp16 P), and the row's sum, O and LSE all use the same
// reference, so the result is unchanged, while O is rescaled only a few times a row
// instead of whenever the max creeps up: +3.5% at d128 (docs/design/cuda_attention.md).
constexpr float kRescaleThreshold = 8.f;

template <class Traits>
struct OnlineSoftmax {
  float row_max[Traits::kMmaM][2];  // log2 domain; -inf until the row sees a key
  float row_sum[Traits::kMmaM][2];  // this thread's share of the row's sum

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) row_max[m][h] = -INFINITY, row_sum[m][h] = 0.f;
  }

  // s: one block of scores, fold * s in the log2 domain (fold > 0; masked keys -inf) ->
  // probabilities exp2(fold * s - max); rescales the accumulator o by exp2(old - new max).
  // Most blocks move none of the warp's rows' maxima: the rescale of O (a multiply per
  // accumulator) is then skipped for the whole warp.
  __device__ __forceinline__ void update(float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4],
                                         float (&o)[Traits::kMmaM][Traits::kDimAtoms][4],
                                         float fold) {
    float correction[Traits::kMmaM][2];
    if (update_scores(s, fold, correction)) rescale(o, correction);
  }

  // The two halves of update(), for a caller that rescales O later (while a product that
  // accumulates into O is in flight): s -> probabilities, row statistics, and the factor
  // each row's O must be multiplied by. Returns whether any row of the warp needs it.
  __device__ __forceinline__ bool update_scores(float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4],
                                                float fold, float (&correction)[Traits::kMmaM][2]) {
    bool moved = false;
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float block_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < Traits::kKeyAtoms; ++n)
          block_max = fmaxf(block_max, fmaxf(s[m][n][2 * h], s[m][n][2 * h + 1]));
        // Rounded up, so fmaf(s, fold, -base) below, exact before its rounding, is never
        // positive at the max: a rounded-to-nearest max leaves up to half an ulp of fold * s,
        // which beyond 2^31 (huge queries) is > 128 and makes exp2 inf.
        block_max = __fmul_ru(quad_max(block_max), fold);
        const bool grows = block_max > row_max[m][h] + kRescaleThreshold;
        const float new_max = grows ? block_max : row_max[m][h];
        // A row that has seen nothing keeps max -inf; subtracting 0 then keeps every
        // probability and the correction at exp2(-inf) = 0 instead of NaN.
        const float base = new_max == -INFINITY ? 0.f : new_max;
        moved |= grows;
        correction[m][h] = exp2_approx(row_max[m][h] - base);
        row_max[m][h] = new_max;
        float block_sum = 0.f;
#pragma unroll
        for (int n = 0; n < Traits::kKeyAtoms; ++n)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[m][n][e] = exp2_approx(fmaf(s[m][n][e], fold, -base));
            block_sum += s[m][n][e];
          }
        row_sum[m][h] = row_sum[m][h] * correction[m][h] + block_sum;
      }
    // (A row whose max stays -inf has o = 0: skipping its correction of 0 changes nothing.)
    return __any_sync(0xffffffffu, moved);
  }

  __device__ __forceinline__ static void rescale(float (&o)[Traits::kMmaM][Traits::kDimAtoms][4],
                                                 const float (&correction)[Traits::kMmaM][2]) {
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
      for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[m][d][e] *= correction[m][e / 2];
  }
};

}  // namespace jax_fmha::cuda
