// Compile-time shape of the Hopper (sm_90a) attention forward kernel: the forward kernel of
// cuda/sm80/forward_kernel.cuh with its two products on warpgroup MMA (wgmma) instead
// of per-warp mma.sync.
//
// One CTA = two warpgroups of 128 threads, kBlockM = 128 packed query rows: warpgroup g owns
// rows 64 g .. 64 g + 63, its warp w (of 4) rows 16 w .. 16 w + 15 within them. The wgmma
// accumulator gives each thread the same elements as an m16n8 mma.sync accumulator would
// (rows g and g + 8 of its warp's 16, columns 8 n + 2 t, 2 t + 1), so the masking, the
// online softmax and the epilogue of the portable kernel run unchanged on it (kMmaM = 1,
// kWarpRows = 16).
//
// Shared memory: Q (kBlockM x d), and kStages stages of K and V (kBlockN x d each), all in
// the K-major swizzled layout wgmma reads (rows of d elements in 128-byte swizzle atoms).
// Q K^T reads Q and K from there (both operands K-major: the reduction runs over d); P V
// reads V through a transposed view (d x keys, "MN-major"), P from registers. After them,
// for pages loaded as 16-key runs, the page ids of the key blocks in flight.
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

// The widest wgmma swizzle atom (128, 64 or 32 bytes of a row) that tiles a d-wide row.
template <typename T, int kHeadDim>
using KMajorAtom =
    std::conditional_t<kHeadDim % 64 == 0, cute::GMMA::Layout_K_SW128_Atom<T>,
                       std::conditional_t<kHeadDim % 32 == 0, cute::GMMA::Layout_K_SW64_Atom<T>,
                                          cute::GMMA::Layout_K_SW32_Atom<T>>>;

template <typename Element_, int kHeadDim_>
struct HopperTraits {
  using Element = Element_;
  using MmaElement = typename CuteElement<Element>::type;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = int(kHopperShape.block_m);
  // 128 keys up to d128. Above, 64: the K/V stages of 128 keys would not fit the shared
  // memory at d192-d256, and the O accumulator (up to 128 registers) leaves less room for S.
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = 16;
  static constexpr int kMmaGroupRows = 64;  // the rows of one warpgroup's MMAs
  static constexpr int kMmaM = 1;
  static constexpr int kKeyAtoms = kBlockN / 8;
  static constexpr int kDimAtoms = kHeadDim / 8;
  static constexpr int kStages = 2;
  // A key block is loaded as runs of 64 keys, each run's rows looked up one block ahead
  // (KeyBlockRows): pages of 64 keys or a multiple of 64 load as fast as a dense array.
  static constexpr int kRunKeys = 64;
  static constexpr int kKeyRuns = kBlockN / kRunKeys;
  // Other pages that are a multiple of 16 keys load as runs of 16 (PagedRuns): the page ids
  // of block n + 2 are copied to shared memory at step n, with that step's copies, into one
  // of kPageIdSlots slots (a slot is read at the two steps after the one that fills it, so
  // three would do).
  static constexpr int kPageRunKeys = int(kHopperPageRunKeys);
  static constexpr int kPageRuns = kBlockN / kPageRunKeys;
  static constexpr int kPageIdSlots = 4;
  // load_kv_tile's general path two copies at a time. At run time it serves d96 and d192
  // here (their rows do not split evenly over 256 threads); the launcher sends pages that
  // are not a multiple of kPageRunKeys to the portable kernel. Fully unrolled, its compiled
  // row-by-row page gather held eight copies' addresses beside S, P and O and spilled 120
  // bytes at d128.
  static constexpr int kGatherUnroll = 2;

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

  using SmemLayoutQ = decltype(cute::tile_to_shape(KMajorAtom<MmaElement, kHeadDim>{},
                                                   cute::Shape<BlockM, HeadDim>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(KMajorAtom<MmaElement, kHeadDim>{},
                                                    cute::Shape<BlockN, HeadDim>{}));
  // The V tile seen as (d, key): element (c, r) is element (r, c) of the K-major tile.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_ordered_layout(cute::Shape<HeadDim, BlockN>{}, cute::Step<cute::_2, cute::_1>{})));

  static constexpr int kQElems = int(cute::cosize_v<SmemLayoutQ>);
  static constexpr int kKvTileElems = int(cute::cosize_v<SmemLayoutKV>);
  static constexpr size_t kPageIdsOffset =
      sizeof(Element) * (size_t(kQElems) + 2 * size_t(kStages) * kKvTileElems);
  static constexpr size_t kSmemBytes = kPageIdsOffset + sizeof(int32_t) * kPageIdSlots * kPageRuns;
  // Every tile starts on a swizzle-pattern boundary (the wgmma descriptors assume it).
  static constexpr size_t kSmemAlign = 1024;

  // Element offset of (row, column) in the shared tiles; column a multiple of kChunk (the
  // swizzle permutes 16-byte chunks, so a chunk stays contiguous).
  __host__ __device__ __forceinline__ static int q_offset(int row, int col) {
    return swizzled_offset<SmemLayoutQ>(row, col);
  }
  __host__ __device__ __forceinline__ static int kv_offset(int row, int col) {
    return swizzled_offset<SmemLayoutKV>(row, col);
  }

 private:
  // A CuTe shared-memory layout swizzles byte addresses (through the tensor's pointer, as
  // the wgmma hardware does), not element offsets: the dense offset in bytes, swizzled.
  template <class SmemLayout>
  __host__ __device__ __forceinline__ static int swizzled_offset(int row, int col) {
    constexpr SmemLayout layout{};
    const int bytes = int(layout.layout_b()(row, col)) * int(sizeof(Element));
    return int(layout.layout_a()(bytes)) / int(sizeof(Element));
  }

 public:
  static_assert(kQElems == kBlockM * kHeadDim && kKvTileElems == kBlockN * kHeadDim,
                "swizzled tiles are dense");
  static_assert((kQElems * sizeof(Element)) % kSmemAlign == 0 &&
                    (kKvTileElems * sizeof(Element)) % kSmemAlign == 0,
                "tiles must keep the swizzle alignment");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of an sm_90 CTA");
  static_assert(kBlockN % kRunKeys == 0, "runs must split the key block");
};

}  // namespace jax_fmha::cuda
