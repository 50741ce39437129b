"""jax_fmha.flax: every layer against its Flax counterpart with the same
parameters (same parameter tree, outputs within float32 tolerance), the paged decode path
against full recomputation, and the errors for what the kernels cannot express."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_fmha.flax import (
  FLAX_MIN_VERSION,
  apply_rope,
  linen as fmha_linen,
  make_attention_fn,
  nnx as fmha_nnx,
)

from conftest import OUT_TOL, assert_close, randn

# The layers against Flax in float32 on the CPU backend (on_cpu: also on a GPU machine).
pytestmark = pytest.mark.usefixtures("on_cpu")

TOL = OUT_TOL["float32"]
BATCH, LENGTH, FEATURES, HEADS = 2, 12, 32, 4  # head_dim 8


def tree_shapes(tree):
  """Parameter paths and shapes: equal for two layers whose checkpoints are interchangeable."""
  return jax.tree.map(jnp.shape, tree)


def nnx_params(module):
  return tree_shapes(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def causal_mask(length):
  return nn.make_causal_mask(jnp.ones((BATCH, length)))


def positions(length):
  return jnp.broadcast_to(jnp.arange(length), (BATCH, length))


@pytest.fixture
def x(rng):
  return jnp.asarray(randn(rng, (BATCH, LENGTH, FEATURES), np.float32))


# ---------------------------------------------------------------------------------------
# make_attention_fn inside Flax's own layers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_attention_fn_in_linen_layer(x, causal):
  flax_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS)
  params = flax_layer.init(jax.random.key(0), x)
  expected = flax_layer.apply(params, x, mask=causal_mask(LENGTH) if causal else None)
  ours = nn.MultiHeadDotProductAttention(
    num_heads=HEADS, attention_fn=make_attention_fn(causal=causal)
  )
  assert_close(ours.apply(params, x), expected, **TOL)


def test_attention_fn_in_nnx_layer_gqa_window(x):
  window = (3, 0)  # the current key and the 3 before it
  query_pos, key_pos = jnp.arange(LENGTH)[:, None], jnp.arange(LENGTH)[None, :]
  band = (key_pos <= query_pos) & (key_pos >= query_pos - window[0])
  flax_layer = nnx.MultiHeadAttention(
    HEADS, FEATURES, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0)
  )
  expected = flax_layer(x, mask=jnp.broadcast_to(band, (BATCH, 1, LENGTH, LENGTH)))
  flax_layer.attention_fn = make_attention_fn(window=window)
  assert_close(flax_layer(x), expected, **TOL)


def test_attention_fn_nnx_is_causal(x):
  flax_layer = nnx.MultiHeadAttention(HEADS, FEATURES, decode=False, rngs=nnx.Rngs(0))
  expected = flax_layer(x, is_causal=True)
  flax_layer.attention_fn = make_attention_fn()
  assert_close(flax_layer(x, is_causal=True), expected, **TOL)
  with pytest.raises(ValueError, match="top-left"):  # cross-attention: alignments differ
    flax_layer(x, x[:, :5], is_causal=True)


def test_attention_fn_refuses_what_it_cannot_express(x):
  attention_fn = make_attention_fn(causal=True)
  linen_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS, attention_fn=attention_fn)
  params = linen_layer.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"mask: got an array of shape .*causal=True"):
    linen_layer.apply(params, x, mask=causal_mask(LENGTH))
  with pytest.raises(ValueError, match="no attention dropout"):
    nn.MultiHeadDotProductAttention(
      num_heads=HEADS, dropout_rate=0.1, attention_fn=attention_fn
    ).apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  # Inference with a dropout rate is fine: no dropout runs.
  nn.MultiHeadDotProductAttention(
    num_heads=HEADS, dropout_rate=0.1, attention_fn=attention_fn
  ).apply(params, x, deterministic=True)
  with pytest.raises(ValueError, match="sow_weights"):
    linen_layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
  # Flax's own decode cache always passes a mask.
  decoding = nn.MultiHeadDotProductAttention(
    num_heads=HEADS, attention_fn=attention_fn, decode=True
  )
  cache = decoding.init(jax.random.key(0), x)["cache"]
  with pytest.raises(ValueError, match="paged KV cache"):
    decoding.apply({**params, "cache": cache}, x[:, :1], mutable=["cache"])
  heads = jnp.zeros((BATCH, LENGTH, HEADS, 8))
  with pytest.raises(ValueError, match="bias: got an array"):
    attention_fn(heads, heads, heads, bias=jnp.zeros((BATCH, HEADS, LENGTH, LENGTH)))
  with pytest.raises(ValueError, match="einsums"):
    attention_fn(
      heads, heads, heads, qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum
    )


# ---------------------------------------------------------------------------------------
# MultiHeadAttention replacements
# ---------------------------------------------------------------------------------------


def test_rope_is_a_rotation_of_half_split_pairs(rng):
  x = randn(rng, (BATCH, LENGTH, 3, 16), np.float32)
  pos = rng.integers(0, 1000, (BATCH, LENGTH))
  half = np.arange(8)
  angle = pos[..., None, None] * 500.0 ** (-2.0 * half / 16)  # [B, L, 1, 8]
  pairs = (x[..., :8] + 1j * x[..., 8:]).astype(np.complex128) * np.exp(1j * angle)
  expected = np.concatenate([pairs.real, pairs.imag], axis=-1)
  assert_close(apply_rope(jnp.asarray(x), jnp.asarray(pos), 500.0), expected, rtol=1e-5, atol=1e-4)


def flax_rope_attention_fn(dot_product_attention, rope_theta, length):
  """Flax's ``dot_product_attention`` after rotary embeddings: the reference for
  ``rope_theta``. (flax.linen passes only the keywords an attention_fn names: mask.)"""

  def attention_fn(query, key, value, mask=None, **kwargs):
    return dot_product_attention(
      apply_rope(query, positions(length), rope_theta),
      apply_rope(key, positions(length), rope_theta),
      value,
      mask=mask,
      **kwargs,
    )

  return attention_fn


def load_params(module, params: dict):
  """Loads a pure dict of parameters (a linen checkpoint) into an nnx module."""
  state = nnx.state(module, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(module, state)


@pytest.mark.parametrize(
  "options",
  [
    dict(),
    dict(use_bias=False, qkv_features=64, out_features=16),
    dict(normalize_qk=True, rope_theta=10000.0),
  ],
)
def test_linen_attention_matches_flax(x, options):
  options = dict(options)
  rope_theta = options.pop("rope_theta", None)
  ours = fmha_linen.MultiHeadDotProductAttention(
    num_heads=HEADS, causal=True, rope_theta=rope_theta, **options
  )
  flax_layer = nn.MultiHeadDotProductAttention(
    num_heads=HEADS,
    **options,
    **(
      {}
      if rope_theta is None
      else dict(attention_fn=flax_rope_attention_fn(nn.dot_product_attention, rope_theta, LENGTH))
    ),
  )
  params = flax_layer.init(jax.random.key(0), x)
  assert tree_shapes(ours.init(jax.random.key(1), x)) == tree_shapes(params)
  assert_close(ours.apply(params, x), flax_layer.apply(params, x, mask=causal_mask(LENGTH)), **TOL)


def test_linen_class_names_give_flax_parameter_paths(x):
  class Model(nn.Module):
    library: object

    @nn.compact
    def __call__(self, x):
      x = self.library.MultiHeadDotProductAttention(num_heads=HEADS)(x)
      return self.library.MultiHeadAttention(num_heads=HEADS)(x)

  ours = Model(fmha_linen).init(jax.random.key(0), x)
  assert tree_shapes(ours) == tree_shapes(Model(nn).init(jax.random.key(0), x))


def test_linen_cross_attention_and_gqa(x, rng):
  memory = jnp.asarray(randn(rng, (BATCH, 7, 24), np.float32))
  ours = fmha_linen.MultiHeadAttention(num_heads=HEADS, num_kv_heads=2)
  params = ours.init(jax.random.key(0), x, memory)
  assert params["params"]["key"]["kernel"].shape == (24, 2, 8)
  # The same computation by nnx's GQA-capable layer, loaded with these parameters.
  flax_layer = nnx.MultiHeadAttention(
    HEADS, FEATURES, num_kv_heads=2, in_kv_features=24, decode=False, rngs=nnx.Rngs(0)
  )
  load_params(flax_layer, params["params"])
  assert_close(ours.apply(params, x, memory), flax_layer(x, memory), **TOL)


@pytest.mark.parametrize(
  "options",
  [
    dict(num_kv_heads=2),
    dict(num_kv_heads=1, use_bias=False, normalize_qk=True, out_features=16),
    dict(num_kv_heads=2, rope_theta=10000.0),
  ],
)
def test_nnx_attention_matches_flax(x, options):
  options = dict(options)
  rope_theta = options.pop("rope_theta", None)
  flax_layer = nnx.MultiHeadAttention(
    HEADS,
    FEATURES,
    **options,
    decode=False,
    rngs=nnx.Rngs(0),
    **(
      {}
      if rope_theta is None
      else dict(attention_fn=flax_rope_attention_fn(nnx.dot_product_attention, rope_theta, LENGTH))
    ),
  )
  ours = fmha_nnx.MultiHeadAttention(
    HEADS, FEATURES, **options, rope_theta=rope_theta, rngs=nnx.Rngs(1)
  )
  assert nnx_params(ours) == nnx_params(flax_layer)
  nnx.update(ours, nnx.state(flax_layer, nnx.Param))
  assert_close(ours(x, is_causal=True), flax_layer(x, is_causal=True), **TOL)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_lengths_match_a_padding_mask(x, api):
  lengths = jnp.array([5, LENGTH], jnp.int32)
  valid = jnp.arange(LENGTH) < lengths[:, None]  # [B, L]
  padding_mask = nn.make_attention_mask(valid, valid)
  if api == "linen":
    flax_layer = nn.MultiHeadDotProductAttention(num_heads=HEADS)
    params = flax_layer.init(jax.random.key(0), x)
    expected = flax_layer.apply(params, x, mask=padding_mask)
    out = fmha_linen.MultiHeadDotProductAttention(num_heads=HEADS).apply(params, x, lengths=lengths)
  else:
    flax_layer = nnx.MultiHeadAttention(HEADS, FEATURES, decode=False, rngs=nnx.Rngs(0))
    expected = flax_layer(x, mask=padding_mask)
    ours = fmha_nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(1))
    nnx.update(ours, nnx.state(flax_layer, nnx.Param))
    out = ours(x, lengths=lengths)
  assert_close(out[0, :5], expected[0, :5], **TOL)
  assert_close(out[1], expected[1], **TOL)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_layers_refuse_masks_and_dropout(x, api):
  if api == "linen":
    layer = fmha_linen.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=0.1)
    params = layer.init(jax.random.key(0), x, deterministic=True)
    call = functools.partial(layer.apply, params, x)
  else:
    call = functools.partial(
      fmha_nnx.MultiHeadAttention(HEADS, FEATURES, dropout_rate=0.1, rngs=nnx.Rngs(0)), x
    )
  with pytest.raises(ValueError, match="takes no dense mask"):
    call(mask=causal_mask(LENGTH), deterministic=True)
  with pytest.raises(ValueError, match="no attention dropout"):
    call(deterministic=False)
  with pytest.raises(ValueError, match="sow"):
    call(deterministic=True, sow_weights=True)
  call(deterministic=True)


# ---------------------------------------------------------------------------------------
# Decoding with the paged KV cache
# ---------------------------------------------------------------------------------------

DECODE_OPTIONS = dict(num_kv_heads=2, causal=True, rope_theta=10000.0)
PROMPT_LENGTHS = jnp.array([3, 7], jnp.int32)
DECODE_STEPS = 4


def decode_inputs(x):
  """The prompts (right-padded to 7 tokens with junk), then each step's next token."""
  prompts = jnp.where((jnp.arange(7) < PROMPT_LENGTHS[:, None])[..., None], x[:, :7], 100.0)
  steps = [x[jnp.arange(BATCH), PROMPT_LENGTHS + step][:, None] for step in range(DECODE_STEPS)]
  return prompts, steps


def assert_decoded_like_full(prefilled, decoded, full, tol=TOL):
  """Outputs of prefill and decode steps == the full sequences' outputs, position by
  position (each row's tokens are x's first PROMPT_LENGTHS[b] + DECODE_STEPS)."""
  for row, length in enumerate(PROMPT_LENGTHS.tolist()):
    assert_close(prefilled[row, :length], full[row, :length], **tol)
    for step, out in enumerate(decoded):
      assert_close(out[row, 0], full[row, length + step], **tol)


def test_linen_decode_matches_full_recomputation(x):
  layer = fmha_linen.MultiHeadAttention(num_heads=HEADS, decode=True, page_size=4, **DECODE_OPTIONS)
  variables = layer.init(jax.random.key(0), jnp.zeros((BATCH, 16, FEATURES)))
  assert tree_shapes(variables["cache"]) == {
    "key_pages": (8, 4, 2, 8),
    "value_pages": (8, 4, 2, 8),
    "block_table": (2, 4),
    "seq_lens": (2,),
  }
  params, cache = {"params": variables["params"]}, variables["cache"]
  full = fmha_linen.MultiHeadAttention(num_heads=HEADS, **DECODE_OPTIONS).apply(params, x)

  @functools.partial(jax.jit, donate_argnums=1)  # the cache is updated in place
  def step(params, cache, inputs, lengths=None):
    out, variables = layer.apply(
      {**params, "cache": cache}, inputs, lengths=lengths, mutable=["cache"]
    )
    return out, variables["cache"]

  prompts, tokens = decode_inputs(x)
  prefilled, cache = step(params, cache, prompts, PROMPT_LENGTHS)
  decoded = []
  for token in tokens:
    out, cache = step(params, cache, token)
    decoded.append(out)
  np.testing.assert_array_equal(cache["seq_lens"], PROMPT_LENGTHS + DECODE_STEPS)
  assert_decoded_like_full(prefilled, decoded, full)


def test_nnx_decode_matches_full_recomputation(x):
  layer = fmha_nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **DECODE_OPTIONS)
  full = layer(x)
  with pytest.raises(ValueError, match="init_cache"):
    layer(x, decode=True)
  layer.init_cache((BATCH, 16, FEATURES), page_size=4)
  prompts, tokens = decode_inputs(x)
  prefilled = layer(prompts, decode=True, lengths=PROMPT_LENGTHS)
  decode_step = nnx.jit(lambda layer, token: layer(token, decode=True))
  decoded = [decode_step(layer, token) for token in tokens]
  np.testing.assert_array_equal(layer.seq_lens[...], PROMPT_LENGTHS + DECODE_STEPS)
  assert_decoded_like_full(prefilled, decoded, full)


def test_nnx_decode_refuses_more_tokens_than_the_cache_holds(x):
  layer = fmha_nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **DECODE_OPTIONS)
  layer.init_cache((BATCH, 10, FEATURES), page_size=4)  # 3 pages: 12 tokens
  long_inputs = jnp.concatenate([x, x[:, :1]], axis=1)  # 13 tokens
  message = (
    r"13 tokens per sequence.*capacity of 12 .*pages of 4\); make a longer cache: init_cache"
  )
  with pytest.raises(ValueError, match=message):
    layer(long_inputs, decode=True)
  with pytest.raises(ValueError, match=message):
    nnx.jit(lambda layer, inputs: layer(inputs, decode=True))(layer, long_inputs)
  np.testing.assert_array_equal(layer.seq_lens[...], [0, 0])  # nothing was cached
  assert np.isfinite(layer(x, decode=True)).all()  # exactly the capacity fits


def test_linen_decode_refuses_more_tokens_than_the_cache_holds(x):
  layer = fmha_linen.MultiHeadAttention(num_heads=HEADS, decode=True, page_size=4, **DECODE_OPTIONS)
  variables = layer.init(jax.random.key(0), x[:, :10])  # 3 pages: 12 tokens
  long_inputs = jnp.concatenate([x, x[:, :1]], axis=1)
  with pytest.raises(ValueError, match=r"13 tokens per sequence.*capacity of 12 .*\(init\)"):
    jax.jit(lambda v, inputs: layer.apply(v, inputs, mutable=["cache"]))(variables, long_inputs)
  out, _ = layer.apply(variables, x, mutable=["cache"])
  assert np.isfinite(out).all()


# An FP8 cache's outputs against the float32 full recomputation: the error of storing keys
# and values in FP8, not the kernel's (max |error| / max |row| measured up to 0.08 for
# e4m3fn and 0.17 for e5m2 over 12 random inputs).
FP8_TOL = {"float8_e4m3fn": dict(rtol=0.1, atol=0.05), "float8_e5m2": dict(rtol=0.2, atol=0.1)}


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_nnx_decode_with_fp8_cache(x, fmt):
  """init_cache with an FP8 dtype: per-head scales in the cache state (1.0, then set by
  the caller), the cached keys are the layer's keys quantized with them, and decoding
  matches the full recomputation to FP8 precision."""
  fp8 = jnp.dtype(fmt)
  layer = fmha_nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **DECODE_OPTIONS)
  full = layer(x)
  layer.init_cache((BATCH, 16, FEATURES), fp8, page_size=4)
  assert layer.key_pages.dtype == layer.value_pages.dtype == fp8
  np.testing.assert_array_equal(layer.key_scale[...], [1.0, 1.0])
  scale = jnp.asarray([0.5, 0.125], jnp.float32)
  layer.key_scale[...] = scale
  prompts, tokens = decode_inputs(x)
  prefilled = layer(prompts, decode=True, lengths=PROMPT_LENGTHS)
  decode_step = nnx.jit(lambda layer, token: layer(token, decode=True))
  decoded = [decode_step(layer, token) for token in tokens]
  assert_decoded_like_full(prefilled, decoded, full, FP8_TOL[fmt])
  # Token j of sequence b is at page block_table[b, j // 4], slot j % 4: its rotated key
  # divided by its head's scale, to FP8 precision (2^-4 / 2^-3 relative, or subnormal).
  keys = apply_rope(layer.key(x), positions(LENGTH), DECODE_OPTIONS["rope_theta"])
  pages, table = np.asarray(layer.key_pages[...]).astype(np.float32), layer.block_table[...]
  relative = {"float8_e4m3fn": 2.0**-4, "float8_e5m2": 2.0**-3}[fmt]
  subnormal = float(jnp.finfo(fp8).smallest_subnormal)
  for b, length in enumerate((PROMPT_LENGTHS + DECODE_STEPS).tolist()):
    j = np.arange(length)
    cached = pages[np.asarray(table)[b, j // 4], j % 4] * np.asarray(scale)[:, None]
    expected = np.asarray(keys[b, :length])
    bound = relative * np.abs(expected) + subnormal * np.asarray(scale)[:, None]
    assert (np.abs(cached - expected) <= bound).all()


@pytest.mark.parametrize("cache_dtype", ["float8_e5m2", "bfloat16"])
def test_linen_decode_with_cache_dtype(x, cache_dtype):
  """cache_dtype: FP8 (scales in the cache collection, replaceable before prefill) or a
  float dtype other than the compute dtype (the cached attention runs in it)."""
  full = fmha_linen.MultiHeadAttention(num_heads=HEADS, **DECODE_OPTIONS)
  params = {"params": full.init(jax.random.key(0), x)["params"]}
  full = full.apply(params, x)
  cache_dtype = jnp.dtype(cache_dtype)
  fp8 = cache_dtype == jnp.float8_e5m2
  layer = fmha_linen.MultiHeadAttention(
    num_heads=HEADS, decode=True, page_size=4, cache_dtype=cache_dtype, **DECODE_OPTIONS
  )
  cache = layer.init(jax.random.key(0), jnp.zeros((BATCH, 16, FEATURES)))["cache"]
  assert cache["key_pages"].dtype == cache["value_pages"].dtype == cache_dtype
  scales = {"key_scale", "value_scale"} if fp8 else set()
  assert set(cache) == {"key_pages", "value_pages", "block_table", "seq_lens"} | scales
  if fp8:
    cache = {**cache, "value_scale": jnp.asarray([2.0, 0.5], jnp.float32)}

  @jax.jit
  def step(cache, inputs, lengths=None):
    out, variables = layer.apply(
      {**params, "cache": cache}, inputs, lengths=lengths, mutable=["cache"]
    )
    return out, variables["cache"]

  prompts, tokens = decode_inputs(x)
  prefilled, cache = step(cache, prompts, PROMPT_LENGTHS)
  decoded = []
  for token in tokens:
    out, cache = step(cache, token)
    decoded.append(out)
  assert prefilled.dtype == jnp.float32
  if fp8:
    np.testing.assert_array_equal(cache["value_scale"], [2.0, 0.5])
  tol = FP8_TOL["float8_e5m2"] if fp8 else OUT_TOL["bfloat16"]
  assert_decoded_like_full(prefilled, decoded, full, tol)


@pytest.mark.parametrize("api", ["nnx", "linen"])
def test_decode_past_the_cache_gives_nan_rows_of_that_sequence_only(x, api):
  """Lengths overflowing only on the device, which no shape tells: the documented outcome
  of jax_fmha.update_kv_cache and jax_fmha.attention (writes past capacity dropped, NaN
  output rows), for the overflowing sequence alone and on every later call."""
  prompts, _ = decode_inputs(x)  # lengths 3 and 7; the cache holds 8 tokens per sequence
  if api == "nnx":
    layer = fmha_nnx.MultiHeadAttention(HEADS, FEATURES, rngs=nnx.Rngs(0), **DECODE_OPTIONS)
    layer.init_cache((BATCH, 8, FEATURES), page_size=4)
    call = lambda inputs, lengths=None: layer(inputs, decode=True, lengths=lengths)
    cache = lambda: {name: getattr(layer, name)[...] for name in ("key_pages", "seq_lens")}
  else:
    layer = fmha_linen.MultiHeadAttention(
      num_heads=HEADS, decode=True, page_size=4, **DECODE_OPTIONS
    )
    variables = layer.init(jax.random.key(0), x[:, :8])

    def call(inputs, lengths=None):
      nonlocal variables
      out, updated = layer.apply(variables, inputs, lengths=lengths, mutable=["cache"])
      variables = {**variables, **updated}
      return out

    cache = lambda: variables["cache"]

  call(prompts, PROMPT_LENGTHS)
  token = x[:, 7:8]
  assert np.isfinite(call(token)).all()  # 4 and 8 tokens cached: the second is full
  pages_before = cache()["key_pages"]
  for _ in range(2):
    out = call(token)
    assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
  np.testing.assert_array_equal(cache()["seq_lens"], [6, 10])
  # Sequence 1 (pages 2 and 3) kept its 8 tokens; sequence 0 wrote its 2 into page 1.
  np.testing.assert_array_equal(cache()["key_pages"][2:], pages_before[2:])
  assert not np.array_equal(cache()["key_pages"][1], pages_before[1])


# ---------------------------------------------------------------------------------------
# RMSNorm and GatedMLP
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_rms_norm_matches_flax(rng, dtype):
  x = jnp.asarray(randn(rng, (3, 5, 48), dtype))
  residual = jnp.asarray(randn(rng, (3, 5, 48), dtype))
  scale_init = nn.initializers.uniform(2.0)
  flax_norm = nn.RMSNorm(epsilon=1e-5, scale_init=scale_init)
  params = flax_norm.init(jax.random.key(0), x)
  ours = fmha_linen.RMSNorm(epsilon=1e-5)
  assert tree_shapes(ours.init(jax.random.key(0), x)) == tree_shapes(params)
  expected = flax_norm.apply(params, x)
  out = ours.apply(params, x)
  assert out.dtype == expected.dtype  # the promotion of x and the float32 scale, as Flax's
  tol = OUT_TOL[np.dtype(dtype).name]
  assert_close(out, expected, **tol)
  normed, summed = ours.apply(params, x, residual=residual)
  assert_close(summed, x + residual, **tol)
  assert_close(normed, flax_norm.apply(params, x + residual), **tol)

  flax_nnx_norm = nnx.RMSNorm(48, epsilon=1e-5, scale_init=scale_init, rngs=nnx.Rngs(0))
  nnx_norm = fmha_nnx.RMSNorm(48, epsilon=1e-5, rngs=nnx.Rngs(1))
  assert nnx_params(nnx_norm) == nnx_params(flax_nnx_norm)
  nnx.update(nnx_norm, nnx.state(flax_nnx_norm, nnx.Param))
  assert_close(nnx_norm(x), flax_nnx_norm(x), **tol)


class FlaxGatedMLP(nn.Module):
  """The gated MLP from flax.linen.Dense and jax.nn's activations."""

  hidden_features: int
  activation: object

  @nn.compact
  def __call__(self, x):
    gate = nn.Dense(self.hidden_features, use_bias=False, name="gate_proj")(x)
    up = nn.Dense(self.hidden_features, use_bias=False, name="up_proj")(x)
    return nn.Dense(x.shape[-1], use_bias=False, name="down_proj")(self.activation(gate) * up)


@pytest.mark.parametrize(
  "activation,approximate,flax_activation",
  [
    ("silu", True, jax.nn.silu),
    ("gelu", True, functools.partial(jax.nn.gelu, approximate=True)),
    ("gelu", False, functools.partial(jax.nn.gelu, approximate=False)),
  ],
)
def test_gated_mlp_matches_flax(x, activation, approximate, flax_activation):
  flax_mlp = FlaxGatedMLP(hidden_features=40, activation=flax_activation)
  params = flax_mlp.init(jax.random.key(0), x)
  ours = fmha_linen.GatedMLP(
    hidden_features=40, activation=activation, approximate_gelu=approximate
  )
  assert tree_shapes(ours.init(jax.random.key(1), x)) == tree_shapes(params)
  expected = flax_mlp.apply(params, x)
  assert_close(ours.apply(params, x), expected, **TOL)

  nnx_mlp = fmha_nnx.GatedMLP(
    FEATURES, 40, activation=activation, approximate_gelu=approximate, rngs=nnx.Rngs(0)
  )
  assert nnx_params(nnx_mlp) == tree_shapes(params["params"])
  load_params(nnx_mlp, params["params"])
  assert_close(nnx_mlp(x), expected, **TOL)


def test_gated_mlp_refuses_unknown_activation():
  with pytest.raises(ValueError, match="activation: expected one of"):
    fmha_nnx.GatedMLP(8, 16, activation="relu", rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------
# flax stays optional
# ---------------------------------------------------------------------------------------


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_error_without(fake_flax: str) -> str:
  """What ``import jax_fmha.flax`` raises in a fresh process (the source tree's, run from
  the repository root) where ``flax`` is ``fake_flax``: None (not installed) or a module."""
  script = (
    "import sys, types\n"
    f"sys.modules['flax'] = {fake_flax}\n"
    "import jax_fmha\n"
    "try:\n"
    "  import jax_fmha.flax\n"
    "except ImportError as error:\n"
    "  print(error)\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPOSITORY, check=True
  )
  return result.stdout


def test_jax_fmha_imports_without_flax():
  message = import_error_without("None")  # makes `import flax` fail
  assert f"needs flax>={FLAX_MIN_VERSION}: pip install 'jax_fmha[flax]'" in message


def test_too_old_flax_names_the_minimum():
  message = import_error_without("types.SimpleNamespace(__version__='0.12.5')")
  assert f"needs flax>={FLAX_MIN_VERSION}, found flax 0.12.5" in message


def test_flax_minimum_is_the_extras_pin():
  with open(os.path.join(REPOSITORY, "pyproject.toml"), "rb") as file:
    extras = tomllib.load(file)["project"]["optional-dependencies"]
  for extra in ("flax", "test"):
    assert [r for r in extras[extra] if r.startswith("flax")] == [f"flax>={FLAX_MIN_VERSION}"]
