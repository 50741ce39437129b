"""FP8 attention accuracy on the GPU: ours (e4m3 q, k, v; and e4m3 q, k with bf16 v) beside
cuDNN's FP8 attention and our bf16 kernel, against a float64 reference, on the error
model's inputs (docs/design/fp8_attention.md): standard normal with 4 of the head dim's
channels 10x larger, quantized with one scale per tensor (the only form cuDNN takes).

  python3 benchmarks/tools/fp8_accuracy.py [--seq 2048] [--heads 8] [--head-dim 128]

Each row: relative RMS error ||out - ref|| / ||ref|| and max |out - ref| / max |ref|,
against the reference on the dequantized inputs (the kernel's own error: the output's
rounding, P's rounding with FP8 v, FP8 wgmma's accumulation) and on the unquantized inputs
(what FP8 costs). cuDNN's output is e4m3 (scale 1): its own error includes that rounding.
Our bf16 row runs on the dequantized values rounded to bfloat16, so its error against them
includes that input rounding.
"""

import argparse
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_fmha

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]
from attention import cudnn_fp8_fn, per_tensor_e4m3  # noqa: E402

import numpy_reference as ref  # noqa: E402


def outlier_inputs(rng, shape):
  x = rng.standard_normal(shape)
  x[..., rng.choice(shape[-1], 4, replace=False)] *= 10.0
  return x


def errors(out, expected):
  out = np.asarray(out, np.float64)
  return (
    np.linalg.norm(out - expected) / np.linalg.norm(expected),
    np.abs(out - expected).max() / np.abs(expected).max(),
  )


def report(rng, shape, scale, causal):
  """One masking: fresh inputs, each implementation's errors."""
  exact = {n: outlier_inputs(rng, shape) for n in "qkv"}
  bf16 = {n: jnp.asarray(x, jnp.bfloat16) for n, x in exact.items()}
  x = {}
  for n in "qkv":
    x[n], x[f"{n}_scale"] = per_tensor_e4m3(bf16[n])
  deq = {n: np.asarray(x[n], np.float64) * float(x[f"{n}_scale"]) for n in "qkv"}
  unq = {n: np.asarray(bf16[n], np.float64) for n in "qkv"}
  ref_deq = ref.dense(deq["q"], deq["k"], deq["v"], causal=causal)[0]
  ref_unq = ref.dense(unq["q"], unq["k"], unq["v"], causal=causal)[0]
  scales = {f"{n}_scale": x[f"{n}_scale"] for n in "qkv"}
  runs = {
    "jax_fmha FP8 (e4m3 v)": lambda: jax_fmha.attention(
      x["q"], x["k"], x["v"], causal=causal, **scales
    ),
    "jax_fmha FP8 Q K^T, bf16 v": lambda: jax_fmha.attention(
      x["q"],
      x["k"],
      jnp.asarray(deq["v"], jnp.bfloat16),
      q_scale=x["q_scale"],
      k_scale=x["k_scale"],
      causal=causal,
    ),
    "cuDNN FP8": lambda: cudnn_fp8_fn(causal, scale)(x),
    "jax_fmha bf16 (dequantized)": lambda: jax_fmha.attention(
      *(jnp.asarray(deq[n], jnp.bfloat16) for n in "qkv"), causal=causal
    ),
  }
  print(f"causal={causal}")
  for name, run in runs.items():
    try:
      out = jax.block_until_ready(jax.jit(run)())
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
      print(f"  {name:28s} failed: {type(e).__name__}: {str(e)[:120]}")
      continue
    (d_rms, d_max), (u_rms, u_max) = errors(out, ref_deq), errors(out, ref_unq)
    print(f"  {name:28s} {d_rms:12.2e} ({d_max:8.2e})    {u_rms:12.2e} ({u_max:8.2e})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=128)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  shape = (1, args.seq, args.heads, args.head_dim)
  scale = 1.0 / math.sqrt(args.head_dim)
  print(jax.devices()[0].device_kind, shape, "e4m3fn per-tensor scales")
  print(f"{'':30s} {'vs dequantized: RMS (max)':>28s} {'vs unquantized: RMS (max)':>28s}")
  for causal in (False, True):
    report(rng, shape, scale, causal)


if __name__ == "__main__":
  main()
