// CPU split-KV merge: each row combines its partial outputs with LSE weights (float32).
#include <algorithm>

#include "common/merge_ffi.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

constexpr int64_t kRowsPerItem = 64;

template <typename OutT>
void merge(xla::ffi::ThreadPool& pool, const MergeProblem& m, const float* partial_out,
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

xla::ffi::Error merge_cpu(xla::ffi::ThreadPool pool, ffi::Buffer<ffi::F32> partial_out,
                          ffi::Buffer<ffi::F32> partial_lse, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  MergeProblem m;
  if (auto err = decode_merge(partial_out, partial_lse, *out, *lse, m); !err.success()) return err;
  if (m.head_dim > kMaxHeadDim) return shape_error("merge: head_dim must be at most 256");
  const float* po = partial_out.typed_data();
  const float* pl = partial_lse.typed_data();
  void* o = out->untyped_data();
  float* l = lse->typed_data();
  switch (out->element_type()) {
    case ffi::DataType::F32: merge(pool, m, po, pl, static_cast<float*>(o), l); break;
    case ffi::DataType::BF16: merge(pool, m, po, pl, static_cast<bf16*>(o), l); break;
    case ffi::DataType::F16: merge(pool, m, po, pl, static_cast<f16*>(o), l); break;
    default: return shape_error("merge: out must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxFmhaMergeCpu, jax_fmha::cpu::merge_cpu,
                              jax_fmha::bind_merge(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
