// Host check of the Hopper kernel's FP8 P V data path (run by tests/test_fp8_pv_layout.py):
// the producer's V transpose and the consumers' P packing (cuda/sm90/fp8_pv_layout.cuh, the
// maps the kernel runs) against CuTe's layouts of the products (the layouts the kernel's
// wgmma descriptors and fragments come from). For each head dim, a V tile of random bytes is
// transposed item by item as transpose_v does; then for every consumer thread and byte of its
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
  // transpose_v's items (their order does not matter: they write disjoint words).
  for (int item = 0; item < kBlockN / 4 * (kHeadDim / 16); ++item) {
    const VtItem it = vt_item<kBlockN>(item);
    uint32_t w[4][4];
    for (int i = 0; i < 4; ++i) {
      const int k = it.load_key(i);
      for (int q = 0; q < 4; ++q) {
        w[i][q] = 0;
        if (k < valid) std::memcpy(&w[i][q], &v[VTile::offset(k, it.dim) + 4 * q], 4);
      }
    }
    for (int q = 0; q < 4; ++q) {
      uint32_t out[4];
      transpose4(w[0][q], w[1][q], w[2][q], w[3][q], it.swap, out);
      for (int j = 0; j < 4; ++j)
        std::memcpy(&vt[VtTile::offset(it.dim + 4 * q + j, it.col & ~15) + (it.col & 15)], &out[j],
                    4);
    }
  }
  using PvAtom = typename Traits::MmaPV::Atom;
  const typename PvAtom::LayoutA_TV a_layout{};    // (thread, value) -> row + 64 column
  const typename Traits::SmemLayoutVt b_layout{};  // (dim, column) -> V^T tile element
  static_assert(cute::size<1>(typename PvAtom::LayoutA_TV{}) == 16, "an e4m3 k32 A fragment");
  int errors = 0;
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
