"""Kernels to profile under Nsight Compute, launched through JAX as a user would.

  ncu -k regex:rms_norm python3 benchmarks/tools/ncu_targets.py norm
  ncu -k regex:attention_forward python3 benchmarks/tools/ncu_targets.py prefill
  ncu -k regex:attention_decode python3 benchmarks/tools/ncu_targets.py decode_fp8

norm: ours and XLA's RMSNorm and RMSNorm + residual, 2 calls each (16384 x 4096 bf16);
prefill: one d128 attention, B2 x 8k, 16 heads, full; prefill_short: B32 x 512 (the short
sequences, where each tile has 4 key blocks);
decode, decode_fp8: one paged decode step, B64 x 4k keys, GQA 32/8, d128, pages of 16, over a
bfloat16 or a float8_e4m3fn cache (the decode suite's first shape).

Add --set full (or the sections wanted) and -o to keep a report.
"""

import math
import sys

import jax
import jax.numpy as jnp

import jax_fmha
from jax_fmha import reference


def rand(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


if sys.argv[1] == "norm":
  x, res, w = rand(0, (16384, 4096)), rand(1, (16384, 4096)), rand(2, (4096,), jnp.float32)
  for fn in (
    jax_fmha.rms_norm_residual,
    reference.rms_norm_residual,
    jax_fmha.rms_norm,
    reference.rms_norm,
  ):
    f = jax.jit(fn)
    args = (x, res, w) if "residual" in fn.__name__ else (x, w)
    for _ in range(2):
      jax.block_until_ready(f(*args))
elif sys.argv[1] in ("decode", "decode_fp8"):
  batch, seq_k, page = 64, 4096, 16
  pages = batch * seq_k // page
  q = rand(0, (batch, 1, 32, 128))
  k, v = (rand(i, (pages, page, 8, 128)) for i in (1, 2))
  scales = {}
  if sys.argv[1] == "decode_fp8":
    k, scales["k_scale"] = jax_fmha.quantize_kv(k, jnp.float8_e4m3fn)
    v, scales["v_scale"] = jax_fmha.quantize_kv(v, jnp.float8_e4m3fn)
  block_table = jnp.arange(pages, dtype=jnp.int32).reshape(batch, -1)
  seq_lens = jnp.full((batch,), seq_k, jnp.int32)
  jax.block_until_ready(
    jax.jit(jax_fmha.attention)(q, k, v, block_table=block_table, seq_lens=seq_lens, **scales)
  )
else:
  shape = (32, 512, 16, 128) if sys.argv[1] == "prefill_short" else (2, 8192, 16, 128)
  q, k, v = (rand(i, shape) for i in range(3))
  jax.block_until_ready(
    jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, scale=1 / math.sqrt(128)))(q, k, v)
  )
