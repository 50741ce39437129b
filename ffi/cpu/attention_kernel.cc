// CPU flash-attention tile: blocked online softmax with float32 statistics and accumulators,
// O(tile) memory (the Sq x Sk score matrix is never formed).
//
// Compiled once per instruction set into namespace JAX_FMHA_CPU_ISA (see attention_kernel.h
// and CMakeLists.txt). Everything here is in that namespace or inlined: an out-of-line
// shared (weak) function compiled with AVX could be picked by the linker for the baseline
// code too (check with `nm -C` on the object files: no weak symbols outside the namespace).
//
// Layout: the tile's queries are transposed, qt[d][row], so that rows are vector lanes. The
// scores of a key block are then computed as s[key][row] = sum_d K[key][d] * qt[d][row]:
// one broadcast key element times a vector of rows per FMA (per bf16-pair dot product where
// the CPU has AVX512-BF16), a register block of keys x row vectors, no horizontal sums and
// no transposed keys. The softmax statistics (max, sum,
// rescale) are per row, hence elementwise on those vectors. P V accumulates
// acc[row][d] += p[key][row] * V[key][d]: a broadcast probability times a vector of d.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "common/activations.h"
#include "cpu/attention_kernel.h"
#include "cpu/dtypes.h"

namespace jax_fmha::cpu::JAX_FMHA_CPU_ISA {
namespace {

// Vector width and register blocks. The QK block holds kQkRowVecs x kQkKeys accumulators,
// the PV block kPvRows x kPvVecs: 16 of AVX-512's 32 registers, 8 of the 16 of AVX2/SSE,
// leaving room for the operands and enough independent FMAs to hide their latency.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kQkKeys = 8;
constexpr int kPvVecs = 4;
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kQkKeys = 4;
constexpr int kPvVecs = 2;
#else
constexpr int kLanes = 4;
constexpr int kQkKeys = 4;
constexpr int kPvVecs = 2;
#endif
constexpr int kQkRowVecs = 2;
constexpr int kPvRows = 4;
static_assert(kBlockKeys % kQkKeys == 0 && kTileRows % (kQkRowVecs * kLanes) == 0);
static_assert(kTileRows % kPvRows == 0 && kPvRows <= kLanes);

typedef float Vec __attribute__((vector_size(4 * kLanes)));
typedef int32_t IVec __attribute__((vector_size(4 * kLanes)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline IVec load(const int32_t* p) {
  IVec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }
inline Vec splat(float x) { return x - Vec{}; }  // (x + 0 is not x for x = -0: not folded)
inline Vec max(Vec a, Vec b) { return a > b ? a : b; }

// exp(x) for x <= 0 (softmax arguments), within about 1 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by exp_reduced (common/activations.h), 2^n built in the exponent
// bits. Below -87 (results under FLT_MIN, and -inf) gives 0; NaN stays NaN.
inline Vec exp_nonpositive(Vec x) {
  const Vec xc = x < -87.f ? splat(-87.f) : x;
  const float round_magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec n = (xc * 1.44269504f + round_magic) - round_magic;
  // r = x - n ln2 with ln2 split in two (Cody-Waite): n * 0.693145751953125 is exact.
  const Vec r = (xc - n * 0.693145751953125f) - n * 1.42860682e-6f;
  const Vec poly = exp_reduced(r);
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);
  return x < -87.f ? Vec{} : poly * pow2n;
}

// n elements (a multiple of 8) to float32, converted on load; or FP8 to bf16 (exact: FP8
// values have at most 3 significant bits) for the bf16 pair dot product.
template <typename T, typename Dst = float>
inline void load_row(const T* src, Dst* dst, int64_t n) {
  if constexpr (std::is_same_v<T, Dst>) {
    std::memcpy(dst, src, n * sizeof(T));
  } else if constexpr (std::is_same_v<Dst, float>) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
  } else {
    static_assert(std::is_same_v<Dst, bf16>);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = bf16{uint16_t(float_to_bits(to_float(src[d])) >> 16)};
  }
}

// s[j][row] = scale * sum_d key[j][d] * qt[d][row] for kQkKeys key rows and RowVecs row
// vectors from qt (row stride kTileRows in both qt and s).
template <int RowVecs>
inline void qk_block(const float* qt, const float* const* key, int64_t D, float scale, float* s) {
  Vec acc[kQkKeys][RowVecs] = {};
  for (int64_t d = 0; d < D; ++d) {
    Vec q[RowVecs];
    for (int v = 0; v < RowVecs; ++v) q[v] = load(qt + d * kTileRows + v * kLanes);
    for (int j = 0; j < kQkKeys; ++j) {
      const Vec kj = splat(key[j][d]);
      for (int v = 0; v < RowVecs; ++v) acc[j][v] += kj * q[v];
    }
  }
  for (int j = 0; j < kQkKeys; ++j)
    for (int v = 0; v < RowVecs; ++v) store(s + j * kTileRows + v * kLanes, acc[j][v] * scale);
}

// bf16 inputs where the CPU has AVX512-BF16: the same scores from bf16 pairs, twice the
// multiply-adds per instruction. vdpbf16ps adds q[2i] k[2i] + q[2i+1] k[2i+1] (products of
// bf16 are exact in float32) to a float32 lane. qt holds the queries as bf16 pairs,
// [D/2][kTileRows] 32-bit words (set_query_column); keys are read as stored.
#if defined(__AVX512BF16__)
constexpr bool kBf16PairDot = true;
template <int RowVecs>
inline void qk_block(const float* qt, const bf16* const* key, int64_t D, float scale, float* s) {
  __m512 acc[kQkKeys][RowVecs];
  for (int j = 0; j < kQkKeys; ++j)
    for (int v = 0; v < RowVecs; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < D / 2; ++pair) {
    __m512bh q[RowVecs];
    for (int v = 0; v < RowVecs; ++v)
      q[v] = __m512bh(_mm512_loadu_si512(qt + pair * kTileRows + v * kLanes));
    for (int j = 0; j < kQkKeys; ++j) {
      int32_t k_pair;
      std::memcpy(&k_pair, key[j] + 2 * pair, sizeof k_pair);
      const __m512bh kj = __m512bh(_mm512_set1_epi32(k_pair));
      for (int v = 0; v < RowVecs; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], kj, q[v]);
    }
  }
  for (int j = 0; j < kQkKeys; ++j)
    for (int v = 0; v < RowVecs; ++v) store(s + j * kTileRows + v * kLanes, acc[j][v] * scale);
}
#else
constexpr bool kBf16PairDot = false;
#endif

// Column r of the transposed query tile from a query row stored as Q (nullptr: a padding
// row of zeros): float32 qt[d][r], or bf16 pairs (Elem bf16) for the pair dot product.
template <typename Q, typename Elem>
inline void set_query_column(float* qt, int64_t r, const Q* src, int64_t D) {
  Elem q_row[kMaxHeadDim] = {};
  if (src) load_row(src, q_row, D);
  if constexpr (std::is_same_v<Elem, bf16>) {
    for (int64_t pair = 0; pair < D / 2; ++pair)
      std::memcpy(qt + pair * kTileRows + r, q_row + 2 * pair, 2 * sizeof(bf16));
  } else {
    for (int64_t d = 0; d < D; ++d) qt[d * kTileRows + r] = q_row[d];
  }
}

// acc[r][d0 + d] = acc[r][d0 + d] * corr[r] + sum_{j < n} p[j][r] * value[j][d0 + d] for
// kPvRows rows and Vecs vectors of d (acc has row stride Dp, p has kTileRows).
template <int Vecs>
inline void pv_block(const float* p, const float* const* value, int64_t d0, int64_t n, int64_t Dp,
                     const float* corr, float* acc) {
  Vec a[kPvRows][Vecs];
  for (int r = 0; r < kPvRows; ++r)
    for (int v = 0; v < Vecs; ++v) a[r][v] = load(acc + r * Dp + v * kLanes) * corr[r];
  for (int64_t j = 0; j < n; ++j) {
    Vec x[Vecs];
    for (int v = 0; v < Vecs; ++v) x[v] = load(value[j] + d0 + v * kLanes);
    for (int r = 0; r < kPvRows; ++r) {
      const Vec pr = splat(p[j * kTileRows + r]);
      for (int v = 0; v < Vecs; ++v) a[r][v] += pr * x[v];
    }
  }
  for (int r = 0; r < kPvRows; ++r)
    for (int v = 0; v < Vecs; ++v) store(acc + r * Dp + v * kLanes, a[r][v]);
}

// ---- the tile, step by step ------------------------------------------------------------
// run_tile's steps are forced inline: the tile stays one function, compiled as one hot loop.
#define FMHA_TILE_STEP inline __attribute__((always_inline))

// With the compute type bf16, queries and keys are bf16 where the CPU multiplies bf16 pairs
// (FP8 ones converted to bf16, exactly); otherwise they are read as float32.
template <typename T>
constexpr bool kPairs = kBf16PairDot && std::is_same_v<T, bf16>;
template <typename T>
using KeyElement = std::conditional_t<kPairs<T>, bf16, float>;

// Calls f(Element{}) with the storage type of an operand of `dtype`: the compute type T, or
// an FP8 format. The element type is a run-time switch of the loads, not a template
// parameter of the tile (docs/design/fp8_kv_cache.md, "The CPU kernel").
template <typename T, typename F>
FMHA_TILE_STEP void with_storage(Dtype dtype, const F& f) {
  switch (dtype) {
    case Dtype::kF8E4M3FN: return f(f8e4m3fn{});
    case Dtype::kF8E5M2: return f(f8e5m2{});
    default: return f(T{});
  }
}

template <typename T>
constexpr int64_t storage_bytes(Dtype dtype) {
  return dtype == Dtype::kF8E4M3FN || dtype == Dtype::kF8E5M2 ? 1 : int64_t(sizeof(T));
}

// Sizes of a tile, computed once: rows are computed in whole vectors (the padding rows have
// zero queries and no visible key, and are never stored).
struct TileShape {
  int64_t D, Dp;      // head dim, and padded_head_dim(D)
  int64_t group;      // query heads per KV head
  int64_t kv_stride;  // elements between key rows
  int64_t row_vecs, padded_rows;
};

FMHA_TILE_STEP TileShape tile_shape(const AttentionProblem& p, const Tile& t) {
  const int64_t row_vecs = (t.rows + kLanes - 1) / kLanes;
  return {p.head_dim,       padded_head_dim(p.head_dim), p.group(), p.kv_row_stride(), row_vecs,
          row_vecs * kLanes};
}

// The per-thread scratch of a tile (tile_scratch_floats), carved into its arrays.
struct TileScratch {
  float* qt;       // [D][kTileRows] (see set_query_column)
  float* acc;      // [kTileRows][Dp]
  float* kb;       // [kBlockKeys][D]
  float* vb;       // [kBlockKeys][Dp]
  float* s;        // [kBlockKeys][kTileRows]: scores, then P
  float* row_max;  // [kTileRows]
  float* row_sum;  // [kTileRows]
  float* corr;     // [kTileRows]: rescale of acc for the current block
};

FMHA_TILE_STEP TileScratch carve_scratch(float* scratch, const TileShape& g) {
  TileScratch sc;
  sc.qt = scratch;
  sc.acc = sc.qt + kTileRows * g.D;
  sc.kb = sc.acc + kTileRows * g.Dp;
  sc.vb = sc.kb + kBlockKeys * g.D;
  sc.s = sc.vb + kBlockKeys * g.Dp;
  sc.row_max = sc.s + kBlockKeys * kTileRows;
  sc.row_sum = sc.row_max + kTileRows;
  sc.corr = sc.row_sum + kTileRows;
  return sc;
}

// Row r of a tile: query i of the sequence, query head h (the heads of the KV head are
// interleaved, attention_kernel.h).
struct RowHead {
  int64_t i, h;
};
FMHA_TILE_STEP RowHead row_head(const Tile& t, int64_t r, int64_t group) {
  return {(t.row_begin + r) / group, t.kvh * group + (t.row_begin + r) % group};
}

// Keys the tile's rows see within its split: the union [lo, hi) over its rows, and
// [all_lo, all_hi), where every row sees every key.
struct TileKeys {
  int64_t lo, hi, all_lo, all_hi;
};

// Step 1: the queries into qt (padding rows: zeros and no visible key), each row's visible
// keys into key_lo/key_hi, the statistics and accumulators reset.
template <typename T>
FMHA_TILE_STEP TileKeys begin_tile(const AttentionArgs& args, const Tile& t, const TileShape& g,
                                   const TileScratch& sc, int32_t* key_lo, int32_t* key_hi) {
  const AttentionProblem& p = *args.p;
  const int64_t D = g.D, Dp = g.Dp;
  const int64_t sq = p.q.len(t.b), sk = p.kv.len(t.b);
  const KeyRange split_range = split_keys(sk, t.split, p.num_splits, kBlockKeys);
  TileKeys keys{sk, 0, 0, sk};
  for (int64_t r = 0; r < g.padded_rows; ++r) {
    KeyRange row_keys{0, 0};
    if (r < t.rows) {
      const RowHead rh = row_head(t, r, g.group);
      const int64_t q_row = (p.q.begin(t.b) + rh.i) * p.q_row_stride() + rh.h * D;
      with_storage<T>(args.q_dtype, [&](auto q_element) {
        using Q = decltype(q_element);
        set_query_column<Q, KeyElement<T>>(sc.qt, r, static_cast<const Q*>(args.q) + q_row, D);
      });
      row_keys = visible_keys(p, rh.i, sq, sk);
      row_keys.lo = std::max(row_keys.lo, split_range.lo);
      row_keys.hi = std::min(row_keys.hi, split_range.hi);
      if (!row_keys.empty())
        keys.lo = std::min(keys.lo, row_keys.lo), keys.hi = std::max(keys.hi, row_keys.hi);
      keys.all_lo = std::max(keys.all_lo, row_keys.lo);
      keys.all_hi = std::min(keys.all_hi, row_keys.hi);
    } else {
      set_query_column<T, KeyElement<T>>(sc.qt, r, nullptr, D);
    }
    key_lo[r] = int32_t(row_keys.lo);
    key_hi[r] = int32_t(row_keys.hi);
    sc.row_max[r] = kNegInf;
    sc.row_sum[r] = 0.f;
  }
  std::memset(sc.acc, 0, sizeof(float) * kTileRows * Dp);
  for (int64_t j = 0; j < kBlockKeys; ++j)
    std::memset(sc.vb + j * Dp + D, 0, sizeof(float) * (Dp - D));
  return keys;
}

// Element offset of key `key` of the tile's sequence and KV head in k and v.
FMHA_TILE_STEP int64_t kv_offset(const AttentionProblem& p, const Tile& t, const TileShape& g,
                                 int64_t key) {
  return p.kv.row(t.b, key) * g.kv_stride + t.kvh * g.D;
}

// Step 2: the rows of the n keys from j0 in `x` (keys or values, stored as X: the compute
// type or FP8), as Elem. Rows are read in place where they already are Elem (whole vectors
// of float32, or bf16 keys for the pair dot product); others are converted into `block`
// (row stride `stride`, its padding columns left as they are).
template <typename X, typename Elem>
FMHA_TILE_STEP void gather_rows(const AttentionArgs& args, const Tile& t, const TileShape& g,
                                int64_t j0, int64_t n, const void* x, Elem* block, int64_t stride,
                                const Elem** rows) {
  const X* stored = static_cast<const X*>(x);
  const bool in_place = std::is_same_v<X, Elem> && (!std::is_same_v<X, float> || g.D % kLanes == 0);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t offset = kv_offset(*args.p, t, g, j0 + j);
    if (in_place) {
      rows[j] = reinterpret_cast<const Elem*>(stored + offset);
    } else {
      load_row(stored + offset, block + j * stride, g.D);
      rows[j] = block + j * stride;
    }
  }
}

// The key and value rows of the block. Keys past n in the last QK register block repeat the
// first (their scores are unused). Returns n rounded up to whole QK register blocks.
template <typename T>
FMHA_TILE_STEP int64_t gather_block(const AttentionArgs& args, const Tile& t, const TileShape& g,
                                    int64_t j0, int64_t n, const TileScratch& sc,
                                    const KeyElement<T>** key, const float** value) {
  with_storage<T>(args.k_dtype, [&](auto k_element) {
    gather_rows<decltype(k_element)>(args, t, g, j0, n, args.k,
                                     reinterpret_cast<KeyElement<T>*>(sc.kb), g.D, key);
  });
  with_storage<T>(args.v_dtype, [&](auto v_element) {
    gather_rows<decltype(v_element)>(args, t, g, j0, n, args.v, sc.vb, g.Dp, value);
  });
  const int64_t n_padded = (n + kQkKeys - 1) / kQkKeys * kQkKeys;
  for (int64_t j = n; j < n_padded; ++j) key[j] = key[0];
  return n_padded;
}

// Step 3: prefetch the block after j0's. Its key and value rows are short runs (D elements
// of kv_bytes, a KV-row stride apart, pages anywhere), which the hardware prefetchers do not
// follow. When few query rows share the keys (decode) a block's arithmetic is short, and
// without it the next block's loads would wait on memory latency, row after row.
FMHA_TILE_STEP void prefetch_next_block(const AttentionArgs& args, const Tile& t,
                                        const TileShape& g, int64_t k_bytes, int64_t v_bytes,
                                        int64_t j0, int64_t hi) {
  const char* k = static_cast<const char*>(args.k);
  const char* v = static_cast<const char*>(args.v);
  for (int64_t j = j0 + kBlockKeys; j < std::min(j0 + 2 * kBlockKeys, hi); ++j) {
    const int64_t offset = kv_offset(*args.p, t, g, j);
    for (int64_t byte = 0; byte < g.D * k_bytes; byte += 64)
      __builtin_prefetch(k + offset * k_bytes + byte);
    for (int64_t byte = 0; byte < g.D * v_bytes; byte += 64)
      __builtin_prefetch(v + offset * v_bytes + byte);
  }
}

// Step 4: the scores of the block times `scale` (and softcapped) into s, in whole register
// blocks.
template <typename Key>
FMHA_TILE_STEP void score_block(const AttentionProblem& p, const TileShape& g, float scale,
                                const Key* const* key, int64_t n, int64_t n_padded,
                                const TileScratch& sc) {
  for (int64_t j = 0; j < n_padded; j += kQkKeys) {
    float* s_keys = sc.s + j * kTileRows;
    int64_t rv = 0;
    for (; rv + kQkRowVecs <= g.row_vecs; rv += kQkRowVecs)
      qk_block<kQkRowVecs>(sc.qt + rv * kLanes, key + j, g.D, scale, s_keys + rv * kLanes);
    for (; rv < g.row_vecs; ++rv)
      qk_block<1>(sc.qt + rv * kLanes, key + j, g.D, scale, s_keys + rv * kLanes);
  }
  if (p.softcap > 0.f)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < g.padded_rows; ++r) {
        float& x = sc.s[j * kTileRows + r];
        x = p.softcap * std::tanh(x / p.softcap);
      }
}

// Step 5: mask (unless `masked` is false: every row sees the whole block) and online
// softmax, a row vector at a time: s becomes P, and corr the rescale of acc. A row that has
// seen no key yet keeps max -inf; its exponent is taken against 0, so its probabilities and
// rescale are exp(-inf) = 0.
FMHA_TILE_STEP void softmax_block(const TileShape& g, int64_t j0, int64_t n, bool masked,
                                  const int32_t* key_lo, const int32_t* key_hi,
                                  const TileScratch& sc) {
  for (int64_t rv = 0; rv < g.row_vecs; ++rv) {
    float* col = sc.s + rv * kLanes;
    const IVec vlo = load(key_lo + rv * kLanes), vhi = load(key_hi + rv * kLanes);
    Vec block_max = splat(kNegInf);
    for (int64_t j = 0; j < n; ++j) {
      Vec x = load(col + j * kTileRows);
      if (masked) {
        const int32_t pos = int32_t(j0 + j);
        x = (vlo <= pos) & (vhi > pos) ? x : kNegInf;
        store(col + j * kTileRows, x);
      }
      block_max = max(block_max, x);
    }
    const Vec old_max = load(sc.row_max + rv * kLanes);
    const Vec new_max = max(old_max, block_max);
    const Vec ref = new_max == kNegInf ? Vec{} : new_max;
    Vec block_sum{};
    for (int64_t j = 0; j < n; ++j) {
      const Vec e = exp_nonpositive(load(col + j * kTileRows) - ref);
      store(col + j * kTileRows, e);
      block_sum += e;
    }
    const Vec c = exp_nonpositive(old_max - ref);
    store(sc.corr + rv * kLanes, c);
    store(sc.row_max + rv * kLanes, new_max);
    store(sc.row_sum + rv * kLanes, load(sc.row_sum + rv * kLanes) * c + block_sum);
  }
}

// Step 6: acc = acc * corr + P V, for the tile's rows rounded up to a register block.
FMHA_TILE_STEP void accumulate_block(const Tile& t, const TileShape& g, const float* const* value,
                                     int64_t n, const TileScratch& sc) {
  const int64_t Dp = g.Dp, d_vecs = (g.D + kLanes - 1) / kLanes;
  for (int64_t r = 0; r < t.rows; r += kPvRows) {
    float* acc_rows = sc.acc + r * Dp;
    int64_t dv = 0;
    for (; dv + kPvVecs <= d_vecs; dv += kPvVecs)
      pv_block<kPvVecs>(sc.s + r, value, dv * kLanes, n, Dp, sc.corr + r, acc_rows + dv * kLanes);
    for (; dv < d_vecs; ++dv)
      pv_block<1>(sc.s + r, value, dv * kLanes, n, Dp, sc.corr + r, acc_rows + dv * kLanes);
  }
}

// Step 7: normalize (times `value_scale`) and store the rows as OutT, and their LSE. A row
// that saw no key gets 0 and LSE -inf.
template <typename OutT>
FMHA_TILE_STEP void store_rows(const AttentionArgs& args, const Tile& t, const TileShape& g,
                               float value_scale, const TileScratch& sc) {
  const AttentionProblem& p = *args.p;
  OutT* out = static_cast<OutT*>(args.out);
  const int64_t D = g.D, Dp = g.Dp;
  for (int64_t r = 0; r < t.rows; ++r) {
    const RowHead rh = row_head(t, r, g.group);
    const bool seen = sc.row_sum[r] > 0.f;
    const float inv = seen ? value_scale / sc.row_sum[r] : 0.f;
    OutT* o = out + (t.split * p.q.rows + p.q.begin(t.b) + rh.i) * p.q_row_stride() + rh.h * D;
    for (int64_t d = 0; d < D; ++d) o[d] = from_float<OutT>(sc.acc[r * Dp + d] * inv);
    args.lse[t.split * p.lse_size() + p.lse_index(t.b, rh.h, rh.i)] =
        seen ? sc.row_max[r] + std::log(sc.row_sum[r]) : kNegInf;
  }
}

// The output type is a run-time switch too: the store runs once per tile.
FMHA_TILE_STEP void store_tile(const AttentionArgs& args, const Tile& t, const TileShape& g,
                               float value_scale, const TileScratch& sc) {
  switch (args.out_dtype) {
    case Dtype::kBF16: return store_rows<bf16>(args, t, g, value_scale, sc);
    case Dtype::kF16: return store_rows<f16>(args, t, g, value_scale, sc);
    default: return store_rows<float>(args, t, g, value_scale, sc);
  }
}

// One tile: the online softmax over its keys, kBlockKeys at a time.
template <typename T>
void run_tile(const AttentionArgs& args, const Tile& t, float* scratch) {
  const TileShape g = tile_shape(*args.p, t);
  const TileScratch sc = carve_scratch(scratch, g);
  int32_t key_lo[kTileRows], key_hi[kTileRows];  // keys [lo, hi) visible to each row
  const TileKeys keys = begin_tile<T>(args, t, g, sc, key_lo, key_hi);
  // FP8 operands: their scales fold into the scores and the output (a tile is one sequence
  // and KV head).
  const float score_scale = args.p->score_scale(t.b, t.kvh);
  const float value_scale = args.p->value_scale(t.b, t.kvh);
  const int64_t k_bytes = storage_bytes<T>(args.k_dtype), v_bytes = storage_bytes<T>(args.v_dtype);

  const KeyElement<T>* key[kBlockKeys];
  const float* value[kBlockKeys];
  for (int64_t j0 = keys.lo; j0 < keys.hi; j0 += kBlockKeys) {
    const int64_t n = std::min(kBlockKeys, keys.hi - j0);
    const int64_t n_padded = gather_block<T>(args, t, g, j0, n, sc, key, value);
    prefetch_next_block(args, t, g, k_bytes, v_bytes, j0, keys.hi);
    score_block(*args.p, g, score_scale, key, n, n_padded, sc);
    const bool masked = j0 < keys.all_lo || j0 + n > keys.all_hi || g.padded_rows > t.rows;
    softmax_block(g, j0, n, masked, key_lo, key_hi, sc);
    accumulate_block(t, g, value, n, sc);
  }
  store_tile(args, t, g, value_scale, sc);
}

#undef FMHA_TILE_STEP

}  // namespace

void attention_tile(const AttentionArgs& args, const Tile& t, float* scratch) {
  switch (args.dtype) {
    case Dtype::kF32: return run_tile<float>(args, t, scratch);
    case Dtype::kBF16: return run_tile<bf16>(args, t, scratch);
    case Dtype::kF16: return run_tile<f16>(args, t, scratch);
    case Dtype::kF8E4M3FN:
    case Dtype::kF8E5M2: return;  // never a compute type (attention.cc)
  }
}

}  // namespace jax_fmha::cpu::JAX_FMHA_CPU_ISA
