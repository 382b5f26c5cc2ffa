// torch.autocast support for the mmfast ops.
//
// Without an Autocast kernel a custom op falls through autocast untouched, so it would see mixed dtypes (a
// float32 CNN feature next to a bfloat16 text feature) and its own ATen calls (cuBLAS GEMMs) would be
// autocast behind its back, writing bfloat16 results into float32 buffers. AutocastKernel fixes both:
//   * forward ops (kCast = true) cast their floating inputs like a native lower-precision op (nn.Linear, conv):
//     to the autocast dtype on CUDA, where the kernels take float16/bfloat16 and accumulate in float32; and to
//     float32 on the CPU, whose kernels are float32/float64 (float64 is left alone, as autocast does);
//   * backward ops (kCast = false) run as they are.
// Either way the op then runs with the autocast keys excluded, so nothing inside it is cast again.
#pragma once
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace mmfast {

template <const char* kName, c10::DeviceType kDevice, bool kCast, class Sig>
struct AutocastKernel;

template <const char* kName, c10::DeviceType kDevice, bool kCast, class Ret, class... Args>
struct AutocastKernel<kName, kDevice, kCast, Ret(Args...)> {
  static Ret call(Args... args) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").template typed<Ret(Args...)>();
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    if constexpr (kCast) {
      const at::ScalarType to =
          kDevice == c10::DeviceType::CUDA ? at::autocast::get_autocast_dtype(at::kCUDA) : at::kFloat;
      return op.call(at::autocast::cached_cast(to, args, kDevice)...);
    } else {
      return op.call(args...);
    }
  }
};

}  // namespace mmfast

// Registers AutocastKernel for `op` (forward, cast) and `_op_backward` (not cast) on the CPU and CUDA autocast
// keys; forward_kernel / backward_kernel name functions of the ops' signatures (the CPU kernels).
#define MMFAST_REGISTER_AUTOCAST(op, forward_kernel, backward_kernel)                                      \
  namespace mmfast {                                                                                       \
  namespace {                                                                                              \
  constexpr char k_##op##_forward[] = "mmfast::" #op;                                                      \
  constexpr char k_##op##_backward[] = "mmfast::_" #op "_backward";                                        \
  template <c10::DeviceType kDevice>                                                                       \
  void register_##op##_autocast(torch::Library& m) {                                                      \
    m.impl(#op, &AutocastKernel<k_##op##_forward, kDevice, true, decltype(forward_kernel)>::call);         \
    m.impl("_" #op "_backward",                                                                            \
           &AutocastKernel<k_##op##_backward, kDevice, false, decltype(backward_kernel)>::call);           \
  }                                                                                                        \
  }                                                                                                        \
  }                                                                                                        \
  TORCH_LIBRARY_IMPL(mmfast, AutocastCPU, m) { mmfast::register_##op##_autocast<c10::DeviceType::CPU>(m); } \
  TORCH_LIBRARY_IMPL(mmfast, AutocastCUDA, m) { mmfast::register_##op##_autocast<c10::DeviceType::CUDA>(m); }
