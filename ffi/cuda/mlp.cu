// CUDA kernels of the fused MLP ops (GLU activations, RMSNorm, RMSNorm + residual).
//
// Memory-bound and row-wise: each element is read once and written once. Threads move
// 16 bytes at a time ("vectors") when the row length and every pointer allow it, else one
// element at a time (the same kernels with a vector width of 1). float32 arithmetic, one
// rounding (to nearest even) at each store. No allocation, no synchronization: the
// handlers only launch on XLA's stream, so they are safe to capture in CUDA graphs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/mlp_ffi.h"
#include "cuda/common/dtypes.cuh"
#include "cuda/common/launch_check.h"

namespace jax_fmha::cuda {
namespace {

// N consecutive elements. When they fill whole 16-byte words, the pack is 16-byte aligned
// and a copy is one 16-byte load or store per word (the address must then be aligned).
template <typename U, int N>
struct alignas(N * sizeof(U) % 16 == 0 ? 16 : alignof(U)) Pack {
  U v[N];
};

// A pack of whole 16-byte words moves as uint4 words: copied as a struct, some
// instantiations compiled to four 4-byte accesses.
template <int N, typename U>
__device__ __forceinline__ Pack<U, N> load(const U* p) {
  Pack<U, N> x;
  if constexpr (sizeof(x) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(x) / 16); ++i)
      reinterpret_cast<uint4*>(&x)[i] = reinterpret_cast<const uint4*>(p)[i];
  } else {
    x = *reinterpret_cast<const Pack<U, N>*>(p);
  }
  return x;
}

template <int N, typename U>
__device__ __forceinline__ void store(U* p, const Pack<U, N>& x) {
  if constexpr (sizeof(x) % 16 == 0) {
#pragma unroll
    for (int i = 0; i < int(sizeof(x) / 16); ++i)
      reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(&x)[i];
  } else {
    *reinterpret_cast<Pack<U, N>*>(p) = x;
  }
}

// Elements of T in a 16-byte vector.
template <typename T>
constexpr int kVectorWidth = 16 / sizeof(T);

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

constexpr int64_t kMaxGridX = 0x7fffffff;  // the kernels loop over what a grid does not cover
constexpr int64_t kMaxGridY = 65535;

// ---- GLU ----------------------------------------------------------------------------
// Thread (x, y) of the grid computes vector x of row y: a block is blockDim.y rows of
// blockDim.x vectors, shaped to the row so that short rows do not leave threads idle.

template <typename T, Activation A, bool kInterleaved, int V>
__global__ void glu_kernel(GluProblem p) {
  constexpr int64_t kStep = kInterleaved ? 2 : 1;
  const T* gate = static_cast<const T*>(p.gate);
  const T* up = static_cast<const T*>(p.up);
  T* out = static_cast<T*>(p.out);
  const int64_t vectors = p.hidden / V;
  for (int64_t r = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; r < p.rows;
       r += int64_t(gridDim.y) * blockDim.y) {
    for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < vectors;
         c += int64_t(gridDim.x) * blockDim.x) {
      const int64_t in = r * p.row_stride + c * V * kStep;
      Pack<T, V> o;
      if constexpr (kInterleaved) {  // one load brings both: g0, u0, g1, u1, ...
        const Pack<T, 2 * V> gu = load<2 * V>(gate + in);
#pragma unroll
        for (int i = 0; i < V; ++i)
          o.v[i] = from_float<T>(activate<A>(to_float(gu.v[2 * i])) * to_float(gu.v[2 * i + 1]));
      } else {
        const Pack<T, V> g = load<V>(gate + in);
        const Pack<T, V> u = load<V>(up + in);
#pragma unroll
        for (int i = 0; i < V; ++i)
          o.v[i] = from_float<T>(activate<A>(to_float(g.v[i])) * to_float(u.v[i]));
      }
      store<V>(out + r * p.hidden + c * V, o);
    }
  }
}

template <typename T, Activation A, bool kInterleaved, int V>
void launch_glu(cudaStream_t stream, const GluProblem& p) {
  constexpr int64_t kThreads = 256;
  const int64_t vectors = p.hidden / V;
  const int64_t block_x = std::min(kThreads, next_pow2(vectors));
  const int64_t block_y = kThreads / block_x;
  const dim3 block{unsigned(block_x), unsigned(block_y)};
  const dim3 grid(unsigned(std::min(ceil_div(vectors, block_x), kMaxGridX)),
                  unsigned(std::min(ceil_div(p.rows, block_y), kMaxGridY)));
  glu_kernel<T, A, kInterleaved, V><<<grid, block, 0, stream>>>(p);
}

ffi::Error run_glu(cudaStream_t stream, const GluProblem& p) {
  if (p.rows == 0 || p.hidden == 0) return ffi::Error::Success();
  dispatch_dtype<float, __nv_bfloat16, __half>(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    constexpr int V = kVectorWidth<T>;
    // Interleaved rows are read through gate alone (up is gate + 1 element).
    const bool vectorized = p.hidden % V == 0 && aligned16(p.gate) && aligned16(p.out) &&
                            (p.interleaved || aligned16(p.up));
    dispatch_activation(p.activation, [&](auto activation) {
      dispatch_bool(p.interleaved, [&](auto interleaved) {
        constexpr Activation A = decltype(activation)::value;
        constexpr bool kInterleaved = decltype(interleaved)::value;
        if (vectorized) return launch_glu<T, A, kInterleaved, V>(stream, p);
        launch_glu<T, A, kInterleaved, 1>(stream, p);
      });
    });
  });
  return check_launch("glu (CUDA)", "launching the GLU kernel");
}

// ---- RMSNorm (+ residual) -----------------------------------------------------------
// blockDim.x threads (a multiple of 32) per row, blockDim.y rows per block. Pass 1 reads
// the row (x, or x + residual, rounded and stored as h) and reduces its sum of squares in
// float32; pass 2 scales it. Each thread keeps its first kCached vectors of the row in
// registers between the passes, which covers rows of up to kMaxRowThreads * kCached
// vectors (16384 bf16 elements); beyond that the rest is read again (from L2, mostly).
//
// The op is memory-bound, so what matters is the bytes in flight per SM. Every load of a
// pass is issued before the first arithmetic: the compiler cannot move a load of x or
// residual above a store of h (the pointers may alias, for all it knows), so a loop that
// loads, adds and stores one vector at a time keeps one vector of each in flight. The
// weights are read in pass 2 (L1 hits, mostly): held from pass 1 on, their registers cost
// more in occupancy than their latency (3.4 vs 3.9 TB/s for rms_norm, 16384 x 4096 bf16 on
// an H200; docs/design/mlp_kernels.md).

constexpr int kCachedVectors = 4;

// Sum of v over the blockDim.x threads of each row. Every thread of the block calls it.
__device__ float row_sum(float v, float* warp_sums) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return v;
  __syncthreads();  // the previous row's reads of warp_sums are done
  if (threadIdx.x % 32 == 0) warp_sums[(threadIdx.y * blockDim.x + threadIdx.x) / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps_per_row; ++w) total += warp_sums[threadIdx.y * warps_per_row + w];
  return total;
}

template <typename T, int V>
__device__ __forceinline__ void add_squares(const Pack<T, V>& v, float& sum) {
#pragma unroll
  for (int i = 0; i < V; ++i) sum += to_float(v.v[i]) * to_float(v.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> add_rounded(const Pack<T, V>& a, const Pack<T, V>& b) {
  Pack<T, V> s;
#pragma unroll
  for (int i = 0; i < V; ++i) s.v[i] = from_float<T>(to_float(a.v[i]) + to_float(b.v[i]));
  return s;
}

// At most kMaxRowThreads threads a block: the bound keeps every instantiation's registers
// within what a block of that size may take (1024 threads of 72+ registers cannot launch).
constexpr int kMaxRowThreads = 512;

template <typename T, typename W, int V, int kCached, bool kResidual>
__global__ void __launch_bounds__(kMaxRowThreads) rms_norm_kernel(RmsNormProblem p) {
  __shared__ float warp_sums[32];
  const W* __restrict__ weight = static_cast<const W*>(p.weight);
  // Columns are counted in vectors, in 32 bits (hidden < 2^31); vector k of the thread's
  // cache is column threadIdx.x + k * blockDim.x.
  const int vectors = int(p.hidden / V);
  const int tid = threadIdx.x, step = blockDim.x;

  // The rows of a block advance together: row_sum synchronizes the block.
  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const int vectors_here = row < p.rows ? vectors : 0;  // a row past the end: none
    const int64_t offset = row * p.hidden;
    const T* __restrict__ x = static_cast<const T*>(p.x) + offset;
    const T* __restrict__ residual = static_cast<const T*>(p.residual) + offset;
    T* __restrict__ y = static_cast<T*>(p.y) + offset;
    T* __restrict__ h = static_cast<T*>(p.h) + offset;

    // Pass 1 over the cached vectors: the row that is normalized, x or h = x + residual.
    Pack<T, V> cached[kCached];
#pragma unroll
    for (int k = 0; k < kCached; ++k)
      if (tid + k * step < vectors_here) cached[k] = load<V>(x + (tid + k * step) * V);
    if constexpr (kResidual) {
      Pack<T, V> res[kCached];
#pragma unroll
      for (int k = 0; k < kCached; ++k)
        if (tid + k * step < vectors_here) res[k] = load<V>(residual + (tid + k * step) * V);
#pragma unroll
      for (int k = 0; k < kCached; ++k)
        if (tid + k * step < vectors_here) {
          cached[k] = add_rounded(cached[k], res[k]);
          store<V>(h + (tid + k * step) * V, cached[k]);
        }
    }
    float sum_squares = 0.f;
#pragma unroll
    for (int k = 0; k < kCached; ++k)
      if (tid + k * step < vectors_here) add_squares(cached[k], sum_squares);
    // Pass 1 past the cache (rows over kMaxRowThreads * kCached vectors).
    for (int c = tid + kCached * step; c < vectors_here; c += step) {
      Pack<T, V> v = load<V>(x + c * V);
      if constexpr (kResidual) {
        v = add_rounded(v, load<V>(residual + c * V));
        store<V>(h + c * V, v);
      }
      add_squares(v, sum_squares);
    }

    const float inv_rms = rsqrtf(row_sum(sum_squares, warp_sums) / float(p.hidden) + p.eps);
    const auto store_normalized = [&](int c, const Pack<T, V>& v, const Pack<W, V>& w) {
      Pack<T, V> out;
#pragma unroll
      for (int i = 0; i < V; ++i)
        out.v[i] = from_float<T>(to_float(v.v[i]) * inv_rms * (to_float(w.v[i]) + p.weight_offset));
      store<V>(y + c * V, out);
    };
#pragma unroll
    for (int k = 0; k < kCached; ++k)
      if (tid + k * step < vectors_here)
        store_normalized(tid + k * step, cached[k], load<V>(weight + (tid + k * step) * V));
    // Vectors past the cache: read again, h (this thread stored it in pass 1) or x.
    const T* source = kResidual ? h : x;
    for (int c = tid + kCached * step; c < vectors_here; c += step)
      store_normalized(c, load<V>(source + c * V), load<V>(weight + c * V));
  }
}

template <typename T, typename W, int V, int kCached, bool kResidual>
void launch_rms_norm_rows(cudaStream_t stream, const RmsNormProblem& p) {
  // About kCached vectors per thread: enough loads in flight per thread, and blocks small
  // enough for many per SM. At least 128 threads per block.
  const int64_t vectors = p.hidden / V;
  const int64_t threads_per_row =
      std::clamp<int64_t>(next_pow2(ceil_div(vectors, kCached)), 32, kMaxRowThreads);
  const int64_t rows_per_block = std::max<int64_t>(1, 128 / threads_per_row);
  const dim3 block{unsigned(threads_per_row), unsigned(rows_per_block)};
  const dim3 grid(unsigned(std::min(ceil_div(p.rows, rows_per_block), kMaxGridX)));
  rms_norm_kernel<T, W, V, kCached, kResidual><<<grid, block, 0, stream>>>(p);
}

template <typename T, typename W, int V, bool kResidual>
void launch_rms_norm(cudaStream_t stream, const RmsNormProblem& p) {
  // Shapes measured on an H200 (docs/design/mlp_kernels.md): the residual op, which loads two
  // vectors per cached one, runs at memcpy speed with 2 vectors x 256 threads, steadier than
  // 4 x 128; so it caches 2 vectors a thread while the row fits 2 x 512 vectors, 4 above.
  // rms_norm keeps 4 x 128, as fast as the best other shape.
  if constexpr (kResidual) {
    if (p.hidden / V <= 2 * kMaxRowThreads)
      return launch_rms_norm_rows<T, W, V, 2, kResidual>(stream, p);
  }
  launch_rms_norm_rows<T, W, V, kCachedVectors, kResidual>(stream, p);
}

ffi::Error run_rms_norm(cudaStream_t stream, const RmsNormProblem& p) {
  if (p.rows == 0 || p.hidden == 0) return ffi::Error::Success();
  dispatch_dtype<float, __nv_bfloat16, __half>(p.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    constexpr int V = kVectorWidth<T>;
    const bool vectorized = p.hidden % V == 0 && aligned16(p.x) && aligned16(p.weight) &&
                            aligned16(p.y) && (!p.residual || aligned16(p.residual)) &&
                            (!p.h || aligned16(p.h));
    dispatch_bool(p.residual != nullptr, [&](auto residual) {
      constexpr bool kResidual = decltype(residual)::value;
      const auto launch = [&](auto weight_type) {
        using W = typename decltype(weight_type)::type;
        if (vectorized) return launch_rms_norm<T, W, V, kResidual>(stream, p);
        launch_rms_norm<T, W, 1, kResidual>(stream, p);
      };
      if (p.weight_dtype == ffi::DataType::F32) return launch(Tag<float>{});
      launch(Tag<T>{});
    });
  });
  return check_launch("rms_norm (CUDA)", "launching the RMSNorm kernel");
}

}  // namespace
}  // namespace jax_fmha::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaGluCuda, (jax_fmha::glu_handler<cudaStream_t, jax_fmha::cuda::run_glu>),
    jax_fmha::bind_glu(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaRmsNormCuda, (jax_fmha::rms_norm_handler<cudaStream_t, jax_fmha::cuda::run_rms_norm>),
    jax_fmha::bind_rms_norm(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxFmhaRmsNormResidualCuda,
    (jax_fmha::rms_norm_residual_handler<cudaStream_t, jax_fmha::cuda::run_rms_norm>),
    jax_fmha::bind_rms_norm_residual(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
