// The two products of a warpgroup on wgmma (sm_90a), fp32 accumulators in the thread's
// registers, laid out like the mma.sync accumulators of cuda/sm80/warp_mma.cuh:
//   S[1][kKeyAtoms]  = Q (warpgroup's 64 rows, shared) x K^T (key tile, shared)
//   O[1][kDimAtoms] += P (probabilities, registers)    x V   (value tile, shared)
// Each product is issued as one batch of wgmma k-steps (k16; k32 for FP8 operands) (issue_qk,
// issue_pv) and runs asynchronously: the caller waits with wait_products<N>() (N = batches left in
// flight), and until then reads nor writes neither the accumulators nor the P registers. CuTe
// builds the shared-memory descriptors from the layouts of HopperTraits.
#pragma once

#include <cute/tensor.hpp>

#include "cuda/common/dtypes.cuh"
#include "cuda/sm90/fp8_pv_layout.cuh"
#include "cuda/sm90/kernel_traits.cuh"

namespace jax_fmha::cuda {

// Orders this thread's earlier generic-proxy writes of shared memory (cp.async, stores)
// before later reads by wgmma (the async proxy); a barrier then extends it to the CTA.
__device__ __forceinline__ void fence_shared_for_wgmma() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Keeps the compiler from moving register accesses across the asynchronous products.
// (T: float accumulators or uint32_t packed P.)
template <typename T, int kN>
__device__ __forceinline__ void fence_registers(T (&regs)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) cute::warpgroup_fence_operand(regs[i]);
}

// Waits until at most kInFlight product batches of this warpgroup are still running.
template <int kInFlight>
__device__ __forceinline__ void wait_products() {
  cute::warpgroup_wait<kInFlight>();
}

// c (+)= a b over the k-steps of the fragments, as one wgmma batch (not waited for).
// accumulate false: c = a b (the first step scales the old c by zero).
template <class TiledMma, class FragA, class FragB, class FragC>
__device__ __forceinline__ void issue_gemm(TiledMma& mma, const FragA& a, const FragB& b, FragC& c,
                                           bool accumulate) {
  cute::warpgroup_arrive();
  mma.accumulate_ = accumulate ? cute::GMMA::ScaleOut::One : cute::GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < cute::size<2>(a); ++k) {
    cute::gemm(mma, a(cute::_, cute::_, k), b(cute::_, cute::_, k), c);
    mma.accumulate_ = cute::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
}

// The thread's accumulator registers of a tiled MMA over an M x N tile, as a CuTe tensor.
template <class TiledMma, int kM, int kN>
__device__ __forceinline__ auto accumulator_view(float* regs) {
  using Layout =
      decltype(cute::partition_fragment_C(TiledMma{}, cute::Shape<cute::Int<kM>, cute::Int<kN>>{})
                   .layout());
  return cute::make_tensor(cute::make_rmem_ptr(regs), Layout{});
}

// S = Q K^T for the warpgroup's rows. smem_q, smem_k: the tiles in HopperTraits' layouts;
// group: the caller's consumer warpgroup (it picks the rows), warp-uniform to the compiler
// (the kernel reads it from lane 0) so that the shared-memory descriptors are built on the
// uniform datapath.
// FP8 Q and K give S in the same accumulator layout as 16-bit ones.
template <class Traits>
__device__ __forceinline__ void issue_qk(const typename Traits::QkElement* smem_q,
                                         const typename Traits::QkElement* smem_k,
                                         float (&s)[1][Traits::kKeyAtoms][4], int group) {
  using T = typename Traits::MmaQkElement;
  typename Traits::MmaQK mma;
  const auto thread_mma = mma.get_thread_slice(group * Traits::kGroupThreads);
  const auto q = cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<const T*>(smem_q)),
                                   typename Traits::SmemLayoutQ{});
  const auto k = cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<const T*>(smem_k)),
                                   typename Traits::SmemLayoutK{});
  auto acc =
      accumulator_view<typename Traits::MmaQK, Traits::kBlockM, Traits::kBlockN>(&s[0][0][0]);
  issue_gemm(mma, thread_mma.partition_fragment_A(q), thread_mma.partition_fragment_B(k), acc,
             false);
}

// The register A operand of P V. 16-bit P: per k16 step, the 8 values (column pair, row half,
// k half) of the wgmma A layout, two values a register. FP8 P: per k32 step, 16 values, four
// a register (below).
template <class Traits>
using ProbabilityRegs = uint32_t[Traits::kBlockN / (Traits::kFp8V ? 32 : 16) * 4];

// Four probabilities as e4m3fn (round to nearest, saturating), x0 in the lowest byte.
__device__ __forceinline__ uint32_t pack4_e4m3(float x0, float x1, float x2, float x3) {
  uint16_t lo, hi;  // (cvt's first source goes to the upper byte)
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(x1), "f"(x0));
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(x3), "f"(x2));
  return uint32_t(lo) | uint32_t(hi) << 16;
}

// 16-bit P: as with mma.sync, the probabilities in S's accumulator layout are that operand
// once two adjacent n8 key tiles are packed into one k16 step.
//
// FP8 P: the A fragment of a k32 step gives thread (group g, index t of 4) the columns
// 4t..4t+3 of rows g and g+8 (registers 0 and 1) and 16+4t..16+4t+3 of the same rows
// (registers 2 and 3), while S gives it keys 8j+2t and 8j+2t+1 of each n8 atom j. So the
// thread packs its own keys of atoms j, j+1 (registers 0, 1) and j+2, j+3 (registers 2, 3)
// (fp8_probability_slot): column 16a+4t+2b+i of the step stands for key 8(2a+b)+2t+i, and
// the V^T tile the producer writes holds that key's values in that column
// (forward_kernel.cuh, transpose_v).
template <class Traits>
__device__ __forceinline__ void pack_probabilities(const float (&p)[1][Traits::kKeyAtoms][4],
                                                   ProbabilityRegs<Traits>& regs) {
  if constexpr (Traits::kFp8V) {
#pragma unroll
    for (int kk = 0; kk < Traits::kBlockN / 32; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const auto x = [&](int byte) {  // (sm90/fp8_pv_layout.cuh)
          const ProbabilitySlot slot = fp8_probability_slot(r, byte);
          return p[0][4 * kk + slot.atom][slot.element];
        };
        regs[4 * kk + r] = pack4_e4m3(x(0), x(1), x(2), x(3));
      }
  } else {
#pragma unroll
    for (int kk = 0; kk < Traits::kBlockN / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float (&pair)[4] = p[0][2 * kk + r / 2];
        regs[4 * kk + r] =
            pack2<typename Traits::Element>(pair[2 * (r % 2)], pair[2 * (r % 2) + 1]);
      }
  }
}

// O += P V for the warpgroup's rows; smem_v: the value tile in HopperTraits' layout (FP8 V:
// the V^T tile); group: as for issue_qk.
template <class Traits>
__device__ __forceinline__ void issue_pv(const ProbabilityRegs<Traits>& p,
                                         const typename Traits::Element* smem_v,
                                         float (&o)[1][Traits::kDimAtoms][4], int group) {
  using T = typename Traits::MmaElement;
  typename Traits::MmaPV mma;
  const auto thread_mma = mma.get_thread_slice(group * Traits::kGroupThreads);
  const auto vt = cute::make_tensor(cute::make_smem_ptr(reinterpret_cast<const T*>(smem_v)),
                                    typename Traits::SmemLayoutVt{});
  // (values of a step, M, steps): 16-bit (2, 2, 2) per k16 step, FP8 (4, 2, 2) per k32 step.
  using StepValues = std::conditional_t<Traits::kFp8V, cute::Shape<cute::_4, cute::_2, cute::_2>,
                                        cute::Shape<cute::_2, cute::_2, cute::_2>>;
  constexpr int kSteps = Traits::kBlockN / (Traits::kFp8V ? 32 : 16);
  const auto a =
      cute::make_tensor(cute::make_rmem_ptr(reinterpret_cast<const T*>(&p[0])),
                        cute::Layout<cute::Shape<StepValues, cute::_1, cute::Int<kSteps>>>{});
  auto acc =
      accumulator_view<typename Traits::MmaPV, Traits::kBlockM, Traits::kHeadDim>(&o[0][0][0]);
  issue_gemm(mma, a, thread_mma.partition_fragment_B(vt), acc, true);
}

}  // namespace jax_fmha::cuda
