"""Each op forward+backward once at the GPU shapes, inside cudaProfilerStart/Stop: the workload for Nsight Compute.

    ncu --profile-from-start off -k regex:mmfast --section SpeedOfLight ... python3 benchmarks/kernel_workload.py

Two warm-up iterations run outside the profiled range, so one-time setup (layout choice, cuBLAS handles, the
caching allocator) is not what gets profiled. gpu_check.sh runs this with NCU=1.
"""
import torch

import mmfast
from mmfast.testing import make_concat_linear_inputs, make_conv2d_relu_maxpool2d_inputs, make_lstm_inputs


def steps(device):
    """name -> fwd+bwd step at the shapes of benchmarks/RESULTS.md (batch 256)."""
    torch.manual_seed(0)
    conv = {}
    for name, (c, o, size, padding) in {"conv 3->32": (3, 32, 32, 0), "conv 32->64": (32, 64, 16, 1)}.items():
        x = torch.randn(256, c, size, size, device=device, requires_grad=c > 3)
        _, w, b, _ = make_conv2d_relu_maxpool2d_inputs(device, torch.float32, n=1, c=c, h=1, w=1, o=o, k=3,
                                                       padding=padding, requires_grad=True)
        conv[name] = (x, w, b, padding)
    x, _, h0, c0, *weights = make_lstm_inputs(device, torch.float32, b=256, t=32, i=128, h=64, requires_grad=True)
    lengths = torch.randint(1, 33, (256,), device=device)
    inputs, w_head, b_head = make_concat_linear_inputs(device, torch.float32, n=256, widths=(7200, 64), o=128,
                                                       requires_grad=True)

    def conv_step(name):
        xi, wi, bi, pad = conv[name]
        return lambda: mmfast.ops.conv2d_relu_maxpool2d(xi, wi, bi, pad).sum().backward()

    def lstm_step():
        y, (h_n, _) = mmfast.ops.lstm(x, lengths, None, None, *weights)
        (y.sum() + h_n.sum()).backward()

    def head_step():
        mmfast.ops.concat_linear(inputs, w_head, b_head, 0.5, training=True, relu=True).sum().backward()

    return {"conv 3->32": conv_step("conv 3->32"), "conv 32->64": conv_step("conv 32->64"),
            "lstm B256 T32 H64": lstm_step, "head [7200, 64] -> 128": head_step}


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = steps(device)
    for _ in range(2):
        for step in work.values():
            step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for step in work.values():
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("kernel_workload: done on", device)


if __name__ == "__main__":
    main()
