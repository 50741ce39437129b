// TMA (the Hopper tensor memory accelerator) for the K and V arrays: the host builds one
// tensor map per array, the kernel's producer copies boxes of rows with it into swizzled
// shared memory, each copy completing bytes on an mbarrier (sm90/pipeline.cuh).
//
// Every K/V layout is the same 3-D tensor to TMA: (d, KV heads, rows) of the [rows, Hkv, d]
// view of the array (KvView::row gives a key's row). A box is one swizzle span of columns x
// one head x run_rows rows: run_rows is the key block for every layout but pages, and for
// pages the greatest common divisor of the page size and the block, so that a run never
// crosses a page. Columns past the problem's head dim and rows past the array are
// filled with zeros by the copy itself.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <numeric>

#include "common/attention_problem.h"

namespace jax_fmha::cuda {

// The tensor maps of K and V and the rows of a box (kernel parameters: __grid_constant__);
// for the kernel that gathers K/V rows by cp.async instead (small pages), the arrays
// themselves (the maps are not built then).
struct KvTensorMaps {
  CUtensorMap k, v;
  int run_rows;
  const void* k_array = nullptr;
  const void* v_array = nullptr;
};

// Keys of one TMA box: rows that are consecutive in the array for every block.
inline int tma_run_rows(const KvView& kv, int block_n) {
  if (kv.layout != KvLayout::kPaged) return block_n;
  return int(std::gcd(kv.pages.page_size, int64_t(block_n)));  // (a multiple of 16 here)
}

// cuTensorMapEncodeTiled, from the driver the runtime already loaded (the extension does not
// link libcuda: it must import on machines without a GPU).
using EncodeTiledFn = decltype(&cuTensorMapEncodeTiled);
inline cudaError_t encode_tensor_map_fn(EncodeTiledFn* fn) {
  static EncodeTiledFn cached = nullptr;
  static cudaError_t result = [] {
    cudaDriverEntryPointQueryResult status;
    void* entry = nullptr;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry,
                                                             12000, cudaEnableDefault, &status);
    if (err != cudaSuccess) return err;
    if (status != cudaDriverEntryPointSuccess) return cudaErrorSymbolNotFound;
    cached = reinterpret_cast<EncodeTiledFn>(entry);
    return cudaSuccess;
  }();
  *fn = cached;
  return result;
}

// The tensor map of K or V (`base`: the array) for the boxes of run_rows rows of Tile (a
// SwizzledTile of sm90/kernel_traits.cuh: its element type and swizzle span). Returns false
// with a reason in `error` if the driver refuses it.
template <class Tile>
bool make_kv_tensor_map(const AttentionProblem& p, const void* base, int run_rows, CUtensorMap* map,
                        const char** error) {
  EncodeTiledFn encode = nullptr;
  if (encode_tensor_map_fn(&encode) != cudaSuccess) {
    *error = "cuTensorMapEncodeTiled is not available from the CUDA driver";
    return false;
  }
  using Element = typename Tile::Element;
  constexpr cuuint64_t kBytes = sizeof(Element);
  const cuuint64_t dims[3] = {cuuint64_t(p.head_dim), cuuint64_t(p.num_kv_heads),
                              cuuint64_t(p.kv.rows)};
  const cuuint64_t strides[2] = {cuuint64_t(p.head_dim) * kBytes,
                                 cuuint64_t(p.kv_row_stride()) * kBytes};
  const cuuint32_t box[3] = {cuuint32_t(Tile::kBoxColumns), 1, cuuint32_t(run_rows)};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapSwizzle swizzle = Tile::kSwizzleBytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : Tile::kSwizzleBytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                                 : CU_TENSOR_MAP_SWIZZLE_32B;
  // (FP8 is copied as bytes: TMA does not convert.)
  const CUtensorMapDataType type = sizeof(Element) == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8
                                   : std::is_same_v<Element, __half>
                                       ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                       : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult result =
      encode(map, type, 3, const_cast<void*>(base), dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) {
    *error = "cuTensorMapEncodeTiled refused the K/V tensor map";
    return false;
  }
  return true;
}

// Copies the box at (column, head, row) of `map` into shared memory at `smem`; its bytes
// complete on the mbarrier `bar`.
__device__ __forceinline__ void tma_load(const CUtensorMap& map, uint64_t* bar, void* smem,
                                         int column, int head, int row) {
  cute::SM90_TMA_LOAD_3D::copy(&map, bar, uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL), smem,
                               column, head, row);
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap& map) {
  cute::prefetch_tma_descriptor(reinterpret_cast<const cute::TmaDescriptor*>(&map));
}

}  // namespace jax_fmha::cuda
