"""Flax layers computed by jax_fmha's kernels: ``jax_fmha.flax.linen`` and
``jax_fmha.flax.nnx``.

Each module has ``make_attention_fn`` (an ``attention_fn`` for Flax's own attention
layers), ``MultiHeadAttention`` (Flax's parameters, plus GQA, rotary embeddings and a paged
KV cache for decoding), ``RMSNorm`` and ``GatedMLP``. Needs flax
(``pip install "jax_fmha[flax]"``); ``import jax_fmha`` does not import it.
"""

try:
  import flax  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
  raise ImportError(
    "jax_fmha.flax needs flax: pip install 'jax_fmha[flax]' (or pip install 'flax>=0.10')"
  ) from error

from jax_fmha.flax._common import PagedKVCache, make_attention_fn
from jax_fmha.flax._rope import apply_rope

__all__ = ["PagedKVCache", "apply_rope", "make_attention_fn"]
