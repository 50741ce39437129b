// CPU flash-attention forward: the FFI handler. It splits the problem into tiles (split,
// sequence, KV head, kTileRows query rows) run over XLA's thread pool by the tile kernel of
// the widest instruction set this CPU has (attention_kernel.h), and writes the rows no tile
// owns (invalid sequences, packed rows outside every sequence).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <string>

#include "common/attention_ffi.h"
#include "common/errors.h"
#include "cpu/attention_kernel.h"
#include "cpu/dtypes.h"
#include "cpu/parallel.h"

namespace jax_fmha::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename OutT>
struct Tiles {
  const AttentionArgs& args;
  const AttentionProblem& p;
  TileKernel* kernel;
  int64_t group;   // query heads per KV head
  int64_t blocks;  // row blocks per (sequence, KV head)

  int64_t items() const { return p.num_splits * p.batch * p.num_kv_heads * blocks; }

  void operator()(int64_t item) const {
    const int64_t block = item % blocks;
    const int64_t kvh = (item / blocks) % p.num_kv_heads;
    const int64_t b = (item / blocks / p.num_kv_heads) % p.batch;
    const int64_t split = item / blocks / p.num_kv_heads / p.batch;
    if (!p.q.valid(b)) return;  // see write_rows_outside_sequences
    const int64_t row_begin = block * kTileRows;
    const int64_t rows = std::min(kTileRows, p.q.len(b) * group - row_begin);
    if (rows <= 0) return;
    if (!p.kv.valid(b)) return write_nan(split, b, kvh, row_begin, rows);
    // The tile's working set lives on the stack (280 KiB at head_dim 256): the handler
    // allocates nothing, and the blocks stay hot in this core's caches.
    alignas(64) float scratch[tile_scratch_floats(kMaxHeadDim)];
    kernel(args, Tile{split, b, kvh, row_begin, rows}, scratch);
  }

  OutT* out() const { return static_cast<OutT*>(args.out); }
  // Element offset of (split, query row, head) in out.
  int64_t out_offset(int64_t split, int64_t row, int64_t h) const {
    return (split * p.q.rows + row) * p.q_row_stride() + h * p.head_dim;
  }

  void write_nan(int64_t split, int64_t b, int64_t kvh, int64_t row_begin, int64_t rows) const {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t r = row_begin; r < row_begin + rows; ++r) {
      const int64_t i = r / group, h = kvh * group + r % group;
      OutT* o = out() + out_offset(split, p.q.begin(b) + i, h);
      for (int64_t d = 0; d < p.head_dim; ++d) o[d] = from_float<OutT>(nan);
      args.lse[split * p.lse_size() + p.lse_index(b, h, i)] = nan;
    }
  }

  // Packed queries: rows before cu_seqlens_q[0] or after cu_seqlens_q[B] belong to no
  // sequence and get 0 with LSE -inf; the rows of a sequence whose query range is invalid
  // (out of bounds, or longer than max_seqlen_q) get NaN. With non-decreasing cu_seqlens_q
  // this writes every row that no tile writes.
  void write_rows_outside_sequences() const {
    if (!p.q.packed) return;
    const auto clamp = [&](int64_t row) { return std::clamp<int64_t>(row, 0, p.q.rows); };
    fill_rows(0, clamp(p.q.cu_seqlens[0]), 0.f, kNegInf);
    fill_rows(clamp(p.q.cu_seqlens[p.batch]), p.q.rows, 0.f, kNegInf);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t b = 0; b < p.batch; ++b)
      if (!p.q.valid(b))
        fill_rows(clamp(p.q.cu_seqlens[b]), clamp(p.q.cu_seqlens[b + 1]), nan, nan);
  }

  void fill_rows(int64_t row_begin, int64_t row_end, float value, float lse_value) const {
    for (int64_t split = 0; split < p.num_splits; ++split)
      for (int64_t row = row_begin; row < row_end; ++row)
        for (int64_t h = 0; h < p.num_q_heads; ++h) {
          OutT* o = out() + out_offset(split, row, h);
          for (int64_t d = 0; d < p.head_dim; ++d) o[d] = from_float<OutT>(value);
          args.lse[split * p.lse_size() + h * p.q.rows + row] = lse_value;
        }
  }
};

template <typename OutT>
void run(xla::ffi::ThreadPool& pool, const AttentionArgs& args) {
  TileKernel* const kernel = selected_isa().kernel;
  const AttentionProblem& p = *args.p;
  const int64_t group = p.group();
  const Tiles<OutT> tiles{args, p, kernel, group,
                          (p.q.max_len * group + kTileRows - 1) / kTileRows};
  tiles.write_rows_outside_sequences();
  parallel_for(pool, tiles.items(), tiles);
}

// The kernel's name of a storage type of the custom call.
std::optional<Dtype> kernel_dtype(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F32: return Dtype::kF32;
    case ffi::DataType::BF16: return Dtype::kBF16;
    case ffi::DataType::F16: return Dtype::kF16;
    case ffi::DataType::F8E4M3FN: return Dtype::kF8E4M3FN;
    case ffi::DataType::F8E5M2: return Dtype::kF8E5M2;
    default: return std::nullopt;
  }
}

ffi::Error run_attention(xla::ffi::ThreadPool pool, const AttentionProblem& p,
                         const AttentionData& data) {
  if (!selected_isa().error.empty()) return invalid_argument("attention", selected_isa().error);
  const std::optional<Dtype> q_dtype = kernel_dtype(data.dtype);
  const std::optional<Dtype> k_dtype = kernel_dtype(data.kv_dtype);
  const std::optional<Dtype> v_dtype = kernel_dtype(data.v_dtype);
  const std::optional<Dtype> out_dtype = kernel_dtype(data.out_dtype);
  if (!q_dtype || !k_dtype || !v_dtype || !out_dtype)
    return invalid_argument("attention", "unsupported dtype");
  // The tile's compute type (attention_kernel.h): FP8 q computes in bfloat16 (FP8 values
  // convert exactly), or in v's type when v is 16-bit, so that every operand is stored as
  // the compute type or as FP8.
  Dtype dtype = *q_dtype;
  if (is_fp8(data.dtype)) dtype = *v_dtype == Dtype::kF16 ? Dtype::kF16 : Dtype::kBF16;
  const AttentionArgs args{&p,     dtype,  *q_dtype, *k_dtype, *v_dtype, *out_dtype,
                           data.q, data.k, data.v,   data.out, data.lse};
  switch (*out_dtype) {
    case Dtype::kF32: run<float>(pool, args); break;
    case Dtype::kBF16: run<bf16>(pool, args); break;
    case Dtype::kF16: run<f16>(pool, args); break;
    default: return invalid_argument("attention", "out must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

}  // namespace

// JAX_FMHA_CPU_ISA caps the choice, to test and time every variant on one machine.
const IsaChoice& selected_isa() {
  static const IsaChoice choice = [] {
    struct Variant {
      const char* name;
      bool supported;
      TileKernel* kernel;
    };
    const Variant variants[] = {
        // narrowest first
        {"baseline", true, baseline::attention_tile},
#if defined(__x86_64__)
        {"avx2", bool(__builtin_cpu_supports("x86-64-v3")), avx2::attention_tile},
        {"avx512", bool(__builtin_cpu_supports("x86-64-v4")), avx512::attention_tile},
        {"avx512bf16", __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("avx512bf16"),
         avx512bf16::attention_tile},
#endif
    };
    // Every name is accepted on every machine: a cap above what the CPU has is no cap.
    constexpr const char* kNames[] = {"baseline", "avx2", "avx512", "avx512bf16"};
    const char* cap = std::getenv("JAX_FMHA_CPU_ISA");
    if (cap != nullptr && *cap == '\0') cap = nullptr;
    if (cap != nullptr && std::none_of(std::begin(kNames), std::end(kNames), [&](const char* name) {
          return std::strcmp(cap, name) == 0;
        }))
      return IsaChoice{"baseline", baseline::attention_tile,
                       "JAX_FMHA_CPU_ISA='" + std::string(cap) +
                           "' is not an instruction set; expected one of baseline, avx2, "
                           "avx512, avx512bf16 (or unset: the widest this CPU has)"};
    IsaChoice chosen{"baseline", baseline::attention_tile, ""};
    for (const Variant& v : variants) {
      if (v.supported) chosen = IsaChoice{v.name, v.kernel, ""};
      if (cap != nullptr && std::strcmp(cap, v.name) == 0) break;
    }
    return chosen;
  }();
  return choice;
}

}  // namespace jax_fmha::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaAttentionCpu,
    (jax_fmha::attention_handler<xla::ffi::ThreadPool, jax_fmha::cpu::run_attention>),
    jax_fmha::bind_attention(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
