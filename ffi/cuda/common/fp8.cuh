// FP8 keys and values in the mma.sync kernels: the storage types, their exact conversion to
// fp16 pairs (the tensor cores' input), and the saturating quantization of update_kv_cache.
// Why fp16 for both query dtypes: docs/design/fp8_kv_cache.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "cuda/common/dtypes.cuh"

namespace jax_fmha::cuda {

// The K/V storage types: q's 16-bit type, or one of the FP8 formats.
template <typename Kv>
inline constexpr bool kIsFp8 =
    std::is_same_v<Kv, __nv_fp8_e4m3> || std::is_same_v<Kv, __nv_fp8_e5m2>;

template <typename Kv>
inline constexpr __nv_fp8_interpretation_t kFp8Interpretation =
    std::is_same_v<Kv, __nv_fp8_e5m2> ? __NV_E5M2 : __NV_E4M3;

// Bytes `lo` and `hi` of `word` -> one register of two fp16 (lo in the low half). Exact: every
// e4m3fn and e5m2 value is an fp16 value; NaN stays NaN, e5m2's infinities stay infinite.
template <typename Kv, int lo, int hi>
__device__ __forceinline__ uint32_t fp8x2_to_half2(uint32_t word) {
  // The two bytes as the high bytes of two 16-bit lanes (0x4: a zero byte).
  const uint32_t high_bytes = __byte_perm(word, 0, (hi << 12) | (0x4 << 8) | (lo << 4) | 0x4);
  if constexpr (std::is_same_v<Kv, __nv_fp8_e5m2>) {
    return high_bytes;  // e5m2 is fp16 without its low 8 mantissa bits
  } else {
#if __CUDA_ARCH__ >= 890
    const uint16_t pair = uint16_t(__byte_perm(word, 0, (0x4 << 12) | (0x4 << 8) | (hi << 4) | lo));
    uint32_t out;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(out) : "h"(pair));
    return out;
#else
    // The magnitude's 7 bits moved to fp16's exponent and mantissa fields give the value
    // times 2^(7 - 15) (a subnormal e4m3fn maps onto an fp16 subnormal): multiplying by 2^8
    // rebiases exactly. The NaN magnitude 0x7f would read as 480; it is set to NaN.
    const uint32_t magnitude = high_bytes & 0x7f007f00u;
    const uint32_t bits = (high_bytes & 0x80008000u) | (magnitude >> 1);
    const __half2 value =
        __hmul2(*reinterpret_cast<const __half2*>(&bits), __float2half2_rn(256.f));
    const uint32_t nan_lanes = (magnitude + 0x01000100u) & 0x80008000u;
    return *reinterpret_cast<const uint32_t*>(&value) | (nan_lanes - (nan_lanes >> 6));
#endif
  }
}

// The sign bit of a float32, bfloat16 or float16, as FP8's (NaN included).
__device__ __forceinline__ uint8_t fp8_sign(float x) {
  return uint8_t(__float_as_uint(x) >> 24) & 0x80;
}
__device__ __forceinline__ uint8_t fp8_sign(__nv_bfloat16 x) {
  return uint8_t(__bfloat16_as_ushort(x) >> 8) & 0x80;
}
__device__ __forceinline__ uint8_t fp8_sign(__half x) {
  return uint8_t(__half_as_ushort(x) >> 8) & 0x80;
}

// x * inv_scale -> FP8 as update_kv_cache stores it (common/kv_cache_ffi.h): round to nearest
// even, beyond the largest finite value (+-inf included) saturated to it, NaN to the quiet NaN
// of the CPU kernel (cpu/dtypes.h, saturating_fp8) with x's sign. cuda_fp8.h's __NV_SATFINITE
// conversion rounds and saturates as the CPU kernel does; NaN takes x's sign from x itself,
// since the GPU's multiply returns one canonical NaN where the CPU's keeps its operand's.
template <typename Kv, typename New>
__device__ __forceinline__ uint8_t quantize_fp8(New x, float inv_scale) {
  const float value = to_float(x) * inv_scale;
  if (isnan(value)) {
    constexpr uint8_t kNan = std::is_same_v<Kv, __nv_fp8_e5m2> ? 0x7e : 0x7f;
    return fp8_sign(x) | kNan;
  }
  return __nv_cvt_float_to_fp8(value, __NV_SATFINITE, kFp8Interpretation<Kv>);
}

}  // namespace jax_fmha::cuda
