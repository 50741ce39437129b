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
//
// Both take the K/V storage type last: q's dtype, or an FP8 format (common/fp8.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cute/arch/mma_sm80.hpp>
#include <type_traits>

#include "cuda/common/fp8.cuh"
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

// Shared-memory tiles of rows padded by 16 bytes (the mma.sync kernels): element offset of
// (row, column) in the query tile (kRowPitch elements a row) and in a K/V tile (kKvRowPitch),
// for the tile loaders.
template <int kRowPitch, int kKvRowPitch>
struct PaddedRowTiles {
  __host__ __device__ __forceinline__ static constexpr int q_offset(int row, int col) {
    return row * kRowPitch + col;
  }
  __device__ __forceinline__ static int kv_offset(int row, int col) {
    return row * kKvRowPitch + col;
  }
};

// The element types and row layout both tiles share. QElement: q's dtype (bfloat16 or
// float16); KvElement: the K/V storage type, q's or an FP8 format; Element: what the tensor
// cores multiply, q's dtype, or fp16 for FP8 K/V (docs/design/fp8_kv_cache.md). Rows are
// padded by 16 bytes: the 8 rows one ldmatrix reads then start in 8 different bank groups
// (the row pitch is an odd multiple of 16 bytes modulo 128), for 16-bit and FP8 rows alike.
template <typename QElement_, typename Kv_, int kHeadDim_>
struct TileElements
    : PaddedRowTiles<kHeadDim_ + 16 / sizeof(QElement_), kHeadDim_ + 16 / sizeof(Kv_)> {
  using QElement = QElement_;
  using KvElement = Kv_;
  static constexpr bool kFp8 = kIsFp8<Kv_>;
  using Element = std::conditional_t<kFp8, __half, QElement_>;
  using Mma = typename MmaAtom<Element>::Op;

  // Compiled head dim (a smaller problem head_dim runs here with zero-padded columns).
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kChunk = 16 / sizeof(QElement);  // query elements per 16-byte copy
  static constexpr int kChunksPerRow = kHeadDim / kChunk;
  static constexpr int kRowPitch = kHeadDim + kChunk;
  static constexpr int kKvChunk = 16 / sizeof(KvElement);  // K/V elements per 16-byte copy
  static constexpr int kKvChunksPerRow = kHeadDim / kKvChunk;
  static constexpr int kKvRowPitch = kHeadDim + kKvChunk;

  static_assert(sizeof(QElement) == 2 && sizeof(Element) == 2, "16-bit queries");
  static_assert(kHeadDim % (kFp8 ? 32 : 16) == 0,
                "head dim: a multiple of the mma k (16); FP8 keys load two k steps at once");
};

template <typename QElement_, int kHeadDim_, typename Kv_ = QElement_>
struct KernelTraits : TileElements<QElement_, Kv_, kHeadDim_> {
  using Base = TileElements<QElement_, Kv_, kHeadDim_>;
  using typename Base::Element;
  using typename Base::KvElement;
  using typename Base::QElement;
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

  static constexpr int kQElems = kBlockM * Base::kRowPitch;
  static constexpr int kKvTileElems = kBlockN * Base::kKvRowPitch;
  // FP8 K/V: after the query tile, each row's power-of-two factor (fp8 Q pass).
  static constexpr size_t kQBytes =
      sizeof(QElement) * size_t(kQElems) + (Base::kFp8 ? sizeof(float) * kBlockM : 0);
  static constexpr size_t kMainLoopBytes =
      kQBytes + sizeof(KvElement) * 2 * size_t(kStages) * kKvTileElems;
  // The epilogue stages the output tile, float32 split-KV partials included, in the same
  // memory (store_tile), which FP8 stages can leave smaller.
  static constexpr size_t kOutTileBytes = sizeof(float) * size_t(kBlockM) * (kHeadDim + 4);
  static constexpr size_t kSmemBytes =
      kMainLoopBytes > kOutTileBytes ? kMainLoopBytes : kOutTileBytes;

  static_assert(kBlockN % 16 == 0 && kWarpRows % 16 == 0, "tiles must be mma multiples");
  static_assert((kBlockN * Base::kKvChunksPerRow) % kThreads == 0,
                "K/V tile copy must split evenly");
  static_assert(kDimAtoms % 2 == 0 && kKeyAtoms % 2 == 0, "ldmatrix.x4 loads n8 tile pairs");
};

// Decode tile: kBlockM = 16 packed rows (one m16 tile), shared by kWarps warps that each
// stream their own 16-key blocks (warp w takes blocks w, w + kWarps, ...) through a private
// cp.async pipeline of kStages stages, synchronizing only within the warp. The warps' partial
// softmax states are combined through shared memory at the end. Memory-bound: the point is
// many bytes in flight per SM, so the stages fill about 104 KB (two CTAs an SM up to d128).
template <typename QElement_, int kHeadDim_, typename Kv_ = QElement_>
struct DecodeTraits : TileElements<QElement_, Kv_, kHeadDim_> {
  using Base = TileElements<QElement_, Kv_, kHeadDim_>;
  using typename Base::Element;
  using typename Base::KvElement;
  using typename Base::QElement;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = int(kDecodeShape.block_m);
  static constexpr int kBlockN = 16;  // keys of one warp step (one k16 step of P V)
  static constexpr int kWarps = Base::kFp8 ? 8 : 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM;  // every warp computes all rows
  static constexpr int kMmaM = 1;
  static constexpr int kKeyAtoms = kBlockN / 8;
  static constexpr int kDimAtoms = kHeadDim / 8;

  static constexpr int kQElems = kBlockM * Base::kRowPitch;
  static constexpr size_t kQBytes =
      sizeof(QElement) * size_t(kQElems) + (Base::kFp8 ? sizeof(float) * kBlockM : 0);
  static constexpr int kKvTileElems = kBlockN * Base::kKvRowPitch;
  static constexpr int kWarpStageBytes = 2 * kKvTileElems * int(sizeof(KvElement));
  // As many stages as fill the budget: FP8 stages hold half the bytes, so up to twice as many
  // keep as many bytes in flight.
  static constexpr int kMaxStages = 12 / int(sizeof(KvElement));
  static constexpr int kStagesFit = (104 * 1024) / (kWarps * kWarpStageBytes);
  static constexpr int kStages =
      kStagesFit < 2 ? 2 : (kStagesFit > kMaxStages ? kMaxStages : kStagesFit);

  // The combine reuses the K/V stages: each warp's O (float32) and row statistics.
  static constexpr int kCombinePitch = kHeadDim + 4;
  static constexpr size_t kCombineBytes =
      sizeof(float) * (size_t(kWarps) * kBlockM * kCombinePitch + 2 * kWarps * kBlockM);
  static constexpr size_t kStageBytes = size_t(kWarps) * kStages * kWarpStageBytes;
  static constexpr size_t kSmemBytes =
      kQBytes + (kStageBytes > kCombineBytes ? kStageBytes : kCombineBytes);

  static_assert((kBlockN * Base::kKvChunksPerRow) % 32 == 0, "a warp's K/V copy must split evenly");
  static_assert(kDimAtoms % 2 == 0, "ldmatrix.x4 loads n8 tile pairs");
};

}  // namespace jax_fmha::cuda
