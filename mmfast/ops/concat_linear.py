from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["concat_linear"]

_SEED_HIGH = 2**62


def concat_linear(
    inputs: Sequence[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = True,
    relu: bool = True,
) -> Tensor:
    """Fused concatenation-fusion layer; the concatenation is never built.

    Equivalent to ``act(F.linear(F.dropout(torch.cat(inputs, 1), dropout_p, training), weight, bias))``
    with ``act = F.relu`` if ``relu`` else identity, except for which elements dropout zeroes: the mask
    is a counter-based hash of a seed drawn from torch's generator on ``weight.device`` (so it is
    reproducible under ``torch.manual_seed``) and is regenerated, not stored, for backward.
    ``mmfast.reference.concat_linear(..., seed=...)`` reproduces it in pure PyTorch.

    Args:
        inputs: 1 to 8 tensors ``[N, K_i]`` (same dtype and device).
        weight: ``[O, sum(K_i)]``, as ``nn.Linear(sum(K_i), O).weight``.
        bias: ``[O]`` or ``None``.
        dropout_p: probability of zeroing an element of the concatenated input, in ``[0, 1]``.
        training: apply dropout only when true (as ``F.dropout``).
        relu: apply ReLU to the output.

    Returns:
        ``[N, O]``.
    """
    seed = None
    if training and dropout_p > 0.0:
        seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=weight.device)
    return torch.ops.mmfast.concat_linear.default(list(inputs), weight, bias, float(dropout_p), bool(relu), seed)


@torch.library.register_fake("mmfast::concat_linear")
def _(inputs, weight, bias, dropout_p, relu, seed):
    torch._check(1 <= len(inputs) <= 8, lambda: "mmfast::concat_linear: expected 1 to 8 input tensors")
    torch._check(
        weight.shape[1] == sum(x.shape[1] for x in inputs),
        lambda: "mmfast::concat_linear: expected weight of shape [O, sum K_i]",
    )
    return weight.new_empty((inputs[0].shape[0], weight.shape[0]))


@torch.library.register_fake("mmfast::_concat_linear_backward")
def _(grad_out, inputs, weight, out, dropout_p, relu, seed):
    return [x.new_empty(x.shape) for x in inputs], weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1])
