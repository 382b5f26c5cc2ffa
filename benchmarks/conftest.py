"""Shared timing for the op benchmarks: one pytest-benchmark group per (op, kind, device, shape), so the
mmfast and native implementations sit side by side; CUDA work is synchronised inside the timed step."""
import pytest
import torch


@pytest.fixture
def measure(benchmark):
    def run(step, *, op: str, kind: str, impl: str, device: str, shape, rounds: int = 30):
        def timed():
            step()
            if device == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{op} {kind} {device} {shape}"
        benchmark.extra_info.update(op=op, kind=kind, impl=impl, device=device, shape=str(shape))
        benchmark.pedantic(timed, warmup_rounds=3, rounds=rounds, iterations=1)

    return run
