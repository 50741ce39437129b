// Output of a tile: normalize O by the row sums, stage it through shared memory in the
// output type, store 16-byte chunks of whole rows; LSE (natural log) per row. Also the rows
// the CPU kernel fills without computing: NaN for a sequence whose data is invalid, and
// 0 / -inf for packed query rows outside every sequence.
#pragma once

#include <cmath>

#include "common/attention_problem.h"
#include "cuda/common/dtypes.cuh"
#include "cuda/common/softmax.cuh"

namespace jax_fmha::cuda {

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* dst, float a, float b) {
  if constexpr (sizeof(OutT) == 4) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = pack2<OutT>(a, b);
  }
}

// Where the outputs of a sequence's packed rows go (split partials are q.rows rows apart).
// Packed rows stay under 2^31 (launch_forward checks): their query and head come from
// 32-bit divisions.
struct OutputRows {
  const AttentionProblem& p;
  int64_t split, b, q_begin;
  int kv_head;

  __device__ __forceinline__ int64_t query(int64_t packed_row) const {
    return int(packed_row) / int(p.group());
  }
  __device__ __forceinline__ int64_t head(int64_t packed_row) const {
    return kv_head * int(p.group()) + int(packed_row) % int(p.group());
  }
  __device__ __forceinline__ int64_t out_offset(int64_t packed_row) const {
    return ((split * p.q.rows + q_begin + query(packed_row)) * p.num_q_heads + head(packed_row)) *
           p.head_dim;
  }
  __device__ __forceinline__ int64_t lse_offset(int64_t packed_row) const {
    return split * p.lse_size() + p.lse_index(b, head(packed_row), query(packed_row));
  }
};

// The epilogue: the threads that hold the accumulators normalize O by the row sums and
// write it, in the output type, into a shared-memory staging tile (`stage(row, col)`: the
// element offset of (row, col) for col a multiple of 8 or a 16-byte chunk's first column; a
// chunk stays contiguous), then copy 16-byte chunks of whole rows out; LSE (natural log) per
// row.

// The portable kernels' staging tile: rows padded by 16 bytes.
template <class Traits, typename OutT>
constexpr int kOutPitch = Traits::kHeadDim + 16 / int(sizeof(OutT));

// The thread's share of a finished tile: its rows' LSE (natural log; one thread of each quad
// writes it), and its normalized output pairs, given to store(m, h, r, col, a, b) for columns
// col and col + 1 of tile row r (r = warp_row + 16 m + 8 h + lane / 4, every row of the tile).
template <class Traits, class Store>
__device__ __forceinline__ void finish_rows(float (&o)[Traits::kMmaM][Traits::kDimAtoms][4],
                                            const OnlineSoftmax<Traits>& softmax, float* lse,
                                            const OutputRows& dst, int64_t row_begin, int rows,
                                            int warp_row, int lane, Store store) {
  constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row + 16 * m + 8 * h + lane / 4;
      const float sum = quad_sum(softmax.row_sum[m][h]);
      const float inv = sum > 0.f ? 1.f / sum : 0.f;  // a row that saw no key stays 0
#pragma unroll
      for (int d = 0; d < Traits::kDimAtoms; ++d)
        store(m, h, r, 8 * d + 2 * (lane % 4), o[m][d][2 * h] * inv, o[m][d][2 * h + 1] * inv);
      if (lane % 4 == 0 && r < rows)
        lse[dst.lse_offset(row_begin + r)] =
            sum > 0.f ? (softmax.row_max[m][h] + log2f(sum)) * kLn2 : -INFINITY;
    }
}

// Rows [first_row, first_row + kRows) of the tile, held by kStoreThreads threads (this one is
// `tid`; its warp's rows from warp_row on), through a staging tile. The staging tile's rows
// must be free (no copy in flight, no reader left) before the call. sync(): a barrier of
// those threads.
template <class Traits, typename OutT, int kRows, int kStoreThreads, class Stage, class Sync>
__device__ __forceinline__ void store_staged(float (&o)[Traits::kMmaM][Traits::kDimAtoms][4],
                                             const OnlineSoftmax<Traits>& softmax, OutT* tile,
                                             Stage stage, OutT* out, float* lse,
                                             const OutputRows& dst, int64_t row_begin, int rows,
                                             int first_row, int warp_row, int tid, Sync sync) {
  finish_rows<Traits>(o, softmax, lse, dst, row_begin, rows, warp_row, tid % 32,
                      [&](int, int, int r, int col, float a, float b) {
                        store_pair(tile + stage(r, col & ~7) + (col & 7), a, b);
                      });
  sync();
  constexpr int kChunk = 16 / sizeof(OutT);
  constexpr int kChunksPerRow = Traits::kHeadDim / kChunk;
  for (int c = tid; c < kRows * kChunksPerRow; c += kStoreThreads) {
    const int r = first_row + c / kChunksPerRow, col = (c % kChunksPerRow) * kChunk;
    if (r < rows && col < dst.p.head_dim)
      *reinterpret_cast<uint4*>(out + dst.out_offset(row_begin + r) + col) =
          *reinterpret_cast<const uint4*>(tile + stage(r, col));
  }
}

// The thread's rows straight from registers to global memory (a quad writes 4 pairs of a row
// side by side), where no staging tile is free.
template <class Traits, typename OutT>
__device__ __forceinline__ void store_direct(float (&o)[Traits::kMmaM][Traits::kDimAtoms][4],
                                             const OnlineSoftmax<Traits>& softmax, OutT* out,
                                             float* lse, const OutputRows& dst, int64_t row_begin,
                                             int rows, int warp_row, int lane) {
  const int head_dim = int(dst.p.head_dim);
  // The thread's rows' outputs, located once (not once per pair).
  OutT* row_out[Traits::kMmaM][2];
#pragma unroll
  for (int m = 0; m < Traits::kMmaM; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      row_out[m][h] = out + dst.out_offset(row_begin + warp_row + 16 * m + 8 * h + lane / 4);
  finish_rows<Traits>(o, softmax, lse, dst, row_begin, rows, warp_row, lane,
                      [&](int m, int h, int r, int col, float a, float b) {
                        if (r < rows && col < head_dim) store_pair(row_out[m][h] + col, a, b);
                      });
}

// The whole tile through a padded staging tile at `smem`, by every thread of the CTA.
template <class Traits, typename OutT, class Sync>
__device__ __forceinline__ void store_tile(float (&o)[Traits::kMmaM][Traits::kDimAtoms][4],
                                           const OnlineSoftmax<Traits>& softmax, void* smem,
                                           OutT* out, float* lse, const OutputRows& dst,
                                           int64_t row_begin, int rows, int warp_row, Sync sync) {
  constexpr int kPitch = kOutPitch<Traits, OutT>;
  static_assert(size_t(Traits::kBlockM) * kPitch * sizeof(OutT) <= Traits::kSmemBytes,
                "output tile exceeds shared memory");
  store_staged<Traits, OutT, Traits::kBlockM, Traits::kThreads>(
      o, softmax, static_cast<OutT*>(smem), [](int r, int col) { return r * kPitch + col; }, out,
      lse, dst, row_begin, rows, 0, warp_row, threadIdx.x, sync);
}

// The rows of a tile whose sequence has invalid K/V data (out-of-range page id, seq_lens
// beyond the cache): NaN output and NaN LSE, as on the CPU.
// `threads` threads share the stores (this one is `tid`).
template <typename OutT>
__device__ void store_nan_rows(OutT* out, float* lse, const OutputRows& dst, int64_t row_begin,
                               int rows, int tid, int threads) {
  const int64_t d = dst.p.head_dim;
  for (int64_t c = tid; c < rows * d; c += threads)
    out[dst.out_offset(row_begin + c / d) + c % d] = from_float<OutT>(NAN);
  for (int r = tid; r < rows; r += threads) lse[dst.lse_offset(row_begin + r)] = NAN;
}

// Packed queries only: rows before cu_seqlens_q[0] or from cu_seqlens_q[B] on get 0 and LSE
// -inf; the rows of a sequence whose query range is invalid (out of the array, or longer
// than max_seqlen_q: no tile computes it) get NaN. Grid: (B + 2 row ranges, CTAs per range,
// splits); range 0 and 1 are the two outside ranges, range 2 + b is sequence b. Launched
// before the attention kernel, whose tiles write every other row.
template <typename OutT>
__global__ void fill_rows_outside_sequences(const AttentionProblem p, OutT* out, float* lse) {
  const int64_t range = blockIdx.x, split = blockIdx.z;
  const auto clamp = [&](int64_t row) { return row < 0 ? 0 : (row > p.q.rows ? p.q.rows : row); };
  int64_t begin, end;
  float value, lse_value;
  if (range < 2) {
    begin = range == 0 ? 0 : clamp(p.q.cu_seqlens[p.batch]);
    end = range == 0 ? clamp(p.q.cu_seqlens[0]) : p.q.rows;
    value = 0.f, lse_value = -INFINITY;
  } else {
    const int64_t b = range - 2;
    if (p.q.valid(b)) return;
    begin = clamp(p.q.cu_seqlens[b]), end = clamp(p.q.cu_seqlens[b + 1]);
    value = lse_value = NAN;
  }
  if (end <= begin) return;
  const int64_t row_elems = p.num_q_heads * p.head_dim;
  const int64_t n = (end - begin) * row_elems;
  OutT* base = out + (split * p.q.rows + begin) * row_elems;
  const OutT fill = from_float<OutT>(value);
  const int64_t stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; e < n; e += stride)
    base[e] = fill;
  const int64_t lse_n = (end - begin) * p.num_q_heads;
  for (int64_t e = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; e < lse_n; e += stride) {
    const int64_t h = e / (end - begin), row = begin + e % (end - begin);
    lse[split * p.lse_size() + h * p.q.rows + row] = lse_value;  // packed LSE is [Hq, Tq]
  }
}

}  // namespace jax_fmha::cuda
