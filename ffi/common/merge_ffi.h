// The split-KV merge custom call, shared by the CPU and CUDA handlers:
//   partial_out f32 [S, ..., D], partial_lse f32 [S, ...]  ->  out [..., D], lse f32 [...]
// Row m of the result combines the S partial results of row m, weighted by
// exp(lse_s - lse) where lse = log(sum_s exp(lse_s)). Empty partials (lse -inf) weigh
// nothing; a row with no non-empty partial gets 0 and -inf; a NaN LSE gives NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>

#include "common/constants.h"
#include "common/errors.h"
#include "common/macros.h"
#include "xla/ffi/api/ffi.h"

namespace jax_fmha {

namespace ffi = xla::ffi;

template <typename Binding>
auto bind_merge(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()   // partial_out
      .template Arg<ffi::Buffer<ffi::F32>>()   // partial_lse
      .template Ret<ffi::AnyBuffer>()          // out
      .template Ret<ffi::Buffer<ffi::F32>>();  // lse
}

struct MergeProblem {
  int64_t num_splits = 0;
  int64_t rows = 0;      // rows to merge (all leading axes of out, flattened)
  int64_t head_dim = 0;  // the last axis of out
};

// Fills `m` from the buffers, checking every size the kernels rely on, the head dim (the CPU
// kernel keeps a row on the stack) and the output dtype.
inline ffi::Error decode_merge(const ffi::Buffer<ffi::F32>& partial_out,
                               const ffi::Buffer<ffi::F32>& partial_lse, const ffi::AnyBuffer& out,
                               const ffi::Buffer<ffi::F32>& lse, MergeProblem& m) {
  constexpr const char* kOp = "merge";
  const auto od = partial_out.dimensions();
  const auto ld = partial_lse.dimensions();
  if (od.size() < 2 || ld.size() != od.size() - 1 || od[0] != ld[0])
    return invalid_argument(kOp, "partial_out must be [S, ..., D] and partial_lse [S, ...]");
  for (size_t i = 0; i < ld.size(); ++i)
    if (od[i] != ld[i]) return invalid_argument(kOp, "partial_out and partial_lse disagree");
  m.num_splits = od[0];
  m.head_dim = od[od.size() - 1];
  m.rows = int64_t(lse.element_count());
  if (m.num_splits < 1) return invalid_argument(kOp, "need at least one partial result");
  if (m.head_dim > kMaxHeadDim)
    return invalid_argument(kOp, "head_dim must be at most " + std::to_string(kMaxHeadDim));
  if (int64_t(partial_lse.element_count()) != m.num_splits * m.rows ||
      int64_t(out.element_count()) != m.rows * m.head_dim)
    return invalid_argument(kOp, "out/lse sizes do not match the partial results");
  const ffi::DataType out_dtype = out.element_type();
  if (out_dtype != ffi::DataType::F32 && out_dtype != ffi::DataType::BF16 &&
      out_dtype != ffi::DataType::F16)
    return invalid_argument(kOp, "out must be float32, bfloat16 or float16");
  return ffi::Error::Success();
}

// The handler of every backend: decodes and checks the call, then `Run` merges. Context is
// what the backend binds first: ffi::ThreadPool on the CPU, cudaStream_t on CUDA. Run is
//   ffi::Error run(Context, const MergeProblem&, const float* partial_out,
//                  const float* partial_lse, ffi::DataType out_dtype, void* out, float* lse)
// with out_dtype float32, bfloat16 or float16 (decode_merge admits no other).
template <typename Context, ffi::Error (*Run)(Context, const MergeProblem&,
                                              const float* partial_out, const float* partial_lse,
                                              ffi::DataType out_dtype, void* out, float* lse)>
ffi::Error merge_handler(Context context, ffi::Buffer<ffi::F32> partial_out,
                         ffi::Buffer<ffi::F32> partial_lse, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  MergeProblem m;
  if (auto err = decode_merge(partial_out, partial_lse, *out, *lse, m); !err.success()) return err;
  return Run(context, m, partial_out.typed_data(), partial_lse.typed_data(), out->element_type(),
             out->untyped_data(), lse->typed_data());
}

// Statistics of one row's partial LSEs: weight(lse_s) is the normalized weight of partial s,
// lse the merged LSE. Built by make() from the partials' largest LSE, the sum of
// exp(lse_s - max) and whether any LSE is NaN (backends reduce those their own way).
struct MergeStats {
  float max_lse, sum, lse;
  FMHA_HOST_DEVICE static MergeStats make(float max_lse, float sum, bool nan) {
    if (nan) return {NAN, NAN, NAN};
    if (max_lse == -INFINITY) return {max_lse, 0.f, -INFINITY};  // every partial empty
    return {max_lse, sum, max_lse + logf(sum)};
  }
  FMHA_HOST_DEVICE float weight(float partial_lse) const {
    return sum == 0.f ? 0.f : expf(partial_lse - max_lse) / sum;  // NaN stays NaN
  }
};

// One row's statistics from its num_splits LSEs, stride apart: two passes, no storage.
FMHA_HOST_DEVICE MergeStats merge_stats(const float* lse, int64_t stride, int64_t num_splits) {
  float max_lse = -INFINITY;
  bool nan = false;
  for (int64_t s = 0; s < num_splits; ++s) {
    const float x = lse[s * stride];
    nan |= x != x;
    max_lse = x > max_lse ? x : max_lse;
  }
  float sum = 0.f;
  if (!nan && max_lse != -INFINITY)
    for (int64_t s = 0; s < num_splits; ++s) sum += expf(lse[s * stride] - max_lse);
  return MergeStats::make(max_lse, sum, nan);
}

}  // namespace jax_fmha
