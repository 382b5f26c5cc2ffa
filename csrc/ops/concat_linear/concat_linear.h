// concat_linear: act(dropout(cat(inputs, 1)) @ weight.T + bias) without materialising the concatenation.
//   inputs:  1..8 tensors [N, K_i]        weight: [O, sum K_i]     bias: [O] or None
//   seed:    int64 scalar tensor on the inputs' device, or None. Dropout is applied iff seed is given and
//            dropout_p > 0; its mask is a pure function of (seed, row, column), see common/dropout_mask.h.
//   out:     [N, O]; relu(out) when relu is true.
// Backward: grad_out [N, O] and the forward's out (for the ReLU mask) -> grads of every input, weight, bias.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace mmfast {

void check_concat_linear_inputs(at::TensorList inputs, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, double dropout_p,
                                const std::optional<at::Tensor>& seed);

at::Tensor concat_linear_cpu(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             double dropout_p, bool relu, const std::optional<at::Tensor>& seed);

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_linear_backward_cpu(
    const at::Tensor& grad_out, at::TensorList inputs, const at::Tensor& weight, const at::Tensor& out,
    double dropout_p, bool relu, const std::optional<at::Tensor>& seed);

}  // namespace mmfast
