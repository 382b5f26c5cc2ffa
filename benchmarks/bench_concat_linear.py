"""concat + dropout + linear + ReLU: mmfast's fused op next to native compositions, same inputs.

Baselines: native eager (cat, dropout, linear, relu), torch.compile of it, and on CUDA its CUDA-graph replay, which
mmfast_cuda_graph, the fused op's own replay, is set against.

Run: pytest benchmarks/bench_concat_linear.py --benchmark-only [--benchmark-json=out.json]
"""
import pytest
import torch

import mmfast
from mmfast import reference
from mmfast.testing import DEVICES, make_concat_linear_inputs
from variants import compiled

# (batch, widths, out_features): the seed's head (CNN features 7200 + text 64 -> 128) at the device's batch (64 on
# the CPU, 256 on CUDA), and a larger one.
SHAPES = {"cpu": [(64, (7200, 64), 128), (256, (7200, 64), 128)],
          "cuda": [(256, (7200, 64), 128), (256, (8192, 256), 512)]}
IMPLS = {"cpu": ["mmfast", "native", "native_compile"],
         "cuda": ["mmfast", "native", "native_compile", "native_cuda_graph", "mmfast_cuda_graph"]}
CASES = [(impl, d, s) for d in DEVICES for s in SHAPES[d] for impl in IMPLS[d]]
P = 0.5


def native(inputs, weight, bias):  # cat + dropout (torch's RNG) + linear + relu
    return reference.concat_linear(inputs, weight, bias, P, training=True, relu=True)


def fused(inputs, weight, bias):
    return mmfast.ops.concat_linear(inputs, weight, bias, P, training=True, relu=True)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl,device,shape", CASES, ids=str)
def test_concat_linear(measure, impl, device, shape, backward):
    n, widths, o = shape
    torch.manual_seed(0)
    inputs, weight, bias = make_concat_linear_inputs(device, torch.float32, n, widths, o, requires_grad=backward)
    fn = {"mmfast": fused, "native": native, "native_compile": compiled(native), "native_cuda_graph": native,
          "mmfast_cuda_graph": fused}[impl]

    def step():
        out = fn(inputs, weight, bias)
        if backward:
            out.sum().backward()

    with torch.set_grad_enabled(backward):
        measure(step, op="concat_linear", kind="fwd+bwd" if backward else "fwd", impl=impl, device=device,
                shape=shape)
