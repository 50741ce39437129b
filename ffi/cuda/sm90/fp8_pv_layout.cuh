// The index maps of the Hopper kernel's FP8 P V (docs/design/fp8_attention.md, "FP8 P·V on
// Hopper"), host and device, so that a host program can check them against CuTe's layouts
// (tests/cuda/hopper_fp8_pv_layout.cu):
//   - the producer's V transpose (forward_kernel.cuh, transpose_v): which keys and dims an
//     item copies, and the 4 x 4 byte transpose;
//   - the consumers' P operand (warpgroup_mma.cuh, pack_probabilities): which S element each
//     byte of the FP8 A fragment takes.
// Column 16a+4t+2b+i of each 32-key group of V^T holds key 8(2a+b)+2t+i: the keys of S's n8
// atoms that thread t of a quad holds, in the order of the A fragment's columns.
#pragma once

#include <cstdint>

namespace jax_fmha::cuda {

// One item of a key block's V transpose: 4 keys x 16 dims, 4 columns of 16 V^T rows.
struct VtItem {
  int key;   // the first of its keys key + {0, 1, 8, 9} (V^T columns col + {0, 1, 2, 3})
  int dim;   // the first of its 16 dims (V^T rows)
  int col;   // the first of its 4 V^T columns
  int swap;  // 1: the key pairs are loaded swapped, (1, 0, 9, 8) (bank-conflict-free loads)

  // The key of load i (0..3).
  __host__ __device__ __forceinline__ int load_key(int i) const {
    return key + ((i ^ swap) % 2) + 8 * (i / 2);
  }
};

// Item `item` of a kBlockN-key block: the items' columns run fastest (the lanes' axis).
template <int kBlockN>
__host__ __device__ __forceinline__ VtItem vt_item(int item) {
  constexpr int kKeyQuads = kBlockN / 4;
  const int col = 4 * (item % kKeyQuads);  // 16a + 4t in group col / 32
  return {col / 32 * 32 + col % 32 / 16 * 16 + col % 16 / 4 * 2, item / kKeyQuads * 16, col,
          col % 32 / 16};
}

__host__ __device__ __forceinline__ uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, selector);
#else
  const uint64_t bytes = uint64_t(y) << 32 | x;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i)
    out |= uint32_t(bytes >> (8 * ((selector >> (4 * i)) & 7)) & 0xff) << (8 * i);
  return out;
#endif
}

// Four dims of an item's keys: w[i] holds dims j = 0..3 (byte j) of load i's key. out[j]
// holds dim j of keys (key, key + 1, key + 8, key + 9) in bytes 0..3: a V^T row's 4 columns.
__host__ __device__ __forceinline__ void transpose4(uint32_t w0, uint32_t w1, uint32_t w2,
                                                    uint32_t w3, int swap, uint32_t (&out)[4]) {
  // Bytes of a key pair interleaved: [k0.b0, k1.b0, k0.b1, k1.b1] (lo) and [k0.b2, k1.b2,
  // k0.b3, k1.b3] (hi), from (w0, w1) = (k0, k1) or, swapped, (k1, k0).
  const uint32_t lo = swap ? 0x1504 : 0x5140, hi = swap ? 0x3726 : 0x7362;
  const uint32_t lo01 = byte_perm(w0, w1, lo), hi01 = byte_perm(w0, w1, hi);
  const uint32_t lo23 = byte_perm(w2, w3, lo), hi23 = byte_perm(w2, w3, hi);
  out[0] = byte_perm(lo01, lo23, 0x5410);
  out[1] = byte_perm(lo01, lo23, 0x7632);
  out[2] = byte_perm(hi01, hi23, 0x5410);
  out[3] = byte_perm(hi01, hi23, 0x7632);
}

// Byte `byte` of register `reg` (0..3) of a k32 step's FP8 A fragment takes element
// `element` of n8 atom 4 k + `atom` of S (k: the step). The A fragment gives registers 0 and
// 1 columns 4t..4t+3 of rows g and g+8, registers 2 and 3 columns 16+4t..16+4t+3; S gives
// element e of atom j key 8j+2t+(e%2) of row g+8(e/2).
struct ProbabilitySlot {
  int atom;
  int element;
};
__host__ __device__ __forceinline__ constexpr ProbabilitySlot fp8_probability_slot(int reg,
                                                                                   int byte) {
  return {2 * (reg / 2) + byte / 2, 2 * (reg % 2) + byte % 2};
}

}  // namespace jax_fmha::cuda
