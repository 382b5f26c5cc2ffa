// Schema, input checks and autograd of mmfast::lstm (contract in lstm.h).
#include "ops/lstm/lstm.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "common/checks.h"

namespace mmfast {

void check_lstm_inputs(const at::Tensor& x, const std::optional<at::Tensor>& lengths,
                       const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh) {
  constexpr const char* op = "mmfast::lstm";
  check_dim(op, "x", x, 3, "[B, T, I] (batch_first)");
  check_floating(op, "x", x);
  const int64_t batch = x.size(0), steps = x.size(1), input_size = x.size(2);
  check_dim(op, "w_hh", w_hh, 2, "[4H, H]");
  check_like(op, "w_hh", w_hh, "x", x);
  const int64_t hidden = w_hh.size(1);
  TORCH_CHECK(hidden > 0 && w_hh.size(0) == 4 * hidden, op, ": expected w_hh of shape [4H, H] with H > 0, got ",
              w_hh.sizes());
  check_dim(op, "w_ih", w_ih, 2, "[4H, I]");
  check_like(op, "w_ih", w_ih, "x", x);
  check_shape(op, "w_ih", w_ih, {4 * hidden, input_size});
  for (const auto& [name, bias] : {std::pair{"b_ih", &b_ih}, std::pair{"b_hh", &b_hh}}) {
    if (!bias->has_value()) continue;
    check_like(op, name, **bias, "x", x);
    check_shape(op, name, **bias, {4 * hidden});
  }
  for (const auto& [name, state] : {std::pair{"h0", &h0}, std::pair{"c0", &c0}}) {
    if (!state->has_value()) continue;
    check_like(op, name, **state, "x", x);
    check_shape(op, name, **state, {1, batch, hidden});
  }
  if (lengths.has_value()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.scalar_type() == at::kLong, op, ": expected lengths of dtype int64, got ", len.scalar_type());
    check_shape(op, "lengths", len, {batch});
    TORCH_CHECK(len.is_cpu() || len.device() == x.device(), op, ": expected lengths on the CPU or on ", x.device(),
                ", got ", len.device());
    if (len.is_cpu() && batch > 0) {  // device lengths are clamped by the CUDA kernels: no host sync here
      const auto [lo, hi] = len.aminmax();
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() <= steps, op,
                  ": expected lengths in [0, T=", steps, "], got values in [", lo.item<int64_t>(), ", ",
                  hi.item<int64_t>(), "]");
    }
  }
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class LstmFunction : public torch::autograd::Function<LstmFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& lengths,
                               const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("mmfast::lstm", "").typed<decltype(lstm_cpu)>();
    at::Tensor y, h_n, c_n, gates, cells;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, h_n, c_n, gates, cells) = op.call(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh);
    }
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);  // the backward op takes a missing grad as zero: no zero-filled [B, T, 4H]
    // The CPU backward recomputes h_{t-1} from gates and cells: keeping y too would cost another [B, T, H].
    ctx->save_for_backward({x, lengths.value_or(at::Tensor()), h0.value_or(at::Tensor()), c0.value_or(at::Tensor()),
                            w_ih, w_hh, x.is_cpu() ? at::Tensor() : y, gates, cells});
    ctx->saved_data["has_b_ih"] = b_ih.has_value();
    ctx->saved_data["has_b_hh"] = b_hh.has_value();
    return {y, h_n, c_n, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mmfast::_lstm_backward", "")
                               .typed<decltype(lstm_backward_cpu)>();
    const auto s = ctx->get_saved_variables();
    auto [grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias] =
        op.call(optional_of(grad_outputs[0]), optional_of(grad_outputs[1]), optional_of(grad_outputs[2]), s[0],
                optional_of(s[1]), optional_of(s[2]), optional_of(s[3]), s[4], s[5], optional_of(s[6]), s[7], s[8]);
    // One gradient per forward argument: x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh.
    return {grad_x,
            at::Tensor(),
            s[2].defined() ? grad_h0 : at::Tensor(),
            s[3].defined() ? grad_c0 : at::Tensor(),
            grad_w_ih,
            grad_w_hh,
            ctx->saved_data["has_b_ih"].toBool() ? grad_bias : at::Tensor(),
            ctx->saved_data["has_b_hh"].toBool() ? grad_bias : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_autograd(
    const at::Tensor& x, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  auto o = LstmFunction::apply(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh);
  return {o[0], o[1], o[2], o[3], o[4]};
}

}  // namespace
}  // namespace mmfast

TORCH_LIBRARY_FRAGMENT(mmfast, m) {
  m.def("lstm(Tensor x, Tensor? lengths, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def("_lstm_backward(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor? lengths, Tensor? h0,"
        " Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? y, Tensor gates, Tensor cells) -> (Tensor grad_x,"
        " Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(mmfast, Autograd, m) {
  m.impl("lstm", &mmfast::lstm_autograd);
  m.impl("_lstm_backward", torch::autograd::autogradNotImplementedFallback());
}

MMFAST_REGISTER_AUTOCAST(lstm, lstm_cpu, lstm_backward_cpu)
