// Compile-time shape of the Hopper (sm_90a) attention forward kernel (sm90/forward_kernel.cuh):
// a producer warpgroup that loads K and V by TMA, and two consumer warpgroups that run the
// products on warpgroup MMA (wgmma) and the softmax.
//
// One CTA = 3 warpgroups of 128 threads, kBlockM = 128 packed query rows: consumer warpgroup
// g owns rows 64 g .. 64 g + 63, its warp w (of 4) rows 16 w .. 16 w + 15 within them. The
// wgmma accumulator gives each thread the same elements as an m16n8 mma.sync accumulator
// would (rows g and g + 8 of its warp's 16, columns 8 n + 2 t, 2 t + 1), so the masking, the
// online softmax and the epilogue of the portable kernel run unchanged on it (kMmaM = 1,
// kWarpRows = 16).
//
// Shared memory: Q (kBlockM x d), kStages stages each of K and V (kBlockN x d), all in the
// K-major swizzled layout wgmma reads and TMA writes: the tile is cut into column boxes of
// one swizzle atom's width (64 columns at 128-byte swizzle), each box kBlockN rows of that
// width, in order. Q K^T reads Q and K from there (both operands K-major: the reduction runs
// over d); P V reads V through a transposed view (d x keys, "MN-major"), P from registers.
// Then the pipeline's mbarriers. The epilogue reuses the whole buffer for the output tile.
// With FP8 queries, Q and K are e4m3 tiles (their own swizzle span and boxes) and V keeps its
// 16-bit type, or is e4m3 too: then a second ring holds each V stage transposed (d x keys,
// keys contiguous), K-major for the FP8 P V product (docs/design/fp8_attention.md, "The
// Hopper kernel").
#pragma once

#include <cuda_fp8.h>
#include <cutlass/float8.h>
#include <cutlass/numeric_types.h>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "cuda/common/dtypes.cuh"
#include "cuda/forward_plan.h"

namespace jax_fmha::cuda {

template <typename Element>
struct CuteElement;
template <>
struct CuteElement<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteElement<__half> {
  using type = cutlass::half_t;
};
template <>
struct CuteElement<__nv_fp8_e4m3> {
  using type = cutlass::float_e4m3_t;
};

// The widest swizzle (128, 64 or 32 bytes of a row) whose atom tiles a d-wide row: its width
// in bytes is also the TMA box's row and swizzle mode (sm90/tma.cuh).
template <int kHeadDim, int kElementBytes>
constexpr int kSwizzleBytes = (kHeadDim * kElementBytes) % 128 == 0  ? 128
                              : (kHeadDim * kElementBytes) % 64 == 0 ? 64
                                                                     : 32;

template <typename T, int kSwizzle>
using KMajorAtom =
    std::conditional_t<kSwizzle == 128, cute::GMMA::Layout_K_SW128_Atom<T>,
                       std::conditional_t<kSwizzle == 64, cute::GMMA::Layout_K_SW64_Atom<T>,
                                          cute::GMMA::Layout_K_SW32_Atom<T>>>;

// One kRows x d tile of T in shared memory, K-major and swizzled, as TMA writes it: cut into
// kColumnBoxes column boxes of one swizzle span (kBoxColumns columns) each, kRows rows a box.
template <typename T, int kRows, int kHeadDim>
struct SwizzledTile {
  using Element = T;
  using MmaElement = typename CuteElement<T>::type;
  static constexpr int kSwizzleBytes = jax_fmha::cuda::kSwizzleBytes<kHeadDim, sizeof(T)>;
  static constexpr int kBoxColumns = kSwizzleBytes / int(sizeof(T));
  static constexpr int kColumnBoxes = kHeadDim / kBoxColumns;
  using Layout =
      decltype(cute::tile_to_shape(KMajorAtom<MmaElement, kSwizzleBytes>{},
                                   cute::Shape<cute::Int<kRows>, cute::Int<kHeadDim>>{}));
  static constexpr int kElems = int(cute::cosize_v<Layout>);
  static constexpr int kBytes = kElems * int(sizeof(T));

  // Element offset of (row, column); column a multiple of 16 bytes (the swizzle permutes
  // 16-byte chunks, so a chunk stays contiguous).
  __host__ __device__ __forceinline__ static constexpr int offset(int row, int col) {
    constexpr Layout layout{};
    const int bytes = int(layout.layout_b()(row, col)) * int(sizeof(T));
    return int(layout.layout_a()(bytes)) / int(sizeof(T));
  }
  // offset(row, col) in unsigned shifts and masks (the V transpose's addresses, a few
  // instructions each; the CuTe form takes signed divisions): the column box's rows, each
  // kSwizzleBytes, whose 16-byte chunk index is XORed with bits 7 and up of the byte offset
  // (Swizzle<log2(kSwizzleBytes / 16), 4, 3>; a box's bytes are a multiple of 1024, so it
  // does not change the XOR). tests/cuda/hopper_fp8_pv_layout.cu checks it against offset().
  __host__ __device__ __forceinline__ static int chunk_offset(unsigned row, unsigned col) {
    constexpr unsigned kChunkMask = (kSwizzleBytes / 16 - 1) << 4;
    const unsigned linear =
        (col / kBoxColumns * kRows + row) * kSwizzleBytes + col % kBoxColumns * unsigned(sizeof(T));
    return int((linear ^ (linear >> 3 & kChunkMask)) / sizeof(T));
  }
  // Element offset of row `row` of column box `box` (rows are swizzled within themselves: a
  // row's span stays whole).
  __host__ __device__ __forceinline__ static constexpr int box_row(int box, int row) {
    return (box * kRows + row) * kBoxColumns;
  }

  static_assert(kElems == kRows * kHeadDim, "swizzled tiles are dense");
  static_assert(kHeadDim % kBoxColumns == 0, "column boxes must tile the head dim");
};

// Key-block size and K/V stages per head dim. 128 keys up to d128; above, 64: two stages of
// 128-key K and V tiles would not fit the shared memory at d192-d256, and the O accumulator
// (up to 128 registers) leaves less room for S. With FP8 Q and K (kQkBytes 1) the Q and K
// tiles take half the bytes: d256 takes a third stage, which also makes room for the float32
// output tile of split-KV partials (docs/design/fp8_attention.md).
template <int kHeadDim, int kQkBytes = 2>
struct HopperTile {
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kStages = kQkBytes == 1 && kHeadDim > 128 ? 3 : 2;
};

// The atom of O += P V: P from registers (K-major); V^T from shared memory, MN-major for 16-bit
// V (a transposed view of the V tile), K-major for FP8 V (the transposed tile: FP8 wgmma reads
// shared operands K-major only).
template <class T, class TileShape, bool kTransposedV>
constexpr auto pv_op_selector() {
  if constexpr (kTransposedV)
    return cute::GMMA::rs_op_selector<T, T, float, TileShape, cute::GMMA::Major::K,
                                      cute::GMMA::Major::K>();
  else
    return cute::GMMA::rs_op_selector<T, T, float, TileShape, cute::GMMA::Major::K,
                                      cute::GMMA::Major::MN>();
}

// Element: the type of V and of P in P V (bfloat16, float16, or float8_e4m3fn: FP8 P V);
// QkElement: that of Q and K, Element or float8_e4m3fn (FP8 Q K^T: docs/design/fp8_attention.md).
template <typename Element_, int kHeadDim_, typename QkElement_ = Element_>
struct HopperTraits {
  using Element = Element_;
  using QkElement = QkElement_;
  using MmaElement = typename CuteElement<Element>::type;
  using MmaQkElement = typename CuteElement<QkElement>::type;
  static constexpr bool kFp8Qk = sizeof(QkElement) == 1;
  // FP8 P V: the producer transposes each V stage into a V^T ring, P is packed to e4m3.
  static constexpr bool kFp8V = sizeof(Element) == 1;
  static_assert(!kFp8V || kFp8Qk, "FP8 v comes with FP8 q and k");

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = int(kHopperShape.block_m);
  static constexpr int kBlockN = HopperTile<kHeadDim, int(sizeof(QkElement))>::kBlockN;
  static constexpr int kStages = HopperTile<kHeadDim, int(sizeof(QkElement))>::kStages;
  static constexpr int kConsumerGroups = 2;
  static constexpr int kGroupThreads = 128;
  static constexpr int kConsumerThreads = kConsumerGroups * kGroupThreads;
  static constexpr int kThreads = kConsumerThreads + kGroupThreads;  // + the producer
  // Registers per thread after setmaxnreg: the producer only issues copies (at 24 ptxas
  // spilled its page-table arithmetic).
  // With FP8 V its warps 1-3 also transpose V stages (within the same 40: the launch grants
  // 168 a thread, so 40 x 128 + 232 x 256 is the whole pool).
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  static constexpr int kTransposeWarps = 3;  // FP8 V: producer warps 1-3
  // FP8 V: V^T stages, one more than the V ring's. The consumers wait for V^T of block n at
  // the start of their iteration n + 1, and the transpose of block n can start once both
  // released the stage's previous use, at the end of their iteration n - S + 1 (S stages):
  // S - 1.5 blocks' time (the consumers run half an iteration apart), half a block with 2.
  static constexpr int kVtStages = kStages + 1;
  static constexpr int kWarpRows = 16;
  static constexpr int kMmaGroupRows = 64;  // the rows of one warpgroup's MMAs
  static constexpr int kMmaM = 1;
  static constexpr int kKeyAtoms = kBlockN / 8;
  static constexpr int kDimAtoms = kHeadDim / 8;

  // The shared tiles (K and V: TMA boxes).
  using QTile = SwizzledTile<QkElement, kBlockM, kHeadDim>;
  using KTile = SwizzledTile<QkElement, kBlockN, kHeadDim>;
  using VTile = SwizzledTile<Element, kBlockN, kHeadDim>;
  // FP8 V: V^T (d rows of kBlockN keys), its keys permuted within each 32-key group
  // (sm90/forward_kernel.cuh, transpose_v). Unused with 16-bit V.
  using VtTile = SwizzledTile<Element, kHeadDim, kBlockN>;

  // The Q loader's 16-byte copies (common/tile_load.cuh).
  static constexpr int kChunk = 16 / sizeof(QkElement);
  static constexpr int kChunksPerRow = kHeadDim / kChunk;

  using BlockM = cute::Int<kBlockM>;
  using BlockN = cute::Int<kBlockN>;
  using HeadDim = cute::Int<kHeadDim>;
  using Warpgroups = cute::Layout<cute::Shape<cute::Int<kBlockM / 64>, cute::_1, cute::_1>>;
  // S = Q K^T: M = rows, N = keys, K = d; both operands from shared memory (FP8: k32 steps).
  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<MmaQkElement, MmaQkElement, float,
                                 cute::Shape<BlockM, BlockN, HeadDim>>(),
      Warpgroups{}));
  // O += P V: M = rows, N = d, K = keys; P from registers, V^T from shared memory (FP8: k32
  // steps).
  using MmaPV = decltype(cute::make_tiled_mma(
      pv_op_selector<MmaElement, cute::Shape<BlockM, HeadDim, BlockN>, kFp8V>(), Warpgroups{}));

  using SmemLayoutQ = typename QTile::Layout;
  using SmemLayoutK = typename KTile::Layout;
  using SmemLayoutV = typename VTile::Layout;
  // P V's B operand as (d, key). 16-bit V: the V tile seen so, element (c, r) is element
  // (r, c) of the K-major tile. FP8 V: the V^T tile.
  using SmemLayoutVt =
      std::conditional_t<kFp8V, typename VtTile::Layout,
                         decltype(cute::composition(
                             SmemLayoutV{},
                             cute::make_ordered_layout(cute::Shape<HeadDim, BlockN>{},
                                                       cute::Step<cute::_2, cute::_1>{})))>;

  // Q, then K stages, then V stages, then (FP8 V) V^T stages (bytes); then the mbarriers (8
  // bytes each): full and empty of each K and V stage, one for the last V block, and (FP8 V)
  // full and empty of each V^T stage (forward_kernel.cuh).
  static constexpr size_t kKOffset = size_t(QTile::kBytes);
  static constexpr size_t kVOffset = kKOffset + size_t(kStages) * KTile::kBytes;
  static constexpr size_t kVtOffset = kVOffset + size_t(kStages) * VTile::kBytes;
  static constexpr size_t kBarriersOffset =
      kVtOffset + (kFp8V ? size_t(kVtStages) * VtTile::kBytes : 0);
  static constexpr int kBarriers = 4 * kStages + 1 + (kFp8V ? 2 * kVtStages : 0);
  static constexpr size_t kSmemBytes = kBarriersOffset + 8 * kBarriers;
  // Every tile starts on a swizzle-pattern boundary (the wgmma descriptors and TMA assume it).
  static constexpr size_t kSmemAlign = 1024;

  // Element offset of (row, column) in the Q tile (the Q loader's chunks; constexpr for its
  // compile-time checks, common/tile_load.cuh).
  __host__ __device__ __forceinline__ static constexpr int q_offset(int row, int col) {
    return QTile::offset(row, col);
  }

  static_assert(QTile::kBytes % kSmemAlign == 0 && KTile::kBytes % kSmemAlign == 0 &&
                    VTile::kBytes % kSmemAlign == 0 && VtTile::kBytes % kSmemAlign == 0,
                "tiles must keep the swizzle alignment");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of an sm_90 CTA");
  static_assert(kBlockN % kHopperPageRunKeys == 0, "page runs must split the key block");
  static_assert(kProducerRegisters * kGroupThreads + kConsumerRegisters * kConsumerThreads <=
                    64 * 1024,
                "register file of an SM");
};

}  // namespace jax_fmha::cuda
