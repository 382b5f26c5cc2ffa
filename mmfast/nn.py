"""Drop-in nn.Modules backed by mmfast's fused ops.

Each module has the parameter names and shapes of the native module it replaces, so ``state_dict``s
load both ways unchanged, and a ``from_native`` classmethod that copies a native module.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import init

from . import ops

__all__ = ["Conv2dReLUMaxPool2d", "LSTM", "ConcatFusion"]


def _single(value, name: str, cls: str) -> int:
    """An int from an int or a square (v, v) pair, as nn.Conv2d accepts."""
    if isinstance(value, int):
        return value
    value = tuple(value)
    if len(value) != 2 or value[0] != value[1]:
        raise ValueError(f"mmfast.nn.{cls}: expected a square {name} (an int or (v, v)), got {value}")
    return int(value[0])


class Conv2dReLUMaxPool2d(nn.Module):
    """``nn.Conv2d(stride=1) -> ReLU -> MaxPool2d(2)`` as one fused op.

    Parameters are those of ``nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)``
    (``weight [O, C, K, K]``, ``bias [O]``), initialised the same way.
    Input ``[N, C, H, W]`` -> output ``[N, O, Hc // 2, Wc // 2]`` with ``Hc = H + 2 * padding - K + 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]],
                 padding: Union[int, Tuple[int, int]] = 0, bias: bool = True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _single(kernel_size, "kernel_size", type(self).__name__)
        self.padding = _single(padding, "padding", type(self).__name__)
        k = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, k, k, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation.
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return ops.conv2d_relu_maxpool2d(x, self.weight, self.bias, self.padding)

    @classmethod
    def from_native(cls, conv: nn.Conv2d) -> "Conv2dReLUMaxPool2d":
        """The fused twin of ``conv`` (followed by ReLU and MaxPool2d(2)), sharing no storage with it."""
        name = cls.__name__
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"mmfast.nn.{name}.from_native: expected stride 1, dilation 1, groups 1 and zero "
                             f"padding, got {conv}")
        if isinstance(conv.padding, str):
            raise ValueError(f"mmfast.nn.{name}.from_native: expected an explicit padding, got '{conv.padding}'")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding, conv.bias is not None,
                     device=conv.weight.device, dtype=conv.weight.dtype)
        module.load_state_dict(conv.state_dict())
        return module

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, padding={self.padding}, "
                f"bias={self.bias is not None}")


class LSTM(nn.Module):
    """One-layer, batch-first ``nn.LSTM`` over padded sequences with per-sample lengths.

    Parameters and state_dict keys are nn.LSTM's (``weight_ih_l0 [4H, I]``, ``weight_hh_l0 [4H, H]``,
    ``bias_ih_l0``, ``bias_hh_l0 [4H]``), initialised the same way.
    ``forward(x [B, T, I], hx=(h0, c0) or None, lengths [B] or None) -> (output [B, T, H], (h_n, c_n))``:
    the result of nn.LSTM on ``pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)``,
    padded back to T steps with zeros. ``lengths`` may live on the CPU or on x's device.
    """

    num_layers = 1
    bidirectional = False

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, batch_first: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not batch_first:
            raise ValueError("mmfast.nn.LSTM: only batch_first=True is supported")
        factory = dict(device=device, dtype=dtype)
        self.input_size, self.hidden_size, self.bias, self.batch_first = input_size, hidden_size, bias, batch_first
        self.weight_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih_l0 = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh_l0 = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih_l0", None)
            self.register_parameter("bias_hh_l0", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.LSTM's initialisation.
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for p in self.parameters():
            init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        h0, c0 = hx if hx is not None else (None, None)
        return ops.lstm(x, lengths, h0, c0, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0)

    @classmethod
    def from_native(cls, lstm: nn.LSTM) -> "LSTM":
        """The fused twin of a one-layer, unidirectional, batch-first ``nn.LSTM`` without projections."""
        if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size != 0 or not lstm.batch_first:
            raise ValueError("mmfast.nn.LSTM.from_native: expected nn.LSTM with num_layers=1, "
                             f"bidirectional=False, proj_size=0 and batch_first=True, got {lstm}")
        module = cls(lstm.input_size, lstm.hidden_size, lstm.bias, device=lstm.weight_ih_l0.device,
                     dtype=lstm.weight_ih_l0.dtype)
        module.load_state_dict(lstm.state_dict())
        return module

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}, batch_first=True"


class ConcatFusion(nn.Module):
    """Concatenation-fusion head: ``act(Linear(Dropout(cat(inputs, 1))))`` without building the concat.

    Parameters are those of ``nn.Linear(sum(in_features), out_features, bias)``, initialised the same way.
    ``forward(*inputs)`` (or a single list) with ``inputs[i]: [N, in_features[i]]`` -> ``[N, out_features]``.
    Dropout is active in training mode; see :func:`mmfast.ops.concat_linear` for its mask.
    """

    def __init__(self, in_features: Sequence[int], out_features: int, dropout: float = 0.0, relu: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        in_features = [int(k) for k in in_features]
        if not 1 <= len(in_features) <= 8 or any(k < 0 for k in in_features):
            raise ValueError(f"mmfast.nn.ConcatFusion: expected 1 to 8 non-negative input widths, got {in_features}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"mmfast.nn.ConcatFusion: expected dropout in [0, 1], got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.in_features: List[int] = in_features
        self.out_features, self.dropout, self.relu = out_features, float(dropout), relu
        self.weight = nn.Parameter(torch.empty(out_features, sum(in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation.
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, *inputs) -> Tensor:
        if len(inputs) == 1 and isinstance(inputs[0], (list, tuple)):
            inputs = tuple(inputs[0])
        if [x.shape[-1] for x in inputs] != self.in_features:
            raise ValueError(f"mmfast.nn.ConcatFusion: expected inputs of widths {self.in_features}, "
                             f"got {[tuple(x.shape) for x in inputs]}")
        return ops.concat_linear(inputs, self.weight, self.bias, self.dropout, self.training, self.relu)

    @classmethod
    def from_native(cls, linear: nn.Linear, in_features: Sequence[int], dropout: float = 0.0,
                    relu: bool = True) -> "ConcatFusion":
        """The fused twin of ``Dropout(dropout) -> linear -> (ReLU)`` applied to ``cat(inputs, 1)``."""
        if sum(in_features) != linear.in_features:
            raise ValueError(f"mmfast.nn.ConcatFusion.from_native: in_features {list(in_features)} sum to "
                             f"{sum(in_features)}, but the linear layer takes {linear.in_features}")
        module = cls(in_features, linear.out_features, dropout, relu, linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.load_state_dict(linear.state_dict())
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dropout={self.dropout}, "
                f"relu={self.relu}, bias={self.bias is not None}")
