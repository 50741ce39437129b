// CUDA handler of jax_fmha_attention_fwd: decodes the custom call like the CPU handler
// (common/attention_ffi.h), picks the kernel (forward_plan.h), the compiled head dim and the
// dtypes (K/V: q's, or FP8), launches on the stream XLA gives us. Allocates nothing; every launch
// is checked. The kernels' launches are compiled apart (forward_launch.h).
#include <cuda_runtime.h>

#include <type_traits>

#include "common/attention_ffi.h"
#include "common/errors.h"
#include "cuda/common/epilogue.cuh"
#include "cuda/common/fp8.cuh"
#include "cuda/common/launch_check.h"
#include "cuda/forward_launch.h"
#include "cuda/forward_plan.h"

namespace jax_fmha::cuda {
namespace {

constexpr const char* kOp = "attention (CUDA)";

// The compute capability (major) of the current device; 0 if the query fails (the portable
// kernels then run).
int compute_capability_major() { return device_attribute<cudaDevAttrComputeCapabilityMajor>(); }

template <typename Element, typename Kv, int kHeadDim, typename OutT>
ffi::Error launch(cudaStream_t stream, ForwardKernel kernel, const AttentionProblem& p,
                  const void* q, const void* k, const void* v, void* out, float* lse) {
  OutT* out_typed = static_cast<OutT*>(out);
  if (p.q.packed && p.batch >= 0) {
    // Rows outside every sequence (and of invalid sequences): 0 / -inf (NaN), as on CPU.
    const dim3 grid(unsigned(p.batch + 2), 8, unsigned(p.num_splits));
    fill_rows_outside_sequences<OutT><<<grid, 256, 0, stream>>>(p, out_typed, lse);
    if (ffi::Error err = check_launch(kOp, "launching the fill of rows outside sequences");
        !err.success())
      return err;
  }
  if constexpr (kIsFp8<Element>) {  // FP8 queries: the Hopper kernel only (forward_kernel)
    return launch_forward<ForwardKernel::kHopper, Element, Kv, kHeadDim>(stream, p, q, k, v,
                                                                         out_typed, lse);
  } else {
    switch (kernel) {
      case ForwardKernel::kDecode:
        return launch_forward<ForwardKernel::kDecode, Element, Kv, kHeadDim>(stream, p, q, k, v,
                                                                             out_typed, lse);
      case ForwardKernel::kHopper:
        if constexpr (std::is_same_v<Kv, Element>)
          return launch_forward<ForwardKernel::kHopper, Element, Kv, kHeadDim>(stream, p, q, k, v,
                                                                               out_typed, lse);
        else  // forward_kernel never picks it for FP8
          return invalid_argument(kOp, "the Hopper kernel takes no FP8 K/V");
      default:
        return launch_forward<ForwardKernel::kPortable, Element, Kv, kHeadDim>(stream, p, q, k, v,
                                                                               out_typed, lse);
    }
  }
}

// FP8 queries (float8_e4m3fn q and k, v of type V, 16-bit or float8_e4m3fn:
// docs/design/fp8_attention.md) at one
// compiled head dim, in the output's type (out_dtype; float32 for split partials too).
template <typename V, int kHeadDim>
ffi::Error launch_fp8_queries_for_output(cudaStream_t stream, const AttentionProblem& p,
                                         const AttentionData& data) {
  const auto run = [&](auto out) {
    return launch<__nv_fp8_e4m3, V, kHeadDim, decltype(out)>(
        stream, ForwardKernel::kHopper, p, data.q, data.k, data.v, data.out, data.lse);
  };
  switch (data.out_dtype) {
    case ffi::DataType::BF16: return run(__nv_bfloat16{});
    case ffi::DataType::F16: return run(__half{});
    default: return run(float{});
  }
}

// FP8 queries: the Hopper kernel at head dims 64, 128, 256 (others zero-padded to the next).
template <typename V>
ffi::Error launch_fp8_queries_for_head_dim(cudaStream_t stream, const AttentionProblem& p,
                                           const AttentionData& data) {
  if (p.head_dim <= 64) return launch_fp8_queries_for_output<V, 64>(stream, p, data);
  if (p.head_dim <= 128) return launch_fp8_queries_for_output<V, 128>(stream, p, data);
  return launch_fp8_queries_for_output<V, 256>(stream, p, data);
}

ffi::Error launch_fp8_queries(cudaStream_t stream, const AttentionProblem& p,
                              const AttentionData& data) {
  const Fp8QueryRefusal refusal =
      fp8_query_refusal(kHopperBuilt && compute_capability_major() == 9, p.head_dim,
                        p.kv.layout == KvLayout::kPaged ? p.kv.pages.page_size : 0,
                        data.dtype == ffi::DataType::F8E4M3FN);
  if (refusal.reason != nullptr) return invalid_argument(kOp, refusal.reason);
  // (v: float8_e4m3fn as q, check_attention_dtypes; or 16-bit)
  if (is_fp8(data.v_dtype)) return launch_fp8_queries_for_head_dim<__nv_fp8_e4m3>(stream, p, data);
  if (data.v_dtype == ffi::DataType::F16)
    return launch_fp8_queries_for_head_dim<__half>(stream, p, data);
  return launch_fp8_queries_for_head_dim<__nv_bfloat16>(stream, p, data);
}

// Split-KV partial outputs are float32; otherwise the output has the input dtype.
template <typename Element, typename Kv, int kHeadDim>
ffi::Error launch_for_output(cudaStream_t stream, ForwardKernel kernel, const AttentionProblem& p,
                             const void* q, const void* k, const void* v, void* out, float* lse) {
  if (p.num_splits > 1)
    return launch<Element, Kv, kHeadDim, float>(stream, kernel, p, q, k, v, out, lse);
  return launch<Element, Kv, kHeadDim, Element>(stream, kernel, p, q, k, v, out, lse);
}

// Compiled head dims: 64, 96, 128, 192, 256; for FP8 K/V 64, 128, 256. Any other multiple of 8
// runs through the next larger one, its extra columns zero-filled on load and never stored.
template <typename Element, typename Kv>
ffi::Error launch_for_head_dim(cudaStream_t stream, const AttentionProblem& p, const void* q,
                               const void* k, const void* v, void* out, float* lse) {
  constexpr bool kFp8 = kIsFp8<Kv>;
  const ForwardKernel kernel =
      forward_kernel(compute_capability_major(), p.q.max_len * p.group(), p.head_dim,
                     p.kv.layout == KvLayout::kPaged ? p.kv.pages.page_size : 0, kFp8);
  const int64_t d = p.head_dim;
  if (d <= 64) return launch_for_output<Element, Kv, 64>(stream, kernel, p, q, k, v, out, lse);
  if constexpr (!kFp8)
    if (d <= 96) return launch_for_output<Element, Kv, 96>(stream, kernel, p, q, k, v, out, lse);
  if (d <= 128) return launch_for_output<Element, Kv, 128>(stream, kernel, p, q, k, v, out, lse);
  if constexpr (!kFp8)
    if (d <= 192) return launch_for_output<Element, Kv, 192>(stream, kernel, p, q, k, v, out, lse);
  return launch_for_output<Element, Kv, 256>(stream, kernel, p, q, k, v, out, lse);
}

// K/V of q's dtype, or FP8 (float8_e4m3fn, float8_e5m2) with their scales.
template <typename Element>
ffi::Error launch_for_kv(cudaStream_t stream, const AttentionProblem& p,
                         const AttentionData& data) {
  switch (data.kv_dtype) {
    case ffi::DataType::F8E4M3FN:
      return launch_for_head_dim<Element, __nv_fp8_e4m3>(stream, p, data.q, data.k, data.v,
                                                         data.out, data.lse);
    case ffi::DataType::F8E5M2:
      return launch_for_head_dim<Element, __nv_fp8_e5m2>(stream, p, data.q, data.k, data.v,
                                                         data.out, data.lse);
    default:
      return launch_for_head_dim<Element, Element>(stream, p, data.q, data.k, data.v, data.out,
                                                   data.lse);
  }
}

ffi::Error run_attention(cudaStream_t stream, const AttentionProblem& p,
                         const AttentionData& data) {
  if (p.head_dim < 8 || p.head_dim % 8 != 0)
    return invalid_argument(kOp, "the CUDA kernel needs head_dim a multiple of 8 in [8, 256]");
  switch (data.dtype) {
    case ffi::DataType::BF16: return launch_for_kv<__nv_bfloat16>(stream, p, data);
    case ffi::DataType::F16: return launch_for_kv<__half>(stream, p, data);
    case ffi::DataType::F32:
      return invalid_argument(
          kOp,
          "the CUDA attention kernel runs bfloat16 and float16 (tensor cores); cast q, k and v "
          "with .astype(jnp.bfloat16), or use backend='reference' for float32");
    case ffi::DataType::F8E4M3FN:
    case ffi::DataType::F8E5M2: return launch_fp8_queries(stream, p, data);
    default: return invalid_argument(kOp, "unsupported dtype (bfloat16, float16)");
  }
}

}  // namespace

}  // namespace jax_fmha::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaAttentionCuda,
    (jax_fmha::attention_handler<cudaStream_t, jax_fmha::cuda::run_attention>),
    jax_fmha::bind_attention(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
