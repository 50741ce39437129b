// Host check of the Hopper kernel's FP8 P V data path (run by tests/test_fp8_pv_layout.py):
// the producer's V transpose and the consumers' P packing (cuda/sm90/fp8_pv_layout.cuh, the
// maps the kernel runs) against CuTe's layouts of the products (the layouts the kernel's
// wgmma descriptors and fragments come from). For each head dim, a V tile of random bytes is
// transposed unit by unit as transpose_v does; then for every consumer thread and byte of its
// A fragment, the key whose probability it packs must be the key whose values the V^T tile
// holds in the column that byte multiplies (through the P V atom's A layout and the V^T
// tile's layout), for every dim; keys at or past the block's last are zeros.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/sm90/fp8_pv_layout.cuh"
#include "cuda/sm90/kernel_traits.cuh"

using namespace jax_fmha::cuda;

template <int kHeadDim>
int check(int valid) {
  using Traits = HopperTraits<__nv_fp8_e4m3, kHeadDim, __nv_fp8_e4m3>;
  using VTile = typename Traits::VTile;
  using VtTile = typename Traits::VtTile;
  constexpr int kBlockN = Traits::kBlockN;
  std::vector<unsigned char> v(VTile::kBytes), vt(VtTile::kBytes, 0xEE), value(kBlockN * kHeadDim);
  for (int k = 0; k < kBlockN; ++k)
    for (int d = 0; d < kHeadDim; ++d) {
      value[k * kHeadDim + d] = static_cast<unsigned char>(rand());
      v[VTile::offset(k, d & ~15) + (d & 15)] = value[k * kHeadDim + d];
    }
  // transpose_v's units (their order does not matter: they write disjoint matrices), each
  // as its warp runs it: ldmatrix.x4.trans (lane l addresses row l % 8 of matrix l / 8; lane
  // l receives, of each matrix, 16-bit elements (2 (l % 4) + h, l / 4) of its rows, h = 0, 1),
  // the keys past `valid` masked, the byte permutes, stmatrix.x4 (lane l's register m is
  // row l / 4 of matrix m, columns 4 (l % 4) .. 4 (l % 4) + 3 of its 16 bytes).
  for (int unit = 0; unit < kBlockN / 32 * (kHeadDim / 16); ++unit) {
    const VtUnit u{unit % (kBlockN / 32), unit / (kBlockN / 32) * 16};
    std::vector<VtChunkAddresses<VTile, VtTile>> at;
    for (int lane = 0; lane < 32; ++lane) at.emplace_back(lane, u.dim);
    uint32_t x[32][4], y[32][4];
    for (int lane = 0; lane < 32; ++lane)
      for (int m = 0; m < 4; ++m) {
        x[lane][m] = 0;
        for (int h = 0; h < 2; ++h) {
          const int row = 8 * m + 2 * (lane % 4) + h;  // the lane whose address holds it
          uint16_t element;
          std::memcpy(&element, &v[at[row].load_offset(u.group) + 2 * (lane / 4)], 2);
          if (u.key(m, lane, h) < valid) x[lane][m] |= uint32_t(element) << (16 * h);
        }
      }
    for (int lane = 0; lane < 32; ++lane)
      for (int m = 0; m < 4; ++m)
        y[lane][m] =
            byte_perm(x[lane][m / 2 * 2], x[lane][m / 2 * 2 + 1], VtUnit::selector(m, lane));
    for (int lane = 0; lane < 32; ++lane)  // row lane % 8 of matrix lane / 8: from 4 lanes
      for (int t = 0; t < 4; ++t)
        std::memcpy(&vt[at[lane].store_offset(u.group) + 4 * t], &y[4 * (lane % 8) + t][lane / 8],
                    4);
  }
  using PvAtom = typename Traits::MmaPV::Atom;
  const typename PvAtom::LayoutA_TV a_layout{};    // (thread, value) -> row + 64 column
  const typename Traits::SmemLayoutVt b_layout{};  // (dim, column) -> V^T tile element
  static_assert(cute::size<1>(typename PvAtom::LayoutA_TV{}) == 16, "an e4m3 k32 A fragment");
  int errors = 0;
  const auto check_chunk_offsets = [&](auto tile, int rows, int columns) {
    using Tile = decltype(tile);
    for (int row = 0; row < rows; ++row)
      for (int col = 0; col < columns; col += 16)
        if (Tile::chunk_offset(row, col) != Tile::offset(row, col) && errors++ < 8)
          printf("d%d: chunk_offset(%d, %d) = %d, offset %d\n", kHeadDim, row, col,
                 Tile::chunk_offset(row, col), Tile::offset(row, col));
  };
  check_chunk_offsets(VTile{}, kBlockN, kHeadDim);
  check_chunk_offsets(VtTile{}, kHeadDim, kBlockN);
  for (int thread = 0; thread < 128; ++thread) {
    const int warp = thread / 32, g = thread % 32 / 4, t = thread % 4;
    for (int step = 0; step < kBlockN / 32; ++step)
      for (int reg = 0; reg < 4; ++reg)
        for (int byte = 0; byte < 4; ++byte) {
          // pack_probabilities: S's element `element` of atom 4 step + `atom`, which the
          // accumulator layout gives key 8 j + 2 t + e % 2 of row g + 8 (e / 2).
          const ProbabilitySlot slot = fp8_probability_slot(reg, byte);
          const int key = 8 * (4 * step + slot.atom) + 2 * t + slot.element % 2;
          const int row = 16 * warp + g + 8 * (slot.element / 2);
          const int mk = int(a_layout(thread, 4 * reg + byte));
          const int column = 32 * step + mk / 64;
          if (mk % 64 != row && errors++ < 8)
            printf("d%d: thread %d byte %d of register %d: row %d, packed row %d\n", kHeadDim,
                   thread, byte, reg, mk % 64, row);
          for (int d = 0; d < kHeadDim; ++d) {
            const int got = vt[int(b_layout(d, column))];
            const int want = key < valid ? value[key * kHeadDim + d] : 0;
            if (got != want && errors++ < 8)
              printf("d%d: V^T(%d, %d) = %d, key %d's value %d\n", kHeadDim, d, column, got, key,
                     want);
          }
        }
  }
  printf("d%d, %d valid keys of %d: %d errors\n", kHeadDim, valid, kBlockN, errors);
  return errors;
}

int main() {
  int errors = 0;
  errors += check<64>(128) + check<64>(77);
  errors += check<128>(128) + check<128>(5);
  errors += check<256>(64) + check<256>(33);
  printf(errors ? "FAILED\n" : "ok\n");
  return errors ? 1 : 0;
}
