"""A whole MultimodalClassifier training step on CUDA: mmfast vs native, CUDA-graph capture and replay,
torch.compile, autocast. Collected only where a GPU and a CUDA build of mmfast exist."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mmfast
from mmfast.models import ModelConfig, MultimodalClassifier

if not (mmfast.with_cuda and torch.cuda.is_available()):
    pytest.skip("needs a GPU and mmfast built with CUDA", allow_module_level=True)

CFG = ModelConfig(num_classes=10, vocab_size=100, image_size=32, channels=(32,), embed_dim=128, hidden_size=64,
                  fusion_dim=128, dropout=0.5)


def _batch(b=64, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    tokens = torch.randint(1, CFG.vocab_size, (b, t), generator=g)
    tokens[torch.arange(t)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, CFG.num_classes, (b,), generator=g)
    return [x.cuda() for x in (images, tokens, lengths, labels)]


def _models(cfg=CFG):
    torch.manual_seed(0)
    fused = MultimodalClassifier(cfg, "mmfast").cuda()
    native = MultimodalClassifier(cfg, "native").cuda()
    native.load_state_dict(fused.state_dict())
    return fused, native


def test_mmfast_and_native_match_on_cuda():
    # Training mode (cuDNN's LSTM has no backward in eval mode) with dropout off, so both are deterministic.
    fused, native = _models(dataclasses.replace(CFG, dropout=0.0))
    images, tokens, lengths, labels = _batch()
    loss_f = F.cross_entropy(fused(images, tokens, lengths), labels)
    loss_n = F.cross_entropy(native(images, tokens, lengths), labels)
    assert_close(loss_f, loss_n, rtol=1e-4, atol=1e-5)
    grads_f = torch.autograd.grad(loss_f, list(fused.parameters()))
    grads_n = torch.autograd.grad(loss_n, list(native.parameters()))
    assert_close(grads_f, grads_n, rtol=1e-3, atol=1e-4)


def test_training_step_captured_in_cuda_graph_matches_eager():
    fused, _ = _models()
    eager = MultimodalClassifier(CFG, "mmfast").cuda()
    eager.load_state_dict(fused.state_dict())
    batches = [_batch(seed=s) for s in range(4)]
    static = [x.clone() for x in batches[0]]
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-3, capturable=True)
    opt_eager = torch.optim.AdamW(eager.parameters(), lr=1e-3, capturable=True)

    def step(model, optimizer, images, tokens, lengths, labels):
        loss = F.cross_entropy(model(images, tokens, lengths), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return loss

    fused.eval(), eager.eval()  # dropout off: the graph and eager runs then see identical math
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for _ in range(2):
            step(fused, opt, *static)
            step(eager, opt_eager, *static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(fused, opt, *static)
    for batch in batches:
        for dst, src in zip(static, batch):
            dst.copy_(src)
        graph.replay()
        loss = step(eager, opt_eager, *batch)
        assert_close(static_loss, loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.parameters(), eager.parameters()):
        assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_on_cuda():
    fused, _ = _models()
    fused.eval()
    images, tokens, lengths, labels = _batch()
    compiled = torch.compile(fused, fullgraph=True)
    assert_close(compiled(images, tokens, lengths), fused(images, tokens, lengths), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_step_is_finite(dtype):
    fused, _ = _models()
    images, tokens, lengths, labels = _batch()
    fused.eval()  # no dropout: the autocast loss is compared with the float32 one
    with torch.no_grad():
        loss_fp32 = F.cross_entropy(fused(images, tokens, lengths), labels)
    with torch.autocast("cuda", dtype=dtype):
        logits = fused(images, tokens, lengths)
        loss = F.cross_entropy(logits.float(), labels)
    assert logits.dtype == dtype
    loss.backward()
    assert_close(loss, loss_fp32, rtol=0.02, atol=0.02)
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)
