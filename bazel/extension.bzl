"""What the extension is compiled from, and with which flags, as CMakeLists.txt has it.

Plain literals, so that tests/test_bazel_build.py can read them and check that they agree
with CMakeLists.txt (pip's build): a source, a flag or a kernel variant added to one build
and not the other fails that test.
"""

# The sources of nanobind_add_module(_jax_fmha_ext ...): the module and the CPU handlers.
EXTENSION_SRCS = [
    "ffi/module.cc",
    "ffi/cpu/attention.cc",
    "ffi/cpu/kv_cache.cc",
    "ffi/cpu/merge.cc",
    "ffi/cpu/mlp.cc",
]

# The extension's own C++ flags (target_compile_options(_jax_fmha_ext ...)).
EXTENSION_COPTS = [
    "-O3",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
]

# The CPU attention tile kernel: compiled once per instruction set, each into the namespace
# its name gives (JAX_FMHA_CPU_ISA); attention.cc picks the widest the CPU has at run time.
ATTENTION_KERNEL_SRC = "ffi/cpu/attention_kernel.cc"
ATTENTION_KERNEL_COPTS = [
    "-O3",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-Wall",
    "-Wextra",
]

# Instruction set -> its extra flags. "baseline" (the compiler's default target) is built on
# every CPU, the others on x86-64 only.
ATTENTION_KERNEL_ISAS = {
    "baseline": [],
    "avx2": ["-march=x86-64-v3"],
    "avx512": ["-march=x86-64-v4"],
    "avx512bf16": ["-march=x86-64-v4", "-mavx512bf16"],
}

# The CUDA backend: the launchers, and one generated file (from FORWARD_INSTANCE_TEMPLATE)
# per forward kernel and head dim.
CUDA_SRCS = [
    "ffi/cuda/attention.cu",
    "ffi/cuda/kv_cache.cu",
    "ffi/cuda/merge.cu",
    "ffi/cuda/mlp.cu",
]
CUDA_COPTS = ["-O3", "-lineinfo"]
FORWARD_INSTANCE_TEMPLATE = "ffi/cuda/forward_instance.cu.in"

# File name prefix -> (the ForwardKernel value, its header).
FORWARD_KERNELS = {
    "decode": ["kDecode", "cuda/sm80/decode_kernel.cuh"],
    "sm80": ["kPortable", "cuda/sm80/forward_kernel.cuh"],
    "sm90": ["kHopper", "cuda/sm90/forward_kernel.cuh"],
}
FORWARD_HEAD_DIMS = [64, 96, 128, 192, 256]

# FP8 K/V: one file (from FP8_FORWARD_INSTANCE_TEMPLATE) per kernel and head dim, decode and
# portable kernels only.
FP8_FORWARD_INSTANCE_TEMPLATE = "ffi/cuda/forward_fp8_instance.cu.in"
FP8_FORWARD_KERNELS = {
    "decode_fp8": ["kDecode", "cuda/sm80/decode_kernel.cuh"],
    "sm80_fp8": ["kPortable", "cuda/sm80/forward_kernel.cuh"],
}
FP8_FORWARD_HEAD_DIMS = [64, 128, 256]

# FP8 queries: one file (from FP8Q_FORWARD_INSTANCE_TEMPLATE) per head dim of
# FP8_FORWARD_HEAD_DIMS, Hopper kernel only.
FP8Q_FORWARD_INSTANCE_TEMPLATE = "ffi/cuda/forward_fp8q_instance.cu.in"
FP8Q_FORWARD_KERNELS = {
    "sm90_fp8q": ["kHopper", "cuda/sm90/forward_kernel.cuh"],
}
