"""Flax layers computed by jax_fmha's kernels: ``jax_fmha.flax.linen`` and
``jax_fmha.flax.nnx``.

Each module has ``make_attention_fn`` (an ``attention_fn`` for Flax's own attention
layers), ``MultiHeadAttention`` (Flax's parameters, plus GQA, rotary embeddings and a paged
KV cache for decoding), ``RMSNorm`` and ``GatedMLP``. Needs flax
(``pip install "jax_fmha[flax]"``); ``import jax_fmha`` does not import it.
"""

import re

# pyproject.toml's flax and test extras pin the same minimum (tests/test_flax.py checks).
FLAX_MIN_VERSION = "0.12.6"
_INSTALL = f"pip install 'jax_fmha[flax]' (or pip install 'flax>={FLAX_MIN_VERSION}')"


def _release(version: str) -> tuple[int, ...]:
  """The release numbers of a version string: "0.12.6.dev1" -> (0, 12, 6)."""
  return tuple(int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


try:
  import flax
except ImportError as error:  # pragma: no cover - depends on the environment
  raise ImportError(f"jax_fmha.flax needs flax>={FLAX_MIN_VERSION}: {_INSTALL}") from error
if _release(flax.__version__) < _release(FLAX_MIN_VERSION):
  raise ImportError(
    f"jax_fmha.flax needs flax>={FLAX_MIN_VERSION}, found flax {flax.__version__}: {_INSTALL}"
  )

from jax_fmha.flax._common import PagedKVCache, make_attention_fn  # noqa: E402
from jax_fmha.flax._rope import apply_rope  # noqa: E402

__all__ = ["PagedKVCache", "apply_rope", "make_attention_fn"]
