"""The main of every py_test in tests/BUILD.bazel: pytest on the test file given as argument.

Bazel runs it in the test's runfiles, where jax_fmha is the package this repository built;
pytest's configuration comes from the pyproject.toml there, and Bazel gets a JUnit report
of the test cases.
"""

from __future__ import annotations

import os
import sys

import pytest

if __name__ == "__main__":
  # Runfiles are read-only: no .pytest_cache.
  args = [*sys.argv[1:], "-p", "no:cacheprovider"]
  if "XML_OUTPUT_FILE" in os.environ:
    args.append(f"--junitxml={os.environ['XML_OUTPUT_FILE']}")
  sys.exit(pytest.main(args))
