// Launch-shape sweep of the CUDA RMSNorm kernels, timed outside JAX with CUDA events: the
// shipped launcher, every (vectors cached a thread, threads a row, rows a block) shape of
// rms_norm_kernel, and cudaMemcpy of the same bytes as the ceiling. Build and run on the GPU
// machine from the repository root (or `bash benchmarks/tools/device_run.sh setup sweep`):
//   nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem <jaxlib>/include \
//        -DMLP_SOURCE='"cuda/mlp.cu"' benchmarks/tools/rms_norm_sweep.cu -o /tmp/sweep && /tmp/sweep
// MLP_SOURCE may name a modified copy of ffi/cuda/mlp.cu (a variant to compare). With
// -DOLD_KERNEL only the copy's launcher is timed (for a copy whose kernel template differs).
// Rows 16384 x hidden 4096, bf16 x / residual / y / h, float32 weight. Each line: median
// over 5 batches of 20 back-to-back launches, GB/s of the bytes the op must move.
#include <algorithm>
#include <cstdio>
#include <vector>

#include MLP_SOURCE

using namespace jax_fmha;
using namespace jax_fmha::cuda;
using bf16 = __nv_bfloat16;

template <typename Launch>
float median_ms(Launch launch) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> t;
  for (int batch = 0; batch < 5; ++batch) {
    cudaEventRecord(a);
    for (int i = 0; i < 20; ++i) launch();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / 20);
  }
  std::sort(t.begin(), t.end());
  if (cudaGetLastError() != cudaSuccess) return -1.f;
  return t[2];
}

int main() {
  const int64_t rows = 16384, hidden = 4096, n = rows * hidden;
  void *x, *res, *y, *h, *w;
  cudaMalloc(&x, n * 2); cudaMalloc(&res, n * 2); cudaMalloc(&y, n * 2); cudaMalloc(&h, n * 2);
  cudaMalloc(&w, hidden * 4);
  std::vector<bf16> host(n);
  for (int64_t i = 0; i < n; ++i) host[i] = __float2bfloat16(float((i * 7919) % 2001) / 1000.f - 1.f);
  cudaMemcpy(x, host.data(), n * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(res, host.data(), n * 2, cudaMemcpyHostToDevice);
  std::vector<float> hw(hidden, 1.f);
  cudaMemcpy(w, hw.data(), hidden * 4, cudaMemcpyHostToDevice);
  const double norm_bytes = 2.0 * n * 2, residual_bytes = 4.0 * n * 2;
  const auto report = [](const char* what, double bytes, float ms) {
    std::printf("%-48s %8.4f ms %7.0f GB/s\n", what, ms, bytes / (ms * 1e-3) / 1e9);
  };
  report("cudaMemcpy D2D (read + write the y bytes)", norm_bytes,
         median_ms([&] { cudaMemcpyAsync(y, x, n * 2, cudaMemcpyDeviceToDevice); }));
  report("cudaMemcpy D2D x2 (the y and h bytes)", residual_bytes, median_ms([&] {
           cudaMemcpyAsync(y, x, n * 2, cudaMemcpyDeviceToDevice);
           cudaMemcpyAsync(h, res, n * 2, cudaMemcpyDeviceToDevice);
         }));
  for (int residual = 0; residual < 2; ++residual) {
    RmsNormProblem p{ffi::DataType::BF16, ffi::DataType::F32, rows, hidden, x,
                     residual ? res : nullptr, w, y, residual ? h : nullptr, 1e-6f, 0.f};
    const double bytes = residual ? residual_bytes : norm_bytes;
    report(residual ? "run_rms_norm (shipped launcher), residual" : "run_rms_norm (shipped launcher)",
           bytes, median_ms([&] { (void)run_rms_norm(0, p); }));
#ifndef OLD_KERNEL
    const auto sweep = [&](auto cached, auto kres) {
      constexpr int kCached = decltype(cached)::value;
      constexpr bool kRes = decltype(kres)::value;
      for (int threads : {64, 128, 256, 512}) {
        if (threads * kCached * 8 < hidden || threads * kCached * 8 >= 2 * hidden) continue;
        for (int rows_per_block : {1, 2, 4}) {
          if (threads * rows_per_block > 512) continue;
          const dim3 block(threads, rows_per_block);
          const dim3 grid(unsigned((rows + rows_per_block - 1) / rows_per_block));
          char what[96];
          std::snprintf(what, sizeof what, "  cached %d, %d threads/row, %d rows/block%s", kCached,
                        threads, rows_per_block, kRes ? ", residual" : "");
          report(what, bytes, median_ms([&] {
                   rms_norm_kernel<bf16, float, 8, kCached, kRes><<<grid, block>>>(p);
                 }));
        }
      }
    };
    const auto each_cache = [&](auto kres) {
      sweep(std::integral_constant<int, 1>{}, kres);
      sweep(std::integral_constant<int, 2>{}, kres);
      sweep(std::integral_constant<int, 4>{}, kres);
      sweep(std::integral_constant<int, 8>{}, kres);
    };
    if (residual) each_cache(std::true_type{}); else each_cache(std::false_type{});
#endif
  }
  return 0;
}
