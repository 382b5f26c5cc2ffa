"""The strongest native options a user would try, as wrappers around a native step (imported by bench_*.py)."""
import torch


def compiled(fn):
    """torch.compile with static shapes; compilation happens in the benchmark's warm-up rounds."""
    return torch.compile(fn, dynamic=False)


def cuda_graphed(step, warmup: int = 3):
    """Capture ``step`` (which must not sync the host) in a CUDA graph and return its replay.

    Warm-up runs on a side stream first, as torch.cuda.graph requires, so gradients and optimizer state exist
    before capture and the replay updates them in place.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
