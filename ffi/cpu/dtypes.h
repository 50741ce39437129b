// Storage types of the CPU kernels: bf16, fp16 and the FP8 formats of quantized KV caches
// are converted to float32 on load; results are rounded once (to nearest even) at the
// store; all arithmetic is float32.
//
// The conversions are always inlined: attention_kernel.cc is compiled once per instruction
// set, and an out-of-line (weak) copy built with AVX could be linked into the baseline code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define FMHA_CPU_CONVERSION inline __attribute__((always_inline))

namespace jax_fmha::cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  _Float16 value;
};

// An 8-bit float: sign, kExponentBits, kMantissaBits, exponent bias 2^(kExponentBits-1) - 1.
// kIeeeSpecials: the top exponent holds infinities and NaNs (e5m2); otherwise only the
// all-ones magnitude is NaN and there is no infinity (the "fn" formats: e4m3fn).
template <int kExponentBits, int kMantissaBits, bool kIeeeSpecials>
struct Fp8 {
  uint8_t bits;

  static constexpr int kBias = (1 << (kExponentBits - 1)) - 1;
  static constexpr uint32_t kExponentMax = (1u << kExponentBits) - 1;
  static constexpr uint32_t kMantissaMask = (1u << kMantissaBits) - 1;
  // The largest finite magnitude: 448 (e4m3fn), 57344 (e5m2).
  static constexpr float kMaxFinite =
      float((2 << kMantissaBits) - 1 - (kIeeeSpecials ? 0 : 1)) *
      float(1ll << ((kExponentMax - (kIeeeSpecials ? 1 : 0)) - kBias - kMantissaBits));
  // The spacing of subnormals (and the smallest one): 2^-9 (e4m3fn), 2^-16 (e5m2).
  static constexpr float kSubnormalStep = 1.f / float(1 << (kBias - 1 + kMantissaBits));
  // The quiet NaN conversions produce (with the input's sign), as XLA's and ml_dtypes'.
  static constexpr uint8_t kNan = kIeeeSpecials ? uint8_t(0x7e) : uint8_t(0x7f);
};
using f8e4m3fn = Fp8<4, 3, false>;
using f8e5m2 = Fp8<5, 2, true>;

FMHA_CPU_CONVERSION float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
FMHA_CPU_CONVERSION uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

FMHA_CPU_CONVERSION float to_float(float x) { return x; }
FMHA_CPU_CONVERSION float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
FMHA_CPU_CONVERSION float to_float(f16 x) { return float(x.value); }

// cond ? a : b, as bit masks: the compiler keeps no branch, so a loop of it vectorizes
// (a ternary over a float product is kept as control flow: the product may trap).
FMHA_CPU_CONVERSION uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(cond);
  return (a & mask) | (b & ~mask);
}

// Exact (every FP8 value is a float32, subnormals included); NaN gives a quiet NaN of the
// same sign. Branch-free, so that a row of conversions vectorizes. Subnormals are built as
// integer * power of two: no float32 subnormal appears, so flush-to-zero modes cannot alter
// the result.
template <int E, int M, bool I>
FMHA_CPU_CONVERSION float to_float(Fp8<E, M, I> x) {
  using F = Fp8<E, M, I>;
  const uint32_t sign = uint32_t(x.bits & 0x80) << 24;
  const uint32_t exponent = (x.bits >> M) & F::kExponentMax;
  const uint32_t mantissa = x.bits & F::kMantissaMask;
  const uint32_t normal = ((exponent + 127 - F::kBias) << 23) | (mantissa << (23 - M));
  const uint32_t subnormal = float_to_bits(float(int32_t(mantissa)) * F::kSubnormalStep);
  uint32_t magnitude = select_bits(exponent == 0, subnormal, normal);
  if constexpr (I) {  // the top exponent: infinity (mantissa 0) or NaN
    const uint32_t special = select_bits(mantissa == 0, 0x7f800000u, 0x7fc00000u);
    magnitude = select_bits(exponent == F::kExponentMax, special, magnitude);
  } else {  // only the all-ones magnitude: NaN
    magnitude = select_bits((x.bits & 0x7f) == 0x7f, 0x7fc00000u, magnitude);
  }
  return bits_to_float(sign | magnitude);
}

template <typename T>
T from_float(float x);
template <>
FMHA_CPU_CONVERSION float from_float<float>(float x) {
  return x;
}
template <>
FMHA_CPU_CONVERSION bf16 from_float<bf16>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}
template <>
FMHA_CPU_CONVERSION f16 from_float<f16>(float x) {
  return f16{static_cast<_Float16>(x)};
}

// Quantization to FP8 (update_kv_cache): round to nearest even, saturating: finite values
// beyond the largest finite FP8 value and +-inf become +-kMaxFinite; NaN stays NaN (kNan).
template <int E, int M, bool I>
FMHA_CPU_CONVERSION Fp8<E, M, I> saturating_fp8(float x) {
  using F = Fp8<E, M, I>;
  const uint32_t u = float_to_bits(x);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  if ((u & 0x7fffffffu) > 0x7f800000u) return F{uint8_t(sign | F::kNan)};
  const float magnitude = std::min(bits_to_float(u & 0x7fffffffu), F::kMaxFinite);
  // Below the smallest normal (2^M subnormal steps): a multiple of the step; the count
  // 2^M (a tie or more rounded up) is the encoding of the smallest normal, as it should be.
  if (magnitude < F::kSubnormalStep * float(F::kMantissaMask + 1))
    return F{uint8_t(sign | uint8_t(std::nearbyint(magnitude / F::kSubnormalStep)))};
  // Normal: drop the low 23 - M mantissa bits, ties to even (a carry moves into the
  // exponent); below the saturation bound the result is at most kMaxFinite.
  constexpr int kDropped = 23 - M;
  uint32_t bits = float_to_bits(magnitude);
  bits += (1u << (kDropped - 1)) - 1 + ((bits >> kDropped) & 1u);
  const uint32_t code = (bits >> kDropped) - (uint32_t(127 - F::kBias) << M);
  return F{uint8_t(sign | code)};
}
template <>
FMHA_CPU_CONVERSION f8e4m3fn from_float<f8e4m3fn>(float x) {
  return saturating_fp8<4, 3, false>(x);
}
template <>
FMHA_CPU_CONVERSION f8e5m2 from_float<f8e5m2>(float x) {
  return saturating_fp8<5, 2, true>(x);
}

}  // namespace jax_fmha::cpu
