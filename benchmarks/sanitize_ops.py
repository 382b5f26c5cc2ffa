"""Each op forward and backward once on CUDA at small, odd shapes: the workload for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_ops.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_ops.py

Small shapes keep the sanitizers (10-100x slower) within a minute; they still cover partial tiles, lengths 0
and 1, and the LSTM's persistent kernels and its per-step fallback.
"""
import os

import torch

import mmfast
from mmfast.testing import make_concat_linear_inputs, make_conv2d_relu_maxpool2d_inputs, make_lstm_inputs


def run_once() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, pad = make_conv2d_relu_maxpool2d_inputs("cuda", dtype, n=3, c=5, h=9, w=7, o=3, k=3, padding=1,
                                                         requires_grad=True)
        mmfast.ops.conv2d_relu_maxpool2d(x, w, b, pad).sum().backward()

        # h=7: one block per row group holds all of w_hh (state kept on chip); h=130: w_hh split over blocks that
        # exchange the state through global memory with a grid sync per step.
        for hidden in (7, 130):
            x, lengths, h0, c0, *weights = make_lstm_inputs("cuda", dtype, b=5, t=6, i=4, h=hidden,
                                                            requires_grad=True)
            lengths = torch.tensor([6, 0, 1, 3, 6], device="cuda")
            y, (h_n, c_n) = mmfast.ops.lstm(x, lengths, h0, c0, *weights)
            (y.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()

        inputs, w, b = make_concat_linear_inputs("cuda", dtype, n=5, widths=(13, 3), o=6, requires_grad=True)
        mmfast.ops.concat_linear(inputs, w, b, 0.5, training=True, relu=True).sum().backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    run_once()
    os.environ["MMFAST_LSTM_CUDA_FALLBACK"] = "1"  # read per call: the per-step path too
    run_once()
    print("sanitize_ops: done")
