// Compile-time shape of the CUDA attention forward kernel: tile sizes, warps, shared memory.
//
// One CTA computes a tile of kBlockM query rows against the keys of one (sequence, KV head,
// split), kBlockN keys at a time. Query rows are "packed rows": the query heads that share
// a KV head are interleaved (row r -> query r / group, head r % group of the group), so one
// K/V tile in shared memory serves every head of the group; with one query per sequence
// (decode) the group's heads fill the tile's rows instead of a single row.
//
// Each warp owns kWarpRows consecutive rows of the tile (kMmaM m16 tiles of the mma.sync
// m16n8k16 instruction) and all kBlockN keys of S = Q K^T and all head-dim columns of O.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>

#include <cute/arch/mma_sm80.hpp>

namespace jax_fmha::cuda {

// The tensor-core instruction for an element type: m16n8k16, fp32 accumulation.
template <typename Element>
struct MmaAtom;
template <>
struct MmaAtom<__nv_bfloat16> {
  using Op = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtom<__half> {
  using Op = cute::SM80_16x8x16_F32F16F16F32_TN;
};

template <typename Element_, int kHeadDim_>
struct KernelTraits {
  using Element = Element_;
  using Mma = typename MmaAtom<Element>::Op;

  // Compiled head dim (a smaller problem head_dim runs here with zero-padded columns).
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  // Above d64 the key tile is halved: it keeps S and O together within 255 registers (no
  // spills) and two stages of K and V within an A100's 163 KB of shared memory.
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
  // Up to d128 a warp owns 32 rows (two m16 tiles share each K/V fragment it loads); above,
  // the O accumulator of 32 rows would not fit the registers, so 8 warps own 16 rows each.
  static constexpr int kWarps = kHeadDim <= 128 ? 4 : 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMmaM = kWarpRows / 16;      // m16 tiles per warp
  static constexpr int kKeyAtoms = kBlockN / 8;     // n8 tiles of S per row block
  static constexpr int kDimAtoms = kHeadDim / 8;    // n8 tiles of O per row block
  static constexpr int kStages = 2;                 // K/V tiles in flight (double buffer)

  // Shared-memory rows are padded by 16 bytes: the 8 rows one ldmatrix reads then start in
  // 8 different bank groups (the row pitch is an odd multiple of 16 bytes modulo 128).
  static constexpr int kChunk = 16 / sizeof(Element);  // elements per 16-byte copy
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kRowPitch = kHeadDim + kChunk;

  static constexpr int kQElems = kBlockM * kRowPitch;
  static constexpr int kKvTileElems = kBlockN * kRowPitch;
  static constexpr size_t kSmemBytes =
      sizeof(Element) * (size_t(kQElems) + 2 * size_t(kStages) * kKvTileElems);

  // The epilogue stages the output tile through the same shared memory, in the output type.
  template <typename OutT>
  static constexpr int kOutPitch = kHeadDim + 16 / int(sizeof(OutT));
  template <typename OutT>
  static constexpr bool kOutTileFits =
      size_t(kBlockM) * kOutPitch<OutT> * sizeof(OutT) <= kSmemBytes;

  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the mma k (16)");
  static_assert(kBlockN % 16 == 0 && kWarpRows % 16 == 0, "tiles must be mma multiples");
  static_assert((kBlockM * kChunksPerRow) % kThreads == 0, "Q tile copy must split evenly");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0, "K/V tile copy must split evenly");
  static_assert(kDimAtoms % 2 == 0 && kKeyAtoms % 2 == 0, "ldmatrix.x4 loads n8 tile pairs");
};

}  // namespace jax_fmha::cuda
