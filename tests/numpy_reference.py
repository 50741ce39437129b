"""A float64 NumPy attention reference, written from the specification.

Deliberately independent of ``jax_fmha.reference``: it loops over sequences and heads and
builds every mask from the definitions, in float64, so the kernels and the pure-JAX
reference are both checked against it.

Structure: every key/value layout is reduced to "for each sequence b: its query rows, its
key rows and its value rows", which ``attend_sequence`` turns into output rows and LSE.
Layout helpers only gather rows:

  * ``dense``     q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D]
  * ``packed``    q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens_q/k [B + 1]
  * ``kv_cache``  k/v [B, S_max, Hkv, D] with seq_lens [B] (first seq_lens[b] keys count)
  * ``paged``     k/v pages [P, page_size, Hkv, D], block_table [B, M], seq_lens [B]

Semantics (from the spec):
  * query head h uses KV head h // (Hq // Hkv);
  * s = scale * q . k (scale defaults to 1/sqrt(D)); softcap > 0: s = softcap*tanh(s/softcap)
    after scaling, before masking;
  * bottom-right alignment: query i of a sequence with Sq queries and Sk keys sits at key
    position diag = i + Sk - Sq; causal keeps keys j <= diag; window (left, right) keeps
    keys in [diag - left, diag + right], -1 meaning unbounded on that side;
  * a row with no visible key: output 0 and LSE -inf;
  * LSE is the natural-log log-sum-exp of the (scaled, softcapped) visible scores.
"""

from __future__ import annotations

import math

import numpy as np


def visible_mask(sq: int, sk: int, *, causal: bool = False, window=(-1, -1)) -> np.ndarray:
  """Boolean [sq, sk]: which keys each query row of one sequence may see."""
  i = np.arange(sq)[:, None]
  j = np.arange(sk)[None, :]
  diag = i + sk - sq
  ok = np.ones((sq, sk), dtype=bool)
  left, right = window
  if causal:
    ok &= j <= diag
  if left != -1:
    ok &= j >= diag - left
  if right != -1:
    ok &= j <= diag + right
  return ok


def attend_sequence(
  q, k, v, *, scale=None, softcap: float = 0.0, causal: bool = False, window=(-1, -1)
):
  """One sequence. q [Sq, Hq, D], k/v [Sk, Hkv, D] (any float dtype; computed in float64).

  Returns out [Sq, Hq, D] float64 and lse [Hq, Sq] float64.
  """
  q = np.asarray(q, dtype=np.float64)
  k = np.asarray(k, dtype=np.float64)
  v = np.asarray(v, dtype=np.float64)
  sq, hq, d = q.shape
  sk, hkv = k.shape[0], k.shape[1]
  assert k.shape == v.shape and k.shape[2] == d and hq % hkv == 0
  group = hq // hkv
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  mask = visible_mask(sq, sk, causal=causal, window=window)
  out = np.zeros((sq, hq, d), dtype=np.float64)
  lse = np.full((hq, sq), -np.inf, dtype=np.float64)
  if sq == 0 or sk == 0:
    return out, lse
  seen = mask.any(axis=1)  # rows with at least one visible key
  for h in range(hq):
    kvh = h // group
    s = scale * (q[:, h, :] @ k[:, kvh, :].T)  # [Sq, Sk]
    if softcap > 0:
      s = softcap * np.tanh(s / softcap)
    s = np.where(mask, s, -np.inf)
    m = np.where(seen, s.max(axis=1), 0.0)  # row max over visible keys
    p = np.where(mask, np.exp(s - m[:, None]), 0.0)
    total = np.where(seen, p.sum(axis=1), 1.0)
    out[:, h, :] = np.where(seen[:, None], (p / total[:, None]) @ v[:, kvh, :], 0.0)
    lse[h] = np.where(seen, m + np.log(total), -np.inf)
  return out, lse


def attend_sequences(
  sequences,
  *,
  hq: int,
  d: int,
  q_rows: int,
  scale=None,
  softcap: float = 0.0,
  causal: bool = False,
  window=(-1, -1),
):
  """The general form: `sequences` yields (q_row_indices, q, k, v) per sequence, where
  q_row_indices are the rows of a packed [q_rows, Hq, D] output owned by the sequence.

  Rows owned by no sequence get output 0 and LSE -inf. Returns out [q_rows, Hq, D] and
  lse [Hq, q_rows] (float64).
  """
  out = np.zeros((q_rows, hq, d), dtype=np.float64)
  lse = np.full((hq, q_rows), -np.inf, dtype=np.float64)
  for rows, q, k, v in sequences:
    o, l = attend_sequence(q, k, v, scale=scale, softcap=softcap, causal=causal, window=window)
    out[rows] = o
    lse[:, rows] = l
  return out, lse


# ---------------------------------------------------------------------------------------
# Layouts: each gathers (rows, q, k, v) per sequence and calls attend_sequences.
# ---------------------------------------------------------------------------------------


def _dense_queries(q):
  """Dense q [B, Sq, Hq, D] -> packed view and per-sequence row ranges."""
  b, sq, hq, d = q.shape
  return q.reshape(b * sq, hq, d), [np.arange(i * sq, (i + 1) * sq) for i in range(b)]


def _unpack_lse(lse, b, sq):
  """Packed-view LSE [Hq, B*Sq] -> dense [B, Hq, Sq]."""
  hq = lse.shape[0]
  return lse.reshape(hq, b, sq).transpose(1, 0, 2)


def dense(q, k, v, **kw):
  """q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> out [B, Sq, Hq, D], lse [B, Hq, Sq]."""
  q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
  b, sq, hq, d = q.shape
  qp, rows = _dense_queries(q)
  seqs = ((rows[i], qp[rows[i]], k[i], v[i]) for i in range(b))
  out, lse = attend_sequences(seqs, hq=hq, d=d, q_rows=b * sq, **kw)
  return out.reshape(b, sq, hq, d), _unpack_lse(lse, b, sq)


def packed(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw):
  """q [Tq, Hq, D], k/v [Tk, Hkv, D], cu_seqlens [B + 1] -> out [Tq, Hq, D], lse [Hq, Tq].

  Query rows outside every sequence (before cu_seqlens_q[0], from cu_seqlens_q[B] on) get
  0 and LSE -inf; key rows outside every sequence are never seen.
  """
  q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
  cq = np.asarray(cu_seqlens_q, dtype=np.int64)
  ck = np.asarray(cu_seqlens_k, dtype=np.int64)
  assert cq.shape == ck.shape and cq.ndim == 1
  seqs = []
  for b in range(len(cq) - 1):
    rows = np.arange(cq[b], cq[b + 1])
    keys = np.arange(ck[b], ck[b + 1])
    seqs.append((rows, q[rows], k[keys], v[keys]))
  return attend_sequences(seqs, hq=q.shape[1], d=q.shape[2], q_rows=q.shape[0], **kw)


def kv_cache(q, k_cache, v_cache, seq_lens, **kw):
  """Dense q [B, Sq, Hq, D]; contiguous cache k/v [B, S_max, Hkv, D] of which the first
  seq_lens[b] keys count -> out [B, Sq, Hq, D], lse [B, Hq, Sq]."""
  q, k_cache, v_cache = (np.asarray(x, dtype=np.float64) for x in (q, k_cache, v_cache))
  b, sq, hq, d = q.shape
  qp, rows = _dense_queries(q)
  lens = np.asarray(seq_lens, dtype=np.int64)
  seqs = ((rows[i], qp[rows[i]], k_cache[i, : lens[i]], v_cache[i, : lens[i]]) for i in range(b))
  out, lse = attend_sequences(seqs, hq=hq, d=d, q_rows=b * sq, **kw)
  return out.reshape(b, sq, hq, d), _unpack_lse(lse, b, sq)


def gather_pages(pages, block_table_row, length: int):
  """The first `length` rows of one sequence stored in pages [P, page_size, H, D]."""
  page_size = pages.shape[1]
  idx = np.arange(length)
  return pages[np.asarray(block_table_row)[idx // page_size], idx % page_size]


def paged(q, k_pages, v_pages, block_table, seq_lens, **kw):
  """Dense q [B, Sq, Hq, D]; k/v pages [P, page_size, Hkv, D]; block_table [B, M];
  seq_lens [B] -> out [B, Sq, Hq, D], lse [B, Hq, Sq]."""
  q, k_pages, v_pages = (np.asarray(x, dtype=np.float64) for x in (q, k_pages, v_pages))
  b, sq, hq, d = q.shape
  qp, rows = _dense_queries(q)
  lens = np.asarray(seq_lens, dtype=np.int64)
  table = np.asarray(block_table)
  seqs = (
    (
      rows[i],
      qp[rows[i]],
      gather_pages(k_pages, table[i], lens[i]),
      gather_pages(v_pages, table[i], lens[i]),
    )
    for i in range(b)
  )
  out, lse = attend_sequences(seqs, hq=hq, d=d, q_rows=b * sq, **kw)
  return out.reshape(b, sq, hq, d), _unpack_lse(lse, b, sq)
