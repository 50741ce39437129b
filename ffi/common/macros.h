// Macros shared by the host and device code of every backend.
#pragma once

// Functions callable from host code and, when compiled by nvcc, from device code.
#if defined(__CUDACC__)
#define FMHA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FMHA_HOST_DEVICE inline
#endif
