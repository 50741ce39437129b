// The nanobind extension: exposes every FFI handler as a capsule, grouped by platform, and
// what the build holds. Python registers the capsules with jax.ffi.register_ffi_target under
// the same target names on every platform, so lowering is platform-independent.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;

// CPU handlers (ffi/cpu/).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaAttentionCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaMergeCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaUpdateKvCacheCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaGluCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaRmsNormCpu);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaRmsNormResidualCpu);

#ifdef JAX_FMHA_WITH_CUDA
// CUDA handlers (ffi/cuda/) are declared here and listed in cuda_targets() below.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaAttentionCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaMergeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaUpdateKvCacheCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaGluCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaRmsNormCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxFmhaRmsNormResidualCuda);
namespace jax_fmha::cuda {
// The instantiation the attention forward tiles run on the current device, now:
// "wgmma" (sm_90a) or "mma.sync" (ffi/cuda/attention.cu).
const char* forward_kernel_name();
}  // namespace jax_fmha::cuda
#endif

namespace {

template <typename Handler>
nb::capsule capsule(Handler* handler) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Handler, XLA_FFI_CallFrame*>,
                "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(handler));
}

nb::dict cpu_targets() {
  nb::dict targets;
  targets["jax_fmha_attention_fwd"] = capsule(JaxFmhaAttentionCpu);
  targets["jax_fmha_merge_states"] = capsule(JaxFmhaMergeCpu);
  targets["jax_fmha_update_kv_cache"] = capsule(JaxFmhaUpdateKvCacheCpu);
  targets["jax_fmha_glu"] = capsule(JaxFmhaGluCpu);
  targets["jax_fmha_rms_norm"] = capsule(JaxFmhaRmsNormCpu);
  targets["jax_fmha_rms_norm_residual"] = capsule(JaxFmhaRmsNormResidualCpu);
  return targets;
}

nb::dict cuda_targets() {
  nb::dict targets;
#ifdef JAX_FMHA_WITH_CUDA
  targets["jax_fmha_attention_fwd"] = capsule(JaxFmhaAttentionCuda);
  targets["jax_fmha_merge_states"] = capsule(JaxFmhaMergeCuda);
  targets["jax_fmha_update_kv_cache"] = capsule(JaxFmhaUpdateKvCacheCuda);
  targets["jax_fmha_glu"] = capsule(JaxFmhaGluCuda);
  targets["jax_fmha_rms_norm"] = capsule(JaxFmhaRmsNormCuda);
  targets["jax_fmha_rms_norm_residual"] = capsule(JaxFmhaRmsNormResidualCuda);
#endif
  return targets;
}

nb::dict build_info() {
  nb::dict info;
  info["version"] = JAX_FMHA_VERSION;
  info["jaxlib_version"] = JAX_FMHA_JAXLIB_VERSION;
  std::vector<std::string> backends{"cpu"};
#ifdef JAX_FMHA_WITH_CUDA
  backends.push_back("cuda");
  info["cuda_architectures"] = JAX_FMHA_CUDA_ARCHS;
#else
  info["cuda_architectures"] = "";
#endif
  info["backends"] = backends;
  return info;
}

}  // namespace

NB_MODULE(_jax_fmha_ext, m) {
  m.doc() = "jax_fmha's XLA FFI handlers";
  m.def("cpu_targets", &cpu_targets, "FFI target name -> handler capsule, for platform 'cpu'");
  m.def("cuda_targets", &cuda_targets, "FFI target name -> handler capsule, for platform 'CUDA'");
  m.def("build_info", &build_info, "What this build of the extension holds");
  m.def(
      "cuda_forward_kernel",
      [] {
#ifdef JAX_FMHA_WITH_CUDA
        return std::string(jax_fmha::cuda::forward_kernel_name());
#else
        return std::string();
#endif
      },
      "The CUDA attention forward kernel the current device runs: 'wgmma' or 'mma.sync' "
      "(JAX_FMHA_CUDA_FORWARD=portable selects the latter); '' without CUDA");
}
