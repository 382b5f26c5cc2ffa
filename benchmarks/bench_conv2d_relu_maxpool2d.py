# run: python -m pytest benchmarks/bench_conv2d_relu_maxpool2d.py --benchmark-only [--benchmark-json=out.json]
import pytest
import torch

import mmfast
from mmfast import reference
from mmfast.testing import DEVICES
from mmfast.testing import make_conv2d_relu_maxpool2d_inputs as make

IMPLS = {"mmfast": mmfast.ops.conv2d_relu_maxpool2d, "native": reference.conv2d_relu_maxpool2d}

# (n, c, o, k, padding, h, w): the seed model's first block, and a wider second-block-like layer.
SHAPES = {
    "B64_3to32_k3_valid_32x32": (64, 3, 32, 3, 0, 32, 32),
    "B64_32to64_k3_pad1_16x16": (64, 32, 64, 3, 1, 16, 16),
}


def _inputs(device, shape, requires_grad):
    n, c, o, k, padding, h, w = SHAPES[shape]
    torch.manual_seed(0)
    x, weight, bias, padding = make(device, torch.float32, n=n, c=c, h=h, w=w, o=o, k=k, padding=padding,
                                    requires_grad=requires_grad)
    x.requires_grad_(False)  # the first layer's images need no gradient
    return x, weight, bias, padding


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd(benchmark, impl, device, shape):
    args = _inputs(device, shape, requires_grad=False)
    fn = IMPLS[impl]

    def step():
        fn(*args)
        _sync(device)

    benchmark.group = f"conv2d_relu_maxpool2d fwd {device} {shape}"
    benchmark.extra_info.update(impl=impl, device=device, shape=shape)
    benchmark.pedantic(step, warmup_rounds=3, rounds=20, iterations=1)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, impl, device, shape):
    args = _inputs(device, shape, requires_grad=True)
    fn = IMPLS[impl]

    def step():
        fn(*args).sum().backward()
        _sync(device)

    benchmark.group = f"conv2d_relu_maxpool2d fwd+bwd {device} {shape}"
    benchmark.extra_info.update(impl=impl, device=device, shape=shape)
    benchmark.pedantic(step, warmup_rounds=3, rounds=20, iterations=1)
