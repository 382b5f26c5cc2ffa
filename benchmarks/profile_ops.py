"""Per-kernel GPU time of each op's forward+backward at the GPU shapes, mmfast next to native: where the time goes.

    python3 benchmarks/profile_ops.py [--device cuda] [--rows 10]

Prints, per case, the CUDA-event time of one step (median of 50) and torch.profiler's kernels by total GPU time
over 20 steps. Speed work reads this table; the benchmarks (pytest-benchmark) stay the measure of record.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import mmfast
from mmfast import reference
from mmfast.testing import make_concat_linear_inputs, make_conv2d_relu_maxpool2d_inputs


def conv_case(device, c, o, padding, size, impl):
    x = torch.randn(256, c, size, size, device=device)
    _, w, b, _ = make_conv2d_relu_maxpool2d_inputs(device, torch.float32, n=1, c=c, h=1, w=1, o=o, k=3,
                                                   padding=padding, requires_grad=True)
    block = mmfast.ops.conv2d_relu_maxpool2d if impl == "mmfast" else reference.conv2d_relu_maxpool2d
    return lambda: block(x, w, b, padding).sum().backward()


def head_case(device, widths, o, impl):
    inputs, w, b = make_concat_linear_inputs(device, torch.float32, n=256, widths=widths, o=o, requires_grad=True)
    if impl == "mmfast":
        return lambda: mmfast.ops.concat_linear(inputs, w, b, 0.5, training=True, relu=True).sum().backward()
    return lambda: F.relu(F.linear(F.dropout(torch.cat(inputs, 1), 0.5, training=True), w, b)).sum().backward()


CASES = {
    "conv 3->32 valid 32x32": lambda d, impl: conv_case(d, 3, 32, 0, 32, impl),
    "conv 32->64 pad1 16x16": lambda d, impl: conv_case(d, 32, 64, 1, 16, impl),
    "head [7200, 64] -> 128": lambda d, impl: head_case(d, (7200, 64), 128, impl),
    "head [8192, 256] -> 512": lambda d, impl: head_case(d, (8192, 256), 512, impl),
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=10)
    args = parser.parse_args()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    for name, make in CASES.items():
        for impl in ("native", "mmfast"):
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


if __name__ == "__main__":
    main()
