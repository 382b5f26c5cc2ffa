// Schema, input checks and autograd of mmfast::concat_linear (shape contract in concat_linear.h).
#include "ops/concat_linear/concat_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "common/checks.h"

namespace mmfast {

namespace {
constexpr const char* kOp = "mmfast::concat_linear";
constexpr size_t kMaxInputs = 8;
}  // namespace

void check_concat_linear_inputs(at::TensorList inputs, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, double dropout_p,
                                const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(!inputs.empty() && inputs.size() <= kMaxInputs, kOp, ": expected 1 to ", kMaxInputs,
              " input tensors, got ", inputs.size());
  const at::Tensor& first = inputs[0];
  check_floating(kOp, "inputs[0]", first);
  int64_t total_k = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string name = "inputs[" + std::to_string(i) + "]";
    check_dim(kOp, name.c_str(), inputs[i], 2, "[N, K_i]");
    check_like(kOp, name.c_str(), inputs[i], "inputs[0]", first);
    TORCH_CHECK(inputs[i].size(0) == first.size(0), kOp, ": expected every input to have ", first.size(0),
                " rows (as inputs[0]), got ", inputs[i].size(0), " rows in ", name);
    total_k += inputs[i].size(1);
  }
  check_dim(kOp, "weight", weight, 2, "[O, sum K_i]");
  check_like(kOp, "weight", weight, "inputs[0]", first);
  TORCH_CHECK(weight.size(1) == total_k, kOp, ": expected weight of shape [O, ", total_k,
              "] (sum of the inputs' widths), got ", weight.sizes());
  if (bias.has_value()) {
    check_like(kOp, "bias", *bias, "inputs[0]", first);
    check_shape(kOp, "bias", *bias, {weight.size(0)});
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kOp, ": expected dropout_p in [0, 1], got ", dropout_p);
  if (seed.has_value()) {
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1, kOp,
                ": expected seed to be a one-element int64 tensor, got dtype ", seed->scalar_type(), " and shape ",
                seed->sizes());
    TORCH_CHECK(seed->device() == first.device(), kOp, ": expected seed on ", first.device(), ", got ",
                seed->device());
  }
  TORCH_CHECK(first.size(0) < (int64_t(1) << 32) && total_k < (int64_t(1) << 32), kOp,
              ": expected fewer than 2^32 rows and columns, got ", first.size(0), " x ", total_k);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class ConcatLinearFunction : public torch::autograd::Function<ConcatLinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, at::TensorList inputs, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double dropout_p, bool relu,
                            const std::optional<at::Tensor>& seed) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mmfast::concat_linear", "")
                               .typed<decltype(concat_linear_cpu)>();
    at::Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(inputs, weight, bias, dropout_p, relu, seed);
    }
    variable_list saved(inputs.begin(), inputs.end());
    saved.push_back(weight);
    saved.push_back(out);
    saved.push_back(seed.value_or(at::Tensor()));
    ctx->save_for_backward(saved);
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["has_bias"] = bias.has_value();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mmfast::_concat_linear_backward", "")
                               .typed<decltype(concat_linear_backward_cpu)>();
    const auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() - 3;
    const std::vector<at::Tensor> inputs(saved.begin(), saved.begin() + n);
    const at::Tensor& weight = saved[n];
    const at::Tensor& out = saved[n + 1];
    const std::optional<at::Tensor> seed =
        saved[n + 2].defined() ? std::optional<at::Tensor>(saved[n + 2]) : std::nullopt;
    auto [grad_inputs, grad_weight, grad_bias] =
        op.call(grad_outputs[0], inputs, weight, out, ctx->saved_data["dropout_p"].toDouble(),
                ctx->saved_data["relu"].toBool(), seed);
    // One gradient per forward argument, the list flattened: inputs..., weight, bias, dropout_p, relu, seed.
    variable_list grads(std::make_move_iterator(grad_inputs.begin()), std::make_move_iterator(grad_inputs.end()));
    grads.push_back(grad_weight);
    grads.push_back(ctx->saved_data["has_bias"].toBool() ? grad_bias : at::Tensor());
    grads.resize(grads.size() + 3);
    return grads;
  }
};

at::Tensor concat_linear_autograd(at::TensorList inputs, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, double dropout_p, bool relu,
                                  const std::optional<at::Tensor>& seed) {
  return ConcatLinearFunction::apply(inputs, weight, bias, dropout_p, relu, seed);
}

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def("concat_linear(Tensor[] inputs, Tensor weight, Tensor? bias, float dropout_p, bool relu, Tensor? seed)"
        " -> Tensor");
  m.def("_concat_linear_backward(Tensor grad_out, Tensor[] inputs, Tensor weight, Tensor out, float dropout_p,"
        " bool relu, Tensor? seed) -> (Tensor[] grad_inputs, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(mmfast, Autograd, m) {
  m.impl("concat_linear", &mmfast::concat_linear_autograd);
  // Double backward is not supported: differentiating the backward op raises instead of returning zeros.
  m.impl("_concat_linear_backward", torch::autograd::autogradNotImplementedFallback());
}

MMFAST_REGISTER_AUTOCAST(concat_linear, concat_linear_cpu, concat_linear_backward_cpu)
