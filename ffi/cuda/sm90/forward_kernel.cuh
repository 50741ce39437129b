// The Hopper (sm_90a) attention forward kernel: the tile and problem of the portable kernel
// (cuda/sm80/forward_kernel.cuh: same grid, tile placement, masks, softmax and epilogue),
// warp-specialized. Why it is built so: docs/design/cuda_attention.md.
//
// One CTA = three warpgroups. The producer (warpgroup 0; one warp works, with few registers)
// copies K and V key blocks by TMA into rings of kStages stages (sm90/pipeline.cuh), in the
// order the consumers use them: K of block 0, then K of block n and V of block n - 1, then V
// of the last block. The two consumer warpgroups (the registers the producer gave up) each
// load their 64 rows of Q, then per key block n issue S_n = Q K_n^T and O += P_{n-1} V_{n-1}
// asynchronously, wait for S_n only, and compute the softmax of block n while P V still runs;
// then wait for it, rescale O if a row maximum moved, and keep P_n in registers.
//
// The two consumers take turns issuing their products (named barriers, "ping-pong"): while
// one warpgroup's products occupy the tensor cores, the other computes its softmax.
//
// Keys at or past the tile's last key are never seen: their scores are masked, and V rows of
// the last block past it are zeroed by the producer before it releases that block (masked
// probabilities are exact zeros, which must not meet garbage values: 0 x NaN is NaN).
//
// FP8 V (FP8 P V, docs/design/fp8_attention.md): FP8 wgmma reads its shared operands K-major
// only, so P V needs V^T (d x keys). The producer's warps 1-3 transpose each landed V stage
// into a V^T ring (transpose_v: its own full and empty mbarriers; the V stage is released to
// the TMA warp once read), zeroing the keys past the tile's last; the consumers read the V^T
// ring instead of the V ring and pack P to e4m3.
//
// Small pages (forward_plan.h, hopper_gathers_kv): the whole producer warpgroup gathers the
// rows of each block with 16-byte cp.async copies instead (gather_kv), zero-filling the
// rows outside the tile's keys as it goes.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <type_traits>

#include "common/attention_problem.h"
#include "common/errors.h"
#include "cuda/common/cta_tile.cuh"
#include "cuda/common/epilogue.cuh"
#include "cuda/common/launch_check.h"
#include "cuda/common/mask.cuh"
#include "cuda/common/softmax.cuh"
#include "cuda/common/tile_load.cuh"
#include "cuda/sm90/fp8_pv_layout.cuh"
#include "cuda/sm90/kernel_traits.cuh"
#include "cuda/sm90/pipeline.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/warpgroup_mma.cuh"

namespace jax_fmha::cuda {

// Named barriers (0 is __syncthreads), one of each per consumer warpgroup: its Q, its turn,
// its staged output rows; and, FP8 queries only, the epilogue of both consumers.
enum HopperBarrier : uint32_t { kQLoaded = 1, kTurn = 3, kOutputStaged = 5, kConsumersDone = 7 };

// The key blocks of a tile, as the producer and the consumers walk them.
struct KeyBlocks {
  int first;  // the first block's first key: blocks start at multiples of kBlockN
  int count;
  int end;  // the tile's last key + 1

  template <int kBlockN>
  __device__ __forceinline__ static KeyBlocks of(const TileKeys& keys) {
    const int first = keys.begin / kBlockN * kBlockN;
    return {first, keys.empty() ? 0 : (keys.end - first + kBlockN - 1) / kBlockN, keys.end};
  }
  template <int kBlockN>
  __device__ __forceinline__ int key_begin(int block) const {
    return first + block * kBlockN;
  }
};

// The producer warp: every K and V block of the tile, each as runs of maps.run_rows rows
// (one per lane) of its tile's column boxes (K's and V's differ with FP8 K).
template <class Traits>
__device__ __forceinline__ void produce_kv(
    const AttentionProblem& p, const KvTensorMaps& maps, const CtaTile& t, const KeyBlocks& blocks,
    const StageRing<Traits::kStages>& k_ring, const StageRing<Traits::kStages>& v_ring,
    uint64_t* last_v_landed, typename Traits::QkElement* smem_k, typename Traits::Element* smem_v) {
  using VTile = typename Traits::VTile;
  constexpr int kBlockN = Traits::kBlockN;
  const int lane = threadIdx.x % 32;
  const int run_rows = maps.run_rows;
  const int runs = kBlockN / run_rows;
  if (lane == 0) {
    prefetch_tensor_map(maps.k);
    prefetch_tensor_map(maps.v);
  }
  // The row of this lane's run of a block; -1 for lanes past the block's runs and runs past
  // the tile's keys (their page ids are never read).
  const auto run_row = [&](int block) {
    const int key = blocks.key_begin<kBlockN>(block) + lane * run_rows;
    return lane < runs && key < blocks.end ? int(p.kv.row(t.b, key)) : -1;
  };
  const auto copy_block = [&](const CUtensorMap& map, auto* tile, uint64_t* bar, int row,
                              int block) {
    using Tile = SwizzledTile<std::remove_pointer_t<decltype(tile)>, kBlockN, Traits::kHeadDim>;
    const int keys_in = min(kBlockN, blocks.end - blocks.key_begin<kBlockN>(block));
    const int bytes = (keys_in + run_rows - 1) / run_rows * run_rows * Traits::kHeadDim *
                      int(sizeof(typename Tile::Element));
    if (lane == 0) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, bytes);
    __syncwarp();
    if (row >= 0)
#pragma unroll
      for (int box = 0; box < Tile::kColumnBoxes; ++box)
        tma_load(map, bar, tile + Tile::box_row(box, lane * run_rows), box * Tile::kBoxColumns,
                 t.kv_head, row);
  };
  const auto k_tile = [&](int block) {
    return smem_k + k_ring.stage(block) * Traits::KTile::kElems;
  };
  const auto v_tile = [&](int block) { return smem_v + v_ring.stage(block) * VTile::kElems; };

  int k_row = run_row(0), v_row = -1;
  for (int block = 0; block < blocks.count; ++block) {
    k_ring.acquire(block);
    copy_block(maps.k, k_tile(block), k_ring.full_barrier(block), k_row, block);
    const int next_row = block + 1 < blocks.count ? run_row(block + 1) : -1;  // read ahead
    if (block > 0) {
      v_ring.acquire(block - 1);
      copy_block(maps.v, v_tile(block - 1), v_ring.full_barrier(block - 1), v_row, block - 1);
    }
    v_row = k_row;
    k_row = next_row;
  }
  const int last = blocks.count - 1;
  const int valid_rows = blocks.end - blocks.key_begin<kBlockN>(last);
  v_ring.acquire(last);
  if (Traits::kFp8V || valid_rows == kBlockN) {  // (FP8 V: transpose_v zeroes the rows)
    copy_block(maps.v, v_tile(last), v_ring.full_barrier(last), v_row, last);
    return;
  }
  // The last V block ends inside: copy it, wait, zero its rows past the keys, then release it.
  typename Traits::Element* tile = v_tile(last);
  copy_block(maps.v, tile, last_v_landed, v_row, last);
  cutlass::arch::ClusterBarrier::wait(last_v_landed, 0);
  constexpr int kChunksPerSpan = VTile::kSwizzleBytes / 16;
  const int chunks = (kBlockN - valid_rows) * VTile::kColumnBoxes * kChunksPerSpan;
  for (int c = lane; c < chunks; c += 32) {
    const int span = c / kChunksPerSpan;
    const int box = span % VTile::kColumnBoxes, row = valid_rows + span / VTile::kColumnBoxes;
    reinterpret_cast<uint4*>(tile + VTile::box_row(box, row))[c % kChunksPerSpan] =
        make_uint4(0, 0, 0, 0);
  }
  fence_shared_for_wgmma();
  __syncwarp();
  if (lane == 0) cutlass::arch::ClusterBarrier::arrive(v_ring.full_barrier(last));
}

// 16-bit 8 x 8 matrices between shared memory and registers (VtUnit, sm90/fp8_pv_layout.cuh).
__device__ __forceinline__ void load_matrices_transposed(const void* smem, uint32_t (&x)[4]) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3])
               : "r"(address));
}
__device__ __forceinline__ void store_matrices(void* smem, const uint32_t (&x)[4]) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address),
               "r"(x[0]), "r"(x[1]), "r"(x[2]), "r"(x[3])
               : "memory");
}

// FP8 V: producer warps 1-3 (`warp` 0..2 among them) copy each landed V stage into the V^T
// ring, keys permuted within each 32-key group as the FP8 A operand of P V needs them
// (warpgroup_mma.cuh, pack_probabilities): column 16a+4t+2b+i of a group holds key
// 8(2a+b)+2t+i. A warp's unit is 32 keys x 16 dims (VtUnit): one ldmatrix.x4.trans (which
// leaves each lane keys 2t, 2t+1 of 8-key rows, the permutation's own order), four byte
// permutes and one stmatrix.x4, 512 bytes each way, conflict-free under both tiles' swizzles
// (each 8-lane phase: 8 rows of distinct residues mod 8). The warps take 16-dim chunks in
// turn, each chunk's units (the key groups) unrolled, their addresses one add or XOR from the
// chunk's (VtChunkAddresses). Keys at or past the tile's last are written as zeros. Then each
// thread orders its writes before the consumers' wgmma (proxy fence), and each warp arrives
// once on the V^T stage's full barrier and on the V stage's empty one (kTransposeWarps
// arrivals each).
template <class Traits>
__device__ __forceinline__ void transpose_v(const KeyBlocks& blocks,
                                            const StageRing<Traits::kStages>& v_ring,
                                            const StageRing<Traits::kVtStages>& vt_ring,
                                            const typename Traits::Element* smem_v,
                                            typename Traits::Element* smem_vt, int warp) {
  using VTile = typename Traits::VTile;
  using VtTile = typename Traits::VtTile;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  const int lane = threadIdx.x % 32;
  for (int block = 0; block < blocks.count; ++block) {
    const int valid = min(kBlockN, blocks.end - blocks.key_begin<kBlockN>(block));
    const auto* v =
        reinterpret_cast<const unsigned char*>(smem_v) + v_ring.stage(block) * VTile::kBytes;
    auto* vt = reinterpret_cast<unsigned char*>(smem_vt) + vt_ring.stage(block) * VtTile::kBytes;
    v_ring.wait(block);      // the V stage landed
    vt_ring.acquire(block);  // the consumers are done with the V^T stage's last use
    // (kPartial: the last block, whose keys at or past `valid` are zeroed; a separate copy of
    // the loop, so that full blocks do not issue the masking.)
    const auto transpose_block = [&](auto partial) {
      constexpr bool kPartial = decltype(partial)::value;
      for (int chunk = warp; chunk < kHeadDim / 16; chunk += Traits::kTransposeWarps) {
        const VtChunkAddresses<VTile, VtTile> at(lane, 16 * chunk);  // (sm90/fp8_pv_layout.cuh)
        // (2 units in flight: 4 spilled the producer's 40 registers at d64-d128)
#pragma unroll 2
        for (int group = 0; group < kBlockN / 32; ++group) {
          const VtUnit u{group, 16 * chunk};
          uint32_t x[4], y[4];
          load_matrices_transposed(v + at.load_offset(group), x);
          if constexpr (kPartial)
#pragma unroll
            for (int m = 0; m < 4; ++m)
              x[m] &= (u.key(m, lane, 0) < valid ? 0xffffu : 0u) |
                      (u.key(m, lane, 1) < valid ? 0xffff0000u : 0u);
#pragma unroll
          for (int m = 0; m < 4; ++m)
            y[m] = byte_perm(x[m / 2 * 2], x[m / 2 * 2 + 1], VtUnit::selector(m, lane));
          store_matrices(vt + at.store_offset(group), y);
        }
      }
    };
    if (valid < kBlockN)
      transpose_block(std::true_type{});
    else
      transpose_block(std::false_type{});
    fence_shared_for_wgmma();
    __syncwarp();
    if (lane == 0) {
      vt_ring.fill(block);
      v_ring.release(block);
    }
  }
}

// The ring P V reads: V, or V^T with FP8 V (its own stage count).
template <class Traits, class VRing, class VtRing>
__device__ __forceinline__ const auto& pv_ring_of(const VRing& v_ring, const VtRing& vt_ring) {
  if constexpr (Traits::kFp8V)
    return vt_ring;
  else
    return v_ring;
}

// The producer warpgroup, gather mode: every K and V block of the tile, in the order of
// produce_kv, as 16-byte cp.async copies. Rows outside the tile's keys [keys.begin, keys.end)
// are zero-filled by their copies (src-size 0: nothing is read; their page ids are neither
// read nor trusted), so the last V block needs no zeroing step. Each thread then arrives on
// the stage's full barrier (counting the producer's 128 threads) through
// cp.async.mbarrier.arrive.noinc, which fires once all of its earlier copies have landed: the
// barrier completes when the whole tile has.
//
// Throughput: a 128-key block at d128 is 2048 copies, 16 a thread, and K and V of a block
// must land in about 2 us: 10 KB in flight per SM at a 0.3 us memory latency. A copy that
// waits for its own page-id load and address arithmetic leaves about one copy (2 KB an SM) in
// flight (docs/design/cuda_attention.md, "Pages of 16 keys"). So a block's copies are issued
// back to back, a few instructions each:
// - Warp w copies the block's rows w kWarpRows .. (w + 1) kWarpRows - 1. Each lane reads the
//   page id of one of those rows (one page-table load and division a block, for K and V)
//   one block ahead, and its warp passes the rows around by shuffles.
// - A lane copies chunks lane / 8 + 4 k of rows lane % 8 + 8 i: one row shuffle and one
//   address multiply serve 4 k-chunks (64 contiguous bytes of a row each, 8 rows a warp
//   copy), and its rows share their phase of the swizzle (row % 8), so every place in the
//   tile is one of kSpanSteps per-thread offsets plus a constant.
//
// The proxies: cp.async writes shared memory in the generic proxy, wgmma reads it in the
// async proxy, so a fence.proxy.async must stand between the two. The producer cannot issue
// it: when it arrives its copies have not landed (a fence orders only writes already
// performed), and waiting for them would stall it. The consumers do: after their wait on the
// full barrier (which acquires the landed copies, zeros included) and before their wgmma
// (forward kernel: consumer_fence).
template <class Traits>
__device__ __forceinline__ void gather_kv(const AttentionProblem& p, const KvTensorMaps& arrays,
                                          const CtaTile& t, const KeyBlocks& blocks,
                                          const StageRing<Traits::kStages>& k_ring,
                                          const StageRing<Traits::kStages>& v_ring,
                                          typename Traits::Element* smem_k,
                                          typename Traits::Element* smem_v) {
  using Element = typename Traits::Element;
  using Tile = typename Traits::VTile;  // (16-bit K and V: the same tile type)
  static_assert(std::is_same_v<typename Traits::KTile, Tile>, "gathers copy 16-bit K and V");
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kChunk = 16 / int(sizeof(Element));  // elements of one copy
  constexpr int kWarpRows = kBlockN / (Traits::kGroupThreads / 32);
  constexpr int kRowSteps = kWarpRows / 8;                     // i: rows lane % 8 + 8 i
  constexpr int kColumnSteps = Traits::kHeadDim / kChunk / 4;  // k: chunks lane / 8 + 4 k
  constexpr int kSpanSteps = Tile::kSwizzleBytes / 16 / 4;     // k-steps in a swizzle span
  constexpr int kBoxElems = kBlockN * Tile::kBoxColumns;       // one column box of the tile
  static_assert(kWarpRows % 8 == 0 && kWarpRows <= 32, "a warp's rows: whole swizzle phases");
  static_assert(kSpanSteps >= 1 && Traits::kHeadDim % (4 * kChunk) == 0,
                "the 4 lane groups' chunks lie in one swizzle span");
  const int lane = int(threadIdx.x) % 32;
  const int warp_row = int(threadIdx.x) / 32 * kWarpRows;  // (the producer warpgroup: 0 .. 127)
  const int chunk = lane / 8, row_phase = lane % 8;
  const int head_dim = int(p.head_dim);
  const int row_bytes = int(p.kv_row_stride()) * int(sizeof(Element));
  const int keys_begin = int(t.keys.begin);
  // This lane's first chunk of row 0 of K and V (a byte pointer: rows are row_bytes apart).
  const int64_t first_chunk = (t.kv_head * head_dim + chunk * kChunk) * int64_t(sizeof(Element));
  const char* k_chunks = static_cast<const char*>(arrays.k_array) + first_chunk;
  const char* v_chunks = static_cast<const char*>(arrays.v_array) + first_chunk;
  int place[kSpanSteps];  // tile offsets of chunks chunk + 4 s of row warp_row + row_phase
#pragma unroll
  for (int s = 0; s < kSpanSteps; ++s)
    place[s] = Tile::offset(warp_row + row_phase, (chunk + 4 * s) * kChunk);

  // The K/V row of this lane's key of a block (row lane % kWarpRows of its warp's rows), -1
  // outside the tile's keys.
  const auto lookup = [&](int block) {
    const int key = blocks.key_begin<kBlockN>(block) + warp_row + lane % kWarpRows;
    return key >= keys_begin && key < blocks.end ? int(p.kv.pages.row(t.b, key)) : -1;
  };
  // One block's copies; `row`: the warp's lookups of the block.
  const auto gather_block = [&](const char* chunks, Element* tile, uint64_t* full, int row) {
#pragma unroll
    for (int i = 0; i < kRowSteps; ++i) {
      const int r = __shfl_sync(0xffffffffu, row, row_phase + 8 * i);
      // (Row 0 when outside the keys: nothing is read. Unsigned: one 32 x 32 -> 64-bit
      // multiply-add.)
      const char* src = chunks + uint64_t(unsigned(max(r, 0))) * unsigned(row_bytes);
#pragma unroll
      for (int k = 0; k < kColumnSteps; ++k) {
        Element* dst =
            tile + place[k % kSpanSteps] + k / kSpanSteps * kBoxElems + i * 8 * Tile::kBoxColumns;
        copy_chunk(dst, reinterpret_cast<const Element*>(src + k * 4 * 16),
                   r >= 0 && (chunk + 4 * k) * kChunk < head_dim);
      }
    }
    cutlass::arch::cpasync_barrier_arrive_noinc(full);
  };
  const auto k_tile = [&](int block) { return smem_k + k_ring.stage(block) * Tile::kElems; };
  const auto v_tile = [&](int block) { return smem_v + v_ring.stage(block) * Tile::kElems; };

  // A block's V rows are its K rows: one lookup serves both.
  int k_row = lookup(0), v_row = -1;
  for (int block = 0; block < blocks.count; ++block) {
    k_ring.acquire(block);
    gather_block(k_chunks, k_tile(block), k_ring.full_barrier(block), k_row);
    const int next_row = block + 1 < blocks.count ? lookup(block + 1) : -1;  // read ahead
    if (block > 0) {
      v_ring.acquire(block - 1);
      gather_block(v_chunks, v_tile(block - 1), v_ring.full_barrier(block - 1), v_row);
    }
    v_row = k_row;
    k_row = next_row;
  }
  const int last = blocks.count - 1;
  v_ring.acquire(last);
  gather_block(v_chunks, v_tile(last), v_ring.full_barrier(last), v_row);
  cute::cp_async_wait<0>();  // (no thread exits with its copies in flight)
}

// kScorePass: the scores take ScoreTransform's explicit pass (softcap, or a scale that is not
// positive); a kernel without it holds no code for it (its registers are the 128-key tile's
// limit, docs/design/cuda_attention.md). kGather: the producer gathers small pages by cp.async
// (gather_kv) instead of copying by TMA (produce_kv).
template <class Traits, typename OutT, bool kScorePass, bool kGather = false>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_forward_kernel_sm90(const __grid_constant__ AttentionProblem p,
                                  const typename Traits::QkElement* __restrict__ q,
                                  OutT* __restrict__ out, float* __restrict__ lse,
                                  const __grid_constant__ KvTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (other targets: an empty kernel, never launched)
  static_assert(!kGather || !Traits::kFp8Qk, "gathers copy 16-bit K and V");
  using Element = typename Traits::Element;
  using QkElement = typename Traits::QkElement;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kGroupThreads = Traits::kGroupThreads;
  extern __shared__ __align__(1024) unsigned char sm90_smem[];  // (swizzle-pattern aligned)
  QkElement* smem_q = reinterpret_cast<QkElement*>(sm90_smem);
  QkElement* smem_k = reinterpret_cast<QkElement*>(sm90_smem + Traits::kKOffset);  // [kStages]
  Element* smem_v = reinterpret_cast<Element*>(sm90_smem + Traits::kVOffset);      // [kStages]
  Element* smem_vt = reinterpret_cast<Element*>(sm90_smem + Traits::kVtOffset);    // FP8 V
  uint64_t* barriers = reinterpret_cast<uint64_t*>(sm90_smem + Traits::kBarriersOffset);
  const StageRing<kStages> k_ring{barriers, barriers + kStages};
  const StageRing<kStages> v_ring{barriers + 2 * kStages, barriers + 3 * kStages};
  uint64_t* last_v_landed = barriers + 4 * kStages;
  const StageRing<Traits::kVtStages> vt_ring{barriers + 4 * kStages + 1,
                                             barriers + 4 * kStages + 1 + Traits::kVtStages};

  CtaTile t;
  if (!place_tile<Traits::kBlockM, kBlockN>(p, out, lse, t)) return;
  // A tile of at most 64 rows leaves the second consumer idle: it neither computes nor
  // releases stages, nor takes turns.
  const int consumer_groups = t.rows > Traits::kMmaGroupRows ? 2 : 1;
  const KeyBlocks blocks = KeyBlocks::of<kBlockN>(t.keys);
  if (threadIdx.x == 0) {
    // (Gathers: each producer thread arrives once its copies land; TMA: one arrival with the
    // bytes to expect.)
    const int fills = kGather ? kGroupThreads : 1;
    k_ring.init(consumer_groups, fills);
    if constexpr (Traits::kFp8V) {  // V: released by the transposing warps, which fill V^T
      v_ring.init(Traits::kTransposeWarps);
      vt_ring.init(consumer_groups, Traits::kTransposeWarps);
    } else {
      v_ring.init(consumer_groups, fills);
    }
    cutlass::arch::ClusterBarrier::init(last_v_landed, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < kGroupThreads) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if constexpr (kGather) {
      if (blocks.count > 0) gather_kv<Traits>(p, maps, t, blocks, k_ring, v_ring, smem_k, smem_v);
    } else if (threadIdx.x < 32 && blocks.count > 0) {
      produce_kv<Traits>(p, maps, t, blocks, k_ring, v_ring, last_v_landed, smem_k, smem_v);
    }
    if constexpr (Traits::kFp8V)
      if (threadIdx.x >= 32)
        transpose_v<Traits>(blocks, v_ring, vt_ring, smem_v, smem_vt, int(threadIdx.x) / 32 - 1);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const int thread = threadIdx.x - kGroupThreads;  // among the consumers
  // Read from lane 0 so that the compiler knows it is warp-uniform: the wgmma descriptors
  // built from it then stay in uniform registers (no per-thread address arithmetic and moves
  // to uniform registers in the key loop).
  const int group = __shfl_sync(0xffffffffu, thread / kGroupThreads, 0);
  const bool leader = thread % kGroupThreads == 0;  // releases the group's stages
  const int warp_row = (thread / 32) * Traits::kWarpRows;
  const RowKeyLimits<Traits> row_limits(p, t.split_range,
                                        int(t.row_begin) + warp_row + thread % 32 / 4,
                                        int(t.rows_in_seq), t.sq, t.sk);
  // FP8 Q and K: their scales fold into the score scale (docs/design/fp8_attention.md). FP8
  // V's scale multiplies O before the store.
  const ScoreTransform transform =
      ScoreTransform::make(Traits::kFp8Qk ? p.score_scale(t.b, t.kv_head) : p.scale, p.softcap);

  float o[1][Traits::kDimAtoms][4];
#pragma unroll
  for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
  auto& o_regs = reinterpret_cast<float (&)[Traits::kDimAtoms * 4]>(o);
  OnlineSoftmax<Traits> softmax;
  ProbabilityRegs<Traits> probs;  // P of the previous block: the A operand of its P V

  if (group < consumer_groups) {
    load_q_tile<Traits, Traits::kMmaGroupRows, kGroupThreads>(
        smem_q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows, group * Traits::kMmaGroupRows,
        thread % kGroupThreads);
    cute::cp_async_wait<0>();
    fence_shared_for_wgmma();
    cutlass::arch::NamedBarrier::sync(kGroupThreads, kQLoaded + group);

    // Turns: each consumer issues its products after the other's (one consumer: after its
    // own, which orders nothing but keeps the code free of branches between the products'
    // issue and wait, where ptxas would serialize them).
    // (A lone consumer's barrier counts its own 128 threads: each arrive or sync completes.)
    const int next_group = (group + 1) % consumer_groups;
    const int turn_threads = consumer_groups * kGroupThreads;
    const auto take_turn = [&] { cutlass::arch::NamedBarrier::sync(turn_threads, kTurn + group); };
    const auto pass_turn = [&] {
      cutlass::arch::NamedBarrier::arrive(turn_threads, kTurn + next_group);
    };
    if (group == consumer_groups - 1 && blocks.count > 0) pass_turn();  // consumer 0 goes first
    // Gathered stages: the copies' generic-proxy writes, acquired by the wait on the full
    // barrier, made visible to wgmma's async proxy (gather_kv). TMA writes in the async proxy.
    const auto consumer_fence = [] {
      if constexpr (kGather) fence_shared_for_wgmma();
    };
    const auto k_tile = [&](int block) {
      return smem_k + k_ring.stage(block) * Traits::KTile::kElems;
    };
    // P V's ring and tiles: V, or V^T with FP8 V (the consumers never touch the V ring then).
    const auto& pv_ring = pv_ring_of<Traits>(v_ring, vt_ring);
    const auto v_tile = [&](int block) {
      if constexpr (Traits::kFp8V)
        return smem_vt + vt_ring.stage(block) * Traits::VtTile::kElems;
      else
        return smem_v + v_ring.stage(block) * Traits::VTile::kElems;
    };

    // The softmax of block n's scores: masked, then probabilities and the factor O must be
    // rescaled by; returns whether any row of the warp needs it.
    float correction[1][2];
    const auto softmax_of = [&](float (&s)[1][Traits::kKeyAtoms][4], int block) {
      const int key_begin = blocks.key_begin<kBlockN>(block);
      if constexpr (kScorePass) {
        transform.apply<Traits>(s);
      } else if constexpr (Traits::kFp8Qk) {  // the launch saw p.scale, not q_scale * k_scale
        if (transform.explicit_pass()) transform.apply<Traits>(s);
      }
      if (t.keys.block_needs_mask(key_begin, kBlockN)) row_limits.mask(s, key_begin);
      const float fold = kScorePass       ? 1.f
                         : Traits::kFp8Qk ? transform.fold()
                                          : transform.scale_log2;
      return softmax.update_scores(s, fold, correction);
    };
    bool rescale = false;    // O must be rescaled before its next product
    if (blocks.count > 0) {  // block 0: S only (the first iteration, peeled: no branch
                             // between the issue and the wait of the loop's products)
      float s[1][Traits::kKeyAtoms][4];
      auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
      k_ring.wait(0);
      consumer_fence();
      take_turn();
      issue_qk<Traits>(smem_q, k_tile(0), s, group);
      pass_turn();
      wait_products<0>();
      if (leader) k_ring.release(0);
      fence_registers(s_regs);
      softmax_of(s, 0);  // (O is still 0: nothing to rescale)
      pack_probabilities<Traits>(s, probs);
    }
    // The loop's count read from lane 0, as `group`: the block index, and with it each
    // stage's addresses and descriptors, stay in uniform registers.
    const int block_count = __shfl_sync(0xffffffffu, blocks.count, 0);
    for (int block = 1; block < block_count; ++block) {
      float s[1][Traits::kKeyAtoms][4];
      auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
      k_ring.wait(block);
      pv_ring.wait(block - 1);
      consumer_fence();
      take_turn();
      issue_qk<Traits>(smem_q, k_tile(block), s, group);
      fence_registers(o_regs);
      if (rescale) softmax.rescale(o, correction);  // while S runs
      fence_registers(o_regs);
      fence_registers(probs);
      issue_pv<Traits>(probs, v_tile(block - 1), o, group);
      pass_turn();
      wait_products<1>();  // S; P V of the last block still runs
      if (leader) k_ring.release(block);
      fence_registers(s_regs);
      rescale = softmax_of(s, block);
      wait_products<0>();
      if (leader) pv_ring.release(block - 1);
      fence_registers(o_regs);
      fence_registers(probs);
      pack_probabilities<Traits>(s, probs);
    }
    if (blocks.count > 0) {  // P V of the last block
      const int last = blocks.count - 1;
      pv_ring.wait(last);
      consumer_fence();
      take_turn();
      fence_registers(o_regs);
      if (rescale) softmax.rescale(o, correction);
      fence_registers(o_regs);
      fence_registers(probs);
      issue_pv<Traits>(probs, v_tile(last), o, group);
      pass_turn();
      wait_products<0>();
      if (leader) pv_ring.release(last);
      fence_registers(o_regs);
      if (group == 0) take_turn();  // the last consumer's last pass (it passed first)
    }
  }
  if constexpr (Traits::kFp8V) {  // O = v_scale x (P V8): the normalization follows
    const float v_scale = p.value_scale(t.b, t.kv_head);
#pragma unroll
    for (int i = 0; i < Traits::kDimAtoms * 4; ++i) o_regs[i] *= v_scale;
  }
  // Each consumer writes its own rows, through its own rows of the Q tile (its products, Q's
  // only readers, have completed; the other consumer never reads them), so neither waits
  // for the other. Float32 partials (split-KV) do not fit there and go straight out. FP8
  // queries: the 16-bit rows do not fit in the FP8 Q tile; once both consumers are done
  // (every copy landed and read), the whole output tile is staged over the shared memory.
  if constexpr (Traits::kFp8Qk && sizeof(OutT) == 2) {
    constexpr int kPitch = kOutPitch<Traits, OutT>;
    static_assert(Traits::kBlockM * kPitch * sizeof(OutT) <= Traits::kBarriersOffset,
                  "the output tile must not overlap the mbarriers");
    const auto consumers_sync = [] {
      cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kConsumersDone);
    };
    consumers_sync();
    store_staged<Traits, OutT, Traits::kBlockM, Traits::kConsumerThreads>(
        o, softmax, reinterpret_cast<OutT*>(sm90_smem),
        [](int r, int col) { return r * kPitch + col; }, out, lse, t.output(p), t.row_begin, t.rows,
        0, warp_row, thread, consumers_sync);
  } else if constexpr (sizeof(OutT) == sizeof(Element)) {
    store_staged<Traits, OutT, Traits::kMmaGroupRows, kGroupThreads>(
        o, softmax, reinterpret_cast<OutT*>(smem_q),
        [](int r, int col) { return Traits::q_offset(r, col); }, out, lse, t.output(p), t.row_begin,
        t.rows, group * Traits::kMmaGroupRows, warp_row, thread % kGroupThreads,
        [&] { cutlass::arch::NamedBarrier::sync(kGroupThreads, kOutputStaged + group); });
  } else {
    store_direct<Traits, OutT>(o, softmax, out, lse, t.output(p), t.row_begin, t.rows, warp_row,
                               thread % 32);
  }
#endif
}

// The kernel of ForwardKernel::kHopper (forward_plan.h), for the launcher: it takes the K/V
// tensor maps instead of the K and V pointers, and comes with and without the score pass.
// With FP8 q (Element), Kv is v's type, 16-bit or float8_e4m3fn (forward_launch.h); otherwise
// it is Element.
template <>
struct ForwardKernelOf<ForwardKernel::kHopper> {
  template <typename Element, int kHeadDim, typename Kv>
  using TraitsOf = std::conditional_t<sizeof(Element) == 1, HopperTraits<Kv, kHeadDim, Element>,
                                      HopperTraits<Element, kHeadDim>>;

  static constexpr bool kLaunchesItself = true;
  template <class Traits, typename OutT>
  static xla::ffi::Error launch(dim3 grid, cudaStream_t stream, const AttentionProblem& p,
                                const void* q, const void* k, const void* v, OutT* out,
                                float* lse) {
    constexpr const char* kOp = "attention (CUDA)";
    if (p.kv.rows > 0x7fffffff)
      return invalid_argument(kOp,
                              "the Hopper kernel addresses K/V rows with 32 bits: arrays of at "
                              "most 2^31 - 1 rows (or JAX_FMHA_CUDA_FORWARD=portable)");
    // Small pages: gathered by cp.async (16-bit K and V only; FP8 queries take TMA pages).
    const bool gather = !Traits::kFp8Qk && p.kv.layout == KvLayout::kPaged &&
                        hopper_gathers_kv(p.kv.pages.page_size);
    KvTensorMaps maps;
    if (gather) {
      maps.run_rows = 0;
      maps.k_array = k;
      maps.v_array = v;
    } else {
      maps.run_rows = tma_run_rows(p.kv, Traits::kBlockN);
      const char* error = nullptr;
      if (!make_kv_tensor_map<typename Traits::KTile>(p, k, maps.run_rows, &maps.k, &error) ||
          !make_kv_tensor_map<typename Traits::VTile>(p, v, maps.run_rows, &maps.v, &error))
        return internal_error(kOp, "building the K/V tensor maps", error);
    }
    const auto launch_kernel = [&](auto score_pass, auto gathers) {
      constexpr auto kernel =
          attention_forward_kernel_sm90<Traits, OutT, score_pass.value, gathers.value>;
      if (cudaError_t err = allow_shared_memory<kernel, Traits::kSmemBytes>(); err != cudaSuccess)
        return internal_error(kOp, "raising the shared-memory limit", cudaGetErrorString(err));
      kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, static_cast<const typename Traits::QkElement*>(q), out, lse, maps);
      return xla::ffi::Error::Success();
    };
    const auto run = [&](auto score_pass) {
      if constexpr (!Traits::kFp8Qk)
        if (gather) return launch_kernel(score_pass, std::true_type{});
      return launch_kernel(score_pass, std::false_type{});
    };
    // (FP8 queries too: from p.scale alone; a tile whose q_scale * k_scale is not positive
    // takes the pass at run time in the kernel without it.)
    if (ScoreTransform::make(p.scale, p.softcap).explicit_pass()) return run(std::true_type{});
    return run(std::false_type{});
  }
};

}  // namespace jax_fmha::cuda
