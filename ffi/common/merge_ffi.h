// The split-KV merge custom call, shared by the CPU and CUDA handlers:
//   partial_out f32 [S, ..., D], partial_lse f32 [S, ...]  ->  out [..., D], lse f32 [...]
// Row m of the result combines the S partial results of row m, weighted by
// exp(lse_s - lse) where lse = log(sum_s exp(lse_s)). Empty partials (lse -inf) weigh
// nothing; a row with no non-empty partial gets 0 and -inf; a NaN LSE gives NaN.
#pragma once

#include <cmath>
#include <limits>
#include <utility>

#include "common/attention_ffi.h"

namespace jax_fmha {

template <typename Binding>
auto bind_merge(Binding binding) {
  return std::move(binding).template Arg<ffi::Buffer<ffi::F32>>()  // partial_out
      .template Arg<ffi::Buffer<ffi::F32>>()                      // partial_lse
      .template Ret<ffi::AnyBuffer>()                             // out
      .template Ret<ffi::Buffer<ffi::F32>>();                     // lse
}

struct MergeProblem {
  int64_t num_splits = 0;
  int64_t rows = 0;      // rows to merge (all leading axes of out, flattened)
  int64_t head_dim = 0;  // the last axis of out
};

inline ffi::Error decode_merge(const ffi::Buffer<ffi::F32>& partial_out,
                               const ffi::Buffer<ffi::F32>& partial_lse, const ffi::AnyBuffer& out,
                               const ffi::Buffer<ffi::F32>& lse, MergeProblem& m) {
  const auto od = partial_out.dimensions();
  const auto ld = partial_lse.dimensions();
  if (od.size() < 2 || ld.size() != od.size() - 1 || od[0] != ld[0])
    return shape_error("merge: partial_out must be [S, ..., D] and partial_lse [S, ...]");
  for (size_t i = 0; i < ld.size(); ++i)
    if (od[i] != ld[i]) return shape_error("merge: partial_out and partial_lse disagree");
  m.num_splits = od[0];
  m.head_dim = od[od.size() - 1];
  m.rows = int64_t(lse.element_count());
  if (m.num_splits < 1) return shape_error("merge: need at least one partial result");
  if (int64_t(partial_lse.element_count()) != m.num_splits * m.rows ||
      int64_t(out.element_count()) != m.rows * m.head_dim)
    return shape_error("merge: out/lse sizes do not match the partial results");
  return ffi::Error::Success();
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
