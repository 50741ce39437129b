// The index maps of the Hopper kernel's FP8 P V (docs/design/fp8_attention.md, "FP8 P·V on
// Hopper"), host and device, so that a host program can check them against CuTe's layouts
// (tests/cuda/hopper_fp8_pv_layout.cu):
//   - the producer's V transpose (forward_kernel.cuh, transpose_v): which keys and dims a
//     unit copies, the lanes' ldmatrix and stmatrix addresses and their byte permutes;
//   - the consumers' P operand (warpgroup_mma.cuh, pack_probabilities): which S element each
//     byte of the FP8 A fragment takes.
// Column 16a+4t+2b+i of each 32-key group of V^T holds key 8(2a+b)+2t+i: the keys of S's n8
// atoms that thread t of a quad holds, in the order of the A fragment's columns.
#pragma once

#include <cstdint>

namespace jax_fmha::cuda {

// One warp's unit of a key block's V transpose: keys 32 g .. 32 g + 31 (one 32-key group of
// V^T's columns) x dims 16 c .. 16 c + 15 (V^T rows), 512 bytes, by one ldmatrix.x4.trans,
// four byte permutes and one stmatrix.x4, each on 8 x 8 matrices of 16-bit elements (lane l:
// t = l % 4, j = l / 4).
//   - ldmatrix.x4.trans: lane l addresses the 16 bytes of key 32 g + l (row l % 8 of matrix
//     l / 8); register m of lane l then holds keys 32 g + 8 m + 2 t + h (16-bit half h) x
//     dims 16 c + 2 j + b (byte b of the half): the layout of an mma accumulator, which is
//     why the key permutation below needs no data movement between lanes.
//   - byte permutes: from registers 2 a and 2 a + 1 (keys 8 (2 a) + 2 t + {0, 1} and
//     8 (2 a + 1) + 2 t + {0, 1}), one dim's 4 bytes: V^T columns 16 a + 4 t .. 16 a + 4 t + 3
//     of that dim's row.
//   - stmatrix.x4 (not transposed): register m of lane l is row j of matrix m, its 4 bytes
//     that row's columns 4 t .. 4 t + 3; lane l addresses row l % 8 of matrix l / 8.
//     Matrix m holds columns 32 g + 16 (m / 2) .. + 15 of V^T rows 16 c + store_dim(m, r).
struct VtUnit {
  int group;  // g
  int dim;    // 16 c

  // The key of half `half` of register m of lane `lane` after ldmatrix.
  __host__ __device__ __forceinline__ int key(int m, int lane, int half) const {
    return 32 * group + 8 * m + 2 * (lane % 4) + half;
  }
  // Row r (0..7) of stmatrix matrix m: dims 2 r and 2 r + 1 of the chunk are rows of matrices
  // 0 and 1 (2 and 3), the odd one first for r >= 4, so that each matrix's 8 rows have 8
  // residues mod 8: 8 distinct 16-byte bank groups under the V^T tile's swizzle (dims
  // 0, 2, 4, 6, 9, 11, 13, 15 would otherwise be 0, 2, 4, 6, 0, 2, 4, 6: two-way conflicts).
  __host__ __device__ __forceinline__ static int store_dim(int m, int r) {
    return 2 * r + ((m % 2) ^ (r / 4));
  }
  // The byte permute of register m of lane `lane`, from ldmatrix registers 2 (m / 2) (x) and
  // 2 (m / 2) + 1 (y): the bytes of dim 16 c + store_dim(m, j), keys x.h0, x.h1, y.h0, y.h1
  // (bytes 0, 2, 4, 6 for the chunk's even dims, 1, 3, 5, 7 for its odd ones).
  __host__ __device__ __forceinline__ static uint32_t selector(int m, int lane) {
    return store_dim(m, lane / 4) % 2 ? 0x7531 : 0x6420;
  }
};

// Lane `lane`'s ldmatrix and stmatrix addresses (element offsets in the V and V^T tiles) for
// the units of one 16-dim chunk: group 0's, computed once a chunk, then moved to group g.
//   - ldmatrix: key 32 g + lane, 32 g rows further: whole swizzle patterns (a multiple of
//     1024 bytes), so the swizzle's XOR, of bits 7 and up into the chunk index, is unchanged.
//   - stmatrix: V^T row 16 c + store_dim(lane / 8, lane % 8), columns 32 g + 16 (lane / 16)
//     on: within the row's one swizzled span (kBlockN bytes), and 32 g sets bits of the chunk
//     index that are 0 at g = 0 and that the swizzle XORs (address bits 5-6, or 5 at 64 keys),
//     so the move is an XOR of 32 g.
template <class VTile, class VtTile>
struct VtChunkAddresses {
  int load, store;  // group 0's

  __host__ __device__ __forceinline__ VtChunkAddresses(int lane, int dim)
      : load(VTile::chunk_offset(lane, dim)),
        store(VtTile::chunk_offset(dim + VtUnit::store_dim(lane / 8, lane % 8), 16 * (lane / 16))) {
  }
  __host__ __device__ __forceinline__ int load_offset(int group) const {
    return load + 32 * group * VTile::kBoxColumns;
  }
  __host__ __device__ __forceinline__ int store_offset(int group) const {
    return store ^ (32 * group);
  }

  static_assert(sizeof(typename VTile::Element) == 1 && sizeof(typename VtTile::Element) == 1,
                "e4m3 tiles: offsets are bytes");
  static_assert(VTile::kBoxColumns * 32 % 1024 == 0, "32 V rows: whole swizzle patterns");
  static_assert(VtTile::kColumnBoxes == 1, "a V^T row is one swizzled span");
};

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
