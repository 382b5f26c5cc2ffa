"""Each op forward+backward once at the GPU shapes, inside cudaProfilerStart/Stop: the workload for Nsight Compute.

    ncu --profile-from-start off -k regex:mmfast --section SpeedOfLight ... python3 benchmarks/kernel_workload.py

The steps are mmfast's cases of benchmarks/profile_ops.py. Two warm-up iterations run outside the profiled range,
so one-time setup (layout choice, cuBLAS handles, the caching allocator) is not what gets profiled.
gpu_check.sh runs this with NCU=1.
"""
import torch

from profile_ops import CASES


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    steps = [make(device, "mmfast") for make, _ in CASES.values()]
    for _ in range(2):
        for step in steps:
            step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for step in steps:
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("kernel_workload: done on", device)


if __name__ == "__main__":
    main()
