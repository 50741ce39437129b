// The shared-memory rings between the Hopper kernel's producer (TMA copies, or cp.async
// gathers) and its consumer warpgroups, on mbarriers: each stage has a "full" barrier (TMA: the
// producer's one arrival, which announces the bytes its copies will complete; gather: one
// arrival per producer thread, triggered when its copies have landed) and an "empty" one (one
// arrival per consumer warpgroup once its products have read the stage). Use i of a ring goes to
// stage i % kStages, in phase (i / kStages) % 2 of the stage's barriers. (With FP8 V the
// producer's transposing warps stand in for the consumers of the V ring and for the producer of
// the V^T ring: the arrival counts are the ring's.)
#pragma once

#include <cutlass/arch/barrier.h>

#include <cstdint>

namespace jax_fmha::cuda {

template <int kStages>
struct StageRing {
  uint64_t* full;   // [kStages]
  uint64_t* empty;  // [kStages]

  __device__ __forceinline__ static int stage(int use) { return use % kStages; }
  __device__ __forceinline__ static uint32_t parity(int use) { return (use / kStages) % 2; }

  // One thread, before any other uses the ring (then fence_barrier_init and a CTA barrier):
  // `releases` arrivals empty a stage, `fills` arrivals fill it (1 for TMA, the producer's
  // threads for gathers).
  __device__ __forceinline__ void init(int releases, int fills = 1) const {
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterBarrier::init(&full[s], fills);
      cutlass::arch::ClusterBarrier::init(&empty[s], releases);
    }
  }
  // Producer of a ring filled by threads' own stores (FP8 V's transposing warps; TMA and
  // cp.async arrive through their copies): one arrival of `fills`.
  __device__ __forceinline__ void fill(int use) const {
    cutlass::arch::ClusterBarrier::arrive(&full[stage(use)]);
  }

  // Producer: waits until use `use - kStages` of the stage is released (the first kStages
  // uses find their stage empty: a fresh barrier counts its phase before 0 as complete).
  __device__ __forceinline__ void acquire(int use) const {
    cutlass::arch::ClusterBarrier::wait(&empty[stage(use)], parity(use) ^ 1);
  }
  __device__ __forceinline__ uint64_t* full_barrier(int use) const { return &full[stage(use)]; }

  // Consumers: wait until the stage holds use `use`; release it once read (one thread of each
  // consumer warpgroup, after the warpgroup's products that read it have completed).
  __device__ __forceinline__ void wait(int use) const {
    cutlass::arch::ClusterBarrier::wait(&full[stage(use)], parity(use));
  }
  __device__ __forceinline__ void release(int use) const {
    cutlass::arch::ClusterBarrier::arrive(&empty[stage(use)]);
  }
};

}  // namespace jax_fmha::cuda
