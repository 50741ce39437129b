"""jax_fmha_configure: the configure step of the Bazel build.

A repository rule that asks a Python interpreter (PYTHON_BIN_PATH, else python3 on PATH)
what the build compiles against, by running configure.py, and makes a repository of it
(named local_config_jax_fmha in WORKSPACE), with no downloads:

- cc_library targets for the interpreter's headers (:python_headers), nanobind built from
  its sources (:nanobind), jaxlib's XLA FFI headers (:xla_ffi_headers) and the CuTe/CUTLASS
  headers of nvidia-cutlass (:cutlass_headers, CUDA builds only), each a link to the
  installed directory;
- :python_toolchain, the Python toolchain WORKSPACE registers: every py_test runs on that
  interpreter, with the jax, numpy and pytest installed there;
- defs.bzl: the versions build_info() reports (pyproject.toml's version, the jaxlib whose
  headers these are), the extension's file suffix, and for CUDA builds nvcc, its library
  directories and the architectures (JAX_FMHA_CUDA_ARCHITECTURES, default as for pip).

It reruns when those environment variables change, or on `bazel sync --configure` (after
installing another jax or nanobind into the interpreter).
"""

def _jax_fmha_configure_impl(repository_ctx):
    python = repository_ctx.os.environ.get("PYTHON_BIN_PATH") or repository_ctx.which("python3")
    if not python:
        fail("jax_fmha: no python3 on PATH; set PYTHON_BIN_PATH to the interpreter that has " +
             "jax and nanobind installed")
    result = repository_ctx.execute([
        python,
        repository_ctx.path(repository_ctx.attr._configure_script),
        repository_ctx.path(repository_ctx.attr._pyproject),
    ])
    if result.return_code != 0:
        fail("jax_fmha: %s could not describe its environment (it needs jax and nanobind):\n%s" %
             (python, result.stderr))
    environment = json.decode(result.stdout)
    for name, path in environment["directories"].items():
        repository_ctx.symlink(path, name)
    repository_ctx.template(
        "BUILD.bazel",
        repository_ctx.attr._build_template,
        {"%{python}": environment["python"]},
    )
    repository_ctx.file("defs.bzl", "".join([
        "%s = %s\n" % (name, repr(value))
        for name, value in sorted(environment["values"].items())
    ]))

jax_fmha_configure = repository_rule(
    implementation = _jax_fmha_configure_impl,
    attrs = {
        "_build_template": attr.label(default = "//bazel:local_config.BUILD.tpl"),
        "_configure_script": attr.label(default = "//bazel:configure.py"),
        "_pyproject": attr.label(default = "//:pyproject.toml"),
    },
    environ = ["PYTHON_BIN_PATH", "PATH", "CUDACXX", "JAX_FMHA_CUDA_ARCHITECTURES"],
    configure = True,
)
