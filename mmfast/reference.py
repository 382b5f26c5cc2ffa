"""Pure-PyTorch versions of mmfast's ops: the test oracle and the benchmark baseline.

Each function defines the semantics that the CPU and CUDA kernels must reproduce.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

__all__ = ["conv2d_relu_maxpool2d", "lstm", "concat_linear", "dropout_keep_mask"]


def conv2d_relu_maxpool2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding: int = 0) -> Tensor:
    """``F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2)``."""
    return F.max_pool2d(F.relu(F.conv2d(x, weight, bias, padding=padding)), 2)


def lstm(
    x: Tensor,
    lengths: Optional[Tensor],
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One-layer ``nn.LSTM(batch_first=True)`` over ``pack_padded_sequence(x, lengths, enforce_sorted=False)``.

    Shapes: x ``[B, T, I]``, lengths ``[B]`` (0..T; 0 allowed), h0/c0 ``[1, B, H]``, weights as nn.LSTM.
    Returns y ``[B, T, H]`` (zero past each length), h_n and c_n ``[1, B, H]`` (h0/c0 where a length is 0).
    """
    batch, steps, _ = x.shape
    hidden = w_hh.shape[1]
    if h0 is None:
        h0 = x.new_zeros(1, batch, hidden)
    if c0 is None:
        c0 = x.new_zeros(1, batch, hidden)
    has_bias = b_ih is not None or b_hh is not None
    params = [w_ih, w_hh]
    if has_bias:
        params += [b_ih if b_ih is not None else w_ih.new_zeros(4 * hidden),
                   b_hh if b_hh is not None else w_ih.new_zeros(4 * hidden)]
    # train=True with dropout 0 computes the same thing and, unlike train=False, has a cuDNN backward.
    if lengths is None:
        y, h_n, c_n = torch.lstm(x, (h0, c0), params, has_bias, 1, 0.0, True, False, True)
        return y, h_n, c_n
    lengths = lengths.to("cpu", torch.int64)
    # pack_padded_sequence rejects length 0: run the non-empty rows, keep h0/c0 for the empty ones.
    rows = torch.nonzero(lengths > 0).flatten()
    y = x.new_zeros(batch, steps, hidden)
    h_n, c_n = h0.clone(), c0.clone()
    if rows.numel() == 0:
        return y, h_n, c_n
    dev_rows = rows.to(x.device)
    packed = pack_padded_sequence(x.index_select(0, dev_rows), lengths[rows], batch_first=True, enforce_sorted=False)
    hx = (h0.index_select(1, dev_rows), c0.index_select(1, dev_rows))
    # pack_padded_sequence sorted the rows; hx must be permuted the same way (as nn.LSTM does).
    hx = tuple(h.index_select(1, packed.sorted_indices) for h in hx)
    out, h, c = torch.lstm(packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, True, False)
    out = pad_packed_sequence(
        PackedSequence(out, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices),
        batch_first=True, total_length=steps,
    )[0]
    h, c = (t.index_select(1, packed.unsorted_indices) for t in (h, c))
    y = y.index_copy(0, dev_rows, out)
    return y, h_n.index_copy(1, dev_rows, h), c_n.index_copy(1, dev_rows, c)


_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    # (x * c) mod 2^32 for x < 2^32, in 16-bit halves so that int64 never overflows.
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(seed: int, p: float, rows: int, cols: int, device=None) -> Tensor:
    """The keep mask (bool ``[rows, cols]``) that mmfast's dropout draws for ``seed`` and ``p``.

    Mirrors ``csrc/common/dropout_mask.h``: keep(r, c) = ``mix32(row_hash(r) ^ col_hash(c)) >> 8 >= floor(p * 2^24)``.
    """
    row_key = _mix32(seed & _M32)
    col_key = _mix32(((seed >> 32) & _M32) ^ row_key)
    threshold = 1 << 24 if p >= 1.0 else int(p * 16777216.0)
    row_hash = _mix32(torch.arange(rows, dtype=torch.int64, device=device) ^ row_key)
    col_hash = _mix32(torch.arange(cols, dtype=torch.int64, device=device) ^ col_key)
    return (_mix32(row_hash[:, None] ^ col_hash[None, :]) >> 8) >= threshold


def concat_linear(
    inputs: Sequence[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    relu: bool = True,
    seed: Optional[int] = None,
) -> Tensor:
    """``act(F.linear(F.dropout(torch.cat(inputs, 1), dropout_p, training), weight, bias))``.

    With ``seed`` given, dropout uses mmfast's counter-based mask for that seed instead of torch's RNG,
    so the result matches ``mmfast.ops.concat_linear`` element for element.
    """
    x = torch.cat(list(inputs), 1)
    if training and dropout_p > 0.0:
        if seed is None:
            x = F.dropout(x, dropout_p, True)
        else:
            keep = dropout_keep_mask(seed, dropout_p, x.shape[0], x.shape[1], x.device)
            scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
            x = x * keep.to(x.dtype) * scale
    out = F.linear(x, weight, bias)
    return F.relu(out) if relu else out
