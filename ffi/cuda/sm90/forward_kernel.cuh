// The Hopper (sm_90a) attention forward kernel: the tile and problem of the portable kernel
// (cuda/sm80/forward_kernel.cuh: same grid, tile placement, masks, softmax and epilogue),
// warp-specialized. Why it is built so: docs/design/cuda_attention.md.
//
// Persistent: about one CTA per SM walks the tiles (row tile, KV head, split x sequence), the
// last row tiles first (under a causal mask they see the most keys), so that one tile's
// loads start while the last one's products and stores finish.
//
// One CTA = three warpgroups. The producer (warpgroup 0; one warp works, with few registers)
// copies K and V key blocks by TMA into rings of kStages stages (sm90/pipeline.cuh), in the
// order the consumers use them: per tile, K of block 0, then K of block n and V of block
// n - 1, then V of the last block. The two consumer warpgroups (the registers the producer
// gave up) each load their 64 rows of Q, then per key block n issue S_n = Q K_n^T and
// O += P_{n-1} V_{n-1} asynchronously, wait for S_n only, and compute the softmax of block n
// while P V still runs; then wait for it, rescale O if a row maximum moved, and keep P_n in
// registers. Each stores its rows straight from registers (the shared memory already holds
// the next tile's keys). Both consumers run every tile, also one of at most 64 rows: the
// rings and the turns count on both.
//
// The two consumers take turns issuing their products (named barriers, "ping-pong"): while
// one warpgroup's products occupy the tensor cores, the other computes its softmax.
//
// Keys at or past the tile's last key are never seen: their scores are masked, and V rows of
// the last block past it are zeroed by the producer before it releases that block (masked
// probabilities are exact zeros, which must not meet garbage values: 0 x NaN is NaN).
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <mutex>

#include "common/attention_problem.h"
#include "common/errors.h"
#include "cuda/common/cta_tile.cuh"
#include "cuda/common/epilogue.cuh"
#include "cuda/common/launch_check.h"
#include "cuda/common/mask.cuh"
#include "cuda/common/softmax.cuh"
#include "cuda/common/tile_load.cuh"
#include "cuda/sm90/kernel_traits.cuh"
#include "cuda/sm90/pipeline.cuh"
#include "cuda/sm90/tma.cuh"
#include "cuda/sm90/warpgroup_mma.cuh"

namespace jax_fmha::cuda {

// Named barriers (0 is __syncthreads): each consumer warpgroup's Q and the consumers' turns.
enum HopperBarrier : uint32_t { kQLoaded = 1, kTurn = 3 };

// The persistent walk: tile t -> (row tile, KV head, z), the last row tiles first. In 32
// bits: the launcher refuses grids of 2^32 tiles or more.
struct TileWalk {
  uint32_t row_tiles, per_row_tile;  // per_row_tile: KV heads x batch x splits

  template <int kBlockM>
  __device__ __forceinline__ static TileWalk of(const AttentionProblem& p) {
    return {uint32_t((p.q.max_len * p.group() + kBlockM - 1) / kBlockM),
            uint32_t(p.num_kv_heads * p.batch * p.num_splits)};
  }
  __device__ __forceinline__ uint32_t count() const { return row_tiles * per_row_tile; }
  template <int kBlockM, int kBlockN>
  __device__ __forceinline__ bool locate(const AttentionProblem& p, uint32_t t,
                                         CtaTile& tile) const {
    const uint32_t rest = t % per_row_tile, heads = uint32_t(p.num_kv_heads);
    return locate_tile<kBlockM, kBlockN>(p, row_tiles - 1 - t / per_row_tile, int(rest % heads),
                                         rest / heads, tile);
  }
};

// Whether a tile's keys lie inside the K/V arrays, decided by one warp (every warp that
// needs it decides alone, with no barrier between the roles).
__device__ __forceinline__ bool tile_keys_valid(const AttentionProblem& p, const CtaTile& t) {
  return kv_keys_valid(p.kv, t.b, t.split_range, int(threadIdx.x % 32), 32,
                       [](bool bad) { return __any_sync(0xffffffffu, bad); });
}

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
// (one per lane) of kColumnBoxes boxes. Block n is use use0 + n of both rings; `landings`
// counts the uses of last_v_landed.
template <class Traits>
__device__ __forceinline__ void produce_kv(const AttentionProblem& p, const KvTensorMaps& maps,
                                           const CtaTile& t, const KeyBlocks& blocks, int use0,
                                           const StageRing<Traits::kStages>& k_ring,
                                           const StageRing<Traits::kStages>& v_ring,
                                           uint64_t* last_v_landed, int& landings,
                                           typename Traits::Element* smem_k,
                                           typename Traits::Element* smem_v) {
  using Element = typename Traits::Element;
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
  const auto copy_block = [&](const CUtensorMap& map, Element* tile, uint64_t* bar, int row,
                              int block) {
    const int keys_in = min(kBlockN, blocks.end - blocks.key_begin<kBlockN>(block));
    const int bytes =
        (keys_in + run_rows - 1) / run_rows * run_rows * Traits::kHeadDim * int(sizeof(Element));
    if (lane == 0) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar, bytes);
    __syncwarp();
    if (row >= 0)
#pragma unroll
      for (int box = 0; box < Traits::kColumnBoxes; ++box)
        tma_load(map, bar, tile + Traits::kv_box_row(box, lane * run_rows),
                 box * Traits::kBoxColumns, t.kv_head, row);
  };
  const auto k_tile = [&](int block) {
    return smem_k + k_ring.stage(use0 + block) * Traits::kKvTileElems;
  };
  const auto v_tile = [&](int block) {
    return smem_v + v_ring.stage(use0 + block) * Traits::kKvTileElems;
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
  if (valid_rows == kBlockN) {
    copy_block(maps.v, v_tile(last), v_ring.full_barrier(use0 + last), v_row, last);
    return;
  }
  // The last V block ends inside: copy it, wait, zero its rows past the keys, then release it.
  Element* tile = v_tile(last);
  copy_block(maps.v, tile, last_v_landed, v_row, last);
  cutlass::arch::ClusterBarrier::wait(last_v_landed, landings++ % 2);
  constexpr int kChunksPerSpan = Traits::kSwizzleBytes / 16;
  const int chunks = (kBlockN - valid_rows) * Traits::kColumnBoxes * kChunksPerSpan;
  for (int c = lane; c < chunks; c += 32) {
    const int span = c / kChunksPerSpan;
    const int box = span % Traits::kColumnBoxes, row = valid_rows + span / Traits::kColumnBoxes;
    reinterpret_cast<uint4*>(tile + Traits::kv_box_row(box, row))[c % kChunksPerSpan] =
        make_uint4(0, 0, 0, 0);
  }
  fence_shared_for_wgmma();
  __syncwarp();
  if (lane == 0) cutlass::arch::ClusterBarrier::arrive(v_ring.full_barrier(use0 + last));
}

// kScorePass: the scores take ScoreTransform's explicit pass (softcap, or a scale that is not
// positive); a kernel without it holds no code for it (its registers are the 128-key tile's
// limit, docs/design/cuda_attention.md).
template <class Traits, typename OutT, bool kScorePass>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_forward_kernel_sm90(const __grid_constant__ AttentionProblem p,
                                  const typename Traits::Element* __restrict__ q,
                                  OutT* __restrict__ out, float* __restrict__ lse,
                                  const __grid_constant__ KvTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (other targets: an empty kernel, never launched)
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kStages = Traits::kStages;
  constexpr int kTile = Traits::kKvTileElems;
  constexpr int kGroupThreads = Traits::kGroupThreads;
  extern __shared__ __align__(1024) unsigned char sm90_smem[];  // (swizzle-pattern aligned)
  Element* smem_q = reinterpret_cast<Element*>(sm90_smem);
  Element* smem_k = smem_q + Traits::kQElems;  // [kStages]
  Element* smem_v = smem_k + kStages * kTile;  // [kStages]
  uint64_t* barriers = reinterpret_cast<uint64_t*>(sm90_smem + Traits::kBarriersOffset);
  const StageRing<kStages> k_ring{barriers, barriers + kStages};
  const StageRing<kStages> v_ring{barriers + 2 * kStages, barriers + 3 * kStages};
  uint64_t* last_v_landed = barriers + 4 * kStages;
  if (threadIdx.x == 0) {
    k_ring.init(Traits::kConsumerGroups);
    v_ring.init(Traits::kConsumerGroups);
    cutlass::arch::ClusterBarrier::init(last_v_landed, 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  const TileWalk walk = TileWalk::of<Traits::kBlockM>(p);

  if (threadIdx.x < kGroupThreads) {  // the producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (threadIdx.x >= 32) return;
    if (threadIdx.x == 0) {
      prefetch_tensor_map(maps.k);
      prefetch_tensor_map(maps.v);
    }
    int use0 = 0, landings = 0;  // the rings' uses of the tile's block 0; last_v_landed's
    for (uint32_t i = blockIdx.x; i < walk.count(); i += gridDim.x) {
      CtaTile t;
      if (!walk.locate<Traits::kBlockM, kBlockN>(p, i, t) || !tile_keys_valid(p, t)) continue;
      const KeyBlocks blocks = KeyBlocks::of<kBlockN>(t.keys);
      if (blocks.count == 0) continue;
      produce_kv<Traits>(p, maps, t, blocks, use0, k_ring, v_ring, last_v_landed, landings, smem_k,
                         smem_v);
      use0 += blocks.count;
    }
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const int thread = threadIdx.x - kGroupThreads;  // among the consumers
  const int group = thread / kGroupThreads;
  const bool leader = thread % kGroupThreads == 0;  // releases the group's stages
  const int warp_row = (thread / 32) * Traits::kWarpRows;
  const ScoreTransform transform = ScoreTransform::make(p.scale, p.softcap);
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
    float o[1][Traits::kDimAtoms][4];
#pragma unroll
    for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
    auto& o_regs = reinterpret_cast<float (&)[Traits::kDimAtoms * 4]>(o);
    OnlineSoftmax<Traits> softmax;
    ProbabilityRegs<Traits> probs;  // P of the previous block: the A operand of its P V

    if (blocks.count > 0) {
      // (Q's last reader, this group's last product of the previous tile, has completed.)
      load_q_tile<Traits, Traits::kMmaGroupRows, kGroupThreads>(
          smem_q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows, group * Traits::kMmaGroupRows,
          thread % kGroupThreads);
      cute::cp_async_wait<0>();
      fence_shared_for_wgmma();
      cutlass::arch::NamedBarrier::sync(kGroupThreads, kQLoaded + group);
    }
    const auto k_tile = [&](int block) { return smem_k + k_ring.stage(use0 + block) * kTile; };
    const auto v_tile = [&](int block) { return smem_v + v_ring.stage(use0 + block) * kTile; };

    // The softmax of block n's scores: masked, then probabilities and the factor O must be
    // rescaled by; returns whether any row of the warp needs it.
    float correction[1][2];
    const auto softmax_of = [&](float (&s)[1][Traits::kKeyAtoms][4], int block) {
      const int key_begin = blocks.key_begin<kBlockN>(block);
      if constexpr (kScorePass) transform.apply<Traits>(s);
      if (t.keys.block_needs_mask(key_begin, kBlockN)) row_limits.mask(s, key_begin);
      return softmax.update_scores(s, kScorePass ? 1.f : transform.scale_log2, correction);
    };
    bool rescale = false;    // O must be rescaled before its next product
    if (blocks.count > 0) {  // block 0: S only (the first iteration, peeled: no branch
                             // between the issue and the wait of the loop's products)
      float s[1][Traits::kKeyAtoms][4];
      auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
      k_ring.wait(use0);
      take_turn();
      issue_qk<Traits>(smem_q, k_tile(0), s, thread);
      pass_turn();
      wait_products<0>();
      if (leader) k_ring.release(use0);
      fence_registers(s_regs);
      softmax_of(s, 0);  // (O is still 0: nothing to rescale)
      pack_probabilities<Traits>(s, probs);
    }
    for (int block = 1; block < blocks.count; ++block) {
      float s[1][Traits::kKeyAtoms][4];
      auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
      k_ring.wait(use0 + block);
      v_ring.wait(use0 + block - 1);
      take_turn();
      issue_qk<Traits>(smem_q, k_tile(block), s, thread);
      fence_registers(o_regs);
      if (rescale) softmax.rescale(o, correction);  // while S runs
      fence_registers(o_regs);
      fence_registers(probs);
      issue_pv<Traits>(probs, v_tile(block - 1), o, thread);
      pass_turn();
      wait_products<1>();  // S; P V of the last block still runs
      if (leader) k_ring.release(use0 + block);
      fence_registers(s_regs);
      rescale = softmax_of(s, block);
      wait_products<0>();
      if (leader) v_ring.release(use0 + block - 1);
      fence_registers(o_regs);
      fence_registers(probs);
      pack_probabilities<Traits>(s, probs);
    }
    if (blocks.count > 0) {  // P V of the last block
      const int last = blocks.count - 1;
      v_ring.wait(use0 + last);
      take_turn();
      fence_registers(o_regs);
      if (rescale) softmax.rescale(o, correction);
      fence_registers(o_regs);
      fence_registers(probs);
      issue_pv<Traits>(probs, v_tile(last), o, thread);
      pass_turn();
      wait_products<0>();
      if (leader) v_ring.release(use0 + last);
      fence_registers(o_regs);
    }
    // The tile located again: its output addressing, which only the stores use, is not held
    // in registers through the key loop.
    CtaTile te;
    walk.locate<Traits::kBlockM, kBlockN>(p, i, te);
    store_rows<Traits, OutT>(o, softmax, out, lse, te.output(p), te.row_begin, te.rows, warp_row,
                             thread % 32);
    use0 += blocks.count;
  }
  if (group == 0) take_turn();  // consumer 1's last pass (it passed first)
#endif
}

// The current device's multiprocessors, queried once per device; 0 if the query fails.
inline int multiprocessor_count() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static int count[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) return 0;
  std::call_once(once[device], [&] {
    if (cudaDeviceGetAttribute(&count[device], cudaDevAttrMultiProcessorCount, device) !=
        cudaSuccess)
      count[device] = 0;
  });
  return count[device];
}

// The kernel of ForwardKernel::kHopper (forward_plan.h), for the launcher: it takes the K/V
// tensor maps instead of the K and V pointers, runs a persistent grid, and comes with and
// without the score pass.
template <>
struct ForwardKernelOf<ForwardKernel::kHopper> {
  template <typename Element, int kHeadDim, typename Kv>
  using TraitsOf = HopperTraits<Element, kHeadDim>;  // Kv: Element (forward_kernel)

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
    KvTensorMaps maps;
    maps.run_rows = tma_run_rows(p.kv, Traits::kBlockN);
    const char* error = nullptr;
    if (!make_kv_tensor_map<Traits>(p, k, maps.run_rows, &maps.k, &error) ||
        !make_kv_tensor_map<Traits>(p, v, maps.run_rows, &maps.v, &error))
      return internal_error(kOp, "building the K/V tensor maps", error);
    // Persistent: one CTA an SM, at most one a tile.
    const uint64_t tiles = uint64_t(grid.x) * grid.y * grid.z;
    if (tiles > 0xffffffffu - 1024)  // (TileWalk counts in 32 bits, one grid stride past)
      return invalid_argument(kOp, "too many tiles for the Hopper kernel (2^32 - 1024 at most)");
    const int sms = multiprocessor_count();
    const unsigned ctas = unsigned(sms > 0 && uint64_t(sms) < tiles ? uint64_t(sms) : tiles);
    const auto run = [&](auto score_pass) {
      constexpr auto kernel = attention_forward_kernel_sm90<Traits, OutT, score_pass.value>;
      if (cudaError_t err = allow_shared_memory<kernel, Traits::kSmemBytes>(); err != cudaSuccess)
        return internal_error(kOp, "raising the shared-memory limit", cudaGetErrorString(err));
      kernel<<<ctas, Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, static_cast<const typename Traits::Element*>(q), out, lse, maps);
      return xla::ffi::Error::Success();
    };
    if (ScoreTransform::make(p.scale, p.softcap).explicit_pass()) return run(std::true_type{});
    return run(std::false_type{});
  }
};

}  // namespace jax_fmha::cuda
