// The activations of the fused GLU kernels, float32 in and out, shared by the CPU and CUDA
// kernels so that both compute the same function.
//
// Each is written with exp as its only transcendental, as branch-free straight-line code:
//   silu(x)      = x * sigmoid(x)                        = x / (1 + exp(-x))
//   gelu_tanh(x) = x * (1 + tanh(y)) / 2, y = sqrt(2/pi) * (x + 0.044715 x^3)
//                = x / (1 + exp(-2y))                    since (1 + tanh y) / 2 = sigmoid(2y)
//   gelu_erf(x)  = x * Phi(x),  Phi(x) = erfc(-x / sqrt(2)) / 2
// The sigmoid forms have no cancellation (1 + tanh(y) for y << 0 has). On the host,
// exp_f32 below vectorizes, unlike glibc's expf/tanhf/erff (which only have SIMD versions
// under -ffast-math). On the device, exp_f32 and the divisions (divide_ge1) are the bare
// MUFU instructions ex2.approx and rcp.approx: a GLU must stay cheaper than the memory
// traffic it rides on (instruction counts and bandwidth: docs/design/mlp_kernels.md).
//
// Accuracy (relative): on the host, exp_f32 within 2 ulp; silu and gelu_tanh within a few
// ulp (a few 1e-7); gelu_erf within ~1e-6 down to x = -6, a few 1e-6 below (the rounding
// of x * x in the exponent of its tail). On the device, exp_f32 is within (2 + 1.2 |x|) ulp
// (the rounding of x log2(e) adds to ex2's 2 ulp): at most ~1e-6 where a result is above
// float32's tolerance of tests/test_mlp.py (1e-6 absolute), a few 1e-7 in practice.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/enum_names.h"
#include "common/macros.h"

namespace jax_fmha {

// The "activation" attribute of the GLU custom call.
enum class Activation : int32_t { kSilu = 0, kGeluTanh = 1, kGeluErf = 2 };
inline constexpr EnumName<Activation> kActivationNames[] = {{"silu", Activation::kSilu},
                                                            {"gelu_tanh", Activation::kGeluTanh},
                                                            {"gelu_erf", Activation::kGeluErf}};

FMHA_HOST_DEVICE int32_t float_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

FMHA_HOST_DEVICE float float_from_bits(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// c ? a : b, through bit masks. A conditional expression lets GCC move the computation of
// a or b into a branch of its own (e.g. to fold a constant through it), and a loop with
// branches does not vectorize.
FMHA_HOST_DEVICE float branchless_select(bool c, float a, float b) {
  const uint32_t mask = uint32_t(-int32_t(c));
  return float_from_bits(
      int32_t((uint32_t(float_bits(a)) & mask) | (uint32_t(float_bits(b)) & ~mask)));
}

// x / d for d >= 1. On the device, a division rounded as IEEE requires is ~10 instructions
// and a branch, as many as the rest of an activation; for such d the hardware reciprocal
// (rcp.approx) is within 1 ulp, so x * rcp(d) is within 2 ulp. Its .ftz form gives 0 for
// d >= 2^126, where x / d is below every activation's resolution; __fdividef is the same
// reciprocal plus 4 instructions that rescale d, for the denormal results ftz gives up.
FMHA_HOST_DEVICE float divide_ge1(float x, float d) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return x * r;
#else
  return x / d;
#endif
}

// exp(r) for |r| <= ln(2) / 2 by its Taylor series to degree 7 (truncation error < 2e-8
// relative), in Horner form. F: float, or a vector of floats (the CPU attention kernel's).
template <typename F>
FMHA_HOST_DEVICE F exp_reduced(F r) {
  F p = r * (1.f / 5040.f) + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  return p * r + 1.f;
}

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by exp_reduced. Out
// of [-104, 89] the result is replaced by 0 or inf, what exp rounds to there (clamping x
// first would thread a constant through the body, see branchless_select). NaN propagates
// (through r).
FMHA_HOST_DEVICE float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  // 2^(x log2 e) by ex2.approx; its .ftz form gives 0 for results below 2^-126 (x < -87),
  // below every activation's resolution: 2 instructions, where expf takes 8 and __expf 5
  // (it rescales for the denormal results).
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504f));
  return y;
#else
  // Adding 1.5 * 2^23 rounds to an integer (the float's unit in the last place is 1 there)
  // and leaves that integer in the low mantissa bits, without a floor() call.
  constexpr float kRoundingShift = 12582912.f;
  const float shifted = x * 1.44269504f + kRoundingShift;
  const float n = shifted - kRoundingShift;
  const int32_t n_int =
      int32_t(uint32_t(float_bits(shifted)) - uint32_t(float_bits(kRoundingShift)));
  // r = x - n ln 2 with ln 2 split in two (Cody-Waite): n * 0.693359375 is exact.
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float p = exp_reduced(r);
  // 2^n = 2^half * 2^(n - half): for n in [-150, 128] both factors are normal floats, so
  // the product overflows to inf and underflows to 0 exactly where exp does.
  const int32_t half = n_int >> 1;
  const float scaled = p * float_from_bits(int32_t(uint32_t(half + 127) << 23)) *
                       float_from_bits(int32_t(uint32_t(n_int - half + 127) << 23));
  // Out of [-104, 89] exp is 0 or inf (and n_int is no longer valid).
  return branchless_select(x > 89.f, float_from_bits(0x7f800000),
                           branchless_select(x < -104.f, 0.f, scaled));
#endif
}

// Phi(-a) = erfc(a / sqrt(2)) / 2 for a >= 0, the lower tail of the standard normal
// distribution. erfc by the Chebyshev fit of Numerical Recipes (erfcc), relative error
// below 1.2e-7 for every argument, so Phi stays accurate deep in the tail; its exponent
// -z^2 is formed as -a^2 / 2 from the exact a, which halves the rounding error there.
FMHA_HOST_DEVICE float normal_lower_tail(float a) {
  const float t = divide_ge1(1.f, 1.f + 0.353553391f * a);  // 1 / (1 + z/2), z = a/sqrt(2)
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  return 0.5f * t * exp_f32(p - 0.5f * a * a);
}

FMHA_HOST_DEVICE float silu(float x) { return divide_ge1(x, 1.f + exp_f32(-x)); }

FMHA_HOST_DEVICE float gelu_tanh(float x) {
  constexpr float kTwoSqrt2OverPi = 1.59576912f;  // 2 * sqrt(2 / pi)
  return divide_ge1(x, 1.f + exp_f32(-kTwoSqrt2OverPi * (x + 0.044715f * x * x * x)));
}

FMHA_HOST_DEVICE float gelu_erf(float x) {
  const float abs_x = float_from_bits(float_bits(x) & 0x7fffffff);
  const float lower_tail = normal_lower_tail(abs_x);  // Phi(-|x|)
  return x * branchless_select(x > 0.f, 1.f - lower_tail, lower_tail);
}

template <Activation A>
FMHA_HOST_DEVICE float activate(float x) {
  if constexpr (A == Activation::kSilu)
    return silu(x);
  else if constexpr (A == Activation::kGeluTanh)
    return gelu_tanh(x);
  else
    return gelu_erf(x);
}

}  // namespace jax_fmha
