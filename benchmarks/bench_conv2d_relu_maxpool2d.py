"""Image feature blocks, conv2d + bias + ReLU + 2x2 max-pool: mmfast's fused op next to native compositions.

Cases: the seed's one block (3->32, 3x3, valid, 32x32) and the larger three-block stack (32, 64, 128; 3x3,
padding 1), at batch 64 on the CPU and 256 on CUDA; on CUDA also the wider block of ../shared/GPU.md's table
(32->64, 3x3, padding 1, 16x16), one of issue 3's target shapes. Baselines: native eager (NCHW), channels_last (CPU),
torch.compile, and a CUDA-graph replay (CUDA), which mmfast_cuda_graph, mmfast's own replay, is set against.

Run: pytest benchmarks/bench_conv2d_relu_maxpool2d.py --benchmark-only [--benchmark-json=out.json]
"""
import pytest
import torch

import mmfast
from mmfast import reference
from mmfast.testing import DEVICES
from mmfast.testing import make_conv2d_relu_maxpool2d_inputs as make
from variants import compiled

OP = "conv2d_relu_maxpool2d"
# name -> (channels, padding, image size); the batch is the device's.
STACKS = {"seed_3to32_valid_32x32": ((3, 32), 0, 32), "blocks_32_64_128_pad1_32x32": ((3, 32, 64, 128), 1, 32),
          "block_32to64_pad1_16x16": ((32, 64), 1, 16)}
DEVICE_STACKS = {"cpu": ["seed_3to32_valid_32x32", "blocks_32_64_128_pad1_32x32"], "cuda": list(STACKS)}
BATCH = {"cpu": 64, "cuda": 256}


def _impls(device):
    impls = ["mmfast", "native", "native_compile"]
    impls += ["native_channels_last"] if device == "cpu" else ["native_cuda_graph", "mmfast_cuda_graph"]
    return impls


CASES = [(impl, d, s) for d in DEVICES for s in DEVICE_STACKS[d] for impl in _impls(d)]


def _setup(impl, device, stack, backward):
    channels, padding, size = STACKS[stack]
    torch.manual_seed(0)
    # Images get no gradient; a feature map from an earlier block (the 32->64 block) does.
    x = torch.randn(BATCH[device], channels[0], size, size, device=device).requires_grad_(backward and channels[0] > 3)
    layers = [make(device, torch.float32, n=1, c=c, h=1, w=1, o=o, k=3, padding=padding, requires_grad=backward)[1:3]
              for c, o in zip(channels, channels[1:])]
    block = mmfast.ops.conv2d_relu_maxpool2d if impl.startswith("mmfast") else reference.conv2d_relu_maxpool2d
    if impl == "native_channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        layers = [(w.detach().contiguous(memory_format=torch.channels_last).requires_grad_(backward), b)
                  for w, b in layers]

    def forward(x):
        for weight, bias in layers:
            x = block(x, weight, bias, padding)
        return x

    if impl == "native_compile":
        forward = compiled(forward)

    def step():
        out = forward(x)
        if backward:
            out.sum().backward()

    return step


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl,device,stack", CASES)
def test_conv_blocks(measure, impl, device, stack, backward):
    with torch.set_grad_enabled(backward):
        step = _setup(impl, device, stack, backward)
        measure(step, op=OP, kind="fwd+bwd" if backward else "fwd", impl=impl, device=device,
                shape=f"B{BATCH[device]}_{stack}", rounds=20)
