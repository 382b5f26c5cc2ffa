"""Shared timing for the benchmark suites.

Each case is one pytest-benchmark group, "<op> <kind> <device> <shape>", holding mmfast and its native baselines
side by side (extra_info "impl": "mmfast", "native" = eager in the default layout, or "native_<variant>" = the
strongest native options a user would try: channels_last, torch.compile, CUDA-graph replay). On CUDA,
"mmfast_cuda_graph" is mmfast's step replayed from a CUDA graph, the GPU-side time without launch overhead, to set
against "native_cuda_graph". CUDA work is synchronised inside the timed step.
`python3 benchmarks/report.py bench.json` turns the JSON into a table.
"""
import functools
import platform

import pytest
import torch

from variants import cuda_graphed


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    brand = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            brand = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{brand} ({torch.get_num_threads()} threads)"


@pytest.fixture
def measure(benchmark):
    """measure(step, ...): time ``step`` as ``impl``. The impl name carries how it runs: "*_cuda_graph" steps are
    captured and replayed, "*compile*" steps get more warm-up rounds (compilation happens in the first)."""

    def run(step, *, op: str, kind: str, impl: str, device: str, shape, rounds: int = 30):
        if impl.endswith("_cuda_graph"):
            step = cuda_graphed(step)
        warmup = 5 if "compile" in impl else 3

        def timed():
            step()
            if device == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{op} {kind} {device} {shape}"
        benchmark.extra_info.update(op=op, kind=kind, impl=impl, device=device, shape=str(shape),
                                    device_name=device_name(device), torch=torch.__version__)
        benchmark.pedantic(timed, warmup_rounds=warmup, rounds=rounds, iterations=1)

    return run
