"""Paged and contiguous KV caches, cache append, split-KV and the merge.

Every kernel result is compared with the float64 NumPy reference in numpy_reference.py.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fmha

import numpy_reference as ref
from conftest import FLOAT_DTYPES, assert_attention_close, assert_close, randn, run_on, to_device


def make_paged_cache(rng, lens, page_size, hkv, d, dtype, spare_pages=3):
  """Pages holding sequences of `lens` keys, scattered through a permuted block table.

  Returns (k_pages, v_pages, block_table, seq_lens). Table entries past a sequence's last
  page hold -1 garbage (they must be ignored).
  """
  pages_per_seq = max(1, max(-(-n // page_size) for n in lens))
  num_pages = len(lens) * pages_per_seq + spare_pages
  k = randn(rng, (num_pages, page_size, hkv, d), dtype)
  v = randn(rng, (num_pages, page_size, hkv, d), dtype)
  perm = rng.permutation(num_pages)[: len(lens) * pages_per_seq]
  table = perm.reshape(len(lens), pages_per_seq).astype(np.int32)
  for b, n in enumerate(lens):
    table[b, -(-n // page_size) :] = -1
  return k, v, table, np.asarray(lens, np.int32)


def packed_paged_reference(q, cu_seqlens_q, k_pages, v_pages, table, lens, **kw):
  """Packed queries against paged keys, from the reference's building blocks."""
  cu = np.asarray(cu_seqlens_q)
  seqs = [
    (
      np.arange(cu[b], cu[b + 1]),
      np.asarray(q, np.float64)[cu[b] : cu[b + 1]],
      ref.gather_pages(np.asarray(k_pages, np.float64), table[b], lens[b]),
      ref.gather_pages(np.asarray(v_pages, np.float64), table[b], lens[b]),
    )
    for b in range(len(cu) - 1)
  ]
  return ref.attend_sequences(seqs, hq=q.shape[1], d=q.shape[2], q_rows=q.shape[0], **kw)


# ---------------------------------------------------------------------------------------
# Paged attention
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16, 64, 256])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_page_sizes(device, rng, page_size, dtype):
  dtype = FLOAT_DTYPES[dtype]
  # Lengths 0, 1, exactly one page, one token past a page boundary, several pages.
  lens = [0, 1, page_size, page_size + 1, 3 * page_size + 5]
  k, v, table, seq_lens = make_paged_cache(rng, lens, page_size, 2, 64, dtype)
  q = randn(rng, (len(lens), 3, 8, 64), dtype)
  args = to_device(device, q, k, v, table, seq_lens)
  out, lse = run_on(
    device,
    dtype,
    jax_fmha.attention,
    *args[:3],
    block_table=args[3],
    seq_lens=args[4],
    causal=True,
    return_lse=True,
  )
  expected, expected_lse = ref.paged(q, k, v, table, seq_lens, causal=True)
  assert_attention_close(out, expected, dtype, lse, expected_lse)


@pytest.mark.parametrize("group", [1, 8, 32])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_paged_decode_gqa(device, rng, group, num_splits):
  dtype = FLOAT_DTYPES["bfloat16"]
  hkv = 32 // group
  lens = [700, 17, 1024, 333]
  k, v, table, seq_lens = make_paged_cache(rng, lens, 16, hkv, 128, dtype)
  q = randn(rng, (len(lens), 1, 32, 128), dtype)
  args = to_device(device, q, k, v, table, seq_lens)
  out, lse = jax_fmha.attention(
    *args[:3], block_table=args[3], seq_lens=args[4], num_splits=num_splits, return_lse=True
  )
  expected, expected_lse = ref.paged(q, k, v, table, seq_lens)
  assert_attention_close(out, expected, dtype, lse, expected_lse)


@pytest.mark.parametrize(
  "kw", [dict(window=(40, 0)), dict(softcap=5.0, causal=True), dict(window=(3, 2), scale=0.3)]
)
def test_paged_masks_softcap(device, rng, kw):
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["float16"]
  lens = [90, 5, 64]
  k, v, table, seq_lens = make_paged_cache(rng, lens, 16, 2, 64, dtype)
  q = randn(rng, (3, 7, 4, 64), dtype)
  args = to_device(device, q, k, v, table, seq_lens)
  out, lse = jax_fmha.attention(
    *args[:3], block_table=args[3], seq_lens=args[4], return_lse=True, **kw
  )
  expected, expected_lse = ref.paged(q, k, v, table, seq_lens, **kw)
  assert_attention_close(out, expected, dtype, lse, expected_lse)


def test_packed_queries_paged_mixed_batch(device, rng):
  """Mixed prefill and decode in one batch: packed queries, paged keys."""
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  q_lens, kv_lens = [1, 40, 0, 1, 13], [300, 40, 9, 1, 100]
  k, v, table, seq_lens = make_paged_cache(rng, kv_lens, 16, 2, 64, dtype)
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  q = randn(rng, (int(cu[-1]) + 2, 8, 64), dtype)  # two rows outside every sequence
  args = to_device(device, q, k, v, table, seq_lens, cu)
  out, lse = jax_fmha.attention(
    *args[:3],
    block_table=args[3],
    seq_lens=args[4],
    cu_seqlens_q=args[5],
    causal=True,
    return_lse=True,
  )
  expected, expected_lse = packed_paged_reference(q, cu, k, v, table, seq_lens, causal=True)
  assert_attention_close(out, expected, dtype, lse, expected_lse)


def test_contiguous_cache(device, rng):
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  k = randn(rng, (3, 200, 2, 64), dtype)
  v = randn(rng, (3, 200, 2, 64), dtype)
  seq_lens = np.asarray([0, 200, 77], np.int32)
  q = randn(rng, (3, 4, 8, 64), dtype)
  args = to_device(device, q, k, v, seq_lens)
  out, lse = jax_fmha.attention(*args[:3], seq_lens=args[3], causal=True, return_lse=True)
  expected, expected_lse = ref.kv_cache(q, k, v, seq_lens, causal=True)
  assert_attention_close(out, expected, dtype, lse, expected_lse)


def test_vmap_paged_folds_into_batch(rng):
  dtype = FLOAT_DTYPES["float32"]
  k, v, table, seq_lens = make_paged_cache(rng, [50, 20], 16, 2, 32, dtype)
  q = randn(rng, (3, 2, 1, 4, 32), dtype)  # vmapped axis of 3 over shared pages
  f = jax.vmap(lambda q: jax_fmha.attention(q, k, v, block_table=table, seq_lens=seq_lens))
  out = f(q)
  for n in range(3):
    expected, _ = ref.paged(q[n], k, v, table, seq_lens)
    assert_close(out[n], expected, rtol=1e-5, atol=2e-5)
  assert "jax_fmha_attention_fwd" in str(jax.make_jaxpr(f)(q))


# ---------------------------------------------------------------------------------------
# Bad device data: documented outcome, nothing touched out of bounds
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-5, 10_000])
def test_out_of_range_page_id_gives_nan_rows(device, rng, bad_id):
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  lens = [40, 40, 40]
  k, v, table, seq_lens = make_paged_cache(rng, lens, 16, 2, 64, dtype)
  table[1, 1] = bad_id
  q = randn(rng, (3, 2, 4, 64), dtype)
  args = to_device(device, q, k, v, table, seq_lens)
  out, lse = jax_fmha.attention(*args[:3], block_table=args[3], seq_lens=args[4], return_lse=True)
  out, lse = np.asarray(out, np.float64), np.asarray(lse)
  assert np.isnan(out[1]).all() and np.isnan(lse[1]).all()
  good = [0, 2]
  expected, expected_lse = ref.paged(q[good], k, v, table[good], seq_lens[good])
  assert_attention_close(out[good].astype(dtype), expected, dtype, lse[good], expected_lse)


def test_overfull_seq_lens_give_nan_rows(device, rng):
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  k, v, table, seq_lens = make_paged_cache(rng, [40, 64], 16, 2, 64, dtype)
  table[0, 3] = 0  # a valid page after the last one: must not be read either
  seq_lens = np.asarray([40, table.shape[1] * 16 + 1], np.int32)  # sequence 1 overflows
  q = randn(rng, (2, 1, 4, 64), dtype)
  out = np.asarray(
    jax_fmha.attention(*to_device(device, q, k, v), block_table=table, seq_lens=seq_lens),
    np.float64,
  )
  assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()
  cache = randn(rng, (2, 30, 2, 64), dtype)
  out = np.asarray(
    jax_fmha.attention(
      *to_device(device, q, cache, cache), seq_lens=np.asarray([30, 31], np.int32)
    ),
    np.float64,
  )
  assert np.isnan(out[1]).all() and not np.isnan(out[0]).any()


def test_update_drops_writes_outside_the_sequence(device, rng):
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  k, v, table, _ = make_paged_cache(rng, [32, 32, 32], 16, 2, 32, dtype, spare_pages=2)
  table[1, 1] = 999  # invalid page: the write onto it is dropped
  cache_seqlens = np.asarray([31, 15, -3], np.int32)  # 0: overflow, 1: bad page, 2: negative
  k_new = randn(rng, (3, 2, 2, 32), dtype)
  k2, v2 = jax_fmha.update_kv_cache(*to_device(device, k, v, k_new, k_new, table), cache_seqlens)
  k2, v2 = np.asarray(k2), np.asarray(v2)
  written = np.zeros(k.shape[:2], bool)
  written[table[0, 1], 15] = True  # sequence 0, position 31: the last slot
  written[table[1, 0], 15] = True  # sequence 1, position 15; position 16 hits page 999
  np.testing.assert_array_equal(k2[~written], k[~written])  # everything else untouched
  np.testing.assert_array_equal(v2[~written], v[~written])
  np.testing.assert_array_equal(k2[table[0, 1], 15], k_new[0, 0])
  np.testing.assert_array_equal(k2[table[1, 0], 15], k_new[1, 0])


# ---------------------------------------------------------------------------------------
# Cache append
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 16, None])  # None: contiguous cache
@pytest.mark.parametrize("packed_new", [False, True])
def test_append_then_attend_equals_concatenation(device, rng, page_size, packed_new):
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  cached = [5, 0, 33]
  new = [3, 3, 3] if not packed_new else [2, 0, 5]
  hkv, d = 2, 64
  if page_size is None:
    k = randn(rng, (3, 48, hkv, d), dtype)
    v = randn(rng, (3, 48, hkv, d), dtype)
    table = None
    history = lambda x, b: x[b, : cached[b]]
  else:
    k, v, table, _ = make_paged_cache(rng, [48] * 3, page_size, hkv, d, dtype)
    history = lambda x, b: ref.gather_pages(x, table[b], cached[b])
  cache_seqlens = np.asarray(cached, np.int32)
  if packed_new:
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    k_new, v_new = randn(rng, (cu[-1], hkv, d), dtype), randn(rng, (cu[-1], hkv, d), dtype)
    q = randn(rng, (cu[-1], 8, d), dtype)
    rows = lambda b: slice(cu[b], cu[b + 1])
  else:
    cu = None
    k_new, v_new = randn(rng, (3, 3, hkv, d), dtype), randn(rng, (3, 3, hkv, d), dtype)
    q = randn(rng, (3, 3, 8, d), dtype)
    rows = lambda b: b
  out, _, _ = jax_fmha.attention_with_kvcache(
    *to_device(device, q, k, v, k_new, v_new),
    cache_seqlens=cache_seqlens,
    block_table=table,
    cu_seqlens_q=cu,
    causal=True,
  )
  for b in range(3):
    keys = np.concatenate([history(k, b), k_new[rows(b)]])
    values = np.concatenate([history(v, b), v_new[rows(b)]])
    expected, _ = ref.attend_sequence(q[rows(b)], keys, values, causal=True)
    assert_close(
      np.asarray(out)[rows(b)],
      expected,
      what=f"sequence {b}",
      rtol=1e-5 if dtype == np.float32 else 1e-2,
      atol=2e-5 if dtype == np.float32 else 1e-2,
    )


def test_update_in_place_when_donated():
  k = jnp.zeros((64, 16, 8, 128), jnp.bfloat16)
  table = jnp.arange(64, dtype=jnp.int32).reshape(4, 16)
  new = jnp.ones((4, 1, 8, 128), jnp.bfloat16)
  lens = jnp.asarray([0, 5, 17, 200], jnp.int32)
  update = lambda k, v: jax_fmha.update_kv_cache(k, v, new, new, table, lens)
  donated = jax.jit(update, donate_argnums=(0, 1)).lower(k, k).compile().as_text()
  assert "jax_fmha_update_kv_cache" in donated
  # No copy instruction anywhere: the custom call writes into the donated cache buffers.
  assert not re.search(r"\bcopy(-start)?\(", donated), donated
  assert "input_output_alias" in donated
  kept = jax.jit(update).lower(k, k).compile().as_text()
  assert re.search(r"\bcopy\(", kept), "without donation XLA must copy the cache first"


# ---------------------------------------------------------------------------------------
# Split-KV and precision
# ---------------------------------------------------------------------------------------


def test_num_splits_agree(rng):
  dtype = FLOAT_DTYPES["float32"]
  k, v, table, seq_lens = make_paged_cache(rng, [5000, 1, 0, 2049], 16, 2, 64, dtype)
  q = randn(rng, (4, 2, 8, 64), dtype)
  results = {
    n: np.asarray(
      jax_fmha.attention(
        q, k, v, block_table=table, seq_lens=seq_lens, num_splits=n, return_lse=True
      )[0],
      np.float64,
    )
    for n in (1, 2, 7, 64)
  }
  scale = np.abs(results[1]).max()
  for n in (2, 7, 64):
    assert np.abs(results[n] - results[1]).max() <= 1e-5 * scale, n
  expected, _ = ref.paged(q, k, v, table, seq_lens)
  assert_close(results[64], expected, rtol=1e-5, atol=2e-5)


def test_long_context_bf16_within_rounding(rng):
  """32k keys in bf16, split or not: the output is the true answer rounded to bf16."""
  dtype = FLOAT_DTYPES["bfloat16"]
  n = 32768 + 5
  k, v, table, seq_lens = make_paged_cache(rng, [n], 64, 1, 128, dtype, spare_pages=0)
  q = randn(rng, (1, 1, 8, 128), dtype, scale=2.0)
  expected, expected_lse = ref.paged(q, k, v, table, seq_lens)
  ulp = np.abs(expected) * 2.0**-8 + 1e-6  # one bf16 unit in the last place
  for splits in (1, None, 64):
    out, lse = jax_fmha.attention(
      q, k, v, block_table=table, seq_lens=seq_lens, num_splits=splits, return_lse=True
    )
    err = np.abs(np.asarray(out, np.float64) - expected)
    assert (err <= ulp).all(), (splits, float((err / ulp).max()))
    np.testing.assert_allclose(np.asarray(lse), expected_lse, rtol=1e-6, atol=1e-5)


def test_split_jaxpr_shows_forward_and_merge(rng):
  k, v, table, seq_lens = make_paged_cache(rng, [100], 16, 1, 64, FLOAT_DTYPES["float32"])
  q = jnp.ones((1, 1, 4, 64))
  jaxpr = str(
    jax.make_jaxpr(
      lambda q: jax_fmha.attention(q, k, v, block_table=table, seq_lens=seq_lens, num_splits=4)
    )(q)
  )
  assert "jax_fmha_attention_fwd" in jaxpr and "num_splits=4" in jaxpr
  assert "jax_fmha_merge_states" in jaxpr
  hlo = (
    jax.jit(
      lambda q: jax_fmha.attention(q, k, v, block_table=table, seq_lens=seq_lens, num_splits=4)
    )
    .lower(q)
    .as_text()
  )
  assert "jax_fmha_merge_states" in hlo


@pytest.mark.parametrize("out_dtype", [None, jnp.bfloat16])
def test_merge_attention_states(device, rng, out_dtype):
  """Attention over three disjoint key segments, merged, equals attention over all."""
  q = randn(rng, (6, 4, 32), np.float32)
  keys = randn(rng, (90, 2, 32), np.float32)
  values = randn(rng, (90, 2, 32), np.float32)
  bounds = [0, 40, 40, 90]  # the middle segment is empty
  parts = [ref.attend_sequence(q, keys[a:b], values[a:b]) for a, b in itertools.pairwise(bounds)]
  outs = np.stack([p[0] for p in parts]).astype(np.float32)  # packed [S, Tq=6, Hq=4, 32]
  lses = np.stack([p[1] for p in parts]).astype(np.float32)  # attention's [S, Hq=4, Tq=6]
  out, lse = jax_fmha.merge_attention_states(*to_device(device, outs, lses), out_dtype=out_dtype)
  expected, expected_lse = ref.attend_sequence(q, keys, values)
  tol = dict(rtol=1e-5, atol=2e-5) if out_dtype is None else dict(rtol=1e-2, atol=1e-2)
  assert_close(out, expected, **tol)
  assert_close(lse, expected_lse, rtol=1e-6, atol=1e-5, what="lse")
  all_empty = jax_fmha.merge_attention_states(outs[1:2], lses[1:2])
  assert (np.asarray(all_empty[0]) == 0).all() and np.isneginf(np.asarray(all_empty[1])).all()


@pytest.mark.parametrize("n", [0, 19, 47])
def test_merge_takes_what_attention_returns_dense(device, rng, n):
  """Attention over keys [0, n) merged with attention over [n, N) is attention over
  [0, N): attention's outputs and LSEs stacked and passed straight in (n = 0 or N: one
  part has no keys)."""
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  q = randn(rng, (2, 5, 4, 32), dtype)
  k, v = randn(rng, (2, 47, 2, 32), dtype), randn(rng, (2, 47, 2, 32), dtype)
  parts = [
    jax_fmha.attention(*to_device(device, q, k[:, a:b], v[:, a:b]), return_lse=True)
    for a, b in ((0, n), (n, 47))
  ]
  outs, lses = (jnp.stack(x) for x in zip(*parts))
  assert outs.shape == (2, 2, 5, 4, 32) and lses.shape == (2, 2, 4, 5)
  out, lse = jax_fmha.merge_attention_states(outs, lses)
  expected, expected_lse = ref.dense(q, k, v)
  assert_attention_close(out, expected, dtype, lse, expected_lse)
  whole, whole_lse = jax_fmha.attention(*to_device(device, q, k, v), return_lse=True)
  assert_close(out, whole, rtol=1e-5 if dtype == np.float32 else 2e-2, atol=2e-5)
  assert_close(lse, whole_lse, rtol=1e-6, atol=2e-5, what="lse")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_merge_takes_what_attention_returns_packed(device, rng, backend):
  """Packed sequences whose keys are split at different points: empty first part, empty
  second part, a middle split, and a sequence with no keys at all (merged to 0, -inf)."""
  dtype = FLOAT_DTYPES["float32"] if device.platform == "cpu" else FLOAT_DTYPES["bfloat16"]
  lens_q, lens_k, split = [3, 6, 1, 4], [30, 41, 17, 0], [0, 20, 17, 0]
  cu_q = np.cumsum([0] + lens_q).astype(np.int32)
  cu_k = np.cumsum([0] + lens_k).astype(np.int32)
  q = randn(rng, (cu_q[-1], 4, 64), dtype)
  k, v = randn(rng, (cu_k[-1], 1, 64), dtype), randn(rng, (cu_k[-1], 1, 64), dtype)
  parts = []
  for keep in (lambda i, b: i < split[b], lambda i, b: i >= split[b]):
    rows = [cu_k[b] + i for b, n in enumerate(lens_k) for i in range(n) if keep(i, b)]
    lens = [sum(keep(i, b) for i in range(n)) for b, n in enumerate(lens_k)]
    cu = np.cumsum([0] + lens).astype(np.int32)
    args = to_device(device, q, k[rows], v[rows], cu_q, cu)
    parts.append(
      jax_fmha.attention(
        *args[:3], cu_seqlens_q=args[3], cu_seqlens_k=args[4], return_lse=True, backend=backend
      )
    )
  outs, lses = (jnp.stack(x) for x in zip(*parts))
  assert outs.shape == (2, 14, 4, 64) and lses.shape == (2, 4, 14)
  out, lse = jax_fmha.merge_attention_states(outs, lses, backend=backend)
  expected, expected_lse = ref.packed(q, k, v, cu_q, cu_k)
  assert np.isneginf(expected_lse[:, -4:]).all()  # the sequence with no keys
  assert_attention_close(out, expected, dtype, lse, expected_lse)


@pytest.mark.parametrize("head_dim", [7, 128, 160])
def test_merge_many_splits(device, rng, head_dim):
  """More splits than a warp has lanes (the CUDA merge takes them 32 at a time), head dims
  that are not a multiple of the 4-column vectors or wider than one pass, empty partials
  holding garbage, a NaN partial: against the float64 formula."""
  splits, rows = 45, 6
  outs = randn(rng, (splits, rows, head_dim), np.float32)
  lses = randn(rng, (splits, rows), np.float32) * 4
  lses[::3, 1] = -np.inf
  outs[::3, 1] = 1e30  # an empty partial's output must weigh nothing, garbage included
  lses[:, 2] = -np.inf  # every partial of row 2 empty
  lses[17, 4] = np.nan
  # Packed with one head: outs [S, Tq, 1, D], lses [S, 1, Tq].
  out, lse = jax_fmha.merge_attention_states(*to_device(device, outs[:, :, None], lses[:, None]))
  out, lse = np.asarray(out)[:, 0], np.asarray(lse)[0]
  with np.errstate(divide="ignore", invalid="ignore"):  # rows 2 and 4 are checked apart
    top = np.max(np.where(np.isnan(lses), -np.inf, lses), 0).astype(np.float64)
    finite = np.where(np.isneginf(lses), 0.0, np.exp(lses - top))
    expected = np.einsum("sr,srd->rd", finite, np.where(finite[..., None] > 0, outs, 0.0))
    expected /= finite.sum(0)[:, None]
    expected_lse = np.log(finite.sum(0)) + top
  ok = [0, 1, 3, 5]
  assert_close(np.asarray(out)[ok], expected[ok], rtol=1e-5, atol=1e-5)
  assert_close(np.asarray(lse)[ok], expected_lse[ok], rtol=1e-6, atol=1e-5, what="lse")
  assert (np.asarray(out)[2] == 0).all() and np.isneginf(np.asarray(lse)[2])
  assert np.isnan(np.asarray(out)[4]).all() and np.isnan(np.asarray(lse)[4])


# ---------------------------------------------------------------------------------------
# Static bad input
# ---------------------------------------------------------------------------------------


def _paged_args():
  k = jnp.zeros((10, 16, 2, 64), jnp.bfloat16)
  return dict(
    q=jnp.zeros((2, 1, 4, 64), jnp.bfloat16),
    k=k,
    v=k,
    block_table=jnp.zeros((2, 3), jnp.int32),
    seq_lens=jnp.zeros((2,), jnp.int32),
  )


@pytest.mark.parametrize(
  "change, error, match",
  [
    (
      dict(block_table=jnp.zeros((2, 3), jnp.float32)),
      TypeError,
      r"block_table: expected an integer dtype \(converted to int32\), got float32",
    ),
    (
      dict(block_table=jnp.zeros((6,), jnp.int32)),
      ValueError,
      r"block_table: expected shape \[B=2",
    ),
    (
      dict(block_table=jnp.zeros((3, 3), jnp.int32)),
      ValueError,
      r"block_table: expected shape \[B=2",
    ),
    (dict(seq_lens=jnp.zeros((3,), jnp.int32)), ValueError, r"seq_lens: expected shape \[2\]"),
    (
      dict(seq_lens=jnp.zeros((2,), jnp.float32)),
      TypeError,
      "seq_lens: expected an integer dtype .* got float32",
    ),
    (dict(seq_lens=None), ValueError, "seq_lens: a paged cache"),
    (dict(v=jnp.zeros((10, 8, 2, 64), jnp.bfloat16)), ValueError, "v: expected k's shape"),
    (
      dict(k=jnp.zeros((10, 16, 3, 64), jnp.bfloat16), v=jnp.zeros((10, 16, 3, 64), jnp.bfloat16)),
      ValueError,
      "num_kv_heads",
    ),
    (
      dict(k=jnp.zeros((160, 2, 64), jnp.bfloat16), v=jnp.zeros((160, 2, 64), jnp.bfloat16)),
      ValueError,
      "k: expected rank 4",
    ),
    (dict(num_splits=0), ValueError, "num_splits: expected an int >= 1"),
    (dict(num_splits=1000), ValueError, "num_splits: expected at most"),
    (dict(num_splits=2.5), TypeError, "num_splits: expected a static Python int"),
    (dict(cu_seqlens_k=jnp.zeros((3,), jnp.int32)), ValueError, "cu_seqlens_k: not used"),
  ],
)
def test_paged_bad_input(change, error, match):
  args = _paged_args()
  args.update(change)
  with pytest.raises(error, match=match):
    jax_fmha.attention(**args)


def test_block_table_over_2_31_keys_per_sequence_is_refused():
  """Key positions within a sequence are 32-bit: a table that can address 2^31 keys is
  refused at trace time (shapes only: nothing is allocated)."""
  pages = jax.ShapeDtypeStruct((4, 2**16, 2, 64), jnp.bfloat16)
  table = jax.ShapeDtypeStruct((2, 2**15), jnp.int32)
  lens = jax.ShapeDtypeStruct((2,), jnp.int32)
  q = jax.ShapeDtypeStruct((2, 1, 2, 64), jnp.bfloat16)
  match = r"block_table: pages_per_seq x page_size must be at most 2147483647 keys"
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(
      lambda q, k, t, n: jax_fmha.attention(q, k, k, block_table=t, seq_lens=n),
      q,
      pages,
      table,
      lens,
    )
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(
      lambda k, new, t, n: jax_fmha.update_kv_cache(k, k, new, new, t, n), pages, q, table, lens
    )


@pytest.mark.parametrize(
  "change, error, match",
  [
    (dict(k_new=jnp.zeros((2, 1, 3, 64), jnp.bfloat16)), ValueError, "k_new: heads and head_dim"),
    (dict(k_new=jnp.zeros((2, 1, 2, 64), jnp.float16)), TypeError, "share one dtype"),
    (dict(v_cache=jnp.zeros((10, 8, 2, 64), jnp.bfloat16)), ValueError, "v_cache: expected"),
    (
      dict(cache_seqlens=jnp.zeros((3,), jnp.int32)),
      ValueError,
      r"cache_seqlens: expected shape \[2\]",
    ),
    (
      dict(block_table=jnp.zeros((2, 3), jnp.bool_)),
      TypeError,
      "block_table: expected an integer dtype .* got bool",
    ),
    (
      dict(cache_seqlens=jnp.zeros((2,), jnp.float16)),
      TypeError,
      "cache_seqlens: expected an integer dtype .* got float16",
    ),
    (dict(cu_seqlens_new=jnp.zeros((3,), jnp.int32)), ValueError, "k_new: expected rank 3"),
  ],
)
def test_update_bad_input(change, error, match):
  k = jnp.zeros((10, 16, 2, 64), jnp.bfloat16)
  args = dict(
    k_cache=k,
    v_cache=k,
    k_new=jnp.zeros((2, 1, 2, 64), jnp.bfloat16),
    v_new=jnp.zeros((2, 1, 2, 64), jnp.bfloat16),
    block_table=jnp.zeros((2, 3), jnp.int32),
    cache_seqlens=jnp.zeros((2,), jnp.int32),
  )
  args.update(change)
  if "v_new" not in change and "k_new" in change:
    args["v_new"] = args["k_new"]
  with pytest.raises(error, match=match):
    jax_fmha.update_kv_cache(**args)


@pytest.mark.parametrize(
  "outs, lses, match",
  [
    # dense [S, B, Sq, Hq, D] with the LSEs in the outputs' row order, not attention's
    ((2, 1, 3, 4, 8), (2, 1, 3, 4), r"lses: expected shape \(2, 1, 4, 3\) for outs "),
    ((2, 3, 4, 8), (2, 3, 4), r"lses: expected shape \(2, 4, 3\) for outs \(2, 3, 4, 8\)"),
    ((2, 3, 4, 8), (2, 4, 3, 1), r"lses: expected shape \(2, 4, 3\).*got \(2, 4, 3, 1\)"),
    ((2, 3, 8), (2, 3), r"outs: expected rank 5 .* or 4 .*got shape \(2, 3, 8\) \(lses"),
  ],
)
def test_merge_bad_shapes(outs, lses, match):
  with pytest.raises(ValueError, match=match):
    jax_fmha.merge_attention_states(jnp.ones(outs, jnp.float32), jnp.ones(lses, jnp.float32))


def test_merge_bad_input():
  with pytest.raises(TypeError, match="outs: expected dtype"):
    jax_fmha.merge_attention_states(jnp.zeros((2, 3, 1, 8), jnp.int32), jnp.zeros((2, 1, 3)))
