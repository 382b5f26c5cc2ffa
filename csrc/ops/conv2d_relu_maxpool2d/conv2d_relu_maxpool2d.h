// conv2d_relu_maxpool2d: max_pool2d(relu(conv2d(x, weight, bias, padding)), 2) in one pass.
//   x:      [N, C, H, W]            weight: [O, C, K, K], K in {1, 3, 5, 7}      bias: [O] or None
//   padding in [0, K/2], stride 1; conv output Hc = H + 2*padding - K + 1 (likewise Wc), both >= 2.
//   out:    [N, O, Hc/2, Wc/2] (floor: an odd last conv row/column is dropped, as max_pool2d does).
//   argmax: uint8 [N, O, Hc/2, Wc/2]: the max's position in its 2x2 window (2*dy + dx, first in scan
//           order on ties, as max_pool2d), or kArgmaxDropped where the ReLU output is 0 (no gradient).
// Since bias is per channel and ReLU is monotone, relu(maxpool(conv) + bias) is the same function:
// the kernels pool before the epilogue and never write the full-resolution activation.
// Backward: grad_out [N, O, Hp, Wp] + argmax -> grad_x (an empty [0] tensor unless need_grad_x),
//           grad_weight [O, C, K, K], grad_bias [O].
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace mmfast {

constexpr uint8_t kArgmaxDropped = 255;

void check_conv2d_relu_maxpool2d_inputs(const at::Tensor& x, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, int64_t padding);

// The forward checks plus grad_out/argmax of the pooled shape, dtype (x's, uint8) and device (x's).
void check_conv2d_relu_maxpool2d_backward_inputs(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& weight, const at::Tensor& argmax,
                                                 int64_t padding);

std::tuple<at::Tensor, at::Tensor> conv2d_relu_maxpool2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             int64_t padding);

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_maxpool2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& argmax,
    int64_t padding, bool need_grad_x);

}  // namespace mmfast
