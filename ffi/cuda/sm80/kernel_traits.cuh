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
//
// DecodeTraits: the tile for few packed rows per (sequence, KV head) (decode, small GQA
// groups): 16 rows, and the warps split the keys instead of the rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cute/arch/mma_sm80.hpp>

#include "cuda/forward_plan.h"

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

// Shared-memory tiles of rows padded to kRowPitch elements (the mma.sync kernels): element
// offset of (row, column), for the tile loaders.
template <int kRowPitch>
struct PaddedRowTiles {
  __device__ __forceinline__ static int q_offset(int row, int col) { return row * kRowPitch + col; }
  __device__ __forceinline__ static int kv_offset(int row, int col) {
    return row * kRowPitch + col;
  }
};

template <typename Element_, int kHeadDim_>
struct KernelTraits : PaddedRowTiles<kHeadDim_ + 16 / sizeof(Element_)> {
  using Element = Element_;
  using Mma = typename MmaAtom<Element>::Op;

  // Compiled head dim (a smaller problem head_dim runs here with zero-padded columns).
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = int(kPortableShape.block_m);
  // Above d64 the key tile is 32 keys: with 64, S (64 registers) and O (128) of a warp's 32
  // rows at d128 leave ptxas short (148 B of spills), and on an H200 it measured 2-4% slower
  // than 32 keys with one barrier a step (docs/design/cuda_attention.md). 32 keys also keep two
  // K/V stages within an A100's 163 KB of shared memory at d256.
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
  // Up to d128 a warp owns 32 rows (two m16 tiles share each K/V fragment it loads); above,
  // the O accumulator of 32 rows would not fit the registers, so 8 warps own 16 rows each.
  static constexpr int kWarps = kHeadDim <= 128 ? 4 : 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMmaM = kWarpRows / 16;    // m16 tiles per warp
  static constexpr int kKeyAtoms = kBlockN / 8;   // n8 tiles of S per row block
  static constexpr int kDimAtoms = kHeadDim / 8;  // n8 tiles of O per row block
  static constexpr int kStages = 2;               // K/V tiles in flight (double buffer)

  // Shared-memory rows are padded by 16 bytes: the 8 rows one ldmatrix reads then start in
  // 8 different bank groups (the row pitch is an odd multiple of 16 bytes modulo 128).
  static constexpr int kChunk = 16 / sizeof(Element);  // elements per 16-byte copy
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kRowPitch = kHeadDim + kChunk;

  static constexpr int kQElems = kBlockM * kRowPitch;
  static constexpr int kKvTileElems = kBlockN * kRowPitch;
  static constexpr size_t kSmemBytes =
      sizeof(Element) * (size_t(kQElems) + 2 * size_t(kStages) * kKvTileElems);

  static_assert(kRowPitch == kHeadDim_ + 16 / sizeof(Element_), "PaddedRowTiles pitch");
  static_assert(kHeadDim % 16 == 0, "head dim must be a multiple of the mma k (16)");
  static_assert(kBlockN % 16 == 0 && kWarpRows % 16 == 0, "tiles must be mma multiples");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0, "K/V tile copy must split evenly");
  static_assert(kDimAtoms % 2 == 0 && kKeyAtoms % 2 == 0, "ldmatrix.x4 loads n8 tile pairs");
};

// Decode tile: kBlockM = 16 packed rows (one m16 tile), shared by kWarps warps that each
// stream their own 16-key blocks (warp w takes blocks w, w + kWarps, ...) through a private
// cp.async pipeline of kStages stages, synchronizing only within the warp. The warps' partial
// softmax states are combined through shared memory at the end. Memory-bound: the point is
// many bytes in flight per SM, so the stages fill about 104 KB (two CTAs an SM up to d128).
template <typename Element_, int kHeadDim_>
struct DecodeTraits : PaddedRowTiles<kHeadDim_ + 16 / sizeof(Element_)> {
  using Element = Element_;
  using Mma = typename MmaAtom<Element>::Op;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = int(kDecodeShape.block_m);
  static constexpr int kBlockN = 16;  // keys of one warp step (one k16 step of P V)
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM;  // every warp computes all rows
  static constexpr int kMmaM = 1;
  static constexpr int kKeyAtoms = kBlockN / 8;
  static constexpr int kDimAtoms = kHeadDim / 8;

  static constexpr int kChunk = 16 / sizeof(Element);
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kRowPitch = kHeadDim + kChunk;

  static constexpr int kQElems = kBlockM * kRowPitch;
  static constexpr int kKvTileElems = kBlockN * kRowPitch;
  static constexpr int kWarpStageBytes = 2 * kKvTileElems * int(sizeof(Element));
  static constexpr int kStagesFit = (104 * 1024) / (kWarps * kWarpStageBytes);
  static constexpr int kStages = kStagesFit < 2 ? 2 : (kStagesFit > 6 ? 6 : kStagesFit);

  // The combine reuses the K/V stages: each warp's O (float32) and row statistics.
  static constexpr int kCombinePitch = kHeadDim + 4;
  static constexpr size_t kCombineBytes =
      sizeof(float) * (size_t(kWarps) * kBlockM * kCombinePitch + 2 * kWarps * kBlockM);
  static constexpr size_t kStageBytes = size_t(kWarps) * kStages * kWarpStageBytes;
  static constexpr size_t kSmemBytes = sizeof(Element) * size_t(kQElems) +
                                       (kStageBytes > kCombineBytes ? kStageBytes : kCombineBytes);

  static_assert(kRowPitch == kHeadDim_ + 16 / sizeof(Element_), "PaddedRowTiles pitch");
  static_assert((kBlockN * kChunksPerRow) % 32 == 0, "a warp's K/V copy must split evenly");
  static_assert(kDimAtoms % 2 == 0, "ldmatrix.x4 loads n8 tile pairs");
};

}  // namespace jax_fmha::cuda
