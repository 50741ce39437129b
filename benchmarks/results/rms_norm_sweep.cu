// Launch-shape sweep of the CUDA RMSNorm kernels, timed outside JAX (notes in
// gpu_session3_h200.md). Compiled on the device against ffi/cuda/mlp.cu, or, with
// -DOLD_KERNEL, against an older copy (.bench_old/mlp_old.cu = `git show 01994cc:ffi/cuda/mlp.cu`),
// of which only the shipped launcher is timed. Call 1 also timed a copy that loaded the
// weights in pass 1 (.bench_old/mlp_lateweights.cu was the pass-2 version now committed):
//   nvcc -O3 -std=c++17 -arch=sm_90a -Iffi -isystem <jaxlib>/include \
//        -DMLP_SOURCE='"cuda/mlp.cu"' benchmarks/results/rms_norm_sweep.cu -o sweep
// Session 4 (gpu_session4_run2.sh) also compiles it against copies of mlp.cu whose 16-byte
// loads and/or stores carry the streaming cache hint (__ldcs / __stcs).
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
