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
#include <string>

#include "common/mlp_ffi.h"
#include "cuda/dtypes.cuh"

namespace jax_fmha::cuda {
namespace {

// N consecutive elements. When they fill whole 16-byte words, the pack is 16-byte aligned
// and a copy is one 16-byte load or store per word (the address must then be aligned).
template <typename U, int N>
struct alignas(N * sizeof(U) % 16 == 0 ? 16 : alignof(U)) Pack {
  U v[N];
};

template <int N, typename U>
__device__ __forceinline__ Pack<U, N> load(const U* p) {
  return *reinterpret_cast<const Pack<U, N>*>(p);
}

template <int N, typename U>
__device__ __forceinline__ void store(U* p, const Pack<U, N>& x) {
  *reinterpret_cast<Pack<U, N>*>(p) = x;
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

ffi::Error launch_status(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_fmha: launching ") + kernel +
                              " failed: " + cudaGetErrorString(err));
}

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
  return launch_status("the GLU kernel");
}

// ---- RMSNorm (+ residual) -----------------------------------------------------------
// blockDim.x threads (a multiple of 32) per row, blockDim.y rows per block. Pass 1 reads
// the row (x, or x + residual, rounded and stored as h) and reduces its sum of squares in
// float32; pass 2 scales it. Each thread keeps its first kCachedVectors vectors of the row
// in registers between the passes, which covers rows of up to 1024 * kCachedVectors
// vectors (32768 bf16 elements); beyond that the rest is read again (from L2, mostly).

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

template <typename T, typename W, int V, bool kResidual>
__global__ void rms_norm_kernel(RmsNormProblem p) {
  __shared__ float warp_sums[32];
  const T* x = static_cast<const T*>(p.x);
  const T* residual = static_cast<const T*>(p.residual);
  const W* weight = static_cast<const W*>(p.weight);
  T* y = static_cast<T*>(p.y);
  T* h = static_cast<T*>(p.h);
  const int64_t vectors = p.hidden / V;

  // The rows of a block advance together: row_sum synchronizes the block.
  for (int64_t first_row = int64_t(blockIdx.x) * blockDim.y; first_row < p.rows;
       first_row += int64_t(gridDim.x) * blockDim.y) {
    const int64_t row = first_row + threadIdx.y;
    const int64_t vectors_here = row < p.rows ? vectors : 0;  // a row past the end: none
    const int64_t offset = row * p.hidden;

    // The row that is normalized: x, or h = x + residual rounded to T (stored here).
    const auto load_source = [&](int64_t c) {
      Pack<T, V> v = load<V>(x + offset + c * V);
      if constexpr (kResidual) {
        const Pack<T, V> res = load<V>(residual + offset + c * V);
#pragma unroll
        for (int i = 0; i < V; ++i) v.v[i] = from_float<T>(to_float(v.v[i]) + to_float(res.v[i]));
        store<V>(h + offset + c * V, v);
      }
      return v;
    };
    const auto add_squares = [](const Pack<T, V>& v, float& sum) {
#pragma unroll
      for (int i = 0; i < V; ++i) sum += to_float(v.v[i]) * to_float(v.v[i]);
    };

    Pack<T, V> cached[kCachedVectors];
    float sum_squares = 0.f;
#pragma unroll
    for (int k = 0; k < kCachedVectors; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
      if (c < vectors_here) {
        cached[k] = load_source(c);
        add_squares(cached[k], sum_squares);
      }
    }
    for (int64_t c = threadIdx.x + int64_t(kCachedVectors) * blockDim.x; c < vectors_here;
         c += blockDim.x)
      add_squares(load_source(c), sum_squares);

    const float inv_rms = rsqrtf(row_sum(sum_squares, warp_sums) / float(p.hidden) + p.eps);
    const auto store_normalized = [&](int64_t c, const Pack<T, V>& v) {
      const Pack<W, V> w = load<V>(weight + c * V);
      Pack<T, V> out;
#pragma unroll
      for (int i = 0; i < V; ++i)
        out.v[i] = from_float<T>(to_float(v.v[i]) * inv_rms * (to_float(w.v[i]) + p.weight_offset));
      store<V>(y + offset + c * V, out);
    };
#pragma unroll
    for (int k = 0; k < kCachedVectors; ++k) {
      const int64_t c = threadIdx.x + int64_t(k) * blockDim.x;
      if (c < vectors_here) store_normalized(c, cached[k]);
    }
    // Vectors past the cache: read again, h (this thread stored it in pass 1) or x.
    const T* source = kResidual ? h : x;
    for (int64_t c = threadIdx.x + int64_t(kCachedVectors) * blockDim.x; c < vectors_here;
         c += blockDim.x)
      store_normalized(c, load<V>(source + offset + c * V));
  }
}

template <typename T, typename W, int V, bool kResidual>
void launch_rms_norm(cudaStream_t stream, const RmsNormProblem& p) {
  // About 4 vectors per thread: enough loads in flight per thread, and blocks small enough
  // for many per SM. At least 128 threads per block.
  const int64_t vectors = p.hidden / V;
  const int64_t threads_per_row = std::clamp<int64_t>(next_pow2(ceil_div(vectors, 4)), 32, 1024);
  const int64_t rows_per_block = std::max<int64_t>(1, 128 / threads_per_row);
  const dim3 block{unsigned(threads_per_row), unsigned(rows_per_block)};
  const dim3 grid(unsigned(std::min(ceil_div(p.rows, rows_per_block), kMaxGridX)));
  rms_norm_kernel<T, W, V, kResidual><<<grid, block, 0, stream>>>(p);
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
  return launch_status("the RMSNorm kernel");
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
