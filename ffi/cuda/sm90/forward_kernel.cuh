// The Hopper (sm_90a) attention forward kernel: the tile and problem of the portable kernel
// (cuda/sm80/forward_kernel.cuh: same tiles, tile placement, masks, softmax and epilogue),
// warp-specialized. Why it is built so: docs/design/cuda_attention.md.
//
// Persistent: about one CTA per SM walks the tiles (row tile, KV head, split x sequence), the
// last row tiles first (under a causal mask they see the most keys), so that one tile's
// loads start while the last one's products and stores finish. (FP8 queries: one CTA per
// tile, see kHopperPersistent.)
//
// One CTA = three warpgroups. The producer (warpgroup 0; one warp works, with few registers)
// copies K and V key blocks by TMA into rings of kStages stages (sm90/pipeline.cuh), in the
// order the consumers use them: per tile, K of block 0, then K of block n and V of block
// n - 1, then V of the last block. The two consumer warpgroups (the registers the producer
// gave up) each load their 64 rows of Q, then per key block n issue S_n = Q K_n^T and
// O += P_{n-1} V_{n-1} asynchronously, wait for S_n only, and compute the softmax of block n
// while P V still runs; then wait for it, rescale O if a row maximum moved, and keep P_n in
// registers. Each then stores its rows through its own rows of the Q tile (the K/V stages
// already hold the next tile's keys). Both consumers run every tile, also one of at most 64
// rows: the rings and the turns count on both.
//
// The two consumers take turns issuing their products (named barriers, "ping-pong"): while
// one warpgroup's products occupy the tensor cores, the other computes its softmax.
//
// Keys at or past the tile's last key are never seen: their scores are masked, and V rows of
// the last block past it are zeroed by the producer before it releases that block (masked
// probabilities are exact zeros, which must not meet garbage values: 0 x NaN is NaN).
//
// Small pages (forward_plan.h, hopper_gathers_kv): the whole producer warpgroup gathers the
// rows of each block with 16-byte cp.async copies instead (gather_kv), zero-filling the
// rows outside the tile's keys as it goes.
//
// FP8 V (FP8 P V, docs/design/fp8_attention.md): FP8 wgmma reads its shared operands K-major
// only, so P V needs V^T (d x keys). The producer's warps 1-3 transpose each landed V stage
// into a V^T ring (transpose_v: its own full and empty mbarriers; the V stage is released to
// the TMA warp once read), zeroing the keys past the tile's last; the consumers read the V^T
// ring instead of the V ring and pack P to e4m3.
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

// The persistent walk: tile t -> (row tile, KV head, z). The (KV head, z) pairs are cut into
// sections whose keys and values fit in kWalkL2Bytes together; a section is walked whole
// before the next, its last row tiles first (causal: the longest first), so that the CTAs
// running at once read the same sections' K/V from L2 (docs/design/cuda_attention.md,
// "Persistent kernel"). In 32 bits: the launcher refuses grids of 2^32 tiles or more.
inline constexpr int64_t kWalkL2Bytes = int64_t(32) << 20;  // of the H100/H200's 50 MB

struct TileWalk {
  uint32_t row_tiles, per_row_tile;  // per_row_tile: KV heads x batch x splits
  uint32_t section;                  // (KV head, z) pairs a section, at least 1

  // kv_bytes_per_key: one key's K and V row (one head).
  template <int kBlockM>
  __device__ __forceinline__ static TileWalk of(const AttentionProblem& p,
                                                int64_t kv_bytes_per_key) {
    const int64_t pairs = p.num_kv_heads * p.batch * p.num_splits;
    const int64_t split_keys = (p.kv.max_len() + p.num_splits - 1) / p.num_splits;
    const int64_t section = kWalkL2Bytes / max(int64_t(1), split_keys * kv_bytes_per_key);
    return {uint32_t((p.q.max_len * p.group() + kBlockM - 1) / kBlockM), uint32_t(pairs),
            uint32_t(max(int64_t(1), min(section, pairs)))};
  }
  __device__ __forceinline__ uint32_t count() const { return row_tiles * per_row_tile; }
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ bool locate(const AttentionProblem& p, uint32_t t,
                                         CtaTile& tile) const {
    const uint32_t first = t / (section * row_tiles) * section;  // the section's first pair
    const uint32_t width = min(section, per_row_tile - first);   // (the last may be narrower)
    const uint32_t r = t - first * row_tiles, pair = first + r % width;
    const uint32_t heads = uint32_t(p.num_kv_heads);
    return locate_tile<kBlockM, kBlockN>(p, row_tiles - 1 - r / width, int(pair % heads),
                                         pair / heads, tile);
  }
};

// Whether a tile's keys lie inside the K/V arrays, decided by one warp (every warp that
// needs it decides alone, with no barrier between the roles).
__device__ __forceinline__ bool tile_keys_valid(const AttentionProblem& p, const CtaTile& t) {
  return kv_keys_valid(p.kv, t.b, t.split_range, int(threadIdx.x % 32), 32,
                       [](bool bad) { return __any_sync(0xffffffffu, bad); });
}

// Whether Traits' kernel runs persistent (one CTA per SM, at most one per tile) or one CTA per
// tile. FP8 queries take one CTA per tile: their 16-bit output does not fit in their FP8 Q
// rows, so their epilogue stages the whole output tile over all the shared memory once both
// consumers are done, which a persistent CTA's producer is already refilling with the next
// tile's keys.
template <class Traits>
inline constexpr bool kHopperPersistent = !Traits::kFp8Qk;

// A consumer thread's place: its index among the consumers, its warpgroup, whether it
// releases the group's stages, and its warp's first row of the tile. The group is read from
// lane 0 so that the compiler knows it is warp-uniform: the wgmma descriptors built from it
// stay in uniform registers (warpgroup_mma.cuh).
template <class Traits>
struct ConsumerThread {
  int thread = int(threadIdx.x) - Traits::kGroupThreads;
  int group = __shfl_sync(0xffffffffu, thread / Traits::kGroupThreads, 0);
  bool leader = thread % Traits::kGroupThreads == 0;
  int warp_row = (thread / 32) * Traits::kWarpRows;
};

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
// (one per lane) of its tile's column boxes (K's and V's differ with FP8 K). Block n is use
// use0 + n of both rings; `landings` counts the uses of last_v_landed.
template <class Traits>
__device__ __forceinline__ void produce_kv(const AttentionProblem& p, const KvTensorMaps& maps,
                                           const CtaTile& t, const KeyBlocks& blocks, int use0,
                                           const StageRing<Traits::kStages>& k_ring,
                                           const StageRing<Traits::kStages>& v_ring,
                                           uint64_t* last_v_landed, int& landings,
                                           typename Traits::QkElement* smem_k,
                                           typename Traits::Element* smem_v) {
  using VTile = typename Traits::VTile;
  constexpr int kBlockN = Traits::kBlockN;
  const int lane = threadIdx.x % 32;
  const int run_rows = maps.run_rows;
  const int runs = kBlockN / run_rows;
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
    return smem_k + k_ring.stage(use0 + block) * Traits::KTile::kElems;
  };
  const auto v_tile = [&](int block) {
    return smem_v + v_ring.stage(use0 + block) * VTile::kElems;
  };

  int k_row = run_row(0), v_row = -1;
  for (int block = 0; block < blocks.count; ++block) {
    k_ring.acquire(use0 + block);
    copy_block(maps.k, k_tile(block), k_ring.full_barrier(use0 + block), k_row, block);
    const int next_row = block + 1 < blocks.count ? run_row(block + 1) : -1;  // read ahead
    if (block > 0) {
      v_ring.acquire(use0 + block - 1);
      copy_block(maps.v, v_tile(block - 1), v_ring.full_barrier(use0 + block - 1), v_row,
                 block - 1);
    }
    v_row = k_row;
    k_row = next_row;
  }
  const int last = blocks.count - 1;
  const int valid_rows = blocks.end - blocks.key_begin<kBlockN>(last);
  v_ring.acquire(use0 + last);
  if (Traits::kFp8V || valid_rows == kBlockN) {  // (FP8 V: transpose_v zeroes the rows)
    copy_block(maps.v, v_tile(last), v_ring.full_barrier(use0 + last), v_row, last);
    return;
  }
  // The last V block ends inside: copy it, wait, zero its rows past the keys, then release it.
  typename Traits::Element* tile = v_tile(last);
  copy_block(maps.v, tile, last_v_landed, v_row, last);
  cutlass::arch::ClusterBarrier::wait(last_v_landed, landings++ % 2);
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
  if (lane == 0) cutlass::arch::ClusterBarrier::arrive(v_ring.full_barrier(use0 + last));
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

// The producer warpgroup, gather mode: every K and V block of the tile, in the order of
// produce_kv, as 16-byte cp.async copies. Rows outside the tile's keys [keys.begin, keys.end)
// are zero-filled by their copies (src-size 0: nothing is read; their page ids are neither
// read nor trusted), so the last V block needs no zeroing step. Each thread then arrives on
// the stage's full barrier (counting the producer's 128 threads) through
// cp.async.mbarrier.arrive.noinc, which fires once all of its earlier copies have landed: the
// barrier completes when the whole tile has. Block n is use use0 + n of both rings. The
// caller waits for the thread's copies before it exits (cp_async_wait), not at the end of
// each tile: the next tile's copies are issued while this one's last V block lands.
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
// (consume_key_blocks: consumer_fence).
template <class Traits>
__device__ __forceinline__ void gather_kv(const AttentionProblem& p, const KvTensorMaps& arrays,
                                          const CtaTile& t, const KeyBlocks& blocks, int use0,
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
  const auto k_tile = [&](int block) { return smem_k + k_ring.stage(use0 + block) * Tile::kElems; };
  const auto v_tile = [&](int block) { return smem_v + v_ring.stage(use0 + block) * Tile::kElems; };

  // A block's V rows are its K rows: one lookup serves both.
  int k_row = lookup(0), v_row = -1;
  for (int block = 0; block < blocks.count; ++block) {
    k_ring.acquire(use0 + block);
    gather_block(k_chunks, k_tile(block), k_ring.full_barrier(use0 + block), k_row);
    const int next_row = block + 1 < blocks.count ? lookup(block + 1) : -1;  // read ahead
    if (block > 0) {
      v_ring.acquire(use0 + block - 1);
      gather_block(v_chunks, v_tile(block - 1), v_ring.full_barrier(use0 + block - 1), v_row);
    }
    v_row = k_row;
    k_row = next_row;
  }
  const int last = blocks.count - 1;
  v_ring.acquire(use0 + last);
  gather_block(v_chunks, v_tile(last), v_ring.full_barrier(use0 + last), v_row);
}

// One consumer's key blocks of a tile (block n is use use0 + n of both rings): per block,
// S = Q K^T and the P V of the block before, issued in its turn, the softmax of S while P V
// runs. O (zeroed) and softmax accumulate the tile. smem_pv and pv_ring: the tiles and ring P V
// reads (HopperSmem::pv_tiles, pv_ring: V, or V^T with FP8 V). kGather: the stages were
// gathered by cp.async (gather_kv).
template <class Traits, bool kScorePass, bool kGather, class PvRing, class TakeTurn, class PassTurn>
__device__ __forceinline__ void consume_key_blocks(
    const typename Traits::QkElement* smem_q, const typename Traits::QkElement* smem_k,
    const typename Traits::Element* smem_pv, const StageRing<Traits::kStages>& k_ring,
    const PvRing& pv_ring, int use0, const KeyBlocks& blocks, const TileKeys& keys,
    const RowKeyLimits<Traits>& row_limits, const ScoreTransform& transform,
    float (&o)[1][Traits::kDimAtoms][4], OnlineSoftmax<Traits>& softmax, int group, bool leader,
    TakeTurn take_turn, PassTurn pass_turn) {
  constexpr int kBlockN = Traits::kBlockN;
  // The loop's count and each block's ring use read from lane 0, as `group`, so that the
  // stages' wgmma descriptors stay in uniform registers (use0 read once per tile left them
  // in vector registers: 32 R2UR per block at d128).
  const int block_count = __shfl_sync(0xffffffffu, blocks.count, 0);
  const auto use_of = [&](int block) { return __shfl_sync(0xffffffffu, use0 + block, 0); };
  auto& o_regs = reinterpret_cast<float (&)[Traits::kDimAtoms * 4]>(o);
  ProbabilityRegs<Traits> probs;  // P of the previous block: the A operand of its P V
  const auto k_tile = [&](int use) { return smem_k + k_ring.stage(use) * Traits::KTile::kElems; };
  using PvTile = std::conditional_t<Traits::kFp8V, typename Traits::VtTile, typename Traits::VTile>;
  const auto v_tile = [&](int use) { return smem_pv + pv_ring.stage(use) * PvTile::kElems; };
  // Gathered stages: the copies' generic-proxy writes, acquired by the wait on the full
  // barrier, made visible to wgmma's async proxy (gather_kv). TMA writes in the async proxy.
  const auto consumer_fence = [] {
    if constexpr (kGather) fence_shared_for_wgmma();
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
    if (keys.block_needs_mask(key_begin, kBlockN)) row_limits.mask(s, key_begin);
    const float fold = kScorePass ? 1.f : Traits::kFp8Qk ? transform.fold() : transform.scale_log2;
    return softmax.update_scores(s, fold, correction);
  };
  bool rescale = false;    // O must be rescaled before its next product
  if (blocks.count > 0) {  // block 0: S only (the first iteration, peeled: no branch
                           // between the issue and the wait of the loop's products)
    float s[1][Traits::kKeyAtoms][4];
    auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
    const int use = use_of(0);
    k_ring.wait(use);
    consumer_fence();
    take_turn();
    issue_qk<Traits>(smem_q, k_tile(use), s, group);
    pass_turn();
    wait_products<0>();
    if (leader) k_ring.release(use);
    fence_registers(s_regs);
    softmax_of(s, 0);  // (O is still 0: nothing to rescale)
    pack_probabilities<Traits>(s, probs);
  }
  for (int block = 1; block < block_count; ++block) {
    float s[1][Traits::kKeyAtoms][4];
    auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
    const int use = use_of(block);  // (before the waits, which hide its latency)
    k_ring.wait(use);
    pv_ring.wait(use - 1);
    consumer_fence();
    take_turn();
    issue_qk<Traits>(smem_q, k_tile(use), s, group);
    fence_registers(o_regs);
    if (rescale) softmax.rescale(o, correction);  // while S runs
    fence_registers(o_regs);
    fence_registers(probs);
    issue_pv<Traits>(probs, v_tile(use - 1), o, group);
    pass_turn();
    wait_products<1>();  // S; P V of the last block still runs
    if (leader) k_ring.release(use);
    fence_registers(s_regs);
    rescale = softmax_of(s, block);
    wait_products<0>();
    if (leader) pv_ring.release(use - 1);
    fence_registers(o_regs);
    fence_registers(probs);
    pack_probabilities<Traits>(s, probs);
  }
  if (blocks.count > 0) {  // P V of the last block
    const int use = use_of(blocks.count - 1);
    pv_ring.wait(use);
    consumer_fence();
    take_turn();
    fence_registers(o_regs);
    if (rescale) softmax.rescale(o, correction);
    fence_registers(o_regs);
    fence_registers(probs);
    issue_pv<Traits>(probs, v_tile(use), o, group);
    pass_turn();
    wait_products<0>();
    if (leader) pv_ring.release(use);
    fence_registers(o_regs);
  }
}

// The shared-memory layout of both kernels: Q, the K and V rings, (FP8 V) the V^T ring, their
// barriers.
template <class Traits>
struct HopperSmem {
  typename Traits::QkElement* q;
  typename Traits::QkElement* k;  // [kStages]
  typename Traits::Element* v;    // [kStages]
  typename Traits::Element* vt;   // [kVtStages], FP8 V
  StageRing<Traits::kStages> k_ring, v_ring;
  uint64_t* last_v_landed;
  StageRing<Traits::kVtStages> vt_ring;  // FP8 V

  __device__ __forceinline__ explicit HopperSmem(unsigned char* smem)
      : q(reinterpret_cast<typename Traits::QkElement*>(smem)),
        k(reinterpret_cast<typename Traits::QkElement*>(smem + Traits::kKOffset)),
        v(reinterpret_cast<typename Traits::Element*>(smem + Traits::kVOffset)),
        vt(reinterpret_cast<typename Traits::Element*>(smem + Traits::kVtOffset)),
        k_ring{barriers(smem), barriers(smem) + Traits::kStages},
        v_ring{barriers(smem) + 2 * Traits::kStages, barriers(smem) + 3 * Traits::kStages},
        last_v_landed(barriers(smem) + 4 * Traits::kStages),
        vt_ring{barriers(smem) + 4 * Traits::kStages + 1,
                barriers(smem) + 4 * Traits::kStages + 1 + Traits::kVtStages} {}
  __device__ __forceinline__ static uint64_t* barriers(unsigned char* smem) {
    return reinterpret_cast<uint64_t*>(smem + Traits::kBarriersOffset);
  }
  // (One thread, then every thread of the CTA passes a __syncthreads.) `fills`: the arrivals
  // that fill a K or V stage (TMA: the producer's one, with the bytes to expect; gathers: one
  // per producer thread, once its copies land).
  __device__ __forceinline__ void init(int consumer_groups, int fills) const {
    k_ring.init(consumer_groups, fills);
    if constexpr (Traits::kFp8V) {  // V: released by the transposing warps, which fill V^T
      v_ring.init(Traits::kTransposeWarps, fills);
      vt_ring.init(consumer_groups, Traits::kTransposeWarps);
    } else {
      v_ring.init(consumer_groups, fills);
    }
    cutlass::arch::ClusterBarrier::init(last_v_landed, 1);
    cutlass::arch::fence_barrier_init();
  }
  // The tiles and ring P V reads: V, or V^T with FP8 V (the consumers never touch the V ring
  // then).
  __device__ __forceinline__ const typename Traits::Element* pv_tiles() const {
    return Traits::kFp8V ? vt : v;
  }
  __device__ __forceinline__ const auto& pv_ring() const {
    if constexpr (Traits::kFp8V)
      return vt_ring;
    else
      return v_ring;
  }
};

// O of a consumer's tile before its first key block.
template <class Traits>
__device__ __forceinline__ void zero_output(float (&o)[1][Traits::kDimAtoms][4]) {
#pragma unroll
  for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
}

// kScorePass: the scores take ScoreTransform's explicit pass (softcap, or a scale that is not
// positive); a kernel without it holds no code for it (its registers are the 128-key tile's
// limit, docs/design/cuda_attention.md).
//
// One CTA per tile (grid x: row tile, y: KV head, z: split x sequence): the kernel of
// Traits without kHopperPersistent (FP8 queries; K/V by TMA).
template <class Traits, typename OutT, bool kScorePass>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_forward_kernel_sm90(const __grid_constant__ AttentionProblem p,
                                  const typename Traits::QkElement* __restrict__ q,
                                  OutT* __restrict__ out, float* __restrict__ lse,
                                  const __grid_constant__ KvTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (other targets: an empty kernel, never launched)
  static_assert(Traits::kFp8Qk, "16-bit queries run the persistent kernel");
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kGroupThreads = Traits::kGroupThreads;
  extern __shared__ __align__(1024) unsigned char sm90_smem[];  // (swizzle-pattern aligned)
  const HopperSmem<Traits> smem(sm90_smem);

  CtaTile t;
  if (!place_tile<Traits::kBlockM, kBlockN>(p, out, lse, t)) return;
  // A tile of at most 64 rows leaves the second consumer idle: it neither computes nor
  // releases stages, nor takes turns.
  const int consumer_groups = t.rows > Traits::kMmaGroupRows ? 2 : 1;
  const KeyBlocks blocks = KeyBlocks::of<kBlockN>(t.keys);
  if (threadIdx.x == 0) smem.init(consumer_groups, 1);
  __syncthreads();

  if (threadIdx.x < kGroupThreads) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x < 32 && blocks.count > 0) {
      if (threadIdx.x == 0) {
        prefetch_tensor_map(maps.k);
        prefetch_tensor_map(maps.v);
      }
      int landings = 0;
      produce_kv<Traits>(p, maps, t, blocks, 0, smem.k_ring, smem.v_ring, smem.last_v_landed,
                         landings, smem.k, smem.v);
    }
    if constexpr (Traits::kFp8V)
      if (threadIdx.x >= 32)
        transpose_v<Traits>(blocks, smem.v_ring, smem.vt_ring, smem.v, smem.vt,
                            int(threadIdx.x) / 32 - 1);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const ConsumerThread<Traits> me;
  const int thread = me.thread, group = me.group, warp_row = me.warp_row;
  const bool leader = me.leader;
  const RowKeyLimits<Traits> row_limits(p, t.split_range,
                                        int(t.row_begin) + warp_row + thread % 32 / 4,
                                        int(t.rows_in_seq), t.sq, t.sk);
  // FP8 Q and K: their scales fold into the score scale (docs/design/fp8_attention.md). FP8
  // V's scale multiplies O before the store.
  const ScoreTransform transform = ScoreTransform::make(p.score_scale(t.b, t.kv_head), p.softcap);

  float o[1][Traits::kDimAtoms][4];
  zero_output<Traits>(o);
  OnlineSoftmax<Traits> softmax;

  if (group < consumer_groups) {
    load_q_tile<Traits, Traits::kMmaGroupRows, kGroupThreads>(
        smem.q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows, group * Traits::kMmaGroupRows,
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
    consume_key_blocks<Traits, kScorePass, false>(
        smem.q, smem.k, smem.pv_tiles(), smem.k_ring, smem.pv_ring(), 0, blocks, t.keys, row_limits,
        transform, o, softmax, group, leader, take_turn, pass_turn);
    if (group == 0 && blocks.count > 0) take_turn();  // the last consumer's last pass
  }
  // The tile located again for its output addressing (no page-id check: place_tile passed),
  // so that it is not held in registers through the key loop (ptxas, FP8-query d128: 8/24
  // bytes of spill stores/loads without it).
  CtaTile te;
  locate_tile<Traits::kBlockM, kBlockN>(p, blockIdx.x, blockIdx.y, blockIdx.z, te);
  if constexpr (Traits::kFp8V) {  // O = v_scale x (P V8): the normalization follows
    const float v_scale = p.value_scale(te.b, te.kv_head);
#pragma unroll
    for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][d][e] *= v_scale;
  }
  // The 16-bit rows do not fit in the FP8 Q tile: once both consumers are done (every copy
  // landed and read), each stages its own rows over the shared memory. Float32 partials
  // (split-KV) go straight out.
  if constexpr (sizeof(OutT) == 2) {
    constexpr int kPitch = kOutPitch<Traits, OutT>;
    static_assert(Traits::kBlockM * kPitch * sizeof(OutT) <= Traits::kBarriersOffset,
                  "the output tile must not overlap the mbarriers");
    cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kConsumersDone);
    store_staged<Traits, OutT, Traits::kMmaGroupRows, kGroupThreads>(
        o, softmax, reinterpret_cast<OutT*>(sm90_smem),
        [](int r, int col) { return r * kPitch + col; }, out, lse, te.output(p), te.row_begin,
        te.rows, group * Traits::kMmaGroupRows, warp_row, thread % kGroupThreads,
        [&] { cutlass::arch::NamedBarrier::sync(kGroupThreads, kOutputStaged + group); });
  } else {
    store_direct<Traits, OutT>(o, softmax, out, lse, te.output(p), te.row_begin, te.rows, warp_row,
                               thread % 32);
  }
#endif
}

// The persistent kernel of Traits with kHopperPersistent (16-bit queries): about one CTA per
// SM walks the tiles in TileWalk's order. kGather: the producer warpgroup gathers small pages
// by cp.async (gather_kv), each thread arriving on every stage it fills, instead of one
// warp copying by TMA (produce_kv).
template <class Traits, typename OutT, bool kScorePass, bool kGather>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_forward_kernel_sm90_persistent(const __grid_constant__ AttentionProblem p,
                                             const typename Traits::QkElement* __restrict__ q,
                                             OutT* __restrict__ out, float* __restrict__ lse,
                                             const __grid_constant__ KvTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (other targets: an empty kernel, never launched)
  static_assert(!Traits::kFp8Qk, "FP8 queries stage their output over the K/V stages");
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kGroupThreads = Traits::kGroupThreads;
  extern __shared__ __align__(1024) unsigned char sm90_smem[];  // (swizzle-pattern aligned)
  const HopperSmem<Traits> smem(sm90_smem);
  if (threadIdx.x == 0) smem.init(Traits::kConsumerGroups, kGather ? kGroupThreads : 1);
  __syncthreads();
  const TileWalk walk = TileWalk::of<Traits::kBlockM>(p, 2 * p.head_dim * sizeof(Element));

  if (threadIdx.x < kGroupThreads) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if constexpr (!kGather) {  // TMA: one warp issues every copy
      if (threadIdx.x >= 32) return;
      if (threadIdx.x == 0) {
        prefetch_tensor_map(maps.k);
        prefetch_tensor_map(maps.v);
      }
    }
    int use0 = 0, landings = 0;  // the rings' uses of the tile's block 0; last_v_landed's
    for (uint32_t i = blockIdx.x; i < walk.count(); i += gridDim.x) {
      CtaTile t;
      if (!walk.locate<Traits::kBlockM, kBlockN>(p, i, t) || !tile_keys_valid(p, t)) continue;
      const KeyBlocks blocks = KeyBlocks::of<kBlockN>(t.keys);
      if (blocks.count == 0) continue;
      if constexpr (kGather)
        gather_kv<Traits>(p, maps, t, blocks, use0, smem.k_ring, smem.v_ring, smem.k, smem.v);
      else
        produce_kv<Traits>(p, maps, t, blocks, use0, smem.k_ring, smem.v_ring, smem.last_v_landed,
                           landings, smem.k, smem.v);
      use0 += blocks.count;
    }
    if constexpr (kGather) cute::cp_async_wait<0>();  // (no thread exits with copies in flight)
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const ConsumerThread<Traits> me;
  const int thread = me.thread, group = me.group, warp_row = me.warp_row;
  const bool leader = me.leader;
  // Turns: each consumer issues its products after the other's.
  const auto take_turn = [&] {
    cutlass::arch::NamedBarrier::sync(2 * kGroupThreads, kTurn + group);
  };
  const auto pass_turn = [&] {
    cutlass::arch::NamedBarrier::arrive(2 * kGroupThreads, kTurn + 1 - group);
  };

  // The turns run on across tiles, so that no consumer can pass twice before the other took
  // the first pass (a named barrier would count both and complete without the other).
  if (group == 1) pass_turn();  // consumer 0 goes first

  int use0 = 0;  // the rings' use of the tile's block 0
  for (uint32_t i = blockIdx.x; i < walk.count(); i += gridDim.x) {
    CtaTile t;
    if (!walk.locate<Traits::kBlockM, kBlockN>(p, i, t)) continue;
    if (!tile_keys_valid(p, t)) {
      store_nan_rows(out, lse, t.output(p), t.row_begin, t.rows, thread, Traits::kConsumerThreads);
      continue;
    }
    const KeyBlocks blocks = KeyBlocks::of<kBlockN>(t.keys);
    const RowKeyLimits<Traits> row_limits(p, t.split_range,
                                          int(t.row_begin) + warp_row + thread % 32 / 4,
                                          int(t.rows_in_seq), t.sq, t.sk);
    const ScoreTransform transform = ScoreTransform::make(p.scale, p.softcap);
    float o[1][Traits::kDimAtoms][4];
    zero_output<Traits>(o);
    OnlineSoftmax<Traits> softmax;

    if (blocks.count > 0) {
      // (This group's Q rows are free: its last product of the previous tile, their last
      // reader, has completed, and so have the reads of the output it staged there.)
      load_q_tile<Traits, Traits::kMmaGroupRows, kGroupThreads>(
          smem.q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows, group * Traits::kMmaGroupRows,
          thread % kGroupThreads);
      cute::cp_async_wait<0>();
      fence_shared_for_wgmma();
      cutlass::arch::NamedBarrier::sync(kGroupThreads, kQLoaded + group);
    }
    consume_key_blocks<Traits, kScorePass, kGather>(
        smem.q, smem.k, smem.pv_tiles(), smem.k_ring, smem.pv_ring(), use0, blocks, t.keys,
        row_limits, transform, o, softmax, group, leader, take_turn, pass_turn);
    // The tile located again: its output addressing, which only the stores use, is not held
    // in registers through the key loop. The tile index and the thread's rows pass through an
    // empty asm: otherwise the compiler reuses the first locate's values, and hoists the
    // staging tile's offsets (invariant across tiles) out of the tile loop, and spills both
    // across the key loop (ptxas, d128 bf16 without / with the score pass: 152/160 /
    // 280/320 bytes of spill stores/loads, 24/40 / 96/104 with the asm).
    uint32_t tile = i;
    int tile_warp_row = warp_row, tile_thread = thread;
    asm volatile("" : "+r"(tile), "+r"(tile_warp_row), "+r"(tile_thread));
    CtaTile te;
    walk.locate<Traits::kBlockM, kBlockN>(p, tile, te);
    if constexpr (sizeof(OutT) == sizeof(Element)) {
      // Each consumer writes its own rows through its own rows of the Q tile, the only shared
      // memory free to it (the K/V stages already hold the next tile's keys; the other
      // consumer never reads these rows). They are free from the completion of this group's
      // last S product of the tile (its P V products read only V) until its next tile's Q is
      // loaded into them: so the output is staged and stored out first, and the next Q is
      // loaded only after the group's barrier below, once every thread has read its staged
      // chunks. (Loading the next Q first would leave no room to stage the output in.)
      const auto staged_sync = [&] {
        cutlass::arch::NamedBarrier::sync(kGroupThreads, kOutputStaged + group);
      };
      store_staged<Traits, OutT, Traits::kMmaGroupRows, kGroupThreads>(
          o, softmax, reinterpret_cast<OutT*>(smem.q),
          [](int r, int col) { return Traits::q_offset(r, col); }, out, lse, te.output(p),
          te.row_begin, te.rows, group * Traits::kMmaGroupRows, tile_warp_row,
          tile_thread % kGroupThreads, staged_sync);
      staged_sync();
    } else {  // float32 partials (split-KV) do not fit in the Q rows: straight out
      store_direct<Traits, OutT>(o, softmax, out, lse, te.output(p), te.row_begin, te.rows,
                                 warp_row, thread % 32);
    }
    use0 += blocks.count;
  }
  if (group == 0) take_turn();  // consumer 1's last pass (it passed first)
#endif
}

// The kernel of Traits (kHopperPersistent: the persistent one).
template <class Traits, typename OutT, bool kScorePass, bool kGather>
constexpr auto hopper_forward_kernel() {
  if constexpr (kHopperPersistent<Traits>)
    return attention_forward_kernel_sm90_persistent<Traits, OutT, kScorePass, kGather>;
  else
    return attention_forward_kernel_sm90<Traits, OutT, kScorePass>;
}

// The kernel of ForwardKernel::kHopper (forward_plan.h), for the launcher: it takes the K/V
// tensor maps instead of the K and V pointers (or, small pages, the K/V arrays it gathers
// from), runs a persistent grid (16-bit queries), and comes with and without the score pass.
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
      // Persistent: one CTA an SM, at most one a tile, walking TileWalk's order; otherwise
      // the grid's CTA a tile (kHopperPersistent).
      constexpr bool kPersistent = kHopperPersistent<Traits>;
      constexpr auto kernel =
          hopper_forward_kernel<Traits, OutT, score_pass.value, gathers.value>();
      if (cudaError_t err = allow_shared_memory<kernel, Traits::kSmemBytes>(); err != cudaSuccess)
        return internal_error(kOp, "raising the shared-memory limit", cudaGetErrorString(err));
      dim3 ctas = grid;
      if constexpr (kPersistent) {
        const uint64_t tiles = uint64_t(grid.x) * grid.y * grid.z;
        if (tiles > 0xffffffffu - 1024)  // (TileWalk counts in 32 bits, one grid stride past)
          return invalid_argument(kOp,
                                  "too many tiles for the Hopper kernel (2^32 - 1024 at most)");
        const int sms = device_attribute<cudaDevAttrMultiProcessorCount>();
        ctas = dim3(unsigned(sms > 0 && uint64_t(sms) < tiles ? uint64_t(sms) : tiles));
      }
      kernel<<<ctas, Traits::kThreads, Traits::kSmemBytes, stream>>>(
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
