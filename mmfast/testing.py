"""Helpers shared by the tests and benchmarks: devices, tolerances and input factories for each op."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

import mmfast

__all__ = ["DEVICES", "TOL", "make_conv2d_relu_maxpool2d_inputs", "make_lstm_inputs", "make_concat_linear_inputs",
           "argmax_windows"]

DEVICES: List[str] = ["cpu"] + (["cuda"] if mmfast.with_cuda and torch.cuda.is_available() else [])

# rtol/atol per dtype; fp16/bf16 follow causal-conv1d's tolerances (kernels accumulate in float32).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=3e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=5e-2),
}


def _rand(shape, device, dtype, requires_grad: bool, scale: float = 1.0) -> Tensor:
    return (torch.randn(shape, device=device, dtype=dtype) * scale).requires_grad_(requires_grad)


def make_conv2d_relu_maxpool2d_inputs(
    device="cpu", dtype=torch.float32, n=2, c=3, h=8, w=8, o=4, k=3, padding=1, bias=True, requires_grad=False
) -> Tuple[Tensor, Tensor, Optional[Tensor], int]:
    """(x [n, c, h, w], weight [o, c, k, k], bias [o] or None, padding), weights scaled like nn.Conv2d's init."""
    scale = (c * k * k) ** -0.5
    x = _rand((n, c, h, w), device, dtype, requires_grad)
    weight = _rand((o, c, k, k), device, dtype, requires_grad, scale)
    b = _rand((o,), device, dtype, requires_grad, scale) if bias else None
    return x, weight, b, padding


# conv2d_relu_maxpool2d's pooling corner cases, one 2x2 window each (exact in every dtype).
_ARGMAX_WINDOWS = [
    [[1.0, 2.0], [3.0, 4.0]],  # max last -> 3
    [[5.0, 0.0], [0.0, 0.0]],  # max first -> 0
    [[2.0, 2.0], [2.0, 2.0]],  # four-way tie -> first, 0
    [[0.0, 7.0], [7.0, 7.0]],  # tie after the first -> 1
    [[-1.0, -2.0], [-3.0, -4.0]],  # relu 0 -> dropped
    [[0.0, 0.0], [0.0, 0.0]],  # max + bias == 0 -> dropped (relu passes no gradient at 0)
    [[-5.0, 1.0], [-1.0, -2.0]],  # positive max at 1
]


def argmax_windows(device="cpu", dtype=torch.float32) -> Tensor:
    """x [1, 1, 2, 14] holding the windows above side by side: with a 1x1 weight of 1 and no padding the conv
    output is x itself, so window j of the pooled output is window j above."""
    windows = torch.tensor(_ARGMAX_WINDOWS, dtype=dtype)
    return windows.permute(1, 0, 2).reshape(1, 1, 2, 2 * len(_ARGMAX_WINDOWS)).to(device)


def make_lstm_inputs(
    device="cpu", dtype=torch.float32, b=3, t=5, i=4, h=6, lengths=True, state=True, bias=True, requires_grad=False
):
    """(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh) for mmfast.ops.lstm; lengths are random in [0, t]
    with t itself always present, so the longest sequence spans every step."""
    scale = h ** -0.5
    x = _rand((b, t, i), device, dtype, requires_grad)
    lens = None
    if lengths:
        lens = torch.randint(0, t + 1, (b,), dtype=torch.int64)
        if b > 0:
            lens[torch.randint(0, b, ()).item()] = t
        lens = lens.to(device)
    h0 = _rand((1, b, h), device, dtype, requires_grad) if state else None
    c0 = _rand((1, b, h), device, dtype, requires_grad) if state else None
    w_ih = _rand((4 * h, i), device, dtype, requires_grad, scale)
    w_hh = _rand((4 * h, h), device, dtype, requires_grad, scale)
    b_ih = _rand((4 * h,), device, dtype, requires_grad, scale) if bias else None
    b_hh = _rand((4 * h,), device, dtype, requires_grad, scale) if bias else None
    return x, lens, h0, c0, w_ih, w_hh, b_ih, b_hh


def make_concat_linear_inputs(
    device="cpu", dtype=torch.float32, n=4, widths=(3, 5), o=6, bias=True, requires_grad=False
) -> Tuple[List[Tensor], Tensor, Optional[Tensor]]:
    """([x_i [n, widths[i]]], weight [o, sum(widths)], bias [o] or None)."""
    scale = max(sum(widths), 1) ** -0.5
    inputs = [_rand((n, k), device, dtype, requires_grad) for k in widths]
    weight = _rand((o, sum(widths)), device, dtype, requires_grad, scale)
    b = _rand((o,), device, dtype, requires_grad, scale) if bias else None
    return inputs, weight, b
