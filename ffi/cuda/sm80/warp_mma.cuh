// The two matrix products of a warp, on mma.sync m16n8k16 with fp32 accumulators:
//   S[kMmaM][kKeyAtoms]  = Q (warp's rows, from shared) x K^T (key tile, from shared)
//   O[kMmaM][kDimAtoms] += P (probabilities, registers) x V (value tile, from shared)
// Fragments follow the PTX layout of m16n8k16 (lane = 4 * g + t):
//   A 16x16: a0 = (row g, k 2t..2t+1), a1 = (g + 8, 2t), a2 = (g, 2t + 8), a3 = (g + 8, 2t + 8)
//   B 16x8 : b0 = (k 2t..2t+1, col g), b1 = (k 2t + 8.., col g)
//   C 16x8 : c0, c1 = (row g, col 2t, 2t + 1), c2, c3 = (row g + 8, col 2t, 2t + 1)
// ldmatrix.x4 loads four 8x8 matrices; lanes 8m..8m+7 give the row addresses of matrix m.
#pragma once

#include <cute/arch/copy_sm75.hpp>

#include "cuda/common/dtypes.cuh"
#include "cuda/sm80/kernel_traits.cuh"

namespace jax_fmha::cuda {

template <typename Element>
__device__ __forceinline__ void ldmatrix_x4(const Element* smem, uint32_t (&frag)[4]) {
  cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(smem), frag[0], frag[1],
                                frag[2], frag[3]);
}

template <typename Element>
__device__ __forceinline__ void ldmatrix_x4_trans(const Element* smem, uint32_t (&frag)[4]) {
  cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(smem), frag[0], frag[1],
                                frag[2], frag[3]);
}

template <class Traits>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  Traits::Mma::fma(c[0], c[1], c[2], c[3], a[0], a[1], a[2], a[3], b0, b1, c[0], c[1], c[2], c[3]);
}

// S = Q K^T for the warp's rows. smem_q points at the warp's first row.
template <class Traits>
__device__ __forceinline__ void warp_qk(const typename Traits::Element* smem_q,
                                        const typename Traits::Element* smem_k,
                                        float (&s)[Traits::kMmaM][Traits::kKeyAtoms][4]) {
  constexpr int P = Traits::kRowPitch;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int n = 0; n < Traits::kKeyAtoms; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[m][n][e] = 0.f;

  // A (Q, row-major): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (0-7, 8-15), (8-15, 8-15).
  const typename Traits::Element* q_lane = smem_q + (lane % 16) * P + (lane / 16) * 8;
  // B (K rows = keys, so K is B^T row-major): matrices (keys 0-7, k 0-7) -> b0 of key tile
  // n, (keys 0-7, k 8-15) -> b1 of n, (keys 8-15, k 0-7) -> b0 of n + 1, (8-15, 8-15) -> b1.
  const typename Traits::Element* k_lane =
      smem_k + ((lane % 8) + (lane / 16) * 8) * P + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int kk = 0; kk < Traits::kHeadDim / 16; ++kk) {
    uint32_t a[Traits::kMmaM][4];
#pragma unroll
    for (int m = 0; m < Traits::kMmaM; ++m) ldmatrix_x4(q_lane + m * 16 * P + kk * 16, a[m]);
#pragma unroll
    for (int n = 0; n < Traits::kKeyAtoms; n += 2) {
      uint32_t b[4];
      ldmatrix_x4(k_lane + n * 8 * P + kk * 16, b);
#pragma unroll
      for (int m = 0; m < Traits::kMmaM; ++m) {
        mma<Traits>(s[m][n], a[m], b[0], b[1]);
        mma<Traits>(s[m][n + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// The A fragments of k16 step kk of P V: the probabilities sit in S's accumulator layout,
// which is exactly the A layout once two adjacent n8 key tiles are packed into one k16 step.
template <class Traits>
__device__ __forceinline__ void pack_probabilities(
    const float (&p)[Traits::kMmaM][Traits::kKeyAtoms][4], int kk,
    uint32_t (&a)[Traits::kMmaM][4]) {
  using Element = typename Traits::Element;
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m) {
    a[m][0] = pack2<Element>(p[m][2 * kk][0], p[m][2 * kk][1]);
    a[m][1] = pack2<Element>(p[m][2 * kk][2], p[m][2 * kk][3]);
    a[m][2] = pack2<Element>(p[m][2 * kk + 1][0], p[m][2 * kk + 1][1]);
    a[m][3] = pack2<Element>(p[m][2 * kk + 1][2], p[m][2 * kk + 1][3]);
  }
}

// O += P V.
template <class Traits>
__device__ __forceinline__ void warp_pv(const float (&p)[Traits::kMmaM][Traits::kKeyAtoms][4],
                                        const typename Traits::Element* smem_v,
                                        float (&o)[Traits::kMmaM][Traits::kDimAtoms][4]) {
  using Element = typename Traits::Element;
  constexpr int P = Traits::kRowPitch;
  const int lane = threadIdx.x % 32;
  // B (V rows = keys = k, read transposed): matrices (keys 0-7, d 0-7) -> b0 of d tile n,
  // (keys 8-15, d 0-7) -> b1 of n, (keys 0-7, d 8-15) -> b0 of n + 1, (8-15, 8-15) -> b1.
  const Element* v_lane = smem_v + ((lane % 8) + ((lane / 8) % 2) * 8) * P + (lane / 16) * 8;
#pragma unroll
  for (int kk = 0; kk < Traits::kBlockN / 16; ++kk) {
    uint32_t a[Traits::kMmaM][4];
    pack_probabilities<Traits>(p, kk, a);
#pragma unroll
    for (int n = 0; n < Traits::kDimAtoms; n += 2) {
      uint32_t b[4];
      ldmatrix_x4_trans(v_lane + kk * 16 * P + n * 8, b);
#pragma unroll
      for (int m = 0; m < Traits::kMmaM; ++m) {
        mma<Traits>(o[m][n], a[m], b[0], b[1]);
        mma<Traits>(o[m][n + 1], a[m], b[2], b[3]);
      }
    }
  }
}

}  // namespace jax_fmha::cuda
