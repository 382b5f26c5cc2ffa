// Schema, input checks and autograd of mmfast::conv2d_relu_maxpool2d (contract in conv2d_relu_maxpool2d.h).
#include "ops/conv2d_relu_maxpool2d/conv2d_relu_maxpool2d.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "common/autocast.h"
#include "common/checks.h"

namespace mmfast {

void check_conv2d_relu_maxpool2d_inputs(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, int64_t padding) {
  constexpr const char* op = "mmfast::conv2d_relu_maxpool2d";
  check_dim(op, "x", x, 4, "[N, C, H, W]");
  check_floating(op, "x", x);
  check_dim(op, "weight", weight, 4, "[O, C, K, K]");
  check_like(op, "weight", weight, "x", x);
  const int64_t k = weight.size(2);
  TORCH_CHECK(weight.size(3) == k && (k == 1 || k == 3 || k == 5 || k == 7), op,
              ": expected a square kernel of size 1, 3, 5 or 7 (weight [O, C, K, K]), got weight of shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": expected weight with ", x.size(1),
              " input channels (x is [N, C, H, W]), got weight of shape ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": expected at least one output channel, got weight of shape ",
              weight.sizes());
  if (bias.has_value()) {
    check_like(op, "bias", *bias, "x", x);
    check_shape(op, "bias", *bias, {weight.size(0)});
  }
  TORCH_CHECK(padding >= 0 && padding <= k / 2, op, ": expected padding in [0, ", k / 2, "] for kernel size ", k,
              ", got ", padding);
  const int64_t hc = x.size(2) + 2 * padding - k + 1, wc = x.size(3) + 2 * padding - k + 1;
  TORCH_CHECK(hc >= 2 && wc >= 2, op, ": expected the convolution output to be at least 2x2 for the 2x2 max-pool, ",
              "got ", hc, "x", wc, " from x of shape ", x.sizes(), ", kernel size ", k, " and padding ", padding);
}

void check_conv2d_relu_maxpool2d_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& weight, const at::Tensor& argmax,
                                                 int64_t padding) {
  check_conv2d_relu_maxpool2d_inputs(x, weight, std::nullopt, padding);
  constexpr const char* op = "mmfast::_conv2d_relu_maxpool2d_backward";
  const int64_t k = weight.size(2);
  const std::vector<int64_t> out_shape{x.size(0), weight.size(0), (x.size(2) + 2 * padding - k + 1) / 2,
                                       (x.size(3) + 2 * padding - k + 1) / 2};
  const at::IntArrayRef expected(out_shape);
  TORCH_CHECK(grad_out.sizes() == expected && argmax.sizes() == expected, op,
              ": expected grad_out and argmax of shape ", expected, ", got ", grad_out.sizes(), " and ",
              argmax.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && argmax.scalar_type() == at::kByte, op,
              ": expected grad_out of dtype ", x.scalar_type(), " and argmax of dtype uint8, got ",
              grad_out.scalar_type(), " and ", argmax.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device() && argmax.device() == x.device(), op,
              ": expected grad_out and argmax on ", x.device(), ", got ", grad_out.device(), " and ", argmax.device());
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class Conv2dReluMaxpool2dFunction : public torch::autograd::Function<Conv2dReluMaxpool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t padding) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mmfast::conv2d_relu_maxpool2d", "")
                               .typed<decltype(conv2d_relu_maxpool2d_cpu)>();
    at::Tensor out, argmax;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(out, argmax) = op.call(x, weight, bias, padding);
    }
    ctx->mark_non_differentiable({argmax});
    ctx->save_for_backward({x, weight, argmax});
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["has_bias"] = bias.has_value();
    return {out, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mmfast::_conv2d_relu_maxpool2d_backward", "")
                               .typed<decltype(conv2d_relu_maxpool2d_backward_cpu)>();
    const auto saved = ctx->get_saved_variables();
    auto [grad_x, grad_weight, grad_bias] = op.call(grad_outputs[0], saved[0], saved[1], saved[2],
                                                    ctx->saved_data["padding"].toInt(), ctx->needs_input_grad(0));
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(), grad_weight,
            ctx->saved_data["has_bias"].toBool() ? grad_bias : at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                  const std::optional<at::Tensor>& bias,
                                                                  int64_t padding) {
  auto outputs = Conv2dReluMaxpool2dFunction::apply(x, weight, bias, padding);
  return {outputs[0], outputs[1]};
}

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def("conv2d_relu_maxpool2d(Tensor x, Tensor weight, Tensor? bias, int padding) -> (Tensor out, Tensor argmax)");
  m.def("_conv2d_relu_maxpool2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor argmax, int padding,"
        " bool need_grad_x) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(mmfast, Autograd, m) {
  m.impl("conv2d_relu_maxpool2d", &mmfast::conv2d_relu_maxpool2d_autograd);
  m.impl("_conv2d_relu_maxpool2d_backward", torch::autograd::autogradNotImplementedFallback());
}

MMFAST_REGISTER_AUTOCAST(conv2d_relu_maxpool2d, conv2d_relu_maxpool2d_cpu, conv2d_relu_maxpool2d_backward_cpu)
