"""benchmarks/attention.ipynb runs top to bottom (CPU backend, small sizes) with nbclient."""

from __future__ import annotations

import os
import time

import pytest

# The notebook's other needs (ipykernel, matplotlib) come with nbclient in the bench and test
# extras: a missing one fails the test rather than hiding it.
nbclient = pytest.importorskip(
  "nbclient", reason="nbclient is not installed (pip install '.[bench]' or '.[test]')"
)
import nbformat  # noqa: E402 - a dependency of nbclient

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def test_attention_notebook_runs():
  nb = nbformat.read(os.path.join(BENCHMARKS, "attention.ipynb"), as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": BENCHMARKS}}
  )
  start = time.perf_counter()
  client.execute(env=dict(os.environ, JAX_PLATFORMS="cpu"))
  elapsed = time.perf_counter() - start
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "mismatch" not in text, text
  assert "prefill" in text and "decode" in text, text  # the quick table and the H200 summary
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 6, f"{len(images)} plots"  # the quick run's and one per H200 suite
  assert elapsed < 60, f"the notebook took {elapsed:.0f} s"
