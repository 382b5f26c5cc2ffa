"""The CPU kernels' GEMM helper (csrc/common/blas.h): the BLAS that torch exports, called directly, and its
at::mm_out fallback (forced with MMFAST_BLAS=aten) give the same conv block and LSTM, forward and backward."""
import os
import platform
import subprocess
import sys

import torch
from torch.testing import assert_close

import mmfast
from mmfast.testing import make_conv2d_relu_maxpool2d_inputs, make_lstm_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outputs_and_grads(dtype=torch.float32):
    """The conv block's and the LSTM's outputs and gradients on fixed inputs."""
    torch.manual_seed(0)
    x, w, b, padding = make_conv2d_relu_maxpool2d_inputs("cpu", dtype, n=5, c=4, h=11, w=9, o=6, k=3, padding=1,
                                                         requires_grad=True)
    out = mmfast.ops.conv2d_relu_maxpool2d(x, w, b, padding)
    results = [out.detach(), *torch.autograd.grad(out, (x, w, b), torch.randn_like(out))]
    x, lengths, h0, c0, *weights = make_lstm_inputs("cpu", dtype, b=6, t=7, i=5, h=8, requires_grad=True)
    y, (h_n, c_n) = mmfast.ops.lstm(x, lengths, h0, c0, *weights)
    loss = (y * torch.randn_like(y)).sum() + (h_n * c_n).sum()
    results += [y.detach(), h_n.detach(), c_n.detach(), *torch.autograd.grad(loss, (x, h0, c0, *weights))]
    return results


def test_exported_blas_and_aten_fallback_agree(tmp_path):
    path = tmp_path / "fallback.pt"
    code = ("import sys, torch, mmfast; sys.path.insert(0, 'tests'); from test_blas import outputs_and_grads; "
            "assert mmfast._C.cpu_gemm_backend() == 'aten', mmfast._C.cpu_gemm_backend(); "
            f"torch.save([outputs_and_grads(d) for d in (torch.float32, torch.float64)], {str(path)!r})")
    env = dict(os.environ, MMFAST_BLAS="aten", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    fallback = torch.load(path)
    if sys.platform == "linux" and platform.machine() == "x86_64":
        assert mmfast._C.cpu_gemm_backend() == "exported"  # torch's x86-64 Linux wheels export sgemm_/dgemm_
    for dtype, expected in zip((torch.float32, torch.float64), fallback):
        assert_close(outputs_and_grads(dtype), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
