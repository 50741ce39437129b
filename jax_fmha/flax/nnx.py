"""flax.nnx layers computed by jax_fmha's kernels, with Flax's parameter trees.

* ``make_attention_fn``: an ``attention_fn`` for ``flax.nnx.MultiHeadAttention``.
* ``MultiHeadAttention``: a drop-in for Flax's (GQA through ``num_kv_heads``, as Flax's),
  plus rotary embeddings (``rope_theta``), ``causal``/``window`` masks, right-padded rows
  (``lengths``) and a paged KV cache for decoding (``decode=True`` after ``init_cache``).
* ``RMSNorm`` (Flax's ``scale`` parameter) and ``GatedMLP`` (SwiGLU / GeGLU).

Forward only (the kernels have no gradient).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer, PrecisionLike
from jax.typing import ArrayLike

from jax_fmha.flax._common import (
  GatedActivation,
  PagedKVCache,
  attend,
  attention_inputs,
  check_gated_activation,
  gated_activation,
  make_attention_fn,
  resolve_causal,
  rms_norm,
)

__all__ = ["GatedMLP", "MultiHeadAttention", "RMSNorm", "make_attention_fn"]


class MultiHeadAttention(nnx.Module):
  """``flax.nnx.MultiHeadAttention`` computed by ``jax_fmha.attention``.

  The constructor takes Flax's arguments where they apply and makes Flax's parameters:
  ``query`` ``LinearGeneral`` kernel ``[in_features, num_heads, head_dim]``, ``key`` and
  ``value`` ``[in_kv_features, num_kv_heads, head_dim]``, ``out``
  ``[num_heads, head_dim, out_features]`` (biases with ``use_bias``), ``query_ln`` and
  ``key_ln`` with ``normalize_qk``. ``nnx.update(ours, nnx.state(flax_layer, nnx.Param))``
  loads a Flax layer's parameters.

  Arguments beyond Flax's:
    causal: causal mask, bottom-right aligned (query ``i`` of ``Sq`` sees keys
      ``j <= i + Sk - Sq``); the call's ``is_causal`` also turns it on (for ``Sq == Sk``).
    window: ``(left, right)`` sliding window around that diagonal; -1 is unbounded.
    rope_theta: rotary position embeddings (``apply_rope``) of queries and keys with this
      base, at each token's position (index in its row plus tokens already cached); None
      for none.

  Decoding: ``init_cache((batch, max_length, features))`` makes a paged KV cache
  (``nnx.Cache`` variables ``key_pages``, ``value_pages``, ``block_table``, ``seq_lens``,
  and ``key_scale``/``value_scale`` for an FP8 cache: ``PagedKVCache``'s fields); then
  each call with ``decode=True`` takes self-attention inputs ``[batch, length, features]``,
  appends their keys and values to the cache and attends over everything cached so far:
  prefill a prompt, then one token per call. A call with more tokens than the cache holds
  (inputs longer than it; with ``lengths`` only the device knows the count) raises a
  ValueError at trace time. Only the device knows how many tokens are cached, so a
  sequence that outgrows the cache over several calls (a prefill, then too many decode
  steps) is not caught: as ``jax_fmha.update_kv_cache`` and ``jax_fmha.attention``
  document, the writes past capacity are dropped and that sequence's outputs are NaN from
  then on (the other sequences are unaffected).

  Not supported (a ValueError says so): ``mask`` (use ``causal``/``window``/``lengths``),
  attention dropout when not deterministic, ``sow_weights``.
  """

  def __init__(
    self,
    num_heads: int,
    in_features: int,
    qkv_features: int | None = None,
    out_features: int | None = None,
    num_kv_heads: int | None = None,
    in_kv_features: int | None = None,
    *,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    dropout_rate: float = 0.0,
    deterministic: bool | None = None,
    precision: PrecisionLike = None,
    kernel_init: Initializer = nnx.initializers.lecun_normal(),
    out_kernel_init: Initializer | None = None,
    bias_init: Initializer = nnx.initializers.zeros_init(),
    out_bias_init: Initializer | None = None,
    use_bias: bool = True,
    decode: bool = False,
    normalize_qk: bool = False,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    rope_theta: float | None = None,
    rngs: nnx.Rngs,
  ) -> None:
    qkv_features = in_features if qkv_features is None else qkv_features
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if qkv_features % num_heads or num_heads % num_kv_heads:
      raise ValueError(
        f"qkv_features ({qkv_features}) must be a multiple of num_heads "
        f"({num_heads}), and num_heads of num_kv_heads ({num_kv_heads})"
      )
    self.num_kv_heads, self.head_dim = num_kv_heads, qkv_features // num_heads
    self.dtype, self.param_dtype = dtype, param_dtype
    self.dropout_rate, self.deterministic = dropout_rate, deterministic
    self.decode, self.causal, self.window, self.rope_theta = (
      decode,
      causal,
      tuple(window),
      rope_theta,
    )

    projection = functools.partial(
      nnx.LinearGeneral,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=kernel_init,
      bias_init=bias_init,
      use_bias=use_bias,
      precision=precision,
      rngs=rngs,
    )
    in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.query = projection(in_features, (num_heads, self.head_dim))
    self.key = projection(in_kv_features, (num_kv_heads, self.head_dim))
    self.value = projection(in_kv_features, (num_kv_heads, self.head_dim))
    if normalize_qk:
      qk_norm = functools.partial(
        nnx.LayerNorm,
        self.head_dim,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
      self.query_ln, self.key_ln = qk_norm(), qk_norm()
    else:
      self.query_ln = self.key_ln = nnx.data(None)
    self.out = nnx.LinearGeneral(
      (num_heads, self.head_dim),
      in_features if out_features is None else out_features,
      axis=(-2, -1),
      kernel_init=out_kernel_init or kernel_init,
      bias_init=out_bias_init or bias_init,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      rngs=rngs,
    )
    for name in PagedKVCache._fields:
      setattr(self, name, nnx.data(None))

  def init_cache(
    self, input_shape: Sequence[int], dtype: Dtype | None = None, *, page_size: int = 16
  ) -> None:
    """Makes an empty paged KV cache for inputs ``(batch, max_length, ...)`` (Flax's
    ``init_cache`` argument): room for ``max_length`` tokens per sequence (the prompt
    plus every token to decode; rounded up to whole pages), in pages of ``page_size``
    tokens, of ``dtype`` (the cache dtype; default: the layer's ``dtype`` or
    ``param_dtype``: the keys' dtype). Another float dtype than the keys' casts queries,
    keys and values to it for the cached attention. An FP8 ``dtype``
    (``jnp.float8_e4m3fn``, ``jnp.float8_e5m2``) stores keys and values quantized, with
    float32 per-KV-head scales in ``key_scale``/``value_scale``: 1.0 unless replaced
    (``layer.key_scale[...] = scales``) before the first cached call (see
    ``PagedKVCache``)."""
    empty = PagedKVCache.empty(
      batch_size=input_shape[0],
      max_length=input_shape[1],
      num_kv_heads=self.num_kv_heads,
      head_dim=self.head_dim,
      dtype=dtype or self.dtype or self.param_dtype,
      page_size=page_size,
    )
    for name, initial_value in empty._asdict().items():
      setattr(self, name, nnx.data(None) if initial_value is None else nnx.Cache(initial_value))

  def __call__(
    self,
    inputs_q: jax.Array,
    inputs_k: jax.Array | None = None,
    inputs_v: jax.Array | None = None,
    *,
    mask: jax.Array | None = None,
    deterministic: bool | None = None,
    rngs: nnx.Rngs | None = None,
    sow_weights: bool = False,
    decode: bool | None = None,
    is_causal: bool = False,
    lengths: ArrayLike | None = None,
  ) -> jax.Array:
    """Attention of ``inputs_q [batch..., Sq, in_features]`` over ``inputs_k``/``inputs_v``
    (default: ``inputs_q``, self-attention).

    ``lengths`` (int ``[batch...]``, self-attention only): row b holds ``lengths[b]``
    tokens, then padding, which is neither attended nor cached. ``decode`` overrides the
    constructor's. ``rngs`` is accepted for Flax's signature; there is no dropout to seed.
    """
    del rngs
    inputs_k, inputs_v = attention_inputs(
      inputs_q,
      inputs_k,
      inputs_v,
      mask=mask,
      sow_weights=sow_weights,
      dropout_rate=self.dropout_rate,
      deterministic=self.deterministic if deterministic is None else deterministic,
    )

    query, key, value = self.query(inputs_q), self.key(inputs_k), self.value(inputs_v)
    if self.query_ln is not None:
      query, key = self.query_ln(query), self.key_ln(key)
    mask_and_positions = dict(
      causal=resolve_causal(self.causal, is_causal, query.shape[-3], key.shape[-3]),
      window=self.window,
      lengths=lengths,
      rope_theta=self.rope_theta,
    )

    if self.decode if decode is None else decode:
      if self.key_pages is None:
        raise ValueError(
          "decode=True: the KV cache is not initialized; call "
          "init_cache((batch, max_length, features)) first"
        )
      variables = {name: getattr(self, name) for name in PagedKVCache._fields}
      cache = PagedKVCache(**{n: v[...] for n, v in variables.items() if v is not None})
      cache.check_fits(
        key.shape[-3], lengths, enlarge="make a longer cache: init_cache((batch, max_length, ...))"
      )
      out, cache = attend(query, key, value, cache=cache, **mask_and_positions)
      for name, updated in cache.variables().items():
        getattr(self, name)[...] = updated
    else:
      out, _ = attend(query, key, value, **mask_and_positions)
    return self.out(out)


class RMSNorm(nnx.Module):
  """``flax.nnx.RMSNorm`` (normalizing the last axis) computed by ``jax_fmha.rms_norm``.

  Parameter ``scale [num_features]``, as Flax's. ``__call__(x, residual=None)``: with a
  ``residual``, returns ``(rms_norm(x + residual), x + residual)`` from one fused kernel
  (``jax_fmha.rms_norm_residual``), for pre-norm residual blocks.
  """

  def __init__(
    self,
    num_features: int,
    *,
    epsilon: float = 1e-6,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    use_scale: bool = True,
    scale_init: Initializer = nnx.initializers.ones,
    rngs: nnx.Rngs,
  ) -> None:
    self.epsilon, self.dtype = epsilon, dtype
    self.scale = (
      nnx.Param(scale_init(rngs.params(), (num_features,), param_dtype))
      if use_scale
      else nnx.data(None)
    )

  def __call__(
    self, x: jax.Array, residual: jax.Array | None = None
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    scale = None if self.scale is None else self.scale[...]
    return rms_norm(x, scale, epsilon=self.epsilon, dtype=self.dtype, residual=residual)


class GatedMLP(nnx.Module):
  """``down_proj(act(gate_proj(x)) * up_proj(x))``: the Llama/Gemma feed-forward block,
  with the activation and product fused by ``jax_fmha.swiglu`` / ``jax_fmha.geglu``.

  Parameters: ``gate_proj``, ``up_proj`` (``nnx.Linear``, ``[in_features,
  hidden_features]``) and ``down_proj`` (``[hidden_features, out_features]``).

  Args:
    in_features, hidden_features: input width and width of the gated hidden layer.
    out_features: output width (default ``in_features``).
    activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU).
    approximate_gelu: GeGLU's tanh approximation (as ``jax.nn.gelu``'s default).
  """

  def __init__(
    self,
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    *,
    activation: GatedActivation = "silu",
    approximate_gelu: bool = True,
    use_bias: bool = False,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    precision: PrecisionLike = None,
    kernel_init: Initializer = nnx.initializers.lecun_normal(),
    bias_init: Initializer = nnx.initializers.zeros_init(),
    rngs: nnx.Rngs,
  ) -> None:
    check_gated_activation(activation)
    self.activation, self.approximate_gelu = activation, approximate_gelu
    linear = functools.partial(
      nnx.Linear,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=precision,
      kernel_init=kernel_init,
      bias_init=bias_init,
      rngs=rngs,
    )
    self.gate_proj = linear(in_features, hidden_features)
    self.up_proj = linear(in_features, hidden_features)
    self.down_proj = linear(hidden_features, in_features if out_features is None else out_features)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = gated_activation(
      self.gate_proj(x),
      self.up_proj(x),
      activation=self.activation,
      approximate_gelu=self.approximate_gelu,
    )
    return self.down_proj(hidden)
