# run: python -m pytest benchmarks/bench_conv2d_relu_maxpool2d.py --benchmark-only [--benchmark-json=out.json]
import pytest
import torch

import mmfast
from mmfast import reference
from mmfast.testing import DEVICES
from mmfast.testing import make_conv2d_relu_maxpool2d_inputs as make

IMPLS = {"mmfast": mmfast.ops.conv2d_relu_maxpool2d, "native": reference.conv2d_relu_maxpool2d}

# (n, c, o, k, padding, h, w): the seed model's first block, and a wider second-block-like layer, at the CPU
# batch (64) and the GPU batch (256).
SHAPES = {
    "B64_3to32_k3_valid_32x32": (64, 3, 32, 3, 0, 32, 32),
    "B64_32to64_k3_pad1_16x16": (64, 32, 64, 3, 1, 16, 16),
    "B256_3to32_k3_valid_32x32": (256, 3, 32, 3, 0, 32, 32),
    "B256_32to64_k3_pad1_16x16": (256, 32, 64, 3, 1, 16, 16),
}
CASES = [(d, s) for d in DEVICES for s in SHAPES if s.startswith("B64" if d == "cpu" else "B256")]


def _inputs(device, shape, requires_grad):
    n, c, o, k, padding, h, w = SHAPES[shape]
    torch.manual_seed(0)
    x, weight, bias, padding = make(device, torch.float32, n=n, c=c, h=h, w=w, o=o, k=k, padding=padding,
                                    requires_grad=requires_grad)
    x.requires_grad_(requires_grad and c != 3)  # the first layer's images need no gradient, later blocks' do
    return x, weight, bias, padding


@pytest.mark.parametrize("device,shape", CASES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd(measure, impl, device, shape):
    args = _inputs(device, shape, requires_grad=False)
    fn = IMPLS[impl]
    measure(lambda: fn(*args), op="conv2d_relu_maxpool2d", kind="fwd", impl=impl, device=device, shape=shape,
            rounds=20)


@pytest.mark.parametrize("device,shape", CASES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(measure, impl, device, shape):
    args = _inputs(device, shape, requires_grad=True)
    fn = IMPLS[impl]
    measure(lambda: fn(*args).sum().backward(), op="conv2d_relu_maxpool2d", kind="fwd+bwd", impl=impl,
            device=device, shape=shape, rounds=20)
