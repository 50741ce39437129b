// CUDA handler of jax_fmha_attention_fwd: decodes the custom call like the CPU handler
// (common/attention_ffi.h), picks the compiled head dim and dtypes, launches on the stream
// XLA gives us. Allocates nothing; every launch is checked.
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "common/attention_ffi.h"
#include "cuda/attention/decode_kernel.cuh"
#include "cuda/attention/forward_kernel.cuh"
#include "cuda/hopper/forward_kernel.cuh"

namespace jax_fmha::cuda {
namespace {

ffi::Error cuda_error(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_fmha attention (CUDA): ") + what + ": " +
                              cudaGetErrorString(err));
}

// Shared memory above 48 KB must be granted per kernel and per device; once each. (The
// statics belong to one instantiation: each kernel has its own.)
template <auto kKernel, size_t kSmemBytes>
cudaError_t allow_shared_memory() {
  const auto set = [] {
    return cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                int(kSmemBytes));
  };
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cudaError_t result[kMaxDevices];
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device >= kMaxDevices) return set();
  std::call_once(once[device], [&] { result[device] = set(); });
  return result[device];
}

// Whether the forward tiles (head dims above 64) run on the wgmma kernel: the device is an
// sm_90 (H100, H200, GH200) and this build holds sm_90a code (JAX_FMHA_HOPPER: 90a among
// the CUDA architectures). JAX_FMHA_CUDA_FORWARD=portable in the environment keeps the
// mma.sync kernel (read at every call, so tests and benchmarks can compare the two in one
// process).
bool use_wgmma_kernel() {
#if defined(JAX_FMHA_HOPPER)
  if (const char* choice = std::getenv("JAX_FMHA_CUDA_FORWARD");
      choice != nullptr && std::strcmp(choice, "portable") == 0)
    return false;
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static bool is_sm90[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= kMaxDevices) return false;
  std::call_once(once[device], [&] {
    int major = 0;
    is_sm90[device] =
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) ==
            cudaSuccess &&
        major == 9;
  });
  return is_sm90[device];
#else
  return false;
#endif
}

// Up to this many packed rows per (sequence, KV head) the decode tile (16 rows, warps
// splitting the keys) runs: its tiles of one KV head read the same keys, from L2 after the
// first. Above, the 128-row prefill tile wastes less than it would re-read.
constexpr int64_t kDecodeMaxRows = 64;

// One kernel over the grid (row tiles of the longest sequence, KV heads, batch x splits).
template <class Traits, typename OutT, auto kKernel>
ffi::Error launch_tiles(cudaStream_t stream, const AttentionProblem& p, const void* q,
                        const void* k, const void* v, OutT* out, float* lse) {
  const int64_t row_tiles = (p.q.max_len * p.group() + Traits::kBlockM - 1) / Traits::kBlockM;
  const int64_t z = p.batch * p.num_splits;
  if (row_tiles == 0 || z == 0) return ffi::Error::Success();
  if (row_tiles > 0x7fffffff || p.num_kv_heads > 65535 || z > 65535)
    return ffi::Error::InvalidArgument(
        "jax_fmha attention (CUDA): grid too large (max_seqlen_q * group / 128 < 2^31, "
        "KV heads <= 65535, batch * num_splits <= 65535)");
  if (cudaError_t err = allow_shared_memory<kKernel, Traits::kSmemBytes>(); err != cudaSuccess)
    return cuda_error("raising the shared-memory limit", err);
  using Element = typename Traits::Element;
  const dim3 grid(unsigned(row_tiles), unsigned(p.num_kv_heads), unsigned(z));
  kKernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(
      p, static_cast<const Element*>(q), static_cast<const Element*>(k),
      static_cast<const Element*>(v), out, lse);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    return cuda_error("launching the attention kernel", err);
  return ffi::Error::Success();
}

template <typename Element, int kHeadDim, typename OutT>
ffi::Error launch(cudaStream_t stream, const AttentionProblem& p, const void* q, const void* k,
                  const void* v, void* out, float* lse) {
  OutT* out_typed = static_cast<OutT*>(out);
  if (p.q.packed && p.batch >= 0) {
    // Rows outside every sequence (and of invalid sequences): 0 / -inf (NaN), as on CPU.
    const dim3 grid(unsigned(p.batch + 2), 8, unsigned(p.num_splits));
    fill_rows_outside_sequences<OutT><<<grid, 256, 0, stream>>>(p, out_typed, lse);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
      return cuda_error("launching the fill of rows outside sequences", err);
  }
  if (p.q.max_len * p.group() <= kDecodeMaxRows) {
    using Traits = DecodeTraits<Element, kHeadDim>;
    return launch_tiles<Traits, OutT, attention_decode_kernel<Traits, OutT>>(stream, p, q, k, v,
                                                                       out_typed, lse);
  }
  // At d64 the wgmma kernel measured slower than mma.sync on an H200 (257 vs 280 TFLOP/s:
  // the products halve, the softmax does not; gpu_session5_h200.md): d64 stays portable.
  // Pages that are not a multiple of its 16-key runs take the portable kernel too: the
  // wgmma kernel issues its copies ahead of its products, so row-by-row block-table reads
  // would stall them (0.42-0.49x of dense at pages 16 and 64 before the runs;
  // gpu_session5_h200.md).
  if constexpr (kHeadDim > 64) {
    using Traits = HopperTraits<Element, kHeadDim>;
    if (use_wgmma_kernel() &&
        (p.kv.layout != KvLayout::kPaged || p.kv.page_size % Traits::kPageRunKeys == 0)) {
      return launch_tiles<Traits, OutT, attention_forward_kernel_sm90<Traits, OutT>>(
          stream, p, q, k, v, out_typed, lse);
    }
  }
  using Traits = KernelTraits<Element, kHeadDim>;
  return launch_tiles<Traits, OutT, attention_forward_kernel<Traits, OutT>>(stream, p, q, k, v,
                                                                      out_typed, lse);
}

// Split-KV partial outputs are float32; otherwise the output has the input dtype.
template <typename Element, int kHeadDim>
ffi::Error launch_for_output(cudaStream_t stream, const AttentionProblem& p, const void* q,
                             const void* k, const void* v, void* out, float* lse) {
  if (p.num_splits > 1) return launch<Element, kHeadDim, float>(stream, p, q, k, v, out, lse);
  return launch<Element, kHeadDim, Element>(stream, p, q, k, v, out, lse);
}

// Compiled head dims: 64, 96, 128, 192, 256. Any other multiple of 8 runs through the next
// larger one, its extra columns zero-filled on load and never stored.
template <typename Element>
ffi::Error launch_for_head_dim(cudaStream_t stream, const AttentionProblem& p, const void* q,
                               const void* k, const void* v, void* out, float* lse) {
  const int64_t d = p.head_dim;
  if (d <= 64) return launch_for_output<Element, 64>(stream, p, q, k, v, out, lse);
  if (d <= 96) return launch_for_output<Element, 96>(stream, p, q, k, v, out, lse);
  if (d <= 128) return launch_for_output<Element, 128>(stream, p, q, k, v, out, lse);
  if (d <= 192) return launch_for_output<Element, 192>(stream, p, q, k, v, out, lse);
  return launch_for_output<Element, 256>(stream, p, q, k, v, out, lse);
}

ffi::Error run_attention(cudaStream_t stream, const AttentionProblem& p,
                         const AttentionData& data) {
  if (p.head_dim < 8 || p.head_dim % 8 != 0)
    return shape_error("the CUDA kernel needs head_dim a multiple of 8 in [8, 256]");
  switch (data.dtype) {
    case ffi::DataType::BF16:
      return launch_for_head_dim<__nv_bfloat16>(stream, p, data.q, data.k, data.v, data.out,
                                                data.lse);
    case ffi::DataType::F16:
      return launch_for_head_dim<__half>(stream, p, data.q, data.k, data.v, data.out, data.lse);
    case ffi::DataType::F32:
      return shape_error(
          "the CUDA attention kernel runs bfloat16 and float16 (tensor cores); cast q, k and "
          "v with .astype(jnp.bfloat16), or use backend='reference' for float32");
    default: return shape_error("unsupported dtype (bfloat16, float16)");
  }
}

}  // namespace

const char* forward_kernel_name() { return use_wgmma_kernel() ? "wgmma" : "mma.sync"; }

}  // namespace jax_fmha::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaAttentionCuda, (jax_fmha::attention_handler<cudaStream_t, jax_fmha::cuda::run_attention>),
    jax_fmha::bind_attention(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
