// The CPU flash-attention tile kernel (attention_kernel.cc), compiled once per instruction
// set: namespaces `baseline` (the build's default flags: SSE2 on x86-64, NEON on arm64),
// and on x86-64 `avx2` (x86-64-v3), `avx512` (x86-64-v4) and `avx512bf16` (x86-64-v4 with
// bf16 dot products). attention.cc picks one at run time, so a build made on one x86-64
// machine runs on any.
//
// A tile is (split, sequence, KV head, kTileRows query rows); the query heads sharing the KV
// head are interleaved into its rows (row r -> query r / group, head r % group), so each key
// and value row converted to float32 serves every head of the group.
#pragma once

#include <cstdint>
#include <string>

#include "common/attention_problem.h"
#include "common/constants.h"
#include "common/split_policy.h"

namespace jax_fmha::cpu {

constexpr int64_t kTileRows = 64;   // query rows per tile
constexpr int64_t kBlockKeys = 64;  // keys per step of the online softmax

// The split-KV policy (common/split_policy.h): tiles are scheduled dynamically over the
// threads; two waves of splits of at least 256 keys (docs/design/split_kv.md).
inline SplitPolicy split_policy(int64_t threads) {
  return SplitPolicy{kTileRows, threads, /*waves=*/2, /*min_keys=*/256};
}

enum class Dtype { kF32, kBF16, kF16, kF8E4M3FN, kF8E5M2 };

// q, k and v are each stored as the tile's compute type `dtype` or as FP8, converted on load;
// FP8 operands' scales are the problem's (AttentionProblem::score_scale, value_scale).
struct AttentionArgs {
  const AttentionProblem* p;
  Dtype dtype;      // the compute type: q's, or with FP8 q v's 16-bit type, else bfloat16
  Dtype q_dtype;    // dtype, or an FP8 format
  Dtype k_dtype;    // dtype, or an FP8 format (a quantized cache)
  Dtype v_dtype;    // dtype, or an FP8 format
  Dtype out_dtype;  // float32, bfloat16 or float16 (float32 for split-KV partial outputs)
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
};

struct Tile {
  int64_t split, b, kvh, row_begin, rows;
};

// Head dim rounded up to the widest vector (16 floats): row stride of the value block and
// of the accumulators, whose padding columns stay zero.
constexpr int64_t padded_head_dim(int64_t d) { return (d + 15) / 16 * 16; }

// Floats of per-thread scratch a tile needs: transposed queries, accumulators, key and value
// blocks, the score block, and three per-row statistics.
constexpr int64_t tile_scratch_floats(int64_t d) {
  return kTileRows * d + kTileRows * padded_head_dim(d) + kBlockKeys * d +
         kBlockKeys * padded_head_dim(d) + kBlockKeys * kTileRows + 3 * kTileRows;
}

// Computes one tile (a sequence whose keys are valid) into out and lse.
using TileKernel = void(const AttentionArgs&, const Tile&, float* scratch);
namespace baseline {
TileKernel attention_tile;
}
#if defined(__x86_64__)
namespace avx2 {
TileKernel attention_tile;
}
namespace avx512 {
TileKernel attention_tile;
}
namespace avx512bf16 {
TileKernel attention_tile;
}
#endif

// The tile kernel attention.cc runs: the widest instruction set this CPU has, capped by
// JAX_FMHA_CPU_ISA; chosen once per process, so the extension reports what the kernel runs.
struct IsaChoice {
  const char* name;  // "baseline", "avx2", "avx512" or "avx512bf16"
  TileKernel* kernel;
  std::string error;  // set when JAX_FMHA_CPU_ISA names no variant; the kernel then fails
};
const IsaChoice& selected_isa();

}  // namespace jax_fmha::cpu
