// Decoding of the fused MLP custom calls, shared by the CPU and CUDA handlers.
//
//   jax_fmha_glu                 gate, up -> out               attrs activation, layout
//   jax_fmha_rms_norm            x, weight -> y                attrs eps, weight_offset
//   jax_fmha_rms_norm_residual   x, residual, weight -> y, h   attrs eps, weight_offset
//
// Every op is row-wise: operands are viewed as [rows, hidden] (rows = the product of the
// leading axes). A backend writes one run function per op, taking its context (thread pool
// or stream) and the decoded problem, and gets its handlers from the templates at the end.
// Python validates everything at trace time; the checks here guard against a custom call
// emitted by something other than our lowering, so a mismatch never indexes out of bounds.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "common/activations.h"
#include "common/enum_names.h"
#include "common/errors.h"
#include "xla/ffi/api/ffi.h"

namespace jax_fmha {

namespace ffi = xla::ffi;

// Where gate and up come from: the "layout" attribute of the GLU custom call.
enum class GluLayout : int32_t {
  kSeparate = 0,     // gate [..., H] and up [..., H]
  kConcat = 1,       // one [..., 2H]: gate is the first half of each row, up the second
  kInterleaved = 2,  // one [..., 2H]: g0, u0, g1, u1, ...
};
inline constexpr EnumName<GluLayout> kGluLayoutNames[] = {{"separate", GluLayout::kSeparate},
                                                          {"concat", GluLayout::kConcat},
                                                          {"interleaved", GluLayout::kInterleaved}};

struct GluProblem {
  ffi::DataType dtype;  // of every operand and of out
  Activation activation;
  bool interleaved;
  int64_t rows, hidden;  // out is [rows, hidden]
  // Element c of row r of gate is at gate[r * row_stride + c * step], step 2 when
  // interleaved, else 1; the same for up. row_stride is hidden, or 2 * hidden when packed.
  const void* gate;
  const void* up;
  int64_t row_stride;
  void* out;
};

struct RmsNormProblem {
  ffi::DataType dtype;         // of x, residual, y and h
  ffi::DataType weight_dtype;  // dtype, or F32
  int64_t rows, hidden;
  const void* x;
  const void* residual;  // nullptr for plain rms_norm
  const void* weight;    // [hidden]
  void* y;
  void* h;  // x + residual, rounded to dtype; nullptr for plain rms_norm
  float eps, weight_offset;
};

template <typename Binding>
auto bind_glu(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()  // gate, or the packed gate_up
      .template Arg<ffi::AnyBuffer>()  // up; empty when packed
      .template Ret<ffi::AnyBuffer>()  // out
      .template Attr<int32_t>("activation")
      .template Attr<int32_t>("layout");
}

template <typename Binding>
auto bind_rms_norm(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // weight
      .template Ret<ffi::AnyBuffer>()  // y
      .template Attr<float>("eps")
      .template Attr<float>("weight_offset");
}

template <typename Binding>
auto bind_rms_norm_residual(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // residual
      .template Arg<ffi::AnyBuffer>()  // weight
      .template Ret<ffi::AnyBuffer>()  // y
      .template Ret<ffi::AnyBuffer>()  // h
      .template Attr<float>("eps")
      .template Attr<float>("weight_offset");
}

inline bool is_float_dtype(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// rows = product of all axes but the last; false for a scalar.
inline bool rows_of(const ffi::AnyBuffer& b, int64_t& rows) {
  const auto dims = b.dimensions();
  if (dims.size() < 1) return false;
  rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return true;
}

// Same dtype, same leading axes and a last axis of `last`.
inline bool matches(const ffi::AnyBuffer& b, const ffi::AnyBuffer& like, int64_t last) {
  const auto d = b.dimensions(), l = like.dimensions();
  if (b.element_type() != like.element_type() || d.size() != l.size() || d.size() < 1) return false;
  for (size_t i = 0; i + 1 < d.size(); ++i)
    if (d[i] != l[i]) return false;
  return d.back() == last;
}

inline ffi::Error decode_glu(const ffi::AnyBuffer& gate, const ffi::AnyBuffer& up,
                             const ffi::AnyBuffer& out, int32_t activation, int32_t layout,
                             GluProblem& p) {
  const auto fail = [](const std::string& what) { return invalid_argument("glu", what); };
  if (!is_float_dtype(gate.element_type()))
    return fail("unsupported dtype (float32, bfloat16, float16)");
  if (!rows_of(gate, p.rows)) return fail("gate must have rank >= 1");
  if (activation < 0 || activation > int32_t(Activation::kGeluErf))
    return fail("unknown activation " + std::to_string(activation));
  p.dtype = gate.element_type();
  p.activation = Activation(activation);
  p.gate = gate.untyped_data();
  p.row_stride = gate.dimensions().back();
  switch (GluLayout(layout)) {
    case GluLayout::kSeparate:
      if (!matches(up, gate, p.row_stride)) return fail("up must have gate's shape and dtype");
      p.hidden = p.row_stride;
      p.interleaved = false;
      p.up = up.untyped_data();
      break;
    case GluLayout::kConcat:
    case GluLayout::kInterleaved: {
      if (p.row_stride % 2) return fail("a packed gate_up must have an even last axis");
      if (up.element_count() != 0) return fail("the packed form takes an empty up operand");
      p.hidden = p.row_stride / 2;
      p.interleaved = GluLayout(layout) == GluLayout::kInterleaved;
      const int64_t up_offset = p.interleaved ? 1 : p.hidden;  // elements
      p.up = static_cast<const char*>(p.gate) + up_offset * ffi::ByteWidth(p.dtype);
      break;
    }
    default: return fail("unknown layout " + std::to_string(layout));
  }
  if (!matches(out, gate, p.hidden)) return fail("out must be gate's shape with last axis H");
  p.out = out.untyped_data();
  return ffi::Error::Success();
}

// residual and h are both null (rms_norm) or both set (rms_norm_residual).
inline ffi::Error decode_rms_norm(const ffi::AnyBuffer& x, const ffi::AnyBuffer* residual,
                                  const ffi::AnyBuffer& weight, const ffi::AnyBuffer& y,
                                  const ffi::AnyBuffer* h, float eps, float weight_offset,
                                  RmsNormProblem& p) {
  const auto fail = [](const std::string& what) { return invalid_argument("rms_norm", what); };
  if (!is_float_dtype(x.element_type()))
    return fail("unsupported dtype (float32, bfloat16, float16)");
  if (!rows_of(x, p.rows)) return fail("x must have rank >= 1");
  p.hidden = x.dimensions().back();
  p.dtype = x.element_type();
  p.weight_dtype = weight.element_type();
  if (weight.dimensions().size() != 1 || weight.dimensions()[0] != p.hidden ||
      (p.weight_dtype != p.dtype && p.weight_dtype != ffi::DataType::F32))
    return fail("weight must be [hidden], in x's dtype or float32");
  if (!matches(y, x, p.hidden)) return fail("y must have x's shape and dtype");
  if (residual && !matches(*residual, x, p.hidden))
    return fail("residual must have x's shape and dtype");
  if (h && !matches(*h, x, p.hidden)) return fail("h must have x's shape and dtype");
  if (!(eps > 0.f)) return fail("eps must be positive");
  p.x = x.untyped_data();
  p.residual = residual ? residual->untyped_data() : nullptr;
  p.weight = weight.untyped_data();
  p.y = y.untyped_data();
  p.h = h ? h->untyped_data() : nullptr;
  p.eps = eps;
  p.weight_offset = weight_offset;
  return ffi::Error::Success();
}

// ---- compile-time dispatch for the backends' kernel templates --------------------------

template <typename T>
struct Tag {
  using type = T;
};

// fn(Tag<T>{}) with T the backend's storage type of `dtype` (a dtype decode_* accepted).
template <typename Float32, typename BFloat16, typename Float16, typename Fn>
void dispatch_dtype(ffi::DataType dtype, Fn&& fn) {
  switch (dtype) {
    case ffi::DataType::BF16: return fn(Tag<BFloat16>{});
    case ffi::DataType::F16: return fn(Tag<Float16>{});
    default: return fn(Tag<Float32>{});
  }
}

// fn(std::integral_constant<Activation, a>{}).
template <typename Fn>
void dispatch_activation(Activation a, Fn&& fn) {
  switch (a) {
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGeluTanh:
      return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    default: return fn(std::integral_constant<Activation, Activation::kGeluErf>{});
  }
}

// fn(std::bool_constant<b>{}).
template <typename Fn>
void dispatch_bool(bool b, Fn&& fn) {
  if (b) return fn(std::true_type{});
  return fn(std::false_type{});
}

// ---- handlers: decode, then the backend's run function -------------------------------
// Context is what the backend binds first: ffi::ThreadPool on the CPU, cudaStream_t (from
// ffi::PlatformStream<cudaStream_t>) on CUDA.

template <typename Context, ffi::Error (*Run)(Context, const GluProblem&)>
ffi::Error glu_handler(Context context, ffi::AnyBuffer gate, ffi::AnyBuffer up,
                       ffi::Result<ffi::AnyBuffer> out, int32_t activation, int32_t layout) {
  GluProblem p;
  if (ffi::Error err = decode_glu(gate, up, *out, activation, layout, p); !err.success())
    return err;
  return Run(context, p);
}

template <typename Context, ffi::Error (*Run)(Context, const RmsNormProblem&)>
ffi::Error rms_norm_handler(Context context, ffi::AnyBuffer x, ffi::AnyBuffer weight,
                            ffi::Result<ffi::AnyBuffer> y, float eps, float weight_offset) {
  RmsNormProblem p;
  if (ffi::Error err = decode_rms_norm(x, nullptr, weight, *y, nullptr, eps, weight_offset, p);
      !err.success())
    return err;
  return Run(context, p);
}

template <typename Context, ffi::Error (*Run)(Context, const RmsNormProblem&)>
ffi::Error rms_norm_residual_handler(Context context, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                                     ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> y,
                                     ffi::Result<ffi::AnyBuffer> h, float eps,
                                     float weight_offset) {
  RmsNormProblem p;
  if (ffi::Error err = decode_rms_norm(x, &residual, weight, *y, &*h, eps, weight_offset, p);
      !err.success())
    return err;
  return Run(context, p);
}

}  // namespace jax_fmha
