"""jax_fmha: fused attention and MLP kernels for JAX, as XLA FFI custom calls."""

import pkgutil

# Run from a source checkout (e.g. `python -m jax_fmha` in the repository root after
# `pip install .`), this package is the source tree, which holds no compiled extension:
# extend the package path to the installed copy so that `_jax_fmha_ext` is found there.
__path__ = pkgutil.extend_path(__path__, __name__)

from jax_fmha import reference
from jax_fmha._ffi import FFI_TARGETS, build_info
from jax_fmha.attention import attention
from jax_fmha.kv_cache import attention_with_kvcache, update_kv_cache
from jax_fmha.merge import merge_attention_states
from jax_fmha.mlp import geglu, rms_norm, rms_norm_residual, swiglu
from jax_fmha.quantize import quantize_fp8, quantize_kv

__version__ = "0.1.0"

__all__ = [
  "FFI_TARGETS",
  "__version__",
  "attention",
  "attention_with_kvcache",
  "build_info",
  "geglu",
  "merge_attention_states",
  "quantize_fp8",
  "quantize_kv",
  "reference",
  "rms_norm",
  "rms_norm_residual",
  "swiglu",
  "update_kv_cache",
]
