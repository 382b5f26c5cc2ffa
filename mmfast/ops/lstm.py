from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm"]


def lstm(
    x: Tensor,
    lengths: Optional[Tensor],
    h0: Optional[Tensor],
    c0: Optional[Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Fused one-layer LSTM over padded sequences with per-sample lengths.

    Equivalent to ``nn.LSTM(I, H, batch_first=True)`` with these weights, run on
    ``pack_padded_sequence(x, lengths, enforce_sorted=False)`` and padded back to ``T`` steps.

    Args:
        x: ``[B, T, I]`` (batch first).
        lengths: int64 ``[B]`` with values in ``[0, T]``, on the CPU or on ``x.device``; ``None`` means
            every sequence has ``T`` steps. A length of 0 leaves that sequence's state at ``h0``/``c0``.
        h0, c0: ``[1, B, H]`` or ``None`` (zeros).
        w_ih: ``[4H, I]``, w_hh: ``[4H, H]``, b_ih, b_hh: ``[4H]`` or ``None``; nn.LSTM's layout and gate
            order (i, f, g, o), so ``nn.LSTM.weight_ih_l0`` etc. can be passed unchanged.

    Returns:
        ``y`` ``[B, T, H]`` (zero past each length) and ``(h_n, c_n)``, each ``[1, B, H]``: the states
        after each sequence's last step.
    """
    y, h_n, c_n, _, _ = torch.ops.mmfast.lstm.default(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh)
    return y, (h_n, c_n)


@torch.library.register_fake("mmfast::lstm")
def _(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh):
    torch._check(x.dim() == 3, lambda: "mmfast::lstm: expected x of shape [B, T, I]")
    batch, steps, _ = x.shape
    hidden = w_hh.shape[1]
    state = x.new_empty((1, batch, hidden))
    return (x.new_empty((batch, steps, hidden)), state, x.new_empty((1, batch, hidden)),
            x.new_empty((batch, steps, 4 * hidden)), x.new_empty((batch, steps, hidden)))


@torch.library.register_fake("mmfast::_lstm_backward")
def _(grad_y, grad_h_n, grad_c_n, x, lengths, h0, c0, w_ih, w_hh, y, gates, cells):
    batch, hidden = x.shape[0], w_hh.shape[1]
    return (x.new_empty(x.shape), x.new_empty((1, batch, hidden)), x.new_empty((1, batch, hidden)),
            w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), w_hh.new_empty((4 * hidden,)))
