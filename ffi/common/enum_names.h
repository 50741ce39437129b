// The name table of an enum whose values Python passes as attributes: Python spells them by
// name and reads the numbers from the extension (module.cc's constants()), so that each name
// and number is written once, in the table next to the enum.
#pragma once

namespace jax_fmha {

template <typename Enum>
struct EnumName {
  const char* name;
  Enum value;
};

}  // namespace jax_fmha
