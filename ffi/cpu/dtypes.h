// Storage types of the CPU kernels: bf16 and fp16 are converted to float32 on load and
// rounded once (to nearest even) at the store; all arithmetic is float32.
#pragma once

#include <cstdint>
#include <cstring>

namespace jax_fmha::cpu {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  _Float16 value;
};

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  const uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(f16 x) { return float(x.value); }

template <typename T>
T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline bf16 from_float<bf16>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}
template <>
inline f16 from_float<f16>(float x) {
  return f16{static_cast<_Float16>(x)};
}

}  // namespace jax_fmha::cpu
