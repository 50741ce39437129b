// Which CUDA attention kernel computes a problem, and what the split-KV planner must know of
// each: the packed query rows of its tile and the CTAs an SM holds at once. Plain C++ (no
// CUDA headers): the launcher (attention.cu) calls it at run time, the planner
// (common/split_policy.h, through the extension) at trace time, in every build.
// Why the kernels are shaped and chosen so: docs/design/cuda_attention.md.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace jax_fmha::cuda {

enum class ForwardKernel : int32_t {
  kDecode = 0,    // few packed rows per KV head: 16-row tiles, the warps split the keys
  kPortable = 1,  // sm80+: mma.sync, 128-row tiles
  kHopper = 2,    // sm_90a: wgmma, 128-row tiles
};

struct KernelShape {
  int64_t block_m;      // packed query rows (queries x heads of a KV head) of one CTA
  int64_t ctas_per_sm;  // CTAs one SM runs at once
};

// The decode tile: 16 rows; two CTAs an SM (its K/V stages fill about 104 KB).
inline constexpr KernelShape kDecodeShape{16, 2};
// The portable forward tile: 128 rows, two CTAs an SM up to d128.
inline constexpr KernelShape kPortableShape{128, 2};
// The Hopper forward tile: 128 rows, one CTA an SM (its shared memory and registers).
inline constexpr KernelShape kHopperShape{128, 1};

constexpr KernelShape kernel_shape(ForwardKernel kernel) {
  switch (kernel) {
    case ForwardKernel::kDecode: return kDecodeShape;
    case ForwardKernel::kPortable: return kPortableShape;
    default: return kHopperShape;
  }
}

// Up to this many packed rows per (sequence, KV head) the decode tile runs: its tiles of one
// KV head read the same keys, from L2 after the first. Above, the 128-row tile wastes less
// than it would re-read.
inline constexpr int64_t kDecodeMaxRows = 64;
// The Hopper kernel copies pages of at least kHopperTmaPageKeys keys that are a multiple of
// kHopperPageRunKeys by TMA, in runs of gcd(page size, key block) rows; smaller pages (8 runs
// of 16 keys make a 128-key block slow) and other sizes it gathers row by row with cp.async
// in its producer warpgroup (sm90/forward_kernel.cuh, gather_kv). FP8 queries take TMA pages
// only (fp8_query_refusal).
inline constexpr int64_t kHopperPageRunKeys = 16;
inline constexpr int64_t kHopperTmaPageKeys = 64;

// Whether the Hopper kernel gathers the K/V rows of pages of `page_size` keys (0: not paged).
constexpr bool hopper_gathers_kv(int64_t page_size) {
  return page_size > 0 && (page_size < kHopperTmaPageKeys || page_size % kHopperPageRunKeys != 0);
}

// Whether this build holds the sm_90a kernel (90a among the CUDA architectures).
#if defined(JAX_FMHA_HOPPER)
inline constexpr bool kHopperBuilt = true;
#else
inline constexpr bool kHopperBuilt = false;
#endif

// JAX_FMHA_CUDA_FORWARD=portable keeps Hopper devices on the portable kernel. Read at every
// call, so that tests and benchmarks can compare the two kernels in one process.
inline bool portable_forced() {
  const char* choice = std::getenv("JAX_FMHA_CUDA_FORWARD");
  return choice != nullptr && std::strcmp(choice, "portable") == 0;
}

// Whether a device of this compute capability runs the Hopper kernel where it can.
inline bool hopper_device(int compute_capability_major) {
  return kHopperBuilt && compute_capability_major == 9 && !portable_forced();
}

// The kernel for a problem with `rows_per_kv_head` packed rows (max_seqlen_q x group) per
// (sequence, KV head), head dim `head_dim`, pages of `page_size` keys (0: not paged), and
// FP8 keys and values under 16-bit queries (`fp8_kv`), which the Hopper kernel does not take
// (docs/design/fp8_kv_cache.md). FP8 queries (`fp8_q`: FP8 q and k) run on the Hopper kernel
// alone, at any row count (docs/design/fp8_attention.md); the launcher refuses them where it
// cannot run.
inline ForwardKernel forward_kernel(int compute_capability_major, int64_t rows_per_kv_head,
                                    int64_t head_dim, int64_t page_size, bool fp8_kv,
                                    bool fp8_q = false) {
  if (fp8_q) return ForwardKernel::kHopper;
  if (rows_per_kv_head <= kDecodeMaxRows) return ForwardKernel::kDecode;
  // (Every page size: TMA runs or cp.async gathers, hopper_gathers_kv.)
  if (hopper_device(compute_capability_major) && !fp8_kv) return ForwardKernel::kHopper;
  return ForwardKernel::kPortable;
}

// Why FP8 queries cannot run here, for the CUDA handler and for the trace-time check alike:
// the argument at fault, the reason, and whether the argument's dtype (else its shape) is the
// cause; reason nullptr if the Hopper kernel takes them (FP8 Q K^T, with 16-bit P V or, for
// float8_e4m3fn v, FP8 P V). `hopper_kernel`: the sm_90a kernel is built (and, in the handler,
// the device is a Hopper); `e4m3`: q and k are float8_e4m3fn (FP8 v is then float8_e4m3fn
// too: the dtype rules). (No other kernel takes them: JAX_FMHA_CUDA_FORWARD=portable does not
// apply.)
struct Fp8QueryRefusal {
  const char* argument = nullptr;
  const char* reason = nullptr;
  bool dtype = false;
};
inline Fp8QueryRefusal fp8_query_refusal(bool hopper_kernel, int64_t head_dim, int64_t page_size,
                                         bool e4m3) {
  if (!hopper_kernel)
    return {"q", "FP8 queries need the sm_90a kernel (a Hopper GPU and a build with 90a)", true};
  if (!e4m3) return {"q", "FP8 queries on the GPU are float8_e4m3fn (not float8_e5m2)", true};
  if (head_dim % 16 != 0) return {"q", "FP8 queries on the GPU need head_dim a multiple of 16"};
  if (page_size % kHopperPageRunKeys != 0)
    return {"k", "FP8 queries on the GPU need pages of a multiple of 16 keys"};
  return {};
}

// The traits and the kernel template of each forward kernel, specialized next to the kernel
// (sm80/forward_kernel.cuh, sm80/decode_kernel.cuh, sm90/forward_kernel.cuh): TraitsOf<Element,
// head dim, K/V storage type> and kernel<Traits, OutT>.
template <ForwardKernel kKernel>
struct ForwardKernelOf;

}  // namespace jax_fmha::cuda
