from typing import Optional

import torch
from torch import Tensor

__all__ = ["conv2d_relu_maxpool2d"]


def conv2d_relu_maxpool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding: int = 0) -> Tensor:
    """Fused image feature block: convolution, bias, ReLU and 2x2 max-pool in one pass.

    Equivalent to ``F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2)``.

    Args:
        x: ``[N, C, H, W]``.
        weight: ``[O, C, K, K]`` with K in {1, 3, 5, 7}, as ``nn.Conv2d(C, O, K).weight``.
        bias: ``[O]`` or ``None``.
        padding: zero padding on each side, ``0 <= padding <= K // 2``; stride is 1.

    Returns:
        ``[N, O, Hc // 2, Wc // 2]`` with ``Hc = H + 2 * padding - K + 1`` (likewise ``Wc``).
        The full-resolution activation is never stored; backward keeps one byte per output.
    """
    return torch.ops.mmfast.conv2d_relu_maxpool2d.default(x, weight, bias, int(padding))[0]


def _out_hw(x: Tensor, weight: Tensor, padding: int):
    k = weight.shape[2]
    return (x.shape[2] + 2 * padding - k + 1) // 2, (x.shape[3] + 2 * padding - k + 1) // 2


@torch.library.register_fake("mmfast::conv2d_relu_maxpool2d")
def _(x, weight, bias, padding):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "mmfast::conv2d_relu_maxpool2d: expected 4-D x and weight")
    torch._check(x.shape[1] == weight.shape[1], lambda: "mmfast::conv2d_relu_maxpool2d: channel mismatch")
    hp, wp = _out_hw(x, weight, padding)
    shape = (x.shape[0], weight.shape[0], hp, wp)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.uint8)


@torch.library.register_fake("mmfast::_conv2d_relu_maxpool2d_backward")
def _(grad_out, x, weight, argmax, padding, need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return grad_x, weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])
