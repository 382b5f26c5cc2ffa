"""A whole MultimodalClassifier training step (forward, cross-entropy, backward, fused AdamW): mmfast next to the
native model with the same weights on the same batch, and the native model's channels_last (CPU) and
torch.compile variants. On CUDA also mmfast_cuda_graph: mmfast's whole step replayed from a CUDA graph (capturable
AdamW, lengths on the device), its GPU-side time without launch overhead. (A CUDA-graph replay of the native model
is not possible: its packed LSTM needs the lengths on the host.)

Cases: the seed model (one conv block of 32, LSTM H64, T32) and a larger one (conv blocks 32, 64, 128 with
padding 1; LSTM H256, T64), at batch 64 on the CPU and 256 on CUDA.

Run: pytest benchmarks/bench_train_step.py --benchmark-only [--benchmark-json=out.json]
"""
import pytest

from mmfast.bench import make_case, make_train_step
from mmfast.testing import DEVICES

MODELS = {"seed": dict(channels=(32,), padding=0, hidden_size=64, max_len=32),
          "large": dict(channels=(32, 64, 128), padding=1, hidden_size=256, max_len=64)}
BATCH = {"cpu": 64, "cuda": 256}
VARIANTS = {"cpu": ["mmfast", "native", "native_channels_last", "native_compile"],
            "cuda": ["mmfast", "native", "native_compile", "mmfast_cuda_graph"]}
CASES = [(v, d, m) for d in DEVICES for m in MODELS for v in VARIANTS[d]]
GRAPHED = "_cuda_graph"  # measure captures the step; the model and optimizer must allow it


@pytest.mark.parametrize("variant,device,model", CASES)
def test_train_step(measure, variant, device, model):
    case = make_case("builtin", device, BATCH[device], **MODELS[model])
    step, _ = make_train_step(case, variant.removesuffix(GRAPHED), capturable=variant.endswith(GRAPHED))
    measure(step, op="train_step", kind="fwd+bwd+adamw", impl=variant, device=device,
            shape=f"B{BATCH[device]}_{model}", rounds=20)
