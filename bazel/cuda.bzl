"""The CUDA backend's build rules: the generated forward-kernel instantiation files, and nvcc
compiling .cu files into objects for the extension (Bazel 4 has no CUDA rules of its own)."""

load("@local_config_jax_fmha//:defs.bzl", "CUDA_ARCHITECTURES", "CUDA_MISSING", "NVCC")

def _forward_instances_impl(ctx):
    instances = []
    for prefix, (kernel, header) in ctx.attr.kernels.items():
        for head_dim in ctx.attr.head_dims:
            instance = ctx.actions.declare_file("%s/%s_d%d.cu" % (ctx.label.name, prefix, head_dim))
            ctx.actions.expand_template(
                template = ctx.file.template,
                output = instance,
                substitutions = {
                    "@KERNEL@": kernel,
                    "@KERNEL_HEADER@": header,
                    "@HEAD_DIM@": str(head_dim),
                },
            )
            instances.append(instance)
    return [DefaultInfo(files = depset(instances))]

forward_instances = rule(
    implementation = _forward_instances_impl,
    doc = "One .cu file per (forward kernel, head dim) from the template, as CMake's " +
          "configure_file makes them.",
    attrs = {
        "template": attr.label(allow_single_file = True, mandatory = True),
        "kernels": attr.string_list_dict(
            mandatory = True,
            doc = "file name prefix -> [ForwardKernel value, its header]",
        ),
        "head_dims": attr.int_list(mandatory = True),
    },
)

def _generate_code(architecture):
    """A CMake CUDA architecture ("90a-real", "80-virtual", "80": both) as an nvcc flag."""
    number, _, kind = architecture.partition("-")
    prefixes = {"real": ["sm_"], "virtual": ["compute_"], "": ["compute_", "sm_"]}[kind]
    return "--generate-code=arch=compute_%s,code=[%s]" % (
        number,
        ",".join([prefix + number for prefix in prefixes]),
    )

def _cuda_objects_impl(ctx):
    if CUDA_MISSING:
        fail("jax_fmha: the CUDA build (--config=cuda) needs %s; then run " % CUDA_MISSING +
             "`bazel sync --configure`")
    compilation = cc_common.merge_cc_infos(
        cc_infos = [dep[CcInfo] for dep in ctx.attr.deps],
    ).compilation_context
    flags = (
        # CMake passes host-compiler flags to nvcc the same way.
        ["-forward-unknown-to-host-compiler", "-std=c++17", "-Xcompiler=-fPIC"] +
        [_generate_code(architecture) for architecture in CUDA_ARCHITECTURES] +
        (["-DNDEBUG"] if ctx.var["COMPILATION_MODE"] == "opt" else []) +
        ["-D" + define for define in compilation.defines.to_list()] +
        # Tokenized as a cc_library's local_defines are: a quoted value keeps its quotes.
        ["-D" + token for define in ctx.attr.local_defines for token in ctx.tokenize(define)] +
        ["-I" + path for path in compilation.includes.to_list()] +
        ["-iquote" + path for path in compilation.quote_includes.to_list()] +
        ["-isystem" + path for path in compilation.system_includes.to_list()] +
        ctx.attr.copts
    )
    objects = []
    for src in ctx.files.srcs:
        obj = ctx.actions.declare_file(
            "%s/%s.pic.o" % (ctx.label.name, src.basename[:-len(".cu")]),
        )
        ctx.actions.run(
            executable = NVCC,
            arguments = flags + ["-x", "cu", "-c", src.path, "-o", obj.path],
            inputs = depset([src], transitive = [compilation.headers]),
            outputs = [obj],
            mnemonic = "NvccCompile",
            progress_message = "Compiling %s with nvcc" % src.short_path,
            # nvcc finds its host compiler on PATH, as in the CMake build.
            use_default_shell_env = True,
        )
        objects.append(obj)
    return [DefaultInfo(files = depset(objects))]

cuda_objects = rule(
    implementation = _cuda_objects_impl,
    doc = "Position-independent objects of .cu files, compiled by the configured nvcc for " +
          "the configured architectures; a cc_library takes them as srcs.",
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu"], mandatory = True),
        "deps": attr.label_list(providers = [CcInfo], doc = "headers, include paths, defines"),
        "copts": attr.string_list(),
        "local_defines": attr.string_list(),
    },
)
