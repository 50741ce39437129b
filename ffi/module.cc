// The nanobind extension: exposes every FFI handler as a capsule, grouped by platform, what
// the build holds, the constants Python shares with the kernels, and the split-KV planner.
// Python registers the capsules with jax.ffi.register_ffi_target under the same target names
// on every platform, so lowering is platform-independent.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>

#include "common/activations.h"
#include "common/constants.h"
#include "common/mlp_ffi.h"
#include "common/split_policy.h"
#include "cpu/attention_kernel.h"
#include "cuda/forward_plan.h"
#include "cuda/split_policy.h"
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
  info["hopper_kernel"] = jax_fmha::cuda::kHopperBuilt;
  return info;
}

// The name of a CUDA forward kernel (cuda/split_policy.h), as Python sees it.
const char* kernel_name(jax_fmha::cuda::ForwardKernel kernel) {
  for (const auto& entry : jax_fmha::cuda::kForwardKernelNames)
    if (entry.value == kernel) return entry.name;
  throw nb::value_error("unnamed CUDA forward kernel");
}

// The CPU attention tile kernel's instruction set, as the kernel chose it (attention.cc).
std::string cpu_isa() {
  const jax_fmha::cpu::IsaChoice& isa = jax_fmha::cpu::selected_isa();
  if (!isa.error.empty()) throw nb::value_error(isa.error.c_str());
  return isa.name;
}

// The kernel that runs attention above the decode tile's rows on a device of this compute
// capability: "hopper" (sm_90a, wgmma) or "portable" (mma.sync).
std::string cuda_device_kernel(int compute_capability_major) {
  namespace cuda = jax_fmha::cuda;
  return kernel_name(cuda::hopper_device(compute_capability_major)
                         ? cuda::ForwardKernel::kHopper
                         : cuda::ForwardKernel::kPortable);
}

template <typename Enum, size_t N>
nb::dict name_table(const jax_fmha::EnumName<Enum> (&names)[N]) {
  nb::dict table;
  for (const auto& entry : names) table[entry.name] = static_cast<int64_t>(entry.value);
  return table;
}

nb::dict constants() {
  nb::dict result;
  result["kv_layouts"] = name_table(jax_fmha::kKvLayoutNames);
  result["glu_layouts"] = name_table(jax_fmha::kGluLayoutNames);
  result["glu_activations"] = name_table(jax_fmha::kActivationNames);
  result["max_head_dim"] = jax_fmha::kMaxHeadDim;
  result["max_splits"] = jax_fmha::kMaxSplits;
  nb::dict platforms;
  for (const auto& platform : jax_fmha::kPlatformNames) platforms[platform.lowering] = platform.ffi;
  result["platforms"] = platforms;
  return result;
}

// The forward kernel that would run a problem, and its split-KV policy. `parallelism` is the
// CPU's threads or the GPU's SMs; rows_per_kv_head = max_seqlen_q x group.
struct PlannedKernel {
  const char* kernel;
  jax_fmha::SplitPolicy policy;
};

PlannedKernel plan_kernel(const std::string& platform, int64_t parallelism,
                          int compute_capability_major, int64_t rows_per_kv_head, int64_t head_dim,
                          int64_t page_size, bool fp8_kv, bool fp8_q) {
  if (parallelism < 1) throw nb::value_error("parallelism must be at least 1");
  if (platform == "cpu") return {"cpu", jax_fmha::cpu::split_policy(parallelism)};
  if (platform != "cuda") throw nb::value_error(("unknown platform '" + platform + "'").c_str());
  namespace cuda = jax_fmha::cuda;
  const cuda::ForwardKernel kernel = cuda::forward_kernel(
      compute_capability_major, rows_per_kv_head, head_dim, page_size, fp8_kv, fp8_q);
  return {kernel_name(kernel), cuda::split_policy(kernel, parallelism)};
}

nb::dict split_policy(const std::string& platform, int64_t parallelism,
                      int compute_capability_major, int64_t rows_per_kv_head, int64_t head_dim,
                      int64_t page_size, bool fp8_kv, bool fp8_q) {
  const PlannedKernel plan = plan_kernel(platform, parallelism, compute_capability_major,
                                         rows_per_kv_head, head_dim, page_size, fp8_kv, fp8_q);
  nb::dict result;
  result["kernel"] = plan.kernel;
  result["rows_per_unit"] = plan.policy.rows_per_unit;
  result["slots"] = plan.policy.slots;
  result["waves"] = plan.policy.waves;
  result["min_keys"] = plan.policy.min_keys;
  return result;
}

int64_t plan_num_splits(const std::string& platform, int64_t parallelism,
                        int compute_capability_major, int64_t batch, int64_t num_kv_heads,
                        int64_t group, int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t head_dim,
                        int64_t page_size, bool fp8_kv, bool fp8_q) {
  const PlannedKernel plan = plan_kernel(platform, parallelism, compute_capability_major,
                                         max_seqlen_q * group, head_dim, page_size, fp8_kv, fp8_q);
  return jax_fmha::choose_num_splits(batch, num_kv_heads, group, max_seqlen_q, max_seqlen_k,
                                     plan.policy);
}

int64_t choose_num_splits(int64_t batch, int64_t num_kv_heads, int64_t group, int64_t max_seqlen_q,
                          int64_t max_seqlen_k, int64_t rows_per_unit, int64_t slots, int64_t waves,
                          int64_t min_keys) {
  if (rows_per_unit < 1 || slots < 1 || waves < 1 || min_keys < 1)
    throw nb::value_error("rows_per_unit, slots, waves and min_keys must be at least 1");
  return jax_fmha::choose_num_splits(batch, num_kv_heads, group, max_seqlen_q, max_seqlen_k,
                                     {rows_per_unit, slots, waves, min_keys});
}

// Why FP8 queries cannot run on the GPU (cuda::fp8_query_refusal): None, or (argument,
// reason, whether the argument's dtype is the cause).
nb::object fp8_query_refusal(bool hopper_kernel, int64_t head_dim, int64_t page_size, bool e4m3) {
  const auto refusal = jax_fmha::cuda::fp8_query_refusal(hopper_kernel, head_dim, page_size, e4m3);
  if (refusal.reason == nullptr) return nb::none();
  return nb::make_tuple(refusal.argument, refusal.reason, refusal.dtype);
}

}  // namespace

NB_MODULE(_jax_fmha_ext, m) {
  m.doc() = "jax_fmha's XLA FFI handlers";
  m.def("cpu_targets", &cpu_targets, "FFI target name -> handler capsule, for platform 'cpu'");
  m.def("cuda_targets", &cuda_targets, "FFI target name -> handler capsule, for platform 'CUDA'");
  m.def("build_info", &build_info, "What this build of the extension holds");
  m.def("cpu_isa", &cpu_isa,
        "The instruction set the CPU attention kernel runs: baseline, avx2, avx512 or "
        "avx512bf16 (JAX_FMHA_CPU_ISA caps it; ValueError for an unknown value)");
  m.def("cuda_device_kernel", &cuda_device_kernel, nb::arg("compute_capability_major"),
        "The CUDA attention forward kernel of a device of this compute capability, above the "
        "decode tile's rows: 'hopper' or 'portable' (JAX_FMHA_CUDA_FORWARD=portable forces it)");
  m.def("constants", &constants,
        "The constants Python shares with the kernels: attribute numbers by name, limits, and "
        "platform names (JAX lowering -> register_ffi_target)");
  m.def("split_policy", &split_policy, nb::arg("platform"), nb::arg("parallelism"),
        nb::arg("compute_capability_major"), nb::arg("rows_per_kv_head"), nb::arg("head_dim"),
        nb::arg("page_size"), nb::arg("fp8_kv") = false, nb::arg("fp8_q") = false,
        "The forward kernel ('cpu', 'decode', 'portable' or 'hopper') that would run a problem "
        "and its split-KV policy (rows_per_unit, slots, waves, min_keys); fp8_kv: FP8 keys and "
        "values; fp8_q: FP8 queries and keys");
  m.def("plan_num_splits", &plan_num_splits, nb::arg("platform"), nb::arg("parallelism"),
        nb::arg("compute_capability_major"), nb::arg("batch"), nb::arg("num_kv_heads"),
        nb::arg("group"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"), nb::arg("head_dim"),
        nb::arg("page_size"), nb::arg("fp8_kv") = false, nb::arg("fp8_q") = false,
        "Split-KV splits for a problem on a device: platform 'cpu' (parallelism: threads) or "
        "'cuda' (parallelism: SMs); page_size 0 when the keys are not paged; fp8_kv: FP8 keys "
        "and values; fp8_q: FP8 queries and keys");
  m.def("choose_num_splits", &choose_num_splits, nb::arg("batch"), nb::arg("num_kv_heads"),
        nb::arg("group"), nb::arg("max_seqlen_q"), nb::arg("max_seqlen_k"),
        nb::arg("rows_per_unit"), nb::arg("slots"), nb::arg("waves"), nb::arg("min_keys"),
        "The split-KV heuristic alone, for a given policy");
  m.def("fp8_query_refusal", &fp8_query_refusal, nb::arg("hopper_kernel"), nb::arg("head_dim"),
        nb::arg("page_size"), nb::arg("e4m3"),
        "Why FP8 queries cannot run on the GPU, as the CUDA handler refuses them: None, or "
        "(argument, reason, whether the argument's dtype is the cause)");
}
