"""concat + dropout + linear + ReLU: mmfast's fused op next to the native composition, same inputs.

Run: pytest benchmarks/bench_concat_linear.py --benchmark-only [--benchmark-json=out.json]
"""
import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.testing import DEVICES, make_concat_linear_inputs

# (batch, widths, out_features): the seed's head (CNN features 7200 + text 64 -> 128) at the CPU and GPU
# batch sizes, and a larger one.
SHAPES = {"cpu": [(64, (7200, 64), 128), (256, (7200, 64), 128)],
          "cuda": [(256, (7200, 64), 128), (256, (8192, 256), 512)]}
CASES = [(d, s) for d in DEVICES for s in SHAPES[d]]
P = 0.5


def native(inputs, weight, bias):
    return F.relu(F.linear(F.dropout(torch.cat(inputs, 1), P, training=True), weight, bias))


def fused(inputs, weight, bias):
    return mmfast.ops.concat_linear(inputs, weight, bias, P, training=True, relu=True)


IMPLS = {"mmfast": fused, "native": native}


def _bench(measure, impl, device, shape, backward):
    n, widths, o = shape
    torch.manual_seed(0)
    inputs, weight, bias = make_concat_linear_inputs(device, torch.float32, n, widths, o, requires_grad=backward)
    fn = IMPLS[impl]

    def step():
        out = fn(inputs, weight, bias)
        if backward:
            out.sum().backward()

    measure(step, op="concat_linear", kind="fwd+bwd" if backward else "fwd", impl=impl, device=device, shape=shape)


@pytest.mark.parametrize("device,shape", CASES, ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd(measure, impl, device, shape):
    with torch.no_grad():
        _bench(measure, impl, device, shape, backward=False)


@pytest.mark.parametrize("device,shape", CASES, ids=str)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(measure, impl, device, shape):
    _bench(measure, impl, device, shape, backward=True)
