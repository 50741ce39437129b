"""The Java rules that @bazel_tools//tools/jdk loads from @rules_java (every build parses it
for its toolchains), forwarded to the native ones."""

java_import = native.java_import
java_runtime = native.java_runtime
java_toolchain = native.java_toolchain
