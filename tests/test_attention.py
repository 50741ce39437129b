"""Tests of jax_fmha.attention: dense and variable-length (packed) forward.

Every numeric test compares against the float64 NumPy reference in numpy_reference.py on
fresh random inputs, with per-dtype tolerances (conftest.OUT_TOL / LSE_TOL). Numeric tests
run on every device kind JAX has (the `device` fixture); most call jax_fmha.attention
eagerly, which runs the primitive through a cached jit.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_fmha

import numpy_reference as npref
from conftest import (
  FLOAT_DTYPES,
  OUT_TOL,
  assert_attention_close,
  assert_close,
  dtype_name,
  native_dtype,
  randn,
  run_on,
  to_device,
)

DTYPES = list(FLOAT_DTYPES)  # "float32", "bfloat16", "float16"
TARGET = "jax_fmha_attention_fwd"
REF_KEYS = ("scale", "softcap", "causal", "window")


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------


def _ref_kwargs(kw):
  return {key: kw[key] for key in REF_KEYS if key in kw}


def check_dense(device, rng, dtype, *, b=2, sq=33, sk=47, hq=4, hkv=2, d=64, qk_scale=1.0, **kw):
  """Runs dense attention with return_lse on `device`, checks it against the reference."""
  dtype = FLOAT_DTYPES[dtype]
  q = randn(rng, (b, sq, hq, d), dtype, qk_scale)
  k = randn(rng, (b, sk, hkv, d), dtype, qk_scale)
  v = randn(rng, (b, sk, hkv, d), dtype)
  out, lse = run_on(
    device, dtype, jax_fmha.attention, *to_device(device, q, k, v), return_lse=True, **kw
  )
  assert out.shape == (b, sq, hq, d)
  assert lse.shape == (b, hq, sq)
  assert out.devices() == {device}
  ref_out, ref_lse = npref.dense(q, k, v, **_ref_kwargs(kw))
  assert_attention_close(out, ref_out, dtype, lse, ref_lse)
  return ref_lse


def make_cu(lengths, start=0):
  return np.concatenate([[start], start + np.cumsum(lengths)]).astype(np.int32)


def check_packed(
  device, rng, dtype, q_lens, k_lens, *, hq=4, hkv=2, d=64, q_pad=(0, 0), k_pad=(0, 0), **kw
):
  """Packed attention: sequences of q_lens/k_lens, with q_pad/k_pad rows before/after them
  that belong to no sequence."""
  dtype = FLOAT_DTYPES[dtype]
  cu_q = make_cu(q_lens, q_pad[0])
  cu_k = make_cu(k_lens, k_pad[0])
  tq, tk = int(cu_q[-1]) + q_pad[1], int(cu_k[-1]) + k_pad[1]
  q = randn(rng, (tq, hq, d), dtype)
  k = randn(rng, (tk, hkv, d), dtype)
  v = randn(rng, (tk, hkv, d), dtype)
  out, lse = run_on(
    device,
    dtype,
    jax_fmha.attention,
    *to_device(device, q, k, v),
    cu_seqlens_q=to_device(device, cu_q),
    cu_seqlens_k=to_device(device, cu_k),
    return_lse=True,
    **kw,
  )
  assert out.shape == (tq, hq, d)
  assert lse.shape == (hq, tq)
  ref_out, ref_lse = npref.packed(q, k, v, cu_q, cu_k, **_ref_kwargs(kw))
  assert_attention_close(out, ref_out, dtype, lse, ref_lse)
  return ref_lse, cu_q


# ---------------------------------------------------------------------------------------
# The NumPy reference itself (pure NumPy, cheap): a few identities it must satisfy.
# ---------------------------------------------------------------------------------------


def test_numpy_reference_layouts_agree(rng):
  """dense == packed == kv_cache == paged on the same data; softmax rows sum to one."""
  b, sq, sk, hq, hkv, d = 3, 5, 11, 4, 2, 8
  q = rng.standard_normal((b, sq, hq, d))
  k = rng.standard_normal((b, sk, hkv, d))
  v = rng.standard_normal((b, sk, hkv, d))
  kw = dict(causal=True, window=(6, -1), softcap=2.0)
  out, lse = npref.dense(q, k, v, **kw)
  cu_q, cu_k = make_cu([sq] * b), make_cu([sk] * b)
  pout, plse = npref.packed(
    q.reshape(-1, hq, d), k.reshape(-1, hkv, d), v.reshape(-1, hkv, d), cu_q, cu_k, **kw
  )
  np.testing.assert_allclose(pout.reshape(out.shape), out, rtol=1e-12)
  np.testing.assert_allclose(plse.reshape(hq, b, sq).transpose(1, 0, 2), lse, rtol=1e-12)
  # A cache twice as long whose tail is garbage: only the first seq_lens keys count.
  kc = np.concatenate([k, np.full_like(k, 1e3)], axis=1)
  vc = np.concatenate([v, np.full_like(v, 1e3)], axis=1)
  cout, clse = npref.kv_cache(q, kc, vc, [sk] * b, **kw)
  np.testing.assert_allclose(cout, out, rtol=1e-12)
  np.testing.assert_allclose(clse, lse, rtol=1e-12)
  # Pages of 4 rows in shuffled order.
  page, per_seq = 4, -(-sk // 4)
  perm = rng.permutation(b * per_seq)
  pages = np.zeros((b * per_seq, page, hkv, d))
  vpages = np.zeros_like(pages)
  table = perm.reshape(b, per_seq)
  for i in range(b):
    for j in range(sk):
      pages[table[i, j // page], j % page] = k[i, j]
      vpages[table[i, j // page], j % page] = v[i, j]
  gout, glse = npref.paged(q, pages, vpages, table, [sk] * b, **kw)
  np.testing.assert_allclose(gout, out, rtol=1e-12)
  np.testing.assert_allclose(glse, lse, rtol=1e-12)
  # With v = 1 every visible row's output is 1 (softmax sums to one).
  ones, _ = npref.dense(q, k, np.ones_like(v), **kw)
  seen = np.isfinite(lse).transpose(0, 2, 1)
  np.testing.assert_allclose(ones[seen], 1.0, rtol=1e-12)
  assert (ones[~seen] == 0).all()


# ---------------------------------------------------------------------------------------
# Dense numerics
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(device, rng, dtype, causal):
  check_dense(device, rng, dtype, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
  "hq,hkv", [(4, 4), (8, 2), (16, 2), (32, 1)], ids=["mha", "gqa4", "gqa8", "mqa32"]
)
def test_head_groups(device, rng, hq, hkv, dtype, causal):
  check_dense(device, rng, dtype, hq=hq, hkv=hkv, sq=21, sk=37, d=32, causal=causal)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
  "sq,sk", [(5, 17), (17, 17), (17, 5), (1, 9), (9, 1), (70, 130), (130, 70), (64, 64), (65, 64)]
)
def test_causal_bottom_right(device, rng, sq, sk, dtype):
  ref_lse = check_dense(device, rng, dtype, sq=sq, sk=sk, hq=4, hkv=1, d=32, causal=True)
  # Sq > Sk: the first Sq - Sk query rows see no key at all.
  assert np.isneginf(ref_lse[:, :, : max(sq - sk, 0)]).all()
  assert np.isfinite(ref_lse[:, :, max(sq - sk, 0) :]).all()


WINDOWS = [(3, -1), (-1, 2), (4, 2), (0, 0), (0, -1), (-1, 0), (17, 5), (200, 200)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"w{w[0]}_{w[1]}")
@pytest.mark.parametrize("sq,sk", [(40, 40), (20, 90), (90, 20)])
def test_window(device, rng, sq, sk, window, causal):
  check_dense(device, rng, "float32", sq=sq, sk=sk, hq=2, hkv=1, d=16, window=window, causal=causal)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("window,causal", [((5, 3), False), ((9, -1), True)])
def test_window_low_precision(device, rng, dtype, window, causal):
  check_dense(device, rng, dtype, sq=100, sk=150, window=window, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
  "sq,sk,kw",
  [
    (20, 5, dict(window=(2, 1))),  # rows 0..13 see nothing (diag + right < 0)
    (20, 5, dict(causal=True)),  # rows 0..14 see nothing
    (12, 3, dict(window=(0, 0))),  # only rows with 0 <= diag < Sk see a key
    (9, 2, dict(window=(-1, 0), softcap=3.0)),
    (6, 0, dict()),  # no keys at all
  ],
  ids=["window", "causal", "diag-only", "softcap", "sk0"],
)
def test_rows_that_see_no_key(device, rng, dtype, sq, sk, kw):
  ref_lse = check_dense(device, rng, dtype, sq=sq, sk=sk, **kw)
  assert np.isneginf(ref_lse).any()  # the case really has such rows


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("softcap", [0.5, 5.0, 30.0])
def test_softcap(device, rng, dtype, causal, softcap):
  # scale 1 with unit inputs: scores of std ~sqrt(D) = 8, so the cap really bites.
  check_dense(device, rng, dtype, sq=30, sk=45, d=64, scale=1.0, softcap=softcap, causal=causal)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
  "scale",
  [0.3, 1, 0.0, -0.5, np.float32(2.0)],
  ids=["0.3", "int1", "zero", "negative", "np.float32"],
)
def test_scale_override(device, rng, dtype, scale):
  check_dense(device, rng, dtype, sq=19, sk=70, scale=scale, causal=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sk", [1, 7, 129, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_query(device, rng, dtype, sk, causal):
  """Decoding shape: Sq = 1 (bottom-right causal: the query sees every key)."""
  check_dense(device, rng, dtype, b=3, sq=1, sk=sk, hq=8, hkv=1, d=64, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1, 7, 129, 1000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lengths(device, rng, dtype, s, causal):
  """Lengths that are not multiples of any block size (and one long sequence)."""
  check_dense(
    device, rng, dtype, b=1 if s == 1000 else 2, sq=s, sk=s, hq=4, hkv=2, d=64, causal=causal
  )


@pytest.mark.parametrize("sq,sk", [(7, 1000), (1000, 129), (129, 7)])
def test_lengths_mixed(device, rng, sq, sk):
  check_dense(device, rng, "float32", b=1, sq=sq, sk=sk, hq=2, hkv=1, d=64, causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [8, 24, 64, 80, 128, 256])
def test_head_dims(device, rng, d, dtype):
  check_dense(device, rng, dtype, sq=37, sk=71, hq=4, hkv=2, d=d, causal=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("order", ["increasing", "decreasing", "spiky"])
def test_online_softmax_rescaling(device, rng, dtype, order):
  """Scores that grow along the keys (a new running max in every key block), shrink, or
  have isolated huge peaks: exercises the online-softmax correction."""
  dtype_ = FLOAT_DTYPES[dtype]
  b, sq, sk, h, d = 1, 8, 300, 2, 32
  q = np.abs(randn(rng, (b, sq, h, d), np.float32)) + 0.5
  ramp = np.linspace(-3, 3, sk)[None, :, None, None]
  if order == "decreasing":
    ramp = ramp[:, ::-1]
  base = np.abs(randn(rng, (b, sk, h, d), np.float32)) * 0.2
  k = base * ramp if order != "spiky" else randn(rng, (b, sk, h, d), np.float32)
  if order == "spiky":
    k[:, [13, 150, 299]] *= 8.0
  q, k = q.astype(dtype_), k.astype(dtype_)
  v = randn(rng, (b, sk, h, d), dtype_)
  out, lse = run_on(
    device, dtype_, jax_fmha.attention, *to_device(device, q, k, v), return_lse=True
  )
  ref_out, ref_lse = npref.dense(q, k, v)
  assert_attention_close(out, ref_out, dtype_, lse, ref_lse)


def test_large_scores_do_not_overflow(device, rng):
  """Scores in the hundreds: exp must be taken relative to the running max."""
  check_dense(device, rng, "float32", sq=20, sk=200, d=64, scale=4.0, causal=True)


def test_empty_queries(device, rng):
  """Sq = 0 (dense) and Tq = 0 (packed): empty outputs, no error."""
  dt = native_dtype(device)
  q = randn(rng, (2, 0, 4, 16), dt)
  k = randn(rng, (2, 5, 2, 16), dt)
  out, lse = jax_fmha.attention(*to_device(device, q, k, k), causal=True, return_lse=True)
  assert out.shape == (2, 0, 4, 16) and lse.shape == (2, 4, 0)
  cu_q, cu_k = np.zeros(3, np.int32), np.array([0, 2, 5], np.int32)
  out, lse = jax_fmha.attention(
    *to_device(device, q[0], k[0], k[0]), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True
  )
  assert out.shape == (0, 4, 16) and lse.shape == (4, 0)


def _random_config(seed):
  r = np.random.default_rng(1000 + seed)
  hkv = int(r.choice([1, 2, 3]))
  cfg = dict(
    hkv=hkv,
    hq=hkv * int(r.choice([1, 2, 5, 8])),
    d=int(r.choice([8, 16, 40, 72])),
    dtype=str(r.choice(DTYPES)),
    causal=bool(r.integers(2)),
    window=(int(r.choice([-1, 0, 1, 9, 40])), int(r.choice([-1, 0, 3, 33]))),
    softcap=float(r.choice([0.0, 0.0, 2.0])),
  )
  if r.integers(2):
    cfg["scale"] = float(r.uniform(0.05, 0.6))
  if r.integers(2):
    b = int(r.integers(1, 6))
    cfg["q_lens"] = [int(x) for x in r.choice([0, 1, 2, 13, 31, 64, 97], b)]
    cfg["k_lens"] = [int(x) for x in r.choice([0, 1, 5, 33, 64, 120], b)]
    cfg["q_pad"] = (0, int(r.choice([0, 0, 4])))
  else:
    cfg.update(
      b=int(r.integers(1, 4)),
      sq=int(r.choice([1, 2, 17, 63, 65, 140])),
      sk=int(r.choice([1, 3, 31, 64, 100, 257])),
    )
  return cfg


@pytest.mark.parametrize("seed", range(40))
def test_random_configs(device, rng, seed):
  """Randomly drawn (but fixed) combinations of every option, dense and packed."""
  cfg = _random_config(seed)
  dtype = cfg.pop("dtype")
  if "q_lens" in cfg:
    check_packed(device, rng, dtype, cfg.pop("q_lens"), cfg.pop("k_lens"), **cfg)
  else:
    check_dense(device, rng, dtype, **cfg)


def test_sharding_is_kept():
  """Outputs are typed with the shardings of their inputs' batch and heads (one device;
  tests/test_sharding.py splits over several)."""
  from jax.sharding import AxisType, PartitionSpec as P

  mesh = jax.make_mesh(
    (1,), ("x",), axis_types=(AxisType.Explicit,), devices=jax.devices("cpu")[:1]
  )
  q = np.ones((2, 3, 4, 8), np.float32)
  k = np.ones((2, 5, 2, 8), np.float32)
  f = jax.jit(functools.partial(jax_fmha.attention, return_lse=True))
  with jax.set_mesh(mesh):
    out, lse = f(jax.device_put(q, P("x")), jax.device_put(k, P("x")), jax.device_put(k, P("x")))
    assert out.sharding.spec == P("x", None, None, None)
    assert lse.sharding.spec == P("x", None, None)
    spec = P(None, None, "x")  # heads
    out, lse = f(jax.device_put(q, spec), jax.device_put(k, spec), jax.device_put(k, spec))
    assert out.sharding.spec == P(None, None, "x", None)
    assert lse.sharding.spec == P(None, "x", None)
    cu = np.array([0, 1, 3], np.int32)
    spec = P(None, "x")
    out, lse = f(
      jax.device_put(q[0], spec),
      jax.device_put(k[0], spec),
      jax.device_put(k[0], spec),
      cu_seqlens_q=cu,
      cu_seqlens_k=np.array([0, 2, 5], np.int32),
    )
    assert out.sharding.spec == P(None, "x", None)
    assert lse.sharding.spec == P("x", None)


# ---------------------------------------------------------------------------------------
# LSE and the return structure
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_dense(device, rng, dtype):
  dtype_ = FLOAT_DTYPES[dtype]
  q = randn(rng, (2, 9, 4, 16), dtype_)
  k = randn(rng, (2, 13, 2, 16), dtype_)
  v = randn(rng, (2, 13, 2, 16), dtype_)
  qd, kd, vd = to_device(device, q, k, v)
  out = run_on(device, dtype_, jax_fmha.attention, qd, kd, vd)
  assert isinstance(out, jax.Array) and out.shape == q.shape and out.dtype == dtype_
  res = run_on(device, dtype_, jax_fmha.attention, qd, kd, vd, return_lse=True)
  assert isinstance(res, tuple) and len(res) == 2
  out2, lse = res
  assert lse.shape == (2, 4, 9) and lse.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))
  ref_out, ref_lse = npref.dense(q, k, v)
  assert_attention_close(out2, ref_out, dtype_, lse, ref_lse)
  # The LSE is of the *scaled* scores: a different scale changes it accordingly.
  out3, lse3 = run_on(device, dtype_, jax_fmha.attention, qd, kd, vd, return_lse=True, scale=0.5)
  ref_out3, ref_lse3 = npref.dense(q, k, v, scale=0.5)
  assert_attention_close(out3, ref_out3, dtype_, lse3, ref_lse3)
  assert np.abs(np.asarray(lse3) - np.asarray(lse)).max() > 0.1


def test_lse_shapes_abstract():
  """eval_shape (abstract evaluation only): dense [B, Hq, Sq], packed [Hq, Tq]."""
  f = functools.partial(jax_fmha.attention, return_lse=True)
  sds = jax.ShapeDtypeStruct
  out, lse = jax.eval_shape(
    f,
    sds((3, 5, 8, 16), jnp.bfloat16),
    sds((3, 7, 2, 16), jnp.bfloat16),
    sds((3, 7, 2, 16), jnp.bfloat16),
  )
  assert (out.shape, out.dtype) == ((3, 5, 8, 16), jnp.bfloat16)
  assert (lse.shape, lse.dtype) == ((3, 8, 5), jnp.float32)
  cu = sds((4,), jnp.int32)
  out, lse = jax.eval_shape(
    lambda q, k, v, cq, ck: f(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck),
    sds((11, 8, 16), jnp.float16),
    sds((6, 4, 16), jnp.float16),
    sds((6, 4, 16), jnp.float16),
    cu,
    cu,
  )
  assert (out.shape, out.dtype) == ((11, 8, 16), jnp.float16)
  assert (lse.shape, lse.dtype) == ((8, 11), jnp.float32)


# ---------------------------------------------------------------------------------------
# Packed (variable-length) numerics
# ---------------------------------------------------------------------------------------

# (q_len, k_len) per sequence: empty q, empty k, both empty, single rows, long ones.
PACKED_SEQS = [(5, 9), (0, 4), (7, 0), (0, 0), (33, 33), (1, 17), (70, 65), (20, 3)]


@pytest.mark.parametrize("window", [(-1, -1), (6, 2)], ids=["nowindow", "window"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed(device, rng, dtype, causal, window):
  q_lens, k_lens = zip(*PACKED_SEQS)
  ref_lse, cu_q = check_packed(device, rng, dtype, q_lens, k_lens, causal=causal, window=window)
  # The sequence with queries but no keys: every row is 0 / -inf.
  assert np.isneginf(ref_lse[:, cu_q[2] : cu_q[3]]).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_gqa_softcap_scale(device, rng, dtype):
  check_packed(
    device,
    rng,
    dtype,
    [3, 40, 1],
    [50, 40, 129],
    hq=16,
    hkv=2,
    d=80,
    softcap=4.0,
    scale=0.2,
    causal=True,
  )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
  "q_pad,k_pad",
  [((0, 5), (0, 0)), ((0, 3), (0, 7)), ((4, 0), (2, 0)), ((3, 6), (5, 1))],
  ids=["q-tail", "both-tails", "heads", "heads-and-tails"],
)
def test_packed_rows_outside_sequences(device, rng, dtype, q_pad, k_pad):
  """Query rows outside every sequence get 0 and LSE -inf; key rows outside every
  sequence are never seen."""
  ref_lse, cu_q = check_packed(
    device, rng, dtype, [4, 0, 9], [6, 3, 9], q_pad=q_pad, k_pad=k_pad, causal=True
  )
  assert np.isneginf(ref_lse[:, : cu_q[0]]).all()
  assert np.isneginf(ref_lse[:, cu_q[-1] :]).all()


def test_packed_no_sequences(device, rng):
  """B = 0 (cu_seqlens [0]): every query row is outside: zeros, LSE -inf."""
  check_packed(device, rng, "float32", [], [], q_pad=(0, 5), k_pad=(0, 4))


def test_dense_empty_batch(device, rng):
  dt = native_dtype(device)
  q = randn(rng, (0, 3, 4, 16), dt)
  k = randn(rng, (0, 5, 2, 16), dt)
  out, lse = jax_fmha.attention(*to_device(device, q, k, k), return_lse=True)
  assert out.shape == q.shape and lse.shape == (0, 4, 3)


def test_packed_single_sequence_matches_dense(device, rng):
  """One packed sequence is the dense problem with B = 1."""
  dt = native_dtype(device)
  q = randn(rng, (1, 50, 4, 32), dt)
  k = randn(rng, (1, 77, 2, 32), dt)
  v = randn(rng, (1, 77, 2, 32), dt)
  dense_out, dense_lse = jax_fmha.attention(
    *to_device(device, q, k, v), causal=True, return_lse=True
  )
  out, lse = jax_fmha.attention(
    *to_device(device, q[0], k[0], v[0]),
    causal=True,
    cu_seqlens_q=np.array([0, 50], np.int32),
    cu_seqlens_k=np.array([0, 77], np.int32),
    return_lse=True,
  )
  assert_close(out, dense_out[0], **OUT_TOL[dtype_name(dt)])
  assert_close(lse, dense_lse[0], rtol=1e-6, atol=1e-6, what="lse")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_packed_max_seqlen(device, rng, dtype):
  """Tight static bounds give the same result as the derived ones."""
  q_lens, k_lens = [5, 70, 0, 33], [9, 65, 4, 33]
  check_packed(device, rng, dtype, q_lens, k_lens, causal=True, max_seqlen_q=70, max_seqlen_k=65)
  check_packed(device, rng, dtype, q_lens, k_lens, max_seqlen_q=max(q_lens) + 100)


def test_packed_max_seqlen_too_small_gives_nan(device, rng):
  """Documented: a sequence longer than max_seqlen_q is not computed, its rows are NaN;
  the other sequences are still right."""
  dt = native_dtype(device)
  q_lens, k_lens = [5, 30, 8], [9, 20, 8]
  cu_q, cu_k = make_cu(q_lens), make_cu(k_lens)
  q = randn(rng, (43, 2, 16), dt)
  k = randn(rng, (37, 1, 16), dt)
  v = randn(rng, (37, 1, 16), dt)
  out, lse = jax_fmha.attention(
    *to_device(device, q, k, v),
    cu_seqlens_q=cu_q,
    cu_seqlens_k=cu_k,
    max_seqlen_q=10,
    return_lse=True,
  )
  out, lse = np.asarray(out), np.asarray(lse)
  assert np.isnan(out[5:35]).all() and np.isnan(lse[:, 5:35]).all()
  ref_out, ref_lse = npref.packed(q, k, v, cu_q, cu_k)
  keep = np.r_[0:5, 35:43]
  assert_attention_close(out[keep], ref_out[keep], dt, lse[:, keep], ref_lse[:, keep])


# ---------------------------------------------------------------------------------------
# backend="reference" (pure JAX) agrees with the kernel and with the NumPy reference
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(causal=True),
    dict(window=(7, 3), softcap=2.5),
    dict(causal=True, window=(11, -1), scale=0.4),
  ],
  ids=["plain", "causal", "window-softcap", "causal-window-scale"],
)
def test_reference_backend_dense(device, rng, kw):
  dt = native_dtype(device)
  q = randn(rng, (2, 40, 8, 32), dt)
  k = randn(rng, (2, 25, 2, 32), dt)
  v = randn(rng, (2, 25, 2, 32), dt)
  args = to_device(device, q, k, v)
  ref = jax.jit(functools.partial(jax_fmha.attention, backend="reference", return_lse=True, **kw))(
    *args
  )
  ker = jax.jit(functools.partial(jax_fmha.attention, return_lse=True, **kw))(*args)
  ref_out, ref_lse = npref.dense(q, k, v, **_ref_kwargs(kw))
  assert_attention_close(ref[0], ref_out, dt, ref[1], ref_lse)
  assert_attention_close(ker[0], ref_out, dt, ker[1], ref_lse)
  assert_close(ker[0], ref[0], **OUT_TOL[dtype_name(dt)])
  assert_close(ker[1], ref[1], rtol=1e-5, atol=1e-4, what="lse")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_backend_packed(device, rng, dtype):
  dtype = FLOAT_DTYPES[dtype]
  q_lens, k_lens = zip(*PACKED_SEQS)
  cu_q, cu_k = make_cu(q_lens, 2), make_cu(k_lens, 1)
  tq, tk = int(cu_q[-1]) + 3, int(cu_k[-1]) + 2
  q = randn(rng, (tq, 4, 32), dtype)
  k = randn(rng, (tk, 1, 32), dtype)
  v = randn(rng, (tk, 1, 32), dtype)

  def f(backend, q, k, v, cq, ck):
    return jax_fmha.attention(
      q,
      k,
      v,
      cu_seqlens_q=cq,
      cu_seqlens_k=ck,
      causal=True,
      window=(9, -1),
      return_lse=True,
      backend=backend,
    )

  args = to_device(device, q, k, v, cu_q, cu_k)
  ref = jax.jit(functools.partial(f, "reference"))(*args)
  ker = run_on(device, dtype, jax.jit(functools.partial(f, "auto")), *args)
  ref_out, ref_lse = npref.packed(q, k, v, cu_q, cu_k, causal=True, window=(9, -1))
  assert_attention_close(ref[0], ref_out, dtype, ref[1], ref_lse)
  assert_attention_close(ker[0], ref_out, dtype, ker[1], ref_lse)


# ---------------------------------------------------------------------------------------
# jax.jit, jax.vmap, lowering, jaxpr
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jit_dense(device, rng, dtype):
  dtype = FLOAT_DTYPES[dtype]
  q = randn(rng, (2, 31, 8, 64), dtype)
  k = randn(rng, (2, 45, 2, 64), dtype)
  v = randn(rng, (2, 45, 2, 64), dtype)

  @jax.jit
  def f(q, k, v):
    out, lse = jax_fmha.attention(
      q, k, v, causal=True, window=(20, -1), softcap=10.0, return_lse=True
    )
    return out * 2, lse  # something around the custom call, too

  out, lse = run_on(device, dtype, f, *to_device(device, q, k, v))
  ref_out, ref_lse = npref.dense(q, k, v, causal=True, window=(20, -1), softcap=10.0)
  assert_attention_close(out, 2 * ref_out, dtype, lse, ref_lse)


def test_jit_packed_traced_cu_seqlens(device, rng):
  """cu_seqlens are traced values: one compilation serves different sequence splits."""
  dt = native_dtype(device)
  q = randn(rng, (40, 4, 32), dt)
  k = randn(rng, (50, 2, 32), dt)
  v = randn(rng, (50, 2, 32), dt)
  f = jax.jit(
    lambda q, k, v, cq, ck: jax_fmha.attention(
      q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, return_lse=True, max_seqlen_q=40
    )
  )
  for q_lens, k_lens in [([10, 30], [20, 30]), ([0, 39], [50, 0]), ([25, 5], [1, 2])]:
    cu_q, cu_k = make_cu(q_lens), make_cu(k_lens)
    out, lse = f(*to_device(device, q, k, v, cu_q, cu_k))
    ref_out, ref_lse = npref.packed(q, k, v, cu_q, cu_k, causal=True)
    assert_attention_close(out, ref_out, dt, lse, ref_lse)


def _dense_qkv(rng, lead, b=2, sq=9, sk=14, hq=4, hkv=2, d=16, dtype=np.float32):
  q = randn(rng, lead + (b, sq, hq, d), dtype)
  k = randn(rng, lead + (b, sk, hkv, d), dtype)
  v = randn(rng, lead + (b, sk, hkv, d), dtype)
  return q, k, v


def _attn_lse(q, k, v, **kw):
  return jax_fmha.attention(q, k, v, return_lse=True, **kw)


@pytest.mark.parametrize(
  "in_axes",
  [(0, 0, 0), (0, None, None), (None, 0, 0), (0, 0, None)],
  ids=["all", "q-only", "kv-only", "q-and-k"],
)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_vmap_dense(device, rng, in_axes, jit):
  dt = native_dtype(device)
  n = 3
  q, k, v = _dense_qkv(rng, (n,), dtype=dt)
  # Unbatched arguments are the first slice.
  args = [x if ax is not None else x[0] for x, ax in zip((q, k, v), in_axes)]
  f = jax.vmap(functools.partial(_attn_lse, causal=True, window=(5, -1)), in_axes=in_axes)
  out, lse = (jax.jit(f) if jit else f)(*to_device(device, *args))
  assert out.shape == q.shape and lse.shape == (n, 2, 4, 9)
  for i in range(n):
    qi, ki, vi = (x[i] if ax is not None else x for x, ax in zip(args, in_axes))
    ref_out, ref_lse = npref.dense(qi, ki, vi, causal=True, window=(5, -1))
    assert_attention_close(out[i], ref_out, dt, lse[i], ref_lse)


def test_vmap_dense_nonleading_axes(device, rng):
  """vmapped axes that are not leading, and out_axes that move the batch."""
  dt = native_dtype(device)
  n = 3
  q, k, v = _dense_qkv(rng, (n,), dtype=dt)
  qm = np.moveaxis(q, 0, 2)  # [B, Sq, n, Hq, D]
  km = np.moveaxis(k, 0, 4)  # [B, Sk, Hkv, D, n]
  f = jax.vmap(functools.partial(_attn_lse, causal=True), in_axes=(2, 4, 0), out_axes=(1, 2))
  out, lse = f(*to_device(device, qm, km, v))
  assert out.shape == (2, n, 9, 4, 16) and lse.shape == (2, 4, n, 9)
  for i in range(n):
    ref_out, ref_lse = npref.dense(q[i], k[i], v[i], causal=True)
    assert_attention_close(out[:, i], ref_out, dt, lse[:, :, i], ref_lse)


def test_vmap_nested(device, rng):
  dt = native_dtype(device)
  q, k, v = _dense_qkv(rng, (2, 3), b=1, dtype=dt)
  f = jax.vmap(jax.vmap(functools.partial(_attn_lse, softcap=3.0)), in_axes=(0, 0, 0))
  out, lse = jax.jit(f)(*to_device(device, q, k, v))
  assert out.shape == q.shape and lse.shape == (2, 3, 1, 4, 9)
  for i in range(2):
    for j in range(3):
      ref_out, ref_lse = npref.dense(q[i, j], k[i, j], v[i, j], softcap=3.0)
      assert_attention_close(out[i, j], ref_out, dt, lse[i, j], ref_lse)


def _packed_fn(q, k, v, cq, ck):
  return jax_fmha.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True, return_lse=True)


@pytest.mark.parametrize("batched", ["shared-cu", "batched-cu", "q-only"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_vmap_packed(device, rng, batched, jit):
  dt = native_dtype(device)
  n = 3
  q = randn(rng, (n, 30, 4, 16), dt)
  k = randn(rng, (n, 26, 2, 16), dt)
  v = randn(rng, (n, 26, 2, 16), dt)
  cu_q = np.stack([make_cu([7, 0, 20]), make_cu([1, 15, 10]), make_cu([27, 2, 0])])
  cu_k = np.stack([make_cu([3, 9, 14]), make_cu([0, 25, 1]), make_cu([12, 2, 10])])
  if batched == "shared-cu":
    in_axes, args = (0, 0, 0, None, None), (q, k, v, cu_q[0], cu_k[0])
  elif batched == "batched-cu":
    in_axes, args = (0, 0, 0, 0, 0), (q, k, v, cu_q, cu_k)
  else:
    in_axes, args = (0, None, None, None, None), (q, k[0], v[0], cu_q[0], cu_k[0])
  f = jax.vmap(_packed_fn, in_axes=in_axes)
  out, lse = (jax.jit(f) if jit else f)(*to_device(device, *args))
  assert out.shape == q.shape and lse.shape == (n, 4, 30)
  for i in range(n):
    qi, ki, vi, cqi, cki = (x[i] if ax is not None else x for x, ax in zip(args, in_axes))
    ref_out, ref_lse = npref.packed(qi, ki, vi, cqi, cki, causal=True)
    assert_attention_close(out[i], ref_out, dt, lse[i], ref_lse)


def test_lowered_hlo_has_custom_call(rng):
  q, k, v = _dense_qkv(rng, ())
  f = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, causal=True, softcap=2.0))
  text = f.lower(q, k, v).as_text()
  assert re.search(rf"custom_call @{TARGET}\(", text), text
  # Attributes are typed exactly (the FFI handler decodes i32 / f32).
  for name, typ in (
    ("scale", "f32"),
    ("softcap", "f32"),
    ("window_left", "i32"),
    ("window_right", "i32"),
    ("kv_layout", "i32"),
    ("max_seqlen_q", "i32"),
  ):
    assert re.search(rf"\b{name} = [-+.0-9e]+ : {typ}\b", text), (name, typ)
  assert "window_right = 0 : i32" in text and "max_seqlen_q = 9 : i32" in text
  assert re.search(r"\bscale = (2\.500000e-01|0\.25) : f32", text)
  # The packed form lowers to the same target.
  cu = np.array([0, 4, 9], np.int32)
  fp = jax.jit(
    lambda q, k, v, cq, ck: jax_fmha.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck)
  )
  text = fp.lower(q[0], k[0], v[0], cu, cu).as_text()
  assert f"custom_call @{TARGET}(" in text and "kv_layout = 1 : i32" in text
  # ... and the compiled executable still calls it.
  assert TARGET in f.lower(q, k, v).compile().as_text()


def test_jaxpr_shows_primitive(rng):
  q, k, v = _dense_qkv(rng, ())
  jaxpr = jax.make_jaxpr(lambda q, k, v: jax_fmha.attention(q, k, v))(q, k, v)
  assert TARGET in str(jaxpr)
  assert any(eqn.primitive.name == TARGET for eqn in jaxpr.jaxpr.eqns)
  # vmap of the dense form folds into the batch: still a single primitive, no loop.
  qb, kb, vb = _dense_qkv(rng, (3,))
  jaxpr = jax.make_jaxpr(jax.vmap(lambda q, k, v: jax_fmha.attention(q, k, v)))(qb, kb, vb)
  names = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert names.count(TARGET) == 1, names


def test_reference_backend_has_no_custom_call(rng):
  q, k, v = _dense_qkv(rng, ())
  f = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, backend="reference"))
  assert TARGET not in f.lower(q, k, v).as_text()


def test_missing_platform_kernel_raises_clear_error(rng):
  """Lowering for a platform that has no kernel built (ROCm never is; CUDA when not built)
  is an error that names the fix; never a silent fallback."""
  q, k, v = _dense_qkv(rng, ())
  f = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v))
  platforms = ["rocm"] + ([] if jax_fmha._ffi.has_target(TARGET, "cuda") else ["cuda"])
  for platform in platforms:
    with pytest.raises(RuntimeError, match=rf"(?s)'{platform}' kernel.*backend='reference'"):
      jax.export.export(f, platforms=[platform])(q, k, v)
  # The reference backend lowers for any platform.
  g = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, backend="reference"))
  jax.export.export(g, platforms=["cuda"])(q, k, v)


def test_float32_for_the_gpu_is_refused_with_a_cast_hint(monkeypatch, rng):
  """Lowering float32 attention for CUDA (here with CUDA handlers pretended present, so a
  CPU-only build checks the message too) raises a TypeError naming q, k, v, the dtypes and
  the cast, for attention and attention_with_kvcache; bfloat16 lowers."""
  monkeypatch.setattr(jax_fmha._ffi, "has_target", lambda target, platform: True)
  hint = (
    r"^q, k, v: .* on the GPU expected dtype bfloat16 or float16, got float32: cast them, "
    r"e\.g\. q\.astype\(jnp\.bfloat16\)"
  )
  q, k, v = _dense_qkv(rng, ())
  attend = jax.jit(lambda q, k, v: jax_fmha.attention(q, k, v, causal=True))
  with pytest.raises(TypeError, match=hint):
    jax.export.export(attend, platforms=["cuda"])(q, k, v)
  cast = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(TARGET)]
  jax.export.export(attend, platforms=["cuda"], disabled_checks=unchecked)(*cast)
  step = jax.jit(
    lambda q, k, v: jax_fmha.attention_with_kvcache(
      q, k, v, k[:, :1], v[:, :1], cache_seqlens=jnp.array([3, 7], jnp.int32)
    )
  )
  with pytest.raises(TypeError, match=hint):
    jax.export.export(step, platforms=["cuda"])(q, k, v)


def test_reference_backend_needs_no_extension(monkeypatch):
  """backend='reference' never reads the extension, so the kernels' limits (head dim,
  split count) do not apply to it; backend='auto' raises the extension's error."""

  def no_extension():
    raise RuntimeError("no extension")

  monkeypatch.setattr(jax_fmha._ffi, "constants", no_extension)
  q, k = jnp.ones((1, 4, 2, 264)), jnp.ones((1, 6, 1, 264))
  out = jax_fmha.attention(q, k, k, causal=True, num_splits=1000, backend="reference")
  assert out.shape == q.shape
  pages, table = jnp.zeros((4, 8, 1, 264)), jnp.arange(4, dtype=jnp.int32).reshape(2, 2)
  out, _, _ = jax_fmha.attention_with_kvcache(
    jnp.ones((2, 1, 2, 264)),
    pages,
    pages,
    jnp.ones((2, 1, 1, 264)),
    jnp.ones((2, 1, 1, 264)),
    cache_seqlens=jnp.array([3, 5], jnp.int32),
    block_table=table,
    backend="reference",
  )
  assert out.shape == (2, 1, 2, 264)
  out, _ = jax_fmha.merge_attention_states(
    jnp.ones((3, 5, 1, 300)), jnp.zeros((3, 1, 5)), backend="reference"
  )
  assert out.shape == (5, 1, 300)
  x = jnp.ones((3, 16))
  assert jax_fmha.geglu(x, packed_layout="interleaved", backend="reference").shape == (3, 8)
  with pytest.raises(RuntimeError, match="no extension"):
    jax_fmha.attention(q, k, k)


# ---------------------------------------------------------------------------------------
# Forward only
# ---------------------------------------------------------------------------------------


def test_grad_raises(rng):
  q, k, v = _dense_qkv(rng, ())
  loss = lambda q, k, v: jax_fmha.attention(q, k, v, causal=True).sum()
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(loss)(q, k, v)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(loss, argnums=2)(q, k, v)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.jit(jax.grad(loss))(q, k, v)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.vjp(lambda q: jax_fmha.attention(q, k, v), q)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.jvp(lambda q: jax_fmha.attention(q, k, v), (q,), (q,))
  # The LSE output is no way around it either.
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda q: jax_fmha.attention(q, k, v, return_lse=True)[1].sum())(q)


def test_grad_packed_raises(rng):
  q = randn(rng, (10, 2, 16), np.float32)
  k = randn(rng, (8, 2, 16), np.float32)
  cu = np.array([0, 4, 8], np.int32)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda q: jax_fmha.attention(q, k, k, cu_seqlens_q=cu, cu_seqlens_k=cu).sum())(q)


def test_grad_through_reference_backend(rng):
  """The error message points at backend='reference', which does differentiate."""
  q, k, v = _dense_qkv(rng, ())
  g = jax.grad(lambda q: jax_fmha.attention(q, k, v, causal=True, backend="reference").sum())(q)
  assert g.shape == q.shape and np.isfinite(np.asarray(g)).all()


def test_stop_gradient_on_inputs_allows_grad_elsewhere(rng):
  q, k, v = _dense_qkv(rng, ())
  sg = jax.lax.stop_gradient
  g = jax.grad(lambda q: (jax_fmha.attention(sg(q), sg(k), sg(v)) * q).sum())(q)
  np.testing.assert_allclose(np.asarray(g), np.asarray(jax_fmha.attention(q, k, v)))


def test_forward_only_message_advice_is_correct(rng):
  q, k, v = _dense_qkv(rng, ())
  with pytest.raises(NotImplementedError) as info:
    jax.grad(lambda q: jax_fmha.attention(q, k, v).sum())(q)
  msg = str(info.value)
  if "stop_gradient" in msg:
    # Following the advice as worded must work.
    if re.search(r"wrap the call", msg):
      jax.grad(lambda q: (jax.lax.stop_gradient(jax_fmha.attention(q, k, v)) * q).sum())(q)
    else:
      assert re.search(r"input|q, k", msg), msg


# ---------------------------------------------------------------------------------------
# Bad input: ValueError / TypeError at trace time, naming the argument
# ---------------------------------------------------------------------------------------

F32, BF16 = np.float32, jnp.bfloat16


def _z(shape, dtype=F32):
  return np.ones(shape, dtype)


Q, KV = (2, 8, 4, 16), (2, 10, 2, 16)
PQ, PKV = (12, 4, 16), (10, 2, 16)
CU = np.array([0, 5, 12], np.int32)
CUK = np.array([0, 4, 10], np.int32)


def _dense(q=Q, k=KV, v=KV, dtypes=(F32, F32, F32), **kw):
  return (_z(q, dtypes[0]), _z(k, dtypes[1]), _z(v, dtypes[2])), kw


def _packed(q=PQ, k=PKV, v=PKV, dtypes=(F32, F32, F32), **kw):
  kw.setdefault("cu_seqlens_q", CU)
  kw.setdefault("cu_seqlens_k", CUK)
  return (_z(q, dtypes[0]), _z(k, dtypes[1]), _z(v, dtypes[2])), kw


BAD_INPUTS = {
  # ranks
  "q-rank3-dense": (_dense(q=(8, 4, 16)), ValueError, r"^q: expected rank 4"),
  "q-rank5": (_dense(q=(1, 2, 8, 4, 16)), ValueError, r"^q: expected rank 4.*\(1, 2, 8, 4, 16\)"),
  "k-rank3-dense": (
    _dense(k=(10, 2, 16), v=(10, 2, 16)),
    ValueError,
    r"^k: expected rank 4.*\(10, 2, 16\)",
  ),
  "v-rank3-dense": (_dense(v=(10, 2, 16)), ValueError, r"^v: .*\(10, 2, 16\)"),
  "k-rank4-packed": (
    _packed(k=(1, 10, 2, 16), v=(1, 10, 2, 16)),
    ValueError,
    r"^k: expected rank 3",
  ),
  "v-rank2-packed": (_packed(v=(10, 32)), ValueError, r"^v: .*\(10, 32\)"),
  "dense-q-with-cu_seqlens": (
    _packed(q=Q, k=KV, v=KV),
    ValueError,
    r"^q: expected rank 3.*cu_seqlens",
  ),
  # mismatched q / k / v
  "batch-mismatch": (
    _dense(k=(3, 10, 2, 16), v=(3, 10, 2, 16)),
    ValueError,
    r"^k: batch 3 differs from q's batch 2",
  ),
  "head-dim-mismatch": (
    _dense(k=(2, 10, 2, 32), v=(2, 10, 2, 32)),
    ValueError,
    r"^k: head_dim 32 differs from q's head_dim 16",
  ),
  "v-length-mismatch": (
    _dense(v=(2, 11, 2, 16)),
    ValueError,
    r"^v: expected k's shape \(2, 10, 2, 16\), got \(2, 11, 2, 16\)",
  ),
  "v-heads-mismatch": (_dense(v=(2, 10, 4, 16)), ValueError, r"^v: expected k's shape"),
  "v-head-dim-mismatch": (_dense(v=(2, 10, 2, 8)), ValueError, r"^v: expected k's shape"),
  "packed-v-rows-mismatch": (_packed(v=(11, 2, 16)), ValueError, r"^v: expected k's shape"),
  "heads-not-divisible": (
    _dense(k=(2, 10, 3, 16), v=(2, 10, 3, 16)),
    ValueError,
    r"^k: num_kv_heads \(3\) must divide q's num_heads \(4\)",
  ),
  "more-kv-heads": (_dense(k=(2, 10, 8, 16), v=(2, 10, 8, 16)), ValueError, r"num_kv_heads \(8\)"),
  # dtypes
  "float64": (
    _dense(dtypes=(np.float64,) * 3),
    TypeError,
    r"^q: expected dtype float32, bfloat16, float16 or an FP8 format \(float8_e4m3fn, "
    r"float8_e5m2\), got float64",
  ),
  "int32": (_dense(dtypes=(np.int32,) * 3), TypeError, r"^q: expected dtype .* got int32"),
  "k-float64": (
    _dense(dtypes=(F32, np.float64, np.float64)),
    TypeError,
    r"^k: expected dtype .* got float64",
  ),
  "mixed-q-k": (
    _dense(dtypes=(F32, BF16, BF16)),
    TypeError,
    r"q, k, v must share one dtype, got q=float32, k=bfloat16, v=bfloat16",
  ),
  "mixed-v": (
    _dense(dtypes=(BF16, BF16, np.float16)),
    TypeError,
    r"must share one dtype.*v=float16",
  ),
  # head dims
  "head-dim-12": (
    _dense(q=(2, 8, 4, 12), k=(2, 10, 2, 12), v=(2, 10, 2, 12)),
    ValueError,
    r"head_dim must be a multiple of 8 .* got 12",
  ),
  "head-dim-264": (
    _dense(q=(2, 8, 4, 264), k=(2, 10, 2, 264), v=(2, 10, 2, 264)),
    ValueError,
    r"head_dim must be a multiple of 8 in \[8, 256\], got 264",
  ),
  "head-dim-512": (
    _dense(q=(1, 2, 1, 512), k=(1, 2, 1, 512), v=(1, 2, 1, 512)),
    ValueError,
    r"head_dim .* got 512",
  ),
  # cu_seqlens
  "cu_q-float": (
    _packed(cu_seqlens_q=CU.astype(np.float32)),
    TypeError,
    r"^cu_seqlens_q: expected an integer dtype \(converted to int32\), got float32",
  ),
  "cu_k-bool": (
    _packed(cu_seqlens_k=CUK.astype(bool)),
    TypeError,
    r"^cu_seqlens_k: expected an integer dtype \(converted to int32\), got bool",
  ),
  "cu_q-2d": (
    _packed(cu_seqlens_q=CU[None]),
    ValueError,
    r"^cu_seqlens_q: expected shape .* got \(1, 3\)",
  ),
  "cu_q-empty": (
    _packed(cu_seqlens_q=np.zeros((0,), np.int32)),
    ValueError,
    r"^cu_seqlens_q: expected shape \[B \+ 1\]",
  ),
  "cu_k-wrong-length": (
    _packed(cu_seqlens_k=np.array([0, 4, 8, 10], np.int32)),
    ValueError,
    r"^cu_seqlens_k: expected shape \[3\] .* got \(4,\)",
  ),
  "only-cu_q": (
    _packed(cu_seqlens_k=None),
    ValueError,
    r"cu_seqlens_q and cu_seqlens_k.*needs both, got only cu_seqlens_q",
  ),
  "only-cu_k": (
    _dense(cu_seqlens_k=CUK),
    ValueError,
    r"cu_seqlens_q and cu_seqlens_k.*needs both, got only cu_seqlens_k",
  ),
  "only-cu_k-packed-q": (
    _packed(cu_seqlens_q=None),
    ValueError,
    r"^q: expected rank 4.*cu_seqlens_q",
  ),
  "packed-q-without-cu": (
    _dense(q=PQ, k=PKV, v=PKV),
    ValueError,
    r"^q: expected rank 4.*needs cu_seqlens",
  ),
  # max_seqlen
  "max_seqlen_q-dense": (_dense(max_seqlen_q=8), ValueError, r"^max_seqlen_q: only for .*packed"),
  "max_seqlen_k-dense": (_dense(max_seqlen_k=10), ValueError, r"^max_seqlen_k: only for .*packed"),
  "max_seqlen_q-negative": (
    _packed(max_seqlen_q=-1),
    ValueError,
    r"^max_seqlen_q: expected an int >= 0, got -1",
  ),
  "max_seqlen_q-float": (
    _packed(max_seqlen_q=7.5),
    TypeError,
    r"^max_seqlen_q: expected a static Python int",
  ),
  "max_seqlen_k-negative": (_packed(max_seqlen_k=-3), ValueError, r"^max_seqlen_k:"),
  # score transform / mask
  "softcap-negative": (
    _dense(softcap=-1.0),
    ValueError,
    r"^softcap: expected a value >= 0.0, got -1.0",
  ),
  "softcap-nan": (_dense(softcap=float("nan")), ValueError, r"^softcap: expected a finite"),
  "softcap-str": (_dense(softcap="1"), TypeError, r"^softcap:"),
  "scale-inf": (_dense(scale=float("inf")), ValueError, r"^scale: expected a finite"),
  "scale-str": (_dense(scale="0.1"), TypeError, r"^scale:"),
  "window-left-below-minus-1": (
    _dense(window=(-2, -1)),
    ValueError,
    r"^window\[0\] \(left\): expected an int >= -1, got -2",
  ),
  "window-right-below-minus-1": (
    _dense(window=(3, -5)),
    ValueError,
    r"^window\[1\] \(right\): expected an int >= -1, got -5",
  ),
  "window-causal-below-minus-1": (
    _dense(window=(-7, -1), causal=True),
    ValueError,
    r"^window\[0\]",
  ),
  "window-three": (_dense(window=(1, 2, 3)), ValueError, r"^window: expected a pair"),
  "window-none": (_dense(window=None), ValueError, r"^window: expected a pair"),
  "window-float": (_dense(window=(1.5, 2)), TypeError, r"^window\[0\] \(left\)"),
  "causal-not-bool": (_dense(causal="yes"), TypeError, r"^causal: expected a bool"),
  # backend
  "backend-unknown": (
    _dense(backend="cuda"),
    ValueError,
    r"^backend: expected one of \('auto', 'reference'\), got 'cuda'",
  ),
  "backend-case": (_dense(backend="Reference"), ValueError, r"^backend:"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case):
  ((q, k, v), kw), exc, match = BAD_INPUTS[case]
  with pytest.raises(exc, match=match):
    jax_fmha.attention(q, k, v, **kw)


@pytest.mark.parametrize(
  "case",
  ["batch-mismatch", "mixed-q-k", "cu_k-wrong-length", "softcap-negative", "heads-not-divisible"],
)
def test_bad_input_at_trace_time(case):
  """Under jit (and eval_shape) the same errors come at trace time, before any kernel."""
  ((q, k, v), kw), exc, match = BAD_INPUTS[case]
  cq, ck = kw.pop("cu_seqlens_q", None), kw.pop("cu_seqlens_k", None)
  f = lambda q, k, v, cq, ck: jax_fmha.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, **kw)
  with pytest.raises(exc, match=match):
    jax.jit(f)(q, k, v, cq, ck)
  with pytest.raises(exc, match=match):
    jax.eval_shape(f, q, k, v, cq, ck)


def test_none_inputs():
  q, v = _z(Q), _z(KV)
  with pytest.raises(TypeError, match=r"^k: expected an array, got None"):
    jax_fmha.attention(q, None, v)


# ---------------------------------------------------------------------------------------
# build_info
# ---------------------------------------------------------------------------------------


def test_build_info():
  info = jax_fmha.build_info()
  assert {"version", "backends", "cuda_architectures", "jaxlib_version"} <= set(info)
  assert info["version"] == jax_fmha.__version__
  assert isinstance(info["backends"], list) and "cpu" in info["backends"]
  assert isinstance(info["cuda_architectures"], list)
  assert all(isinstance(a, str) and a for a in info["cuda_architectures"])
  if "cuda" not in info["backends"]:
    assert info["cuda_architectures"] == []
  assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["jaxlib_version"])
  # Built against the jax that is running (the FFI headers come from it).
  assert info["jaxlib_version"] == jax.lib.__version__ or info["jaxlib_version"] == jax.__version__
