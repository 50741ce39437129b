"""GPU-only tests of the CUDA attention forward (ffi/cuda/attention*), against the float64
NumPy reference (tests/numpy_reference.py).

They call the primitive directly (every layout: dense, packed, contiguous cache, paged;
split-KV partial outputs) so that each mode is exercised whatever the public API exposes.
Skipped when JAX has no GPU.

Also runnable as a script:
  python3 tests/test_attention_gpu.py --memcheck   a small subset of every mode, for
      compute-sanitizer --tool memcheck python3 tests/test_attention_gpu.py --memcheck
  python3 tests/test_attention_gpu.py --time       dense prefill bf16 d128 vs cuDNN
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jax_fmha.attention import attention_fwd

import numpy_reference as ref


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA device")]


# Every test runs on both forward kernels of a Hopper build: the Hopper (wgmma) kernel (what
# an sm_90 device runs by default) and the portable mma.sync kernel (JAX_FMHA_CUDA_FORWARD=portable,
# read by the handler at each call). Elsewhere both runs take the portable kernel.
@pytest.fixture(autouse=True, scope="module", params=["default", "portable"])
def forward_kernel(request):
  before = os.environ.get("JAX_FMHA_CUDA_FORWARD")
  os.environ.pop("JAX_FMHA_CUDA_FORWARD", None)
  if request.param == "portable":
    os.environ["JAX_FMHA_CUDA_FORWARD"] = "portable"
  yield request.param
  os.environ.pop("JAX_FMHA_CUDA_FORWARD", None)
  if before is not None:
    os.environ["JAX_FMHA_CUDA_FORWARD"] = before


def hopper_build_and_device() -> bool:
  import jax_fmha

  archs = jax_fmha.build_info()["cuda_architectures"]
  return (
    any("90a" in a for a in archs) and jax.devices("gpu")[0].compute_capability.split(".")[0] == "9"
  )


def test_forward_kernel_choice(forward_kernel):
  import jax_fmha

  hopper = forward_kernel == "default" and hopper_build_and_device()
  device = jax.devices("gpu")[0]
  assert jax_fmha.build_info()["cuda_forward_kernels"][device.id] == (
    "hopper" if hopper else "portable"
  )


BF16 = np.dtype(jnp.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = [BF16, F16]
OUT_TOL = {BF16: 1.5e-2, F16: 3e-3}  # max |err| <= tol * (1 + max |ref|)
LSE_TOL = 1e-3  # LSE from bf16/fp16 inputs, float32 statistics


def randn(rng, shape, dtype):
  return np.asarray(rng.standard_normal(shape), dtype=dtype)


def gpu(x):
  return None if x is None else jax.device_put(x, jax.devices("gpu")[0])


def run(
  q,
  k,
  v,
  *,
  kv_layout,
  cu_seqlens_q=None,
  cu_seqlens_k=None,
  seq_lens=None,
  block_table=None,
  scale=None,
  softcap=0.0,
  window=(-1, -1),
  num_splits=1,
  max_seqlen_q=None,
):
  """The forward primitive on the GPU; returns NumPy (out, lse)."""
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  if max_seqlen_q is None:
    max_seqlen_q = q.shape[1] if q.ndim == 4 else q.shape[0]
  out, lse = attention_fwd(
    gpu(q),
    gpu(k),
    gpu(v),
    cu_seqlens_q=gpu(cu_seqlens_q),
    cu_seqlens_k=gpu(cu_seqlens_k),
    seq_lens=gpu(seq_lens),
    block_table=gpu(block_table),
    scale=scale,
    softcap=softcap,
    window=window,
    kv_layout=kv_layout,
    num_splits=num_splits,
    max_seqlen_q=max_seqlen_q,
  )
  return np.asarray(out), np.asarray(lse)


def run_paged_merged(q, kp, vp, table, lens, window, num_splits):
  """run() on a paged cache, split partials merged."""
  out, lse = run(
    q,
    kp,
    vp,
    kv_layout="paged",
    seq_lens=lens,
    block_table=table,
    window=window,
    num_splits=num_splits,
  )
  return merge_splits(out, lse) if num_splits > 1 else (out, lse)


def merge_splits(outs, lses):
  """NumPy LSE merge of split partials: outs [S, ...q], lses [S, ...lse] (float64)."""
  outs, lses = outs.astype(np.float64), lses.astype(np.float64)
  top = lses.max(axis=0)
  safe = np.where(np.isneginf(top), 0.0, top)
  w = np.exp(lses - safe)  # [S, ...lse]; empty splits weigh 0
  total = w.sum(axis=0)
  lse = np.where(total > 0, safe + np.log(np.where(total > 0, total, 1.0)), -np.inf)
  lse = np.where(np.isnan(total), np.nan, lse)  # a NaN partial spoils the row, as on device
  # Bring the weights to the output layout: dense lse [B, H, Sq] -> [B, Sq, H, 1];
  # packed lse [H, T] -> [T, H, 1].
  if outs.ndim == 5:
    w_out = w.transpose(0, 1, 3, 2)[..., None]
    t_out = total.transpose(0, 2, 1)[..., None]
  else:
    w_out = w.transpose(0, 2, 1)[..., None]
    t_out = total.T[..., None]
  out = (w_out * outs).sum(axis=0) / np.where(t_out > 0, t_out, 1.0)
  return out, lse


def check(out, lse, ref_out, ref_lse, dtype, what="", out_tol=None):
  """Finite agreement within tolerance (OUT_TOL[dtype], or `out_tol` relative to the same
  scale: a number, or one per output channel); -inf LSE (and 0 rows) exactly where expected."""
  out64 = np.asarray(out, np.float64)
  assert not np.isnan(out64).any(), f"{what}: NaN in output"
  scale = 1.0 + float(np.abs(ref_out).max(initial=0.0))
  err = np.abs(out64 - ref_out)
  tol = OUT_TOL[dtype] if out_tol is None else out_tol
  assert (err <= tol * scale).all(), (
    f"{what}: output error {err.max(initial=0.0):.3g} (scale {scale:.3g})"
  )
  lse = np.asarray(lse, np.float64)
  neg = np.isneginf(ref_lse)
  assert np.array_equal(np.isneginf(lse), neg), f"{what}: -inf LSE pattern differs"
  lerr = float(np.abs(lse[~neg] - ref_lse[~neg]).max(initial=0.0))
  assert lerr <= LSE_TOL * (1 + float(np.abs(ref_lse[~neg]).max(initial=0.0))), (
    f"{what}: LSE error {lerr:.3g}"
  )


def rows_of(lse_neg, dense):
  """Boolean mask of output rows from an LSE mask (dense [B,H,Sq] / packed [H,T])."""
  return lse_neg.transpose(0, 2, 1) if dense else lse_neg.T


# ---------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("d", [64, 80, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_head_dims(rng, dtype, d, causal):
  b, sq, sk, hq, hkv = 2, 133, 257, 4, 2
  q, k, v = (
    randn(rng, (b, sq, hq, d), dtype),
    randn(rng, (b, sk, hkv, d), dtype),
    randn(rng, (b, sk, hkv, d), dtype),
  )
  window = (-1, 0) if causal else (-1, -1)
  out, lse = run(q, k, v, kv_layout="uniform", window=window)
  ro, rl = ref.dense(q, k, v, window=window)
  assert out.dtype == dtype
  check(out, lse, ro, rl, dtype, f"d{d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2), (32, 1)])
@pytest.mark.parametrize("sq,sk", [(1, 1000), (7, 129), (200, 200), (300, 100)])
def test_dense_gqa_causal_shapes(rng, dtype, hq, hkv, sq, sk):
  d = 128
  q, k, v = (
    randn(rng, (2, sq, hq, d), dtype),
    randn(rng, (2, sk, hkv, d), dtype),
    randn(rng, (2, sk, hkv, d), dtype),
  )
  for window in [(-1, -1), (-1, 0)]:
    out, lse = run(q, k, v, kv_layout="uniform", window=window)
    ro, rl = ref.dense(q, k, v, window=window)
    check(out, lse, ro, rl, dtype, f"window {window}")


@pytest.mark.parametrize("d", [64, 96, 192, 256])
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 1000), (7, 129), (129, 7), (1000, 1000)])
def test_odd_lengths_every_head_dim(rng, d, sq, sk):
  """Lengths that are not a multiple of any block, causal with Sq < Sk and Sq > Sk, at the
  head dims the d128 shapes above do not cover."""
  q, k, v = (
    randn(rng, (2, sq, 8, d), BF16),
    randn(rng, (2, sk, 2, d), BF16),
    randn(rng, (2, sk, 2, d), BF16),
  )
  for window in [(-1, -1), (-1, 0)]:
    out, lse = run(q, k, v, kv_layout="uniform", window=window)
    ro, rl = ref.dense(q, k, v, window=window)
    check(out, lse, ro, rl, BF16, f"d{d} sq{sq} sk{sk} window {window}")


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("sq", [1, 300])
def test_huge_scores(rng, d, sq):
  """bfloat16 queries of magnitude 1e30 (scores near 2^100 in the softmax's log2 units,
  where one rounding of scale * score exceeds 2^7): finite outputs, each row the value of
  its top key, beside a row of ordinary magnitude."""
  q, k, v = (
    randn(rng, (2, sq, 8, d), BF16) * np.asarray(1e30, BF16),
    randn(rng, (2, 333, 2, d), BF16),
    randn(rng, (2, 333, 2, d), BF16),
  )
  q[:, :, 1] *= np.asarray(1e-30, BF16)
  for window in [(-1, -1), (-1, 0)]:
    out, lse = run(q, k, v, kv_layout="uniform", window=window)
    ro, rl = ref.dense(q, k, v, window=window)
    check(out, lse, ro, rl, BF16, f"d{d} sq{sq} window {window}")


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("layout", ["cache", "packed", "paged"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_keys_past_the_end_are_never_read(rng, d, layout, num_splits):
  """K/V rows that belong to no key of a sequence (cache slots past seq_lens, rows past the
  last packed sequence, page slots past a sequence's end and unused pages) hold NaN: the
  output must still be finite and match the reference on clean data. Prefill-sized tiles
  (the forward kernels, not the decode one), lengths inside a key block."""
  hq, hkv, sq = 8, 2, 70
  lens = np.array([1, 131, 300], np.int32)
  q = randn(rng, (3, sq, hq, d), BF16)
  kw = {}
  if layout == "cache":
    k, v = (randn(rng, (3, 320, hkv, d), BF16) for _ in range(2))
    ro, rl = ref.kv_cache(q, k, v, lens, window=(-1, 0))
    for x in (k, v):
      for b, n in enumerate(lens):
        x[b, n:] = np.nan
    kw = dict(seq_lens=lens)
  elif layout == "packed":
    cu_q = np.arange(4, dtype=np.int32) * sq
    cu_k = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = q.reshape(3 * sq, hq, d)
    k, v = (randn(rng, (int(cu_k[-1]) + 77, hkv, d), BF16) for _ in range(2))
    ro, rl = ref.packed(q, k, v, cu_q, cu_k, window=(-1, 0))
    k[cu_k[-1] :] = np.nan
    v[cu_k[-1] :] = np.nan
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq)
  else:
    q, k, v, table, lens = paged_inputs(
      rng, BF16, b=3, page_size=64, lens=lens, hq=hq, hkv=hkv, d=d, sq=sq
    )
    ro, rl = ref.paged(q, k, v, table, lens, window=(-1, 0))
    used = np.zeros(k.shape[:2], bool)
    for b, n in enumerate(lens):
      for j in range(n):
        used[table[b, j // 64], j % 64] = True
    k[~used] = np.nan
    v[~used] = np.nan
    kw = dict(seq_lens=lens, block_table=table)
  out, lse = run(q, k, v, kv_layout=layout, window=(-1, 0), num_splits=num_splits, **kw)
  if num_splits > 1:
    out, lse = merge_splits(out, lse)
  check(out, lse, ro, rl, BF16, f"{layout} d{d}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize(
  "window,softcap",
  [((32, 0), 0.0), ((16, 8), 0.0), ((-1, -1), 5.0), ((64, -1), 30.0), ((0, 0), 0.0)],
)
def test_dense_window_softcap(rng, dtype, window, softcap):
  b, sq, sk, hq, hkv, d = 2, 190, 330, 8, 2, 64
  q, k, v = (
    randn(rng, (b, sq, hq, d), dtype),
    randn(rng, (b, sk, hkv, d), dtype),
    randn(rng, (b, sk, hkv, d), dtype),
  )
  out, lse = run(q, k, v, kv_layout="uniform", window=window, softcap=softcap, scale=0.3)
  ro, rl = ref.dense(q, k, v, window=window, softcap=softcap, scale=0.3)
  check(out, lse, ro, rl, dtype)


def test_public_api_dense_and_packed(rng):
  import jax_fmha

  q, k, v = (randn(rng, (2, 65, 8, 128), BF16) for _ in range(3))
  out, lse = jax.jit(lambda *a: jax_fmha.attention(*a, causal=True, return_lse=True))(
    gpu(q), gpu(k), gpu(v)
  )
  ro, rl = ref.dense(q, k, v, causal=True)
  check(np.asarray(out), np.asarray(lse), ro, rl, BF16)


# ---------------------------------------------------------------------------------------
# Packed (variable length), rows outside sequences, invalid sequences
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_packed_with_empty_and_outside_rows(rng, dtype, causal, num_splits):
  hq, hkv, d = 8, 2, 96
  # q rows 0..2 and 150..159 belong to no sequence; sequence 1 is empty.
  cu_q = np.array([3, 10, 10, 140, 150], np.int32)
  cu_k = np.array([0, 30, 31, 131, 300], np.int32)
  q = randn(rng, (160, hq, d), dtype)
  k, v = randn(rng, (300, hkv, d), dtype), randn(rng, (300, hkv, d), dtype)
  window = (-1, 0) if causal else (-1, -1)
  out, lse = run(
    q,
    k,
    v,
    kv_layout="packed",
    cu_seqlens_q=cu_q,
    cu_seqlens_k=cu_k,
    window=window,
    num_splits=num_splits,
    max_seqlen_q=130,
  )
  ro, rl = ref.packed(q, k, v, cu_q, cu_k, window=window)
  if num_splits > 1:
    assert out.shape == (num_splits,) + q.shape and out.dtype == np.float32
    out, lse = merge_splits(out, lse)
  check(out, lse, ro, rl, dtype)
  empty = rows_of(np.isneginf(rl), dense=False)
  assert (np.asarray(out, np.float64)[empty] == 0).all()


def test_packed_sequence_longer_than_max_seqlen_is_nan(rng):
  hq, d = 4, 64
  cu = np.array([0, 20, 100, 110], np.int32)  # sequence 1 (80 rows) > max_seqlen_q = 50
  q = randn(rng, (120, hq, d), BF16)
  k, v = randn(rng, (110, hq, d), BF16), randn(rng, (110, hq, d), BF16)
  out, lse = run(q, k, v, kv_layout="packed", cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=50)
  assert np.isnan(np.asarray(out[20:100], np.float32)).all() and np.isnan(lse[:, 20:100]).all()
  ro, rl = ref.packed(q, k, v, cu, cu)
  keep = np.r_[0:20, 100:120]
  check(out[keep], lse[:, keep], ro[keep], rl[:, keep], BF16)


# ---------------------------------------------------------------------------------------
# Contiguous cache, paged KV
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("sq", [1, 4])
def test_cache_with_seq_lens(rng, dtype, sq):
  b, s_max, hq, hkv, d = 4, 300, 16, 2, 128
  lens = np.array([0, 1, 129, 300], np.int32)
  q = randn(rng, (b, sq, hq, d), dtype)
  k, v = randn(rng, (b, s_max, hkv, d), dtype), randn(rng, (b, s_max, hkv, d), dtype)
  for window in [(-1, -1), (-1, 0)]:
    out, lse = run(q, k, v, kv_layout="cache", seq_lens=lens, window=window)
    ro, rl = ref.kv_cache(q, k, v, lens, window=window)
    check(out, lse, ro, rl, dtype)


def paged_inputs(rng, dtype, *, b, page_size, lens, hq, hkv, d, sq, spare_pages=3):
  pages_per_seq = max(1, -(-max(lens) // page_size))
  num_pages = b * pages_per_seq + spare_pages
  table = rng.permutation(num_pages)[: b * pages_per_seq].reshape(b, pages_per_seq)
  q = randn(rng, (b, sq, hq, d), dtype)
  kp = randn(rng, (num_pages, page_size, hkv, d), dtype)
  vp = randn(rng, (num_pages, page_size, hkv, d), dtype)
  return q, kp, vp, table.astype(np.int32), np.asarray(lens, np.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
@pytest.mark.parametrize("sq,hq,hkv", [(1, 32, 8), (1, 8, 8), (1, 32, 1), (5, 8, 2)])
def test_paged(rng, dtype, page_size, sq, hq, hkv):
  d = 128
  lens = [0, 1, page_size, page_size + 1, 700]
  q, kp, vp, table, lens = paged_inputs(
    rng, dtype, b=5, page_size=page_size, lens=lens, hq=hq, hkv=hkv, d=d, sq=sq
  )
  for window in [(-1, -1), (-1, 0)]:
    out, lse = run(q, kp, vp, kv_layout="paged", seq_lens=lens, block_table=table, window=window)
    ro, rl = ref.paged(q, kp, vp, table, lens, window=window)
    check(out, lse, ro, rl, dtype, f"page {page_size} window {window}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
  "page_size,d,num_splits",
  [
    (8, 128, 1),  # pages that are not a multiple of a 16-key run: gathered (Hopper)
    (16, 128, 1),  # wgmma: gathered by cp.async (pages below 64 keys)
    (16, 128, 3),
    (48, 128, 1),  # runs cross no page, blocks do
    (64, 128, 1),  # wgmma: two 64-key runs on two pages
    (192, 128, 1),
    (128, 128, 1),
    (256, 96, 1),
    (16, 96, 1),  # d96: the wgmma loads' general path
    (16, 192, 1),
    (64, 256, 1),
  ],
)
def test_paged_prefill(rng, causal, page_size, d, num_splits):
  """Many query rows on pages: the forward tile kernels (on Hopper, pages of 64 keys or more
  that are a multiple of 16 copy by TMA in runs of gcd(page size, key block) rows, each run's
  page id looked up one block ahead; smaller pages and other sizes are gathered by
  cp.async). The lengths end inside a run (700, 1000), one key into a block (129) and at the
  end of a run (304): the block's later runs are never looked up."""
  lens = [700, 129, 0, 304, 1000]
  q, kp, vp, table, lens = paged_inputs(
    rng, BF16, b=5, page_size=page_size, lens=lens, hq=8, hkv=2, d=d, sq=150
  )
  window = (-1, 0) if causal else (-1, -1)
  out, lse = run_paged_merged(q, kp, vp, table, lens, window, num_splits)
  ro, rl = ref.paged(q, kp, vp, table, lens, window=window)
  check(out, lse, ro, rl, BF16, f"page {page_size}")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
  "page_size,d,num_splits",
  [(1, 128, 1), (16, 128, 1), (48, 128, 1), (16, 64, 3), (48, 256, 1), (1, 80, 1), (24, 96, 1)],
)
def test_paged_prefill_gathered(rng, causal, page_size, d, num_splits):
  """Pages the Hopper kernel gathers row by row (cp.async in its producer warpgroup: pages
  below 64 keys, or not a multiple of 16). Unused page slots and spare pages hold NaN: rows
  past a sequence's end are zero-filled, never read. Lengths end one key into a block (129),
  inside one (700, 1000), at a block's end (256), and on no page boundary; d80 leaves
  columns of the d96 tile past the head dim."""
  lens = [700, 129, 0, 256, 1000]
  q, kp, vp, table, lens = paged_inputs(
    rng, BF16, b=5, page_size=page_size, lens=lens, hq=8, hkv=2, d=d, sq=150
  )
  window = (-1, 0) if causal else (-1, -1)
  ro, rl = ref.paged(q, kp, vp, table, lens, window=window)
  used = np.zeros(kp.shape[:2], bool)
  for b, n in enumerate(lens):
    for j in range(n):
      used[table[b, j // page_size], j % page_size] = True
  kp[~used] = np.nan
  vp[~used] = np.nan
  out, lse = run_paged_merged(q, kp, vp, table, lens, window, num_splits)
  check(out, lse, ro, rl, BF16, f"gathered page {page_size} d{d}")


@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("page_size,d", [(16, 128), (64, 64), (256, 256), (1, 80)])
def test_paged_split_kv(rng, num_splits, page_size, d):
  dtype = BF16
  lens = [3000, 1, 0, 515]
  q, kp, vp, table, lens = paged_inputs(
    rng, dtype, b=4, page_size=page_size, lens=lens, hq=32, hkv=8, d=d, sq=1
  )
  out, lse = run(
    q,
    kp,
    vp,
    kv_layout="paged",
    seq_lens=lens,
    block_table=table,
    num_splits=num_splits,
    softcap=20.0,
  )
  if num_splits > 1:
    assert out.shape == (num_splits,) + q.shape and out.dtype == np.float32
    assert lse.shape == (num_splits, 4, 32, 1)
    out, lse = merge_splits(out, lse)
  ro, rl = ref.paged(q, kp, vp, table, lens, softcap=20.0)
  check(out, lse, ro, rl, dtype)


@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_public_api_paged_decode_with_merge(rng, num_splits):
  """jax_fmha.attention on pages: split-KV partials merged by the CUDA merge kernel."""
  import jax_fmha

  q, kp, vp, table, lens = paged_inputs(
    rng, BF16, b=2, page_size=16, lens=[5000, 77], hq=32, hkv=8, d=128, sq=1
  )
  out, lse = jax.jit(
    lambda *a: jax_fmha.attention(
      *a[:3], block_table=a[3], seq_lens=a[4], num_splits=num_splits, return_lse=True
    )
  )(gpu(q), gpu(kp), gpu(vp), gpu(table), gpu(lens))
  ro, rl = ref.paged(q, kp, vp, table, lens)
  assert np.asarray(out).dtype == BF16
  check(np.asarray(out), np.asarray(lse), ro, rl, BF16)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_invalid_page_id_and_overfull_seq_lens_are_nan(rng, num_splits):
  page_size = 16
  q, kp, vp, table, lens = paged_inputs(
    rng, BF16, b=4, page_size=page_size, lens=[40, 40, 40, 40], hq=8, hkv=2, d=64, sq=3
  )
  num_pages = kp.shape[0]
  table[1, 1] = num_pages  # used page out of range
  table[2, 0] = -1  # negative page id
  lens[3] = table.shape[1] * page_size + 1  # more keys than the table holds
  out, lse = run(
    q, kp, vp, kv_layout="paged", seq_lens=lens, block_table=table, num_splits=num_splits
  )
  if num_splits > 1:
    # A split checks the page ids of its own keys: the bad page makes its partial NaN, and
    # the merge spreads NaN over the whole row. An overfull length spoils every split.
    assert np.isnan(out[:, 3]).all() and np.isnan(lse[:, 3]).all()
    for b in (1, 2):
      assert np.isnan(lse[:, b]).all(axis=(1, 2)).any()
    out, lse = merge_splits(out, lse)
  assert np.isnan(np.asarray(out[1:], np.float32)).all() and np.isnan(lse[1:]).all()
  ro, rl = ref.paged(q[:1], kp, vp, table[:1], lens[:1])
  check(out[:1], lse[:1], ro, rl, BF16)


# ---------------------------------------------------------------------------------------
# Split-KV on dense prefill; large shapes; determinism; dtype errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [3, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_split_kv(rng, num_splits, causal):
  dtype = F16
  q = randn(rng, (2, 70, 8, 192), dtype)
  k, v = randn(rng, (2, 999, 4, 192), dtype), randn(rng, (2, 999, 4, 192), dtype)
  window = (-1, 0) if causal else (-1, -1)
  out, lse = run(q, k, v, kv_layout="uniform", num_splits=num_splits, window=window)
  out, lse = merge_splits(out, lse)
  ro, rl = ref.dense(q, k, v, window=window)
  check(out, lse, ro, rl, dtype)


def sampled_reference(q, k, v, rows, causal):
  """Float64 reference for a few query rows of a long dense sequence (B = 1)."""
  q, k, v = (np.asarray(x[0], np.float64) for x in (q, k, v))
  sq, hq, d = q.shape
  sk, hkv = k.shape[:2]
  g = hq // hkv
  out = np.zeros((len(rows), hq, d))
  lse = np.zeros((hq, len(rows)))
  for n, i in enumerate(rows):
    end = i + sk - sq + 1 if causal else sk
    for h in range(hq):
      s = k[:end, h // g] @ q[i, h] / math.sqrt(d)
      m = s.max()
      p = np.exp(s - m)
      out[n, h] = p @ v[:end, h // g] / p.sum()
      lse[h, n] = m + math.log(p.sum())
  return out, lse


@pytest.mark.parametrize("causal", [False, True])
def test_large_16k_tokens(rng, causal):
  dtype = BF16
  s, hq, hkv, d = 16384, 8, 2, 128
  q = randn(rng, (1, s, hq, d), dtype)
  k, v = randn(rng, (1, s, hkv, d), dtype), randn(rng, (1, s, hkv, d), dtype)
  out, lse = run(q, k, v, kv_layout="uniform", window=(-1, 0) if causal else (-1, -1))
  rows = np.r_[0, 1, 127, 128, rng.integers(0, s, 28), s - 1]
  ro, rl = sampled_reference(q, k, v, rows, causal)
  check(out[0, rows], lse[0][:, rows], ro, rl, dtype)
  assert np.isfinite(np.asarray(out, np.float32)).all()


def test_deterministic(rng):
  q, kp, vp, table, lens = paged_inputs(
    rng, BF16, b=3, page_size=16, lens=[900, 33, 500], hq=16, hkv=4, d=128, sq=7
  )
  args = dict(kv_layout="paged", seq_lens=lens, block_table=table, window=(-1, 0))
  for splits in (1, 5):
    a, la = run(q, kp, vp, num_splits=splits, **args)
    b, lb = run(q, kp, vp, num_splits=splits, **args)
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    assert np.array_equal(la.view(np.uint8), lb.view(np.uint8))


FLOAT32_HINT = (
  r"q, k, v: .* on the GPU expected dtype bfloat16 or float16, got float32: cast them, "
  r"e\.g\. q\.astype\(jnp\.bfloat16\)"
)


def test_float32_is_refused_with_a_cast_hint(rng):
  """float32 attention on the GPU: a TypeError when lowering (before anything runs) that
  names q, k, v, the dtypes expected and received, and the cast; after the cast it runs."""
  import jax_fmha

  q, k, v = (randn(rng, (1, s, h, 64), np.float32) for s, h in ((8, 2), (12, 1), (12, 1)))
  attend = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, causal=True, return_lse=True))
  with pytest.raises(TypeError, match=FLOAT32_HINT):
    attend.lower(gpu(q), gpu(k), gpu(v))
  with pytest.raises(TypeError, match=FLOAT32_HINT):
    run(q, k, v, kv_layout="uniform")
  q, k, v = (x.astype(BF16) for x in (q, k, v))
  out, lse = attend(gpu(q), gpu(k), gpu(v))
  check(np.asarray(out), np.asarray(lse), *ref.dense(q, k, v, causal=True), BF16)


def test_float32_kvcache_is_refused_with_a_cast_hint(rng):
  import jax_fmha

  cache = gpu(randn(rng, (2, 16, 1, 64), np.float32))
  q, new = gpu(randn(rng, (2, 1, 4, 64), np.float32)), gpu(randn(rng, (2, 1, 1, 64), np.float32))
  step = jax.jit(
    lambda q, kc, vc, kn, vn, lens: jax_fmha.attention_with_kvcache(
      q, kc, vc, kn, vn, cache_seqlens=lens
    )
  )
  with pytest.raises(TypeError, match=FLOAT32_HINT):
    step.lower(q, cache, cache, new, new, jnp.array([3, 7], jnp.int32))


# ---------------------------------------------------------------------------------------
# Script modes: memcheck subset, quick timing
# ---------------------------------------------------------------------------------------


def memcheck_subset():
  """One small case of every mode, on each forward kernel (run under compute-sanitizer)."""
  for kernel in ("default", "portable"):
    os.environ.pop("JAX_FMHA_CUDA_FORWARD", None)
    if kernel == "portable":
      os.environ["JAX_FMHA_CUDA_FORWARD"] = "portable"
    memcheck_cases()
    print(f"memcheck subset ({kernel} forward kernel): done")


def memcheck_cases():
  import test_fp8_gpu  # FP8 K/V: the decode and portable kernels, the quantizing append

  rng = np.random.default_rng(0)
  cases = [
    (test_dense_head_dims, BF16, 128, False),
    (test_dense_head_dims, F16, 256, True),
    (test_dense_head_dims, BF16, 80, True),
    (test_dense_head_dims, BF16, 64, True),
    (test_dense_window_softcap, F16, (16, 8), 0.0),
    (test_packed_with_empty_and_outside_rows, BF16, True, 3),
    (test_cache_with_seq_lens, BF16, 1),
    (test_keys_past_the_end_are_never_read, 128, "cache", 1),  # Hopper: the last V block zeroed
    (test_keys_past_the_end_are_never_read, 64, "packed", 3),
    *((test_paged, BF16, page_size, 5, 8, 2) for page_size in (1, 16, 64)),
    (test_paged_prefill, False, 16, 128, 1),  # Hopper: rows gathered by cp.async
    (test_paged_prefill, True, 16, 96, 1),
    (test_paged_prefill, False, 48, 128, 3),
    (test_paged_prefill, True, 64, 128, 1),  # Hopper: TMA runs of 64 keys
    (test_invalid_page_id_and_overfull_seq_lens_are_nan, 4),
    (test_packed_sequence_longer_than_max_seqlen_is_nan,),
    (test_public_api_paged_decode_with_merge, 7),  # + the CUDA merge kernel
    (test_fp8_gpu.test_decode_paged, "float8_e4m3fn", BF16, 128, 32, 8, 16),
    (test_fp8_gpu.test_chunked_prefill_paged, "float8_e5m2", F16, 64, 16, 3),
    (test_fp8_gpu.test_update_quantizes_like_the_cpu, "float8_e4m3fn", "bfloat16", True),
  ]
  if hopper_build_and_device():  # FP8 queries: the Hopper kernel's FP8 Q K^T (and P V)
    import test_fp8_attention_gpu as fp8q

    cases += [
      (fp8q.test_packed_varlen_with_empty_sequence, BF16, 3),
      # FP8 v: the producer's V transpose and the V^T ring (d128 and d256: 3 stages, 64
      # keys), a partial last block (zeroed keys), an idle second consumer, paged runs
      (fp8q.test_fp8_v_packed_varlen_with_empty_sequence, 1, 128),
      (fp8q.test_fp8_v_gqa, 8, 2, 256),
      (fp8q.test_paged_cache, 48, fp8q.E4M3),
    ]
  for fn, *args in cases:
    # Named before it runs: a sanitizer that crashes leaves the case in its report.
    print(f"  {fn.__module__}.{fn.__name__}{tuple(args)}", flush=True)
    fn(rng, *args)
  import jax_fmha

  for d in (7, 160):  # the merge's one-column and two-pass paths, more splits than lanes
    outs = rng.standard_normal((45, 6, 1, d)).astype(np.float32)  # packed [S, Tq, Hq, D]
    lses = rng.standard_normal((45, 1, 6)).astype(np.float32)
    jax.block_until_ready(jax_fmha.merge_attention_states(gpu(outs), gpu(lses)))


def time_prefill(b=2, s=8192, h=16, d=128, reps=20):
  """Dense prefill bf16: ours vs jax.nn.dot_product_attention(cudnn), TFLOP/s (median)."""
  import time

  rng = np.random.default_rng(0)
  q, k, v = (gpu(randn(rng, (b, s, h, d), BF16)) for _ in range(3))
  rows = []
  for causal in (False, True):
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    ours = jax.jit(
      lambda q, k, v, causal=causal: attention_fwd(
        q,
        k,
        v,
        scale=1 / math.sqrt(d),
        softcap=0.0,
        window=(-1, 0 if causal else -1),
        kv_layout="uniform",
        num_splits=1,
        max_seqlen_q=s,
      )[0]
    )
    cudnn = jax.jit(
      lambda q, k, v, causal=causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"
      )
    )
    for name, fn in (("jax_fmha", ours), ("cudnn", cudnn)):
      try:
        for _ in range(3):
          fn(q, k, v).block_until_ready()
        times = []
        for _ in range(reps):
          t0 = time.perf_counter()
          fn(q, k, v).block_until_ready()
          times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        rows.append(
          f"{name:9s} causal={causal!s:5s} B={b} S={s} H={h} D={d}: "
          f"{t * 1e3:7.3f} ms  {flops / t / 1e12:6.1f} TFLOP/s"
        )
      except Exception as e:  # noqa: BLE001 - a peer that fails to run is reported, not fatal
        rows.append(f"{name:9s} causal={causal!s:5s}: failed: {type(e).__name__}: {e}")
  print("\n".join(rows))


def time_paged_decode(reps=20):
  """Paged decode (page 16, GQA 32/8, d128, bf16) through jax_fmha.attention with the
  static split heuristic: GB/s of K and V read (median)."""
  import time

  import jax_fmha

  rows = []
  for b, keys in ((64, 4096), (1, 131072)):
    rng = np.random.default_rng(0)
    q, kp, vp, table, lens = paged_inputs(
      rng, BF16, b=b, page_size=16, lens=[keys] * b, hq=32, hkv=8, d=128, sq=1, spare_pages=0
    )
    args = [gpu(x) for x in (q, kp, vp, table, lens)]
    fn = jax.jit(lambda q, k, v, t, l: jax_fmha.attention(q, k, v, block_table=t, seq_lens=l))
    for _ in range(3):
      fn(*args).block_until_ready()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn(*args).block_until_ready()
      times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    kv_bytes = 2 * b * keys * 8 * 128 * 2
    rows.append(
      f"paged decode B={b} keys={keys} page=16 Hq/Hkv=32/8 D=128: "
      f"{t * 1e6:8.1f} us  {kv_bytes / t / 1e9:7.1f} GB/s"
    )
  print("\n".join(rows))


if __name__ == "__main__":
  if "--memcheck" in sys.argv:
    memcheck_subset()
  if "--time" in sys.argv:
    time_prefill()
    time_paged_decode()
