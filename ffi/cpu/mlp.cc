// CPU kernels of the fused MLP ops (GLU activations, RMSNorm, RMSNorm + residual).
//
// Row-wise: work items are blocks of whole rows on XLA's intra-op pool, and each row is a
// vectorized loop (#pragma omp simd; activations.h is written to vectorize). One pass over
// memory: RMSNorm reads a row once for its sum of squares and once more, from cache, to
// scale it. float32 arithmetic, one rounding at each store (dtypes.h).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/mlp_ffi.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

// On x86-64 (GCC) the row loops are also compiled for x86-64-v3 (AVX2, FMA, F16C), and
// the loader picks that version where the CPU has it: the portable build targets SSE2,
// which computes the activations 4 lanes at a time and converts float16 in software.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define FMHA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FMHA_CPU_CLONES
#endif

// A work item covers at least this many elements (whole rows), so that scheduling it
// costs little next to the work.
constexpr int64_t kMinItemElements = 16384;

template <typename Body>  // Body: void(int64_t row_begin, int64_t row_end)
void for_each_row_block(ffi::ThreadPool& pool, int64_t rows, int64_t hidden, const Body& body) {
  const int64_t rows_per_item =
      std::max<int64_t>(1, kMinItemElements / std::max<int64_t>(hidden, 1));
  const int64_t items = (rows + rows_per_item - 1) / rows_per_item;
  parallel_for(pool, items, [&](int64_t item) {
    const int64_t begin = item * rows_per_item;
    body(begin, std::min(rows, begin + rows_per_item));
  });
}

template <typename T, Activation A, bool kInterleaved>
FMHA_CPU_CLONES void glu_rows(const GluProblem& p, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kStep = kInterleaved ? 2 : 1;
  const int64_t hidden = p.hidden, row_stride = p.row_stride;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* g = static_cast<const T*>(p.gate) + r * row_stride;
    const T* u = static_cast<const T*>(p.up) + r * row_stride;
    T* o = static_cast<T*>(p.out) + r * hidden;
#pragma omp simd
    for (int64_t c = 0; c < hidden; ++c)
      o[c] = from_float<T>(activate<A>(to_float(g[c * kStep])) * to_float(u[c * kStep]));
  }
}

ffi::Error run_glu(ffi::ThreadPool pool, const GluProblem& p) {
  dispatch_dtype<float, bf16, f16>(p.dtype, [&](auto type) {
    dispatch_activation(p.activation, [&](auto activation) {
      dispatch_bool(p.interleaved, [&](auto interleaved) {
        for_each_row_block(pool, p.rows, p.hidden, [&](int64_t row_begin, int64_t row_end) {
          glu_rows<typename decltype(type)::type, decltype(activation)::value,
                   decltype(interleaved)::value>(p, row_begin, row_end);
        });
      });
    });
  });
  return ffi::Error::Success();
}

// W: the weight's type, T or float.
template <typename T, typename W>
FMHA_CPU_CLONES void rms_norm_rows(const RmsNormProblem& p, int64_t row_begin, int64_t row_end) {
  const int64_t hidden = p.hidden;
  const float eps = p.eps, weight_offset = p.weight_offset;
  const W* weight = static_cast<const W*>(p.weight);
  for (int64_t r = row_begin; r < row_end; ++r) {
    // The row that is normalized: x, or h = x + residual rounded to T (as stored).
    const T* source = static_cast<const T*>(p.x) + r * hidden;
    float sum_squares = 0.f;
    if (p.residual) {
      const T* x = source;
      const T* residual = static_cast<const T*>(p.residual) + r * hidden;
      T* h = static_cast<T*>(p.h) + r * hidden;
#pragma omp simd reduction(+ : sum_squares)
      for (int64_t c = 0; c < hidden; ++c) {
        const float sum = to_float(x[c]) + to_float(residual[c]);
        h[c] = from_float<T>(sum);
        const float v = to_float(from_float<T>(sum));  // h as stored
        sum_squares += v * v;
      }
      source = h;
    } else {
#pragma omp simd reduction(+ : sum_squares)
      for (int64_t c = 0; c < hidden; ++c) {
        const float v = to_float(source[c]);
        sum_squares += v * v;
      }
    }
    const float inv_rms = 1.f / std::sqrt(sum_squares / float(hidden) + eps);
    T* y = static_cast<T*>(p.y) + r * hidden;
#pragma omp simd
    for (int64_t c = 0; c < hidden; ++c)
      y[c] = from_float<T>(to_float(source[c]) * inv_rms * (to_float(weight[c]) + weight_offset));
  }
}

ffi::Error run_rms_norm(ffi::ThreadPool pool, const RmsNormProblem& p) {
  dispatch_dtype<float, bf16, f16>(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    const auto run = [&](auto weight_type) {
      using W = typename decltype(weight_type)::type;
      for_each_row_block(pool, p.rows, p.hidden, [&](int64_t row_begin, int64_t row_end) {
        rms_norm_rows<T, W>(p, row_begin, row_end);
      });
    };
    if (p.weight_dtype == ffi::DataType::F32) return run(Tag<float>{});
    run(Tag<T>{});
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaGluCpu, (jax_fmha::glu_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_glu>),
    jax_fmha::bind_glu(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaRmsNormCpu,
    (jax_fmha::rms_norm_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_rms_norm>),
    jax_fmha::bind_rms_norm(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaRmsNormResidualCpu,
    (jax_fmha::rms_norm_residual_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_rms_norm>),
    jax_fmha::bind_rms_norm_residual(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
