"""The split-KV plan: the heuristic and each kernel's policy (ffi/common/split_policy.h), as
the extension exports them, and the device lookup of jax_fmha._split_plan; and the constants
the extension shares with Python, the split limit among them."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from jax_fmha import _ffi, _split_plan

_ext = _ffi._ext


def test_num_splits_heuristic_is_static():
  def gpu(rows):
    return dict(rows_per_unit=16 if rows <= 64 else 128, slots=264, waves=1, min_keys=1024)

  def splits(policy, **shape):
    return _ext.choose_num_splits(**shape, **policy)

  decode = dict(num_kv_heads=8, group=4, max_seqlen_q=1)
  # Enough sequences fill the device: no split.
  assert splits(gpu(4), batch=256, max_seqlen_k=8192, **decode) == 1
  assert splits(gpu(4), batch=64, max_seqlen_k=4096, **decode) == 1
  # One long sequence: split to fill one wave (8 units x 33 splits = 264 CTAs).
  assert splits(gpu(4), batch=1, max_seqlen_k=131072, **decode) == 33
  # 64 units: 4 splits fill one wave (256 of 264 CTAs); 5 would spill into a second one.
  assert splits(gpu(4), batch=8, max_seqlen_k=131072, **decode) == 4
  # 128 units: 2 splits (256 CTAs), not 3 (384: a second wave under half full).
  assert splits(gpu(4), batch=16, max_seqlen_k=4096, **decode) == 2
  # A few short sequences: no split shorter than min_keys.
  assert splits(gpu(4), batch=1, max_seqlen_k=4096, **decode) == 4
  assert splits(gpu(4), batch=1, max_seqlen_k=2000, **decode) == 1
  cpu = dict(rows_per_unit=64, slots=2, waves=2, min_keys=256)
  mqa = dict(num_kv_heads=1, group=8, max_seqlen_q=1)
  assert splits(cpu, batch=1, max_seqlen_k=8192, **mqa) == 4
  assert splits(cpu, batch=8, max_seqlen_k=8192, **mqa) == 1
  assert splits(cpu, batch=0, max_seqlen_k=8192, **mqa) == 1


def test_constants():
  assert _ffi.constants() == {
    "kv_layouts": {"uniform": 0, "packed": 1, "cache": 2, "paged": 3},
    "glu_layouts": {"separate": 0, "concat": 1, "interleaved": 2},
    "glu_activations": {"silu": 0, "gelu_tanh": 1, "gelu_erf": 2},
    "max_head_dim": 256,
    "max_splits": 256,
    "platforms": {"cpu": "cpu", "cuda": "CUDA"},
  }


def test_splits_are_bounded():
  policy = dict(rows_per_unit=16, slots=100000, waves=1, min_keys=1)
  assert (
    _ext.choose_num_splits(
      batch=1, num_kv_heads=1, group=1, max_seqlen_q=1, max_seqlen_k=1 << 20, **policy
    )
    == _ffi.constants()["max_splits"]
  )
  with pytest.raises(ValueError):
    _ext.choose_num_splits(
      batch=1,
      num_kv_heads=1,
      group=1,
      max_seqlen_q=1,
      max_seqlen_k=1,
      rows_per_unit=0,
      slots=1,
      waves=1,
      min_keys=1,
    )


def _policy(kernel, rows_per_unit, slots, waves, min_keys):
  return dict(
    kernel=kernel, rows_per_unit=rows_per_unit, slots=slots, waves=waves, min_keys=min_keys
  )


def test_cuda_prefill_policy_follows_the_forward_kernel(monkeypatch):
  monkeypatch.delenv("JAX_FMHA_CUDA_FORWARD", raising=False)
  prefill = dict(rows_per_kv_head=512, head_dim=128, page_size=0)
  hopper = _ext.split_policy("cuda", 132, 9, **prefill)
  if _ffi.build_info()["hopper_kernel"]:  # one CTA an SM
    assert hopper == _policy("hopper", 128, 132, 1, 1024)
  else:
    assert hopper == _policy("portable", 128, 264, 1, 1024)
  # Devices before Hopper, and Hopper with the portable kernel forced: two CTAs an SM.
  assert _ext.split_policy("cuda", 108, 8, **prefill) == _policy("portable", 128, 216, 1, 1024)
  monkeypatch.setenv("JAX_FMHA_CUDA_FORWARD", "portable")
  assert _ext.split_policy("cuda", 132, 9, **prefill) == _policy("portable", 128, 264, 1, 1024)


# 32 units of 128 rows: one wave is 8 splits of 2 CTAs an SM, or 4 of one CTA an SM.
_PREFILL_SHAPE = dict(
  batch=1, num_kv_heads=8, group=1, max_seqlen_q=512, max_seqlen_k=32768, head_dim=128, page_size=0
)


@pytest.mark.parametrize("page_size", [1, 8, 16, 48, 64, 80, 256])
def test_cuda_paged_prefill_takes_the_hopper_kernel_at_every_page_size(monkeypatch, page_size):
  """Pages of any size run on the Hopper kernel (TMA runs, or rows gathered by cp.async for
  pages below 64 keys or not a multiple of 16): the planner sees its one CTA an SM."""
  monkeypatch.delenv("JAX_FMHA_CUDA_FORWARD", raising=False)
  prefill = dict(rows_per_kv_head=512, head_dim=128, page_size=page_size)
  policy = _ext.split_policy("cuda", 132, 9, **prefill)
  if _ffi.build_info()["hopper_kernel"]:
    assert policy == _policy("hopper", 128, 132, 1, 1024)
  else:
    assert policy == _policy("portable", 128, 264, 1, 1024)


def test_cuda_fp8_prefill_takes_the_portable_kernel(monkeypatch):
  """FP8 K/V never run on the Hopper kernel; decode keeps the decode kernel."""
  monkeypatch.delenv("JAX_FMHA_CUDA_FORWARD", raising=False)
  prefill = dict(rows_per_kv_head=512, head_dim=128, page_size=16, fp8_kv=True)
  assert _ext.split_policy("cuda", 132, 9, **prefill) == _policy("portable", 128, 264, 1, 1024)
  decode = dict(prefill, rows_per_kv_head=8)
  assert _ext.split_policy("cuda", 132, 9, **decode) == _policy("decode", 16, 264, 1, 1024)
  assert _split_plan.num_splits(**_PREFILL_SHAPE, device=_FakeGpu(), fp8_kv=True) == 8


def test_cuda_fp8_queries_take_the_hopper_kernel(monkeypatch):
  """FP8 queries run on the Hopper kernel alone: at every row count (decode too), whatever
  JAX_FMHA_CUDA_FORWARD says; one CTA an SM."""
  monkeypatch.setenv("JAX_FMHA_CUDA_FORWARD", "portable")
  for rows in (8, 512):
    policy = _ext.split_policy(
      "cuda", 132, 9, rows_per_kv_head=rows, head_dim=128, page_size=0, fp8_kv=True, fp8_q=True
    )
    assert policy == _policy("hopper", 128, 132, 1, 1024)
  assert _split_plan.num_splits(**_PREFILL_SHAPE, device=_FakeGpu(), fp8_kv=True, fp8_q=True) == 4


@pytest.mark.parametrize("compute_capability_major", [8, 9])
def test_cuda_decode_policy(compute_capability_major):
  for rows in (1, 4, 64):  # packed query rows per KV head: decode, GQA, short chunks
    policy = _ext.split_policy(
      "cuda", 132, compute_capability_major, rows_per_kv_head=rows, head_dim=128, page_size=16
    )
    assert policy == _policy("decode", 16, 264, 1, 1024)


def test_cpu_policy():
  for rows in (1, 512):
    assert _ext.split_policy(
      "cpu", 16, 0, rows_per_kv_head=rows, head_dim=64, page_size=0
    ) == _policy("cpu", 64, 16, 2, 256)
  with pytest.raises(ValueError, match="platform"):
    _ext.split_policy("tpu", 16, 0, rows_per_kv_head=1, head_dim=64, page_size=0)


@dataclasses.dataclass
class _FakeGpu:
  platform: str = "gpu"
  core_count: int = 132
  compute_capability: str = "9.0"


def test_num_splits_on_a_gpu_uses_its_kernel(monkeypatch):
  monkeypatch.delenv("JAX_FMHA_CUDA_FORWARD", raising=False)
  shape = _PREFILL_SHAPE
  hopper = _ffi.build_info()["hopper_kernel"]
  assert _split_plan.num_splits(**shape, device=_FakeGpu()) == (4 if hopper else 8)
  assert _split_plan.num_splits(**shape, device=_FakeGpu(compute_capability="8.0")) == 8
  monkeypatch.setenv("JAX_FMHA_CUDA_FORWARD", "portable")
  assert _split_plan.num_splits(**shape, device=_FakeGpu()) == 8


@pytest.mark.parametrize(
  "threads, shape, expected",
  [
    (2, dict(batch=1, num_kv_heads=1, group=8, max_seqlen_q=1, max_seqlen_k=8192), 4),
    (2, dict(batch=1, num_kv_heads=2, group=4, max_seqlen_q=1, max_seqlen_k=5000), 2),
    (2, dict(batch=2, num_kv_heads=4, group=1, max_seqlen_q=100, max_seqlen_k=4096), 1),
    (2, dict(batch=1, num_kv_heads=1, group=1, max_seqlen_q=64, max_seqlen_k=1 << 20), 4),
    (16, dict(batch=1, num_kv_heads=1, group=8, max_seqlen_q=1, max_seqlen_k=8192), 32),
    (16, dict(batch=1, num_kv_heads=2, group=4, max_seqlen_q=1, max_seqlen_k=5000), 16),
    (16, dict(batch=2, num_kv_heads=4, group=1, max_seqlen_q=100, max_seqlen_k=4096), 2),
    (16, dict(batch=4, num_kv_heads=8, group=1, max_seqlen_q=1, max_seqlen_k=1000), 1),
  ],
)
def test_num_splits_on_the_cpu(monkeypatch, threads, shape, expected):
  monkeypatch.setattr(_split_plan.os, "cpu_count", lambda: threads)
  cpu = jax.devices("cpu")[0]
  assert _split_plan.num_splits(**shape, head_dim=64, page_size=16, device=cpu) == expected


def test_target_device():
  cpu = jax.devices("cpu")[0]
  assert _split_plan.target_device(jax.device_put(1.0, cpu)) == cpu
  with jax.default_device(cpu):
    assert _split_plan.target_device(None) == cpu
