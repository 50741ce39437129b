"""Kernels to profile under Nsight Compute, launched through JAX as a user would.

  ncu -k regex:rms_norm python3 benchmarks/tools/ncu_targets.py norm
  ncu -k regex:attention_forward python3 benchmarks/tools/ncu_targets.py prefill

norm: ours and XLA's RMSNorm and RMSNorm + residual, 2 calls each (16384 x 4096 bf16);
prefill: one d128 attention, B2 x 8k, 16 heads, full.

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
else:
  q, k, v = (rand(i, (2, 8192, 16, 128)) for i in range(3))
  jax.block_until_ready(
    jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, scale=1 / math.sqrt(128)))(q, k, v)
  )
