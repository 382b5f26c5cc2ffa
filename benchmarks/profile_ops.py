"""Per-kernel GPU time of each op's forward+backward at the GPU shapes, mmfast next to native: where the time goes.

    python3 benchmarks/profile_ops.py [--device cuda] [--rows 10]

Prints, per case, the CUDA-event time of one step (median of 50) and torch.profiler's kernels by total GPU time
over 20 steps. Then, on CUDA, the host floor: CUDA-event and wall-clock time per step of the cheapest autograd step
on the seed conv block's output shape and of mmfast's seed block (forward, forward+backward, its backward op alone),
which shows how much of a small step is host overhead. Speed work reads these tables; the benchmarks
(pytest-benchmark) stay the measure of record.
"""
import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import mmfast
from bench_concat_linear import fused as head_fused
from bench_concat_linear import native as head_native
from bench_lstm import fused as lstm_fused
from bench_lstm import native_unpacked as lstm_native_unpacked
from bench_lstm import text_branch
from mmfast import reference
from mmfast.testing import make_concat_linear_inputs, make_conv2d_relu_maxpool2d_inputs


def conv_inputs(device, c, o, padding, size):
    """Images [256, c, size, size] (no gradient) and one block's weight and bias (with gradients)."""
    x = torch.randn(256, c, size, size, device=device)
    _, w, b, _ = make_conv2d_relu_maxpool2d_inputs(device, torch.float32, n=1, c=c, h=1, w=1, o=o, k=3,
                                                   padding=padding, requires_grad=True)
    return x, w, b


def conv_case(device, c, o, padding, size, impl):
    x, w, b = conv_inputs(device, c, o, padding, size)
    block = mmfast.ops.conv2d_relu_maxpool2d if impl == "mmfast" else reference.conv2d_relu_maxpool2d
    return lambda: block(x, w, b, padding).sum().backward()


def head_case(device, widths, o, impl):
    inputs, w, b = make_concat_linear_inputs(device, torch.float32, n=256, widths=widths, o=o, requires_grad=True)
    head = head_fused if impl == "mmfast" else head_native
    return lambda: head(inputs, w, b).sum().backward()


def lstm_case(device, shape, impl):
    embedding, lstm, tokens, lengths = text_branch(device, shape)
    lengths = lengths.to(device)  # mmfast: device lengths, no host sync; the unpacked native LSTM ignores them
    forward = {"mmfast": lstm_fused, "native_cudnn_unpacked": lstm_native_unpacked}[impl]

    def step():
        y, h_n, _ = forward(embedding, lstm, tokens, lengths)
        (y.sum() + h_n.sum()).backward()

    return step


NATIVE_AND_MMFAST = ("native", "mmfast")
# name -> (make(device, impl) -> fwd+bwd step, impls)
CASES = {
    "conv 3->32 valid 32x32": (lambda d, impl: conv_case(d, 3, 32, 0, 32, impl), NATIVE_AND_MMFAST),
    "conv 32->64 pad1 16x16": (lambda d, impl: conv_case(d, 32, 64, 1, 16, impl), NATIVE_AND_MMFAST),
    "head [7200, 64] -> 128": (lambda d, impl: head_case(d, (7200, 64), 128, impl), NATIVE_AND_MMFAST),
    "head [8192, 256] -> 512": (lambda d, impl: head_case(d, (8192, 256), 512, impl), NATIVE_AND_MMFAST),
    "lstm B256 T32 E128 H64, embedding in front": (lambda d, impl: lstm_case(d, (256, 32, 128, 64), impl),
                                                   ("native_cudnn_unpacked", "mmfast")),
}


def host_floor_steps(device):
    """name -> step, from the cheapest autograd step on the seed block's output shape up to mmfast's seed block."""
    x, w, b = conv_inputs(device, 3, 32, 0, 32)
    relu_input = torch.randn(256, 32, 15, 15, device=device, requires_grad=True)
    with torch.no_grad():
        out, argmax = torch.ops.mmfast.conv2d_relu_maxpool2d(x, w, b, 0)
    grad_out = torch.ones_like(out)

    def forward():
        with torch.no_grad():  # the forward kernel alone: no autograd node, nothing saved
            mmfast.ops.conv2d_relu_maxpool2d(x, w, b, 0)

    return {
        "relu + sum fwd+bwd, [256, 32, 15, 15]": lambda: torch.relu(relu_input).sum().backward(),
        "mmfast conv 3->32 fwd (no grad)": forward,
        "mmfast conv 3->32 fwd+bwd": lambda: mmfast.ops.conv2d_relu_maxpool2d(x, w, b, 0).sum().backward(),
        "mmfast conv 3->32 backward op alone": lambda: torch.ops.mmfast._conv2d_relu_maxpool2d_backward(
            grad_out, x, w, argmax, 0, False),
    }


def step_us(step, device, rounds=50):
    for _ in range(5):
        step()
    if device != "cuda":
        return float("nan")
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def wall_us(step, steps=200):
    """Wall-clock time per step of ``steps`` launched back to back and one synchronize: the host's pace when it is
    the bottleneck."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def print_host_floor(device):
    if device != "cuda":
        print(f"\n### host floor: CUDA only, skipped on {device}")
        return
    print("\n### host floor, us per step: events = CUDA events around one step (median of 50), "
          "wall = 200 steps then one synchronize")
    table = [("step", "events us", "wall us")]
    for name, step in host_floor_steps(device).items():
        table.append((name, f"{step_us(step, device):.1f}", f"{wall_us(step):.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for i, row in enumerate(table):
        print(f"| {row[0]:<{widths[0]}} | {row[1]:>{widths[1]}} | {row[2]:>{widths[2]}} |")
        if i == 0:
            print(f"| {'-' * widths[0]} | {'-' * (widths[1] - 1)}: | {'-' * (widths[2] - 1)}: |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    for name, (make, impls) in CASES.items():
        for impl in impls:
            torch.manual_seed(0)
            step = make(args.device, impl)
            us = step_us(step, args.device)
            with profile(activities=activities) as prof:
                for _ in range(20):
                    step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            print(f"\n### {name} | {impl} | fwd+bwd {us:.1f} us per step (CUDA events, median of 50)")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70))
    print_host_floor(args.device)


if __name__ == "__main__":
    main()
