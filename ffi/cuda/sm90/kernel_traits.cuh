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
#pragma once

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

// Key-block size and K/V stages per head dim. 128 keys up to d128; above, 64: two stages of
// 128-key K and V tiles would not fit the shared memory at d192-d256, and the O accumulator
// (up to 128 registers) leaves less room for S.
template <int kHeadDim>
struct HopperTile {
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kStages = 2;
};

template <typename Element_, int kHeadDim_>
struct HopperTraits {
  using Element = Element_;
  using MmaElement = typename CuteElement<Element>::type;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = int(kHopperShape.block_m);
  static constexpr int kBlockN = HopperTile<kHeadDim>::kBlockN;
  static constexpr int kStages = HopperTile<kHeadDim>::kStages;
  static constexpr int kConsumerGroups = 2;
  static constexpr int kGroupThreads = 128;
  static constexpr int kConsumerThreads = kConsumerGroups * kGroupThreads;
  static constexpr int kThreads = kConsumerThreads + kGroupThreads;  // + the producer
  // Registers per thread after setmaxnreg: the producer only issues copies (at 24 ptxas
  // spilled its page-table arithmetic).
  static constexpr int kProducerRegisters = 40;
  static constexpr int kConsumerRegisters = 232;
  static constexpr int kWarpRows = 16;
  static constexpr int kMmaGroupRows = 64;  // the rows of one warpgroup's MMAs
  static constexpr int kMmaM = 1;
  static constexpr int kKeyAtoms = kBlockN / 8;
  static constexpr int kDimAtoms = kHeadDim / 8;

  // The TMA boxes of a tile: kColumnBoxes boxes of kBoxColumns columns; each row of a box is
  // one swizzle span.
  static constexpr int kSwizzleBytes = jax_fmha::cuda::kSwizzleBytes<kHeadDim, sizeof(Element)>;
  static constexpr int kBoxColumns = kSwizzleBytes / int(sizeof(Element));
  static constexpr int kColumnBoxes = kHeadDim / kBoxColumns;

  static constexpr int kChunk = 16 / sizeof(Element);
  static constexpr int kChunksPerRow = kHeadDim / kChunk;

  using BlockM = cute::Int<kBlockM>;
  using BlockN = cute::Int<kBlockN>;
  using HeadDim = cute::Int<kHeadDim>;
  using Warpgroups = cute::Layout<cute::Shape<cute::Int<kBlockM / 64>, cute::_1, cute::_1>>;
  // S = Q K^T: M = rows, N = keys, K = d; both operands from shared memory.
  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<MmaElement, MmaElement, float,
                                 cute::Shape<BlockM, BlockN, HeadDim>>(),
      Warpgroups{}));
  // O += P V: M = rows, N = d, K = keys; P from registers, V^T from shared memory.
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<MmaElement, MmaElement, float,
                                 cute::Shape<BlockM, HeadDim, BlockN>, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      Warpgroups{}));

  using Atom = KMajorAtom<MmaElement, kSwizzleBytes>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(Atom{}, cute::Shape<BlockM, HeadDim>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(Atom{}, cute::Shape<BlockN, HeadDim>{}));
  // The V tile seen as (d, key): element (c, r) is element (r, c) of the K-major tile.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_ordered_layout(cute::Shape<HeadDim, BlockN>{}, cute::Step<cute::_2, cute::_1>{})));

  static constexpr int kQElems = int(cute::cosize_v<SmemLayoutQ>);
  static constexpr int kKvTileElems = int(cute::cosize_v<SmemLayoutKV>);
  static constexpr int kKvTileBytes = kKvTileElems * int(sizeof(Element));
  // Q, then K stages, then V stages; then the mbarriers (8 bytes each): full and empty of each
  // K and V stage, and one for the last V block (forward_kernel.cuh).
  static constexpr size_t kBarriersOffset =
      sizeof(Element) * (size_t(kQElems) + 2 * size_t(kStages) * kKvTileElems);
  static constexpr int kBarriers = 4 * kStages + 1;
  static constexpr size_t kSmemBytes = kBarriersOffset + 8 * kBarriers;
  // Every tile starts on a swizzle-pattern boundary (the wgmma descriptors and TMA assume it).
  static constexpr size_t kSmemAlign = 1024;

  // Element offset of (row, column) in the shared tiles; column a multiple of kChunk (the
  // swizzle permutes 16-byte chunks, so a chunk stays contiguous).
  __host__ __device__ __forceinline__ static constexpr int q_offset(int row, int col) {
    constexpr SmemLayoutQ layout{};
    const int bytes = int(layout.layout_b()(row, col)) * int(sizeof(Element));
    return int(layout.layout_a()(bytes)) / int(sizeof(Element));
  }
  // Element offset of row `row` of column box `box` in a K or V tile (rows are swizzled
  // within themselves: a row's span stays whole).
  __host__ __device__ __forceinline__ static constexpr int kv_box_row(int box, int row) {
    return (box * kBlockN + row) * kBoxColumns;
  }

  static_assert(kQElems == kBlockM * kHeadDim && kKvTileElems == kBlockN * kHeadDim,
                "swizzled tiles are dense");
  static_assert((kQElems * sizeof(Element)) % kSmemAlign == 0 && kKvTileBytes % kSmemAlign == 0,
                "tiles must keep the swizzle alignment");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of an sm_90 CTA");
  static_assert(kHeadDim % kBoxColumns == 0, "column boxes must tile the head dim");
  static_assert(kBlockN % kHopperPageRunKeys == 0, "page runs must split the key block");
  static_assert(kProducerRegisters * kGroupThreads + kConsumerRegisters * kConsumerThreads <=
                    64 * 1024,
                "register file of an SM");
};

}  // namespace jax_fmha::cuda
