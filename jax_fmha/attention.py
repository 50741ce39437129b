"""``jax_fmha.attention``: the flash-attention forward."""

from __future__ import annotations

import math

import jax.numpy as jnp

from jax_fmha import _checks, _primitives, reference

BACKENDS = ("auto", "reference")


def attention(q, k, v, *, causal: bool = False, scale: float | None = None,
              window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int | None = None,
              max_seqlen_k: int | None = None, return_lse: bool = False,
              backend: str = "auto"):
  """Scaled dot-product attention, computed by a fused flash-attention kernel.

  Layouts:
    * dense: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]``;
    * variable length (packed): ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]`` with
      ``cu_seqlens_q``, ``cu_seqlens_k`` int32 ``[B + 1]`` prefix sums (first entry 0):
      sequence b owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key rows
      ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``. Empty sequences are allowed.

  ``Hq`` must be a multiple of ``Hkv`` (MHA, GQA, MQA); query head ``h`` attends to KV head
  ``h // (Hq // Hkv)``. ``D`` is a multiple of 8, at most 256. q, k, v share one dtype
  (float32, bfloat16 or float16); the output has that dtype; all accumulation is float32.

  Args:
    causal: mask aligned bottom-right: query ``i`` of a sequence with ``Sq`` queries and
      ``Sk`` keys sees keys ``j <= i + Sk - Sq``. Same as ``window=(left, 0)``.
    scale: multiplies ``q @ k.T``; default ``1 / sqrt(D)``.
    window: ``(left, right)``: query ``i`` sees keys in
      ``[i + Sk - Sq - left, i + Sk - Sq + right]``; ``-1`` leaves a side unbounded.
    softcap: if ``> 0``, scores become ``softcap * tanh(score / softcap)`` (after scaling,
      before masking).
    max_seqlen_q, max_seqlen_k: static bounds on the packed sequence lengths (default: the
      packed lengths ``Tq``, ``Tk``). A sequence longer than ``max_seqlen_q`` is not
      computed: its output rows are NaN.
    return_lse: also return the natural-log log-sum-exp of the scaled (softcapped) scores,
      float32 ``[B, Hq, Sq]`` (dense) or ``[Hq, Tq]`` (packed).
    backend: ``"auto"``: the jax_fmha kernel of the platform the computation is placed on
      (an error if that platform's kernel is not built); ``"reference"``: the pure-JAX
      implementation in ``jax_fmha.reference`` (same semantics, materializes the scores).

  A query row that sees no key gets output 0 and LSE ``-inf``. Packed query rows outside
  every sequence (before ``cu_seqlens_q[0]`` or after ``cu_seqlens_q[B]``) get 0 too.
  Forward only: ``jax.grad`` through the kernel raises.

  Returns:
    ``out`` with q's shape and dtype, or ``(out, lse)`` when ``return_lse``.
  """
  spec = _check_attention(q, k, v, causal=causal, scale=scale, window=window,
                          softcap=softcap, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, backend=backend)
  q, k, v = spec.pop("q"), spec.pop("k"), spec.pop("v")
  if backend == "reference":
    out, lse = reference.attention(
        q, k, v, scale=spec["scale"], softcap=spec["softcap"], window=spec["window"],
        cu_seqlens_q=spec["cu_seqlens_q"], cu_seqlens_k=spec["cu_seqlens_k"],
        max_seqlen_q=spec["max_seqlen_q"])
  else:
    out, lse = _primitives.attention_fwd(q, k, v, num_splits=1, **spec)
  return (out, lse) if return_lse else out


def _check_attention(q, k, v, *, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, backend) -> dict:
  """Validates the arguments; returns the canonical problem for the primitive."""
  if backend not in BACKENDS:
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
  q, k, v = (_checks.array(n, x) for n, x in (("q", q), ("k", k), ("v", v)))
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.float_dtype(name, x)
  _checks.same_dtype(("q", "k", "v"), q, k, v)

  packed = cu_seqlens_q is not None or cu_seqlens_k is not None
  if packed:
    if cu_seqlens_q is None or cu_seqlens_k is None:
      raise ValueError("cu_seqlens_q and cu_seqlens_k: the packed (variable-length) form "
                       "needs both, got only "
                       + ("cu_seqlens_q" if cu_seqlens_k is None else "cu_seqlens_k"))
    _checks.rank("q", q, (3,), "packed [Tq, Hq, D] with cu_seqlens_q; dense q is rank 4 "
                 "and takes no cu_seqlens")
    _checks.rank("k", k, (3,), "packed [Tk, Hkv, D] with cu_seqlens_k")
    _checks.rank("v", v, (3,), "packed [Tk, Hkv, D] with cu_seqlens_k")
    cu_seqlens_q = _checks.int32_vector("cu_seqlens_q", cu_seqlens_q, None,
                                        "[B + 1] prefix sums")
    if cu_seqlens_q.shape[0] < 1:
      raise ValueError("cu_seqlens_q: expected shape [B + 1] with B >= 0, got (0,)")
    batch = cu_seqlens_q.shape[0] - 1
    cu_seqlens_k = _checks.int32_vector("cu_seqlens_k", cu_seqlens_k, batch + 1,
                                        "[B + 1] prefix sums, B from cu_seqlens_q")
    if max_seqlen_k is not None:
      _checks.static_int("max_seqlen_k", max_seqlen_k, 0)
    max_seqlen_q = q.shape[0] if max_seqlen_q is None else \
        _checks.static_int("max_seqlen_q", max_seqlen_q, 0)
    kv_layout = _primitives.KV_PACKED
  else:
    _checks.rank("q", q, (4,), "dense [B, Sq, Hq, D]; packed q [Tq, Hq, D] needs "
                 "cu_seqlens_q and cu_seqlens_k")
    _checks.rank("k", k, (4,), "dense [B, Sk, Hkv, D]")
    _checks.rank("v", v, (4,), "dense [B, Sk, Hkv, D]")
    if k.shape[0] != q.shape[0]:
      raise ValueError(f"k: batch {k.shape[0]} differs from q's batch {q.shape[0]} "
                       f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
      if value is not None:
        raise ValueError(f"{name}: only for the packed form (with cu_seqlens), got {value}")
    max_seqlen_q = q.shape[1]
    kv_layout = _primitives.KV_UNIFORM

  if v.shape != k.shape:
    raise ValueError(f"v: expected k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
  num_q_heads, d = q.shape[-2], q.shape[-1]
  num_kv_heads = k.shape[-2]
  _checks.head_dim("q", d)
  if k.shape[-1] != d:
    raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's head_dim {d}")
  if num_kv_heads == 0 or num_q_heads % num_kv_heads:
    raise ValueError(f"k: num_kv_heads ({num_kv_heads}) must divide q's num_heads "
                     f"({num_q_heads}) for MHA/GQA/MQA")

  if not isinstance(causal, (bool, jnp.bool_)):
    raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
  window = _checks.window(window)
  if causal:
    window = (window[0], 0)
  scale = 1.0 / math.sqrt(d) if scale is None else _checks.static_float("scale", scale)
  softcap = _checks.static_float("softcap", softcap, minimum=0.0)
  return dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
              scale=scale, softcap=softcap, window=window, kv_layout=kv_layout,
              max_seqlen_q=max_seqlen_q)
