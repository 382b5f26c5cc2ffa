"""Embedding + one-layer LSTM over padded token sequences: mmfast's fused op next to native compositions.

native = nn.Embedding + pack_padded_sequence + nn.LSTM + pad_packed_sequence (what a user writes for padded
batches); native_compile = the same under torch.compile; on CUDA also native_cudnn_unpacked = nn.LSTM (cuDNN)
over the padded batch, ignoring lengths (less work than the task asks, the fastest native call), and its
CUDA-graph replay. mmfast = nn.Embedding + mmfast.ops.lstm with lengths; on CUDA also mmfast_cuda_graph, its
CUDA-graph replay (lengths on the device), set against native_cuda_graph. Same weights, same tokens.

Run: pytest benchmarks/bench_lstm.py --benchmark-only [--benchmark-json=out.json]
"""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import mmfast
from mmfast.testing import DEVICES
from variants import compiled

VOCAB = 1000
# (batch, steps, embedding, hidden): the seed's text branch and a larger one, at the CPU batch (64) and the GPU
# batch (256).
SHAPES = {"cpu": [(64, 32, 128, 64), (64, 64, 128, 256)], "cuda": [(256, 32, 128, 64), (256, 64, 128, 256)]}
IMPLS = {"cpu": ["mmfast", "native", "native_compile"],
         "cuda": ["mmfast", "native", "native_compile", "native_cudnn_unpacked", "native_cuda_graph",
                  "mmfast_cuda_graph"]}
CASES = [(impl, d, s) for d in DEVICES for s in SHAPES[d] for impl in IMPLS[d]]


def text_branch(device, shape):
    """(embedding, lstm, tokens [B, T] on ``device``, lengths [B] on the CPU): seeded, shared by every impl."""
    b, t, e, h = shape
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    embedding = nn.Embedding(VOCAB, e, padding_idx=0).to(device)
    lstm = nn.LSTM(e, h, batch_first=True).to(device)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    tokens = torch.randint(1, VOCAB, (b, t), generator=gen)
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0  # <pad>
    return embedding, lstm, tokens.to(device), lengths


def native(embedding, lstm, tokens, lengths):
    packed = pack_padded_sequence(embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
    out, (h_n, c_n) = lstm(packed)
    return pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])[0], h_n, c_n


def native_unpacked(embedding, lstm, tokens, lengths):
    out, (h_n, c_n) = lstm(embedding(tokens))
    return out, h_n, c_n


def fused(embedding, lstm, tokens, lengths):
    y, (h_n, c_n) = mmfast.ops.lstm(embedding(tokens), lengths, None, None, lstm.weight_ih_l0, lstm.weight_hh_l0,
                                    lstm.bias_ih_l0, lstm.bias_hh_l0)
    return y, h_n, c_n


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl,device,shape", CASES, ids=str)
def test_lstm(measure, impl, device, shape, backward):
    embedding, lstm, tokens, lengths = text_branch(device, shape)
    fn = {"mmfast": fused, "native": native, "native_compile": compiled(native),
          "native_cudnn_unpacked": native_unpacked, "native_cuda_graph": native_unpacked,
          "mmfast_cuda_graph": fused}[impl]
    if impl.startswith("mmfast") and device == "cuda":
        lengths = lengths.to(device)  # device lengths: no host sync, capturable

    def step():
        y, h_n, c_n = fn(embedding, lstm, tokens, lengths)
        if backward:
            (y.sum() + h_n.sum()).backward()

    with torch.set_grad_enabled(backward):
        measure(step, op="lstm", kind="fwd+bwd" if backward else "fwd", impl=impl, device=device, shape=shape)
