// CPU split-KV merge: each row combines its partial outputs with LSE weights (float32).
#include <algorithm>

#include "common/merge_ffi.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

constexpr int64_t kRowsPerItem = 64;

template <typename OutT>
void merge(ffi::ThreadPool& pool, const MergeProblem& m, const float* partial_out,
           const float* partial_lse, OutT* out, float* lse) {
  const int64_t items = (m.rows + kRowsPerItem - 1) / kRowsPerItem;
  parallel_for(pool, items, [&](int64_t item) {
    alignas(64) float acc[kMaxHeadDim];
    const int64_t D = m.head_dim;
    for (int64_t row = item * kRowsPerItem; row < std::min(m.rows, (item + 1) * kRowsPerItem);
         ++row) {
      const MergeStats stats = merge_stats(partial_lse + row, m.rows, m.num_splits);
      std::fill(acc, acc + D, 0.f);
      for (int64_t s = 0; s < m.num_splits; ++s) {
        const float w = stats.weight(partial_lse[s * m.rows + row]);
        if (w == 0.f) continue;
        const float* src = partial_out + (s * m.rows + row) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] += w * src[d];
      }
      if (stats.lse != stats.lse) std::fill(acc, acc + D, stats.lse);  // NaN in, NaN out
      for (int64_t d = 0; d < D; ++d) out[row * D + d] = from_float<OutT>(acc[d]);
      lse[row] = stats.lse;
    }
  });
}

ffi::Error run_merge(ffi::ThreadPool pool, const MergeProblem& m, const float* partial_out,
                     const float* partial_lse, ffi::DataType out_dtype, void* out, float* lse) {
  switch (out_dtype) {
    case ffi::DataType::F32:
      merge(pool, m, partial_out, partial_lse, static_cast<float*>(out), lse);
      break;
    case ffi::DataType::BF16:
      merge(pool, m, partial_out, partial_lse, static_cast<bf16*>(out), lse);
      break;
    default:  // F16: merge_handler admits no other dtype
      merge(pool, m, partial_out, partial_lse, static_cast<f16*>(out), lse);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaMergeCpu, (jax_fmha::merge_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_merge>),
    jax_fmha::bind_merge(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
