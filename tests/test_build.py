import re
from pathlib import Path

import torch

import mmfast

OPS = ["conv2d_relu_maxpool2d", "lstm", "concat_linear"]


def test_build_facts():
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert mmfast.__version__ == re.search(r'VERSION = "([^"]+)"', setup).group(1)
    assert isinstance(mmfast.with_cuda, bool)
    assert mmfast.with_cuda == mmfast._C.with_cuda
    assert isinstance(mmfast._C.cuda_arch_list, str)


def test_ops_registered_with_cpu_and_autograd_kernels():  # fake kernels: see each op's opcheck test
    for name in OPS:
        for op in (name, f"_{name}_backward"):
            qualified = f"mmfast::{op}"
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CPU"), qualified
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Autograd"), qualified
            if mmfast.with_cuda:
                assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"), qualified
