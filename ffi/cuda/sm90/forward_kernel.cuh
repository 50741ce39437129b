// The Hopper (sm_90a) attention forward kernel: the tile and problem of the portable kernel
// (cuda/sm80/forward_kernel.cuh: same grid, tile placement, loads, masks, softmax and
// epilogue), with its products on warpgroup MMA and a main loop that overlaps them with
// the softmax. One CTA = two warpgroups, each its own 64 rows of the 128-row tile.
//
// Per key block n, each warpgroup issues S_n = Q K_n^T and then O += P_{n-1} V_{n-1}, both
// asynchronous; it waits for S_n only, and computes the softmax of block n while the tensor
// cores still run P_{n-1} V_{n-1}; then waits for that, rescales O if a row maximum moved,
// and keeps P_n in registers for the next step. (The other warpgroup interleaves too.)
//
// Loads: cp.async by all threads, into two stages each of K and V. V lags K by one block
// (P V of a block runs one step after its Q K^T): the copy group issued at step n holds K of
// block n + 1 and V of block n, and one barrier a step both publishes the group issued a
// step earlier and frees the stages that group refills (K of n - 1, V of n - 2: every warp
// is past step n - 1, where their last reads were waited for). Where the rows of a block
// lie (for pages: its page ids) is read a step or two before its copies are issued, so the
// copies never wait for the block table: into registers for 64-key runs (dense layouts,
// pages of 64 keys or a multiple), into shared memory for 16-key runs (other pages).
#pragma once

#include "common/attention_problem.h"
#include "cuda/common/cta_tile.cuh"
#include "cuda/common/epilogue.cuh"
#include "cuda/common/mask.cuh"
#include "cuda/common/softmax.cuh"
#include "cuda/common/tile_load.cuh"
#include "cuda/sm90/kernel_traits.cuh"
#include "cuda/sm90/warpgroup_mma.cuh"

namespace jax_fmha::cuda {

template <class Traits, typename OutT>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    attention_forward_kernel_sm90(const __grid_constant__ AttentionProblem p,
                                  const typename Traits::Element* __restrict__ q,
                                  const typename Traits::Element* __restrict__ k,
                                  const typename Traits::Element* __restrict__ v,
                                  OutT* __restrict__ out, float* __restrict__ lse) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (other targets: an empty kernel, never launched)
  using Element = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kTile = Traits::kKvTileElems;
  static_assert(Traits::kStages == 2, "the copy schedule above is for two stages");
  extern __shared__ __align__(1024) unsigned char sm90_smem[];  // (swizzle-pattern aligned)
  Element* smem_q = reinterpret_cast<Element*>(sm90_smem);
  Element* smem_k = smem_q + Traits::kQElems;  // [2]
  Element* smem_v = smem_k + 2 * kTile;        // [2]
  int32_t* smem_page_ids = reinterpret_cast<int32_t*>(sm90_smem + Traits::kPageIdsOffset);

  CtaTile t;
  if (!place_tile<Traits::kBlockM, kBlockN>(p, out, lse, t)) return;
  const TileKeys& keys = t.keys;
  const int warp_row = (threadIdx.x / 32) * Traits::kWarpRows;
  // A warpgroup whose rows all lie past the sequence skips the arithmetic (not the copies
  // and barriers, which involve every thread).
  const bool group_has_rows = warp_row / Traits::kMmaGroupRows * Traits::kMmaGroupRows < t.rows;
  const int first_row = int(t.row_begin) + warp_row + (threadIdx.x % 32) / 4;
  const ScoreTransform transform = ScoreTransform::make(p.scale, p.softcap);
  // Pages that are not a multiple of 64 keys load as 16-key runs with staged page ids.
  // (The launcher sends pages that are not a multiple of 16 to the portable kernel; the
  // row-by-row gather keeps any page size correct here too.)
  const bool staged_ids = !p.kv.runs_contiguous(Traits::kRunKeys);
  const bool page_runs = p.kv.pages.runs_contiguous(Traits::kPageRunKeys);

  float o[1][Traits::kDimAtoms][4];
#pragma unroll
  for (int d = 0; d < Traits::kDimAtoms; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[0][d][e] = 0.f;
  auto& o_regs = reinterpret_cast<float (&)[Traits::kDimAtoms * 4]>(o);
  OnlineSoftmax<Traits> softmax;
  ProbabilityRegs<Traits> probs;  // P of the previous block: the A operand of its P V

  load_q_tile<Traits>(smem_q, q, p, t.q_begin, t.kv_head, t.row_begin, t.rows);
  if (!keys.empty()) {
    const int first_block = keys.begin / kBlockN * kBlockN;
    const int blocks = (keys.end - first_block + kBlockN - 1) / kBlockN;
    constexpr int kPageRuns = Traits::kPageRuns;
    using BlockRows = KeyBlockRows<Traits::kKeyRuns>;
    const auto rows_of = [&](int block) {
      return key_block_rows<Traits::kKeyRuns, Traits::kRunKeys>(
          p, t.b, first_block + block * kBlockN, keys.end);
    };
    const auto page_ids = [&](int block) {
      return smem_page_ids + block % Traits::kPageIdSlots * kPageRuns;
    };
    const auto stage_ids = [&](int block) {
      if (page_runs)
        stage_page_ids<kPageRuns, Traits::kPageRunKeys>(
            page_ids(block), p, t.b, first_block + block * kBlockN, keys.end, threadIdx.x);
    };
    // 64-key runs: the rows of the blocks whose V, K and next K come next; a block's rows
    // are looked up one step before its K is copied, and kept for its V a step later.
    BlockRows v_rows, k_rows, next_k_rows;
    if (!staged_ids) {
      k_rows = rows_of(0);
      next_k_rows = blocks > 1 ? rows_of(1) : k_rows;
    }
    // One copy group: K of block `key_block` and V of block key_block - 1, where they exist.
    const auto issue = [&](int key_block) {
      const auto copy = [&](auto part, int block, const BlockRows& rows) {
        constexpr KvPart kPart = decltype(part)::value;
        Element* const dst_k = smem_k + block % 2 * kTile;
        Element* const dst_v = smem_v + block % 2 * kTile;
        const int key_begin = first_block + block * kBlockN;
        if (staged_ids) {
          load_kv_tile<Traits, kBlockN, Traits::kThreads, kPart>(
              dst_k, dst_v, k, v, p, t.b, t.kv_head, key_begin, keys.end, page_runs,
              PagedRuns<kPageRuns>{page_ids(block), int(p.kv.pages.page_size), key_begin},
              threadIdx.x);
        } else {
          load_kv_tile<Traits, kBlockN, Traits::kThreads, kPart>(
              dst_k, dst_v, k, v, p, t.b, t.kv_head, key_begin, keys.end, true, rows, threadIdx.x);
        }
      };
      if (key_block < blocks)
        copy(std::integral_constant<KvPart, KvPart::kKeys>{}, key_block, k_rows);
      if (key_block > 0)
        copy(std::integral_constant<KvPart, KvPart::kValues>{}, key_block - 1, v_rows);
      cute::cp_async_fence();  // (the first group also holds Q)
    };
    if (staged_ids) {  // the page ids of blocks 0 and 1 before any copy
      stage_ids(0);
      if (blocks > 1) stage_ids(1);
      cute::cp_async_fence();
      cute::cp_async_wait<0>();
      __syncthreads();
    }
    issue(0);
    for (int block = 0; block < blocks; ++block) {
      cute::cp_async_wait<0>();
      fence_shared_for_wgmma();
      __syncthreads();  // K of this block, V of the last visible; their old stages free
      v_rows = k_rows;
      k_rows = next_k_rows;
      if (block + 2 < blocks) {  // used at the next step
        if (staged_ids)
          stage_ids(block + 2);
        else
          next_k_rows = rows_of(block + 2);
      }
      issue(block + 1);
      if (group_has_rows) {
        float s[1][Traits::kKeyAtoms][4];
        auto& s_regs = reinterpret_cast<float (&)[Traits::kKeyAtoms * 4]>(s);
        issue_qk<Traits>(smem_q, smem_k + block % 2 * kTile, s);
        if (block > 0) {
          fence_registers(o_regs);
          fence_registers(probs);
          issue_pv<Traits>(probs, smem_v + (block - 1) % 2 * kTile, o);
          wait_products<1>();  // S; P V of the last block still runs
        } else {
          wait_products<0>();
        }
        fence_registers(s_regs);
        const int key_begin = first_block + block * kBlockN;
        if (transform.explicit_pass()) transform.apply<Traits>(s);
        if (keys.block_needs_mask(key_begin, kBlockN))
          mask_scores<Traits>(s, p, t.split_range, first_row, int(t.rows_in_seq), t.sq, t.sk,
                              key_begin);
        float correction[1][2];
        const bool rescale = softmax.update_scores(s, transform.fold(), correction);
        wait_products<0>();
        fence_registers(o_regs);
        fence_registers(probs);
        if (rescale) softmax.rescale(o, correction);
        pack_probabilities<Traits>(s, probs);
      }
    }
    // P V of the last block: its V is the group issued in the last step.
    cute::cp_async_wait<0>();
    fence_shared_for_wgmma();
    __syncthreads();
    if (group_has_rows) {
      fence_registers(o_regs);
      fence_registers(probs);
      issue_pv<Traits>(probs, smem_v + (blocks - 1) % 2 * kTile, o);
      wait_products<0>();
      fence_registers(o_regs);
    }
  }
  cute::cp_async_wait<0>();
  __syncthreads();  // shared memory is reused for the output tile
  store_tile<Traits, OutT>(o, softmax, sm90_smem, out, lse, t.output(p), t.row_begin, t.rows,
                           warp_row);
#endif
}

// The kernel of ForwardKernel::kHopper (forward_plan.h), for the launcher.
template <>
struct ForwardKernelOf<ForwardKernel::kHopper> {
  template <typename Element, int kHeadDim>
  using TraitsOf = HopperTraits<Element, kHeadDim>;
  template <class Traits, typename OutT>
  static constexpr auto kernel = attention_forward_kernel_sm90<Traits, OutT>;
};

}  // namespace jax_fmha::cuda
