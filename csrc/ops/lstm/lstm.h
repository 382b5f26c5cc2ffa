// lstm: one-layer batch_first LSTM over padded sequences with per-sample lengths, in nn.LSTM's layout.
//   x:       [B, T, I]                 lengths: int64 [B] in [0, T] or None (= all T); on the CPU or x's device
//   h0, c0:  [1, B, H] or None (= 0)   w_ih: [4H, I]   w_hh: [4H, H]   b_ih, b_hh: [4H] or None (= 0)
//   gate order (i, f, g, o) as nn.LSTM.
//   y:       [B, T, H], zero past each length
//   h_n,c_n: [1, B, H], the states after each sequence's last step (h0/c0 where the length is 0)
//   gates:   [B, T, 4H] workspace for backward: the activated gates (sigmoid i, f, o; tanh g) of each step
//   cells:   [B, T, H]  workspace for backward: the cell state c_t after each step
//   (the workspace's layout inside those shapes is each device's own: backward reads only the workspace
//   that the same device's forward wrote)
// Backward takes y only on CUDA; the CPU kernel recomputes h_{t-1} = o_{t-1} * tanh(c_{t-1}) from the workspace,
// so on the CPU autograd keeps gates and cells (5H values per step) and not y.
// Lengths on the CPU are range-checked; lengths on the device cannot be without a host sync, so the CUDA
// kernels clamp them to [0, T].
// Backward: grads of y, h_n, c_n (each may be None = zero) -> grad_x, grad_h0, grad_c0 [1, B, H],
//           grad_w_ih, grad_w_hh, grad_bias [4H] (the gradient of b_ih and of b_hh alike).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mmfast {

void check_lstm_inputs(const at::Tensor& x, const std::optional<at::Tensor>& lengths,
                       const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0,
                       const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& lengths, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const std::optional<at::Tensor>& grad_y, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& x, const std::optional<at::Tensor>& lengths,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& y, const at::Tensor& gates, const at::Tensor& cells);

}  // namespace mmfast
