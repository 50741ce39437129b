"""The public API under ``jax_enable_x64``, where Python lists and ``jnp.array`` index
arrays are int64: every entry point converts any integer dtype to int32 at trace time.

x64 mode is process-global: the `x64` fixture turns it on for one test and restores the
previous value after it, so no other test sees it. Results are checked against the same
call with int32 index arrays (bit for bit) and against the float64 NumPy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fmha

import numpy_reference as ref
from conftest import OUT_TOL, assert_attention_close, assert_close, randn

# float32 API semantics on the CPU backend (on_cpu: also on a GPU machine).
pytestmark = pytest.mark.usefixtures("on_cpu")

F32 = np.float32
BACKENDS = ["auto", "reference"]


@pytest.fixture
def x64():
  before = jax.config.read("jax_enable_x64")
  jax.config.update("jax_enable_x64", True)
  try:
    yield
  finally:
    jax.config.update("jax_enable_x64", before)


def same(a, b):
  """Bit-for-bit equal results (pytrees of arrays), NaN included."""
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def as_int64(*xs):
  """The three forms an int64 index array takes in x64 mode: list, NumPy, jnp."""
  return [x.tolist() for x in xs], [x.astype(np.int64) for x in xs], [jnp.asarray(x) for x in xs]


def test_fixture_turns_x64_on(x64):
  assert jnp.asarray([1, 2]).dtype == jnp.int64
  assert jnp.asarray(np.float64(1.0)).dtype == jnp.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense(x64, rng, backend):
  q, k, v = (randn(rng, (2, s, h, 32), F32) for s, h in ((7, 4), (19, 2), (19, 2)))
  out, lse = jax_fmha.attention(q, k, v, causal=True, return_lse=True, backend=backend)
  expected, expected_lse = ref.dense(q, k, v, causal=True)
  assert_attention_close(out, expected, F32, lse, expected_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed(x64, rng, backend):
  cu_q, cu_k = np.array([0, 3, 3, 11], np.int32), np.array([0, 9, 14, 30], np.int32)
  q, k, v = (randn(rng, (t, h, 32), F32) for t, h in ((11, 4), (30, 1), (30, 1)))
  call = lambda cq, ck: jax_fmha.attention(
    q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, return_lse=True, backend=backend
  )
  int32 = call(cu_q, cu_k)
  for cq, ck in as_int64(cu_q, cu_k):
    same(call(cq, ck), int32)
  expected, expected_lse = ref.packed(q, k, v, cu_q, cu_k, causal=True)
  assert_attention_close(int32[0], expected, F32, int32[1], expected_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_contiguous_cache(x64, rng, backend):
  lens = np.array([5, 0, 16], np.int32)
  q = randn(rng, (3, 2, 4, 32), F32)
  k, v = (randn(rng, (3, 16, 2, 32), F32) for _ in range(2))
  call = lambda lens: jax_fmha.attention(
    q, k, v, seq_lens=lens, causal=True, return_lse=True, backend=backend
  )
  int32 = call(lens)
  for (n,) in as_int64(lens):
    same(call(n), int32)
  expected, expected_lse = ref.kv_cache(q, k, v, lens, causal=True)
  assert_attention_close(int32[0], expected, F32, int32[1], expected_lse)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_and_split_kv(x64, rng, backend, num_splits):
  """Paged keys with a permuted block table; 3 splits run the merge kernel too."""
  lens, table = np.array([37, 8], np.int32), rng.permutation(12)[:10].reshape(2, 5)
  table = table.astype(np.int32)
  q = randn(rng, (2, 1, 4, 32), F32)
  k, v = (randn(rng, (12, 8, 2, 32), F32) for _ in range(2))
  call = lambda table, lens: jax_fmha.attention(
    q,
    k,
    v,
    block_table=table,
    seq_lens=lens,
    num_splits=num_splits,
    return_lse=True,
    backend=backend,
  )
  int32 = call(table, lens)
  for t, n in as_int64(table, lens):
    same(call(t, n), int32)
  jitted = jax.jit(call)(jnp.asarray(table.astype(np.int64)), jnp.asarray(lens.tolist()))
  assert_close(jitted[0], int32[0], rtol=1e-6, atol=1e-6)
  expected, expected_lse = ref.paged(q, k, v, table, lens)
  assert_attention_close(int32[0], expected, F32, int32[1], expected_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_kv_cache(x64, rng, backend):
  pages = [randn(rng, (6, 4, 2, 16), F32) for _ in range(2)]
  new = [randn(rng, (7, 2, 16), F32) for _ in range(2)]
  table = np.array([[2, 0, 5], [1, 4, 3]], np.int32)
  lens, cu_new = np.array([3, 6], np.int32), np.array([0, 5, 7], np.int32)
  call = lambda table, lens, cu: jax_fmha.update_kv_cache(
    *pages, *new, table, lens, cu, backend=backend
  )
  int32 = call(table, lens, cu_new)
  for t, n, c in as_int64(table, lens, cu_new):
    same(call(t, n, c), int32)
  # Token t of sequence b lands at position lens[b] + t of its pages.
  for b in range(2):
    rows = slice(cu_new[b], cu_new[b + 1])
    k_seq = ref.gather_pages(np.asarray(int32[0]), table[b], lens[b] + rows.stop - rows.start)
    np.testing.assert_array_equal(k_seq[lens[b] :], new[0][rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_kvcache(x64, rng, backend):
  """Packed new tokens appended to pages, then attended, with list index arrays."""
  k_pages, v_pages = (randn(rng, (8, 4, 1, 32), F32) for _ in range(2))
  q = randn(rng, (5, 4, 32), F32)
  k_new, v_new = (randn(rng, (5, 1, 32), F32) for _ in range(2))
  table = np.array([[3, 1, 6, 0], [2, 7, 5, 4]], np.int32)
  lens, cu_q = np.array([6, 1], np.int32), np.array([0, 2, 5], np.int32)
  call = lambda table, lens, cu: jax_fmha.attention_with_kvcache(
    q,
    k_pages,
    v_pages,
    k_new,
    v_new,
    cache_seqlens=lens,
    block_table=table,
    cu_seqlens_q=cu,
    causal=True,
    return_lse=True,
    backend=backend,
  )
  int32 = call(table, lens, cu_q)
  for t, n, c in as_int64(table, lens, cu_q):
    same(call(t, n, c), int32)
  # Against the reference on the appended cache: each sequence's keys then its new tokens.
  keys = [
    np.concatenate([ref.gather_pages(x, table[b], lens[b]), y[cu_q[b] : cu_q[b + 1]]])
    for x, y in ((k_pages, k_new), (v_pages, v_new))
    for b in range(2)
  ]
  cu_k = np.array([0, 8, 12], np.int32)
  expected, expected_lse = ref.packed(
    q, np.concatenate(keys[:2]), np.concatenate(keys[2:]), cu_q, cu_k, causal=True
  )
  assert_attention_close(int32[0], expected, F32, int32[1], expected_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_cache_python_float_scales(x64, rng, backend):
  """FP8 caches with Python float scales (float64 under x64): converted to float32, the
  same results as float32 scales, with int64 index arrays."""
  fp8 = jnp.float8_e4m3fn
  k_pages, v_pages = (np.asarray(randn(rng, (8, 4, 1, 32), F32) * 8, fp8) for _ in range(2))
  q, k_new = randn(rng, (2, 1, 4, 32), F32), randn(rng, (2, 1, 1, 32), F32)
  table, lens = np.array([[3, 1, 6, 0], [2, 7, 5, 4]], np.int32), np.array([6, 1], np.int32)
  call = lambda table, lens, k_scale, v_scale: jax_fmha.attention_with_kvcache(
    q,
    k_pages,
    v_pages,
    k_new,
    k_new,
    cache_seqlens=lens,
    block_table=table,
    k_scale=k_scale,
    v_scale=v_scale,
    backend=backend,
  )
  float32 = call(table, lens, np.float32(0.25), np.float32(0.5))
  assert float32[1].dtype == fp8
  for t, n in as_int64(table, lens):
    same(call(t, n, 0.25, 0.5), float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_attention_states(x64, rng, backend):
  """Attention over keys [0, 9) merged with attention over [9, 25), packed with list
  cu_seqlens, equals attention over all 25."""
  q, k, v = (randn(rng, (t, h, 32), F32) for t, h in ((6, 2), (25, 2), (25, 2)))
  parts = [
    jax_fmha.attention(
      q,
      k[a:b],
      v[a:b],
      cu_seqlens_q=[0, 6],
      cu_seqlens_k=[0, b - a],
      return_lse=True,
      backend=backend,
    )
    for a, b in ((0, 9), (9, 25))
  ]
  out, lse = jax_fmha.merge_attention_states(*(jnp.stack(x) for x in zip(*parts)), backend=backend)
  assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
  expected, expected_lse = ref.attend_sequence(q, k, v)
  assert_attention_close(out, expected, F32, lse, expected_lse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_ops(x64, rng, backend):
  gate, up, x, residual = (randn(rng, (3, 40), F32) for _ in range(4))
  weight = randn(rng, (40,), F32)
  g, u = gate.astype(np.float64), up.astype(np.float64)
  tol = OUT_TOL["float32"]
  assert_close(jax_fmha.swiglu(gate, up, backend=backend), g / (1 + np.exp(-g)) * u, **tol)
  gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
  assert_close(jax_fmha.geglu(gate, up, backend=backend), gelu * u, **tol)
  h = x.astype(np.float64) + residual
  normed = h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6) * weight
  y, h_out = jax_fmha.rms_norm_residual(x, residual, weight, backend=backend)
  assert y.dtype == jnp.float32 and h_out.dtype == jnp.float32
  assert_close(y, normed, **tol)
  assert_close(h_out, h, **tol)
  assert_close(jax_fmha.rms_norm(h.astype(F32), weight, backend=backend), normed, **tol)


def test_float64_is_still_refused(x64):
  """x64 turns Python floats into float64: the float dtype check still names it."""
  q = jnp.ones((1, 2, 1, 8))
  assert q.dtype == jnp.float64
  with pytest.raises(
    TypeError, match="q: expected dtype float32, bfloat16, float16 or an FP8 format"
  ):
    jax_fmha.attention(q, q, q)


def test_int64_numpy_block_table_without_x64(rng):
  """Without x64, a NumPy int64 (or uint) block table and lists work like int32; float and
  bool index arrays raise a TypeError naming the argument."""
  assert not jax.config.read("jax_enable_x64")
  lens, table = np.array([13, 4], np.int32), np.array([[4, 0], [2, 3]], np.int32)
  q = randn(rng, (2, 1, 2, 16), F32)
  k, v = (randn(rng, (5, 8, 1, 16), F32) for _ in range(2))
  call = lambda table, lens: jax_fmha.attention(
    q, k, v, block_table=table, seq_lens=lens, return_lse=True
  )
  int32 = call(table, lens)
  for t, n in ((table.astype(np.int64), lens.tolist()), (table.astype(np.uint16), lens)):
    same(call(t, n), int32)
  expected, expected_lse = ref.paged(q, k, v, table, lens)
  assert_attention_close(int32[0], expected, F32, int32[1], expected_lse)
  with pytest.raises(TypeError, match=r"block_table: expected an integer dtype .* float32"):
    call(table.astype(np.float32), lens)
  with pytest.raises(TypeError, match=r"seq_lens: expected an integer dtype .* got float"):
    call(table, [13.0, 4.0])
  with pytest.raises(TypeError, match=r"cache_seqlens: expected an integer dtype .* bool"):
    jax_fmha.update_kv_cache(k, v, k[:2, :1], v[:2, :1], table, np.array([True, False]))
