"""CUDA kernels of mmfast::conv2d_relu_maxpool2d, against mmfast.reference (float64 on the CPU) and the CPU kernel.

Inputs are drawn on the CPU from seeded generators. Where a test compares argmax (or gradients, which follow it)
with another implementation, the inputs are redrawn until every pooling window has a clear winner and a clear
ReLU decision (`_clear_inputs`): rounding differences between implementations then cannot flip a window. For
the large shapes of the issue, where near-ties are certain, the CUDA backward is compared with the CPU backward
kernel fed the same argmax, and the argmax with the reference on the windows that are clear.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mmfast
from mmfast import reference
from mmfast.testing import TOL, argmax_windows

CUDA = ["cuda"] if mmfast.with_cuda and torch.cuda.is_available() else []
if not CUDA:
    pytest.skip("needs mmfast built with CUDA and a GPU", allow_module_level=True)

FWD = torch.ops.mmfast.conv2d_relu_maxpool2d.default
BWD = torch.ops.mmfast._conv2d_relu_maxpool2d_backward.default
DROPPED = 255
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KERNEL_PADDINGS = [(k, p) for k in (1, 3, 5, 7) for p in range(k // 2 + 1)]
MARGIN = 2e-5  # window gap and |max + bias| that float accumulation (~1e-6 for these sums) cannot cross
# The issue's shapes (n, c, h, w, o, k, padding): every dtype, except B64 224x224 at batch 8 in float16/bfloat16
# (its float64 reference on the CPU is the slow part of the test).
ISSUE_SHAPES = {
    "B256_3to32_k3_valid_32x32": (256, 3, 32, 32, 32, 3, 0),
    "B256_32to64_k3_pad1_16x16": (256, 32, 16, 16, 64, 3, 1),
    "B64_3to32_k3_pad1_224x224": (64, 3, 224, 224, 32, 3, 1),
}
ISSUE_CASES = [(dtype, name, (8,) + shape[1:] if dtype != torch.float32 and shape[2] == 224 else shape)
               for name, shape in ISSUE_SHAPES.items() for dtype in DTYPES]


def _draw(n, c, h, w, o, k, padding, bias, dtype, seed):
    """x, weight, bias on the CPU in `dtype` (weights scaled like nn.Conv2d's init)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    weight = torch.randn(o, c, k, k, generator=gen, dtype=torch.float64) * max(c * k * k, 1) ** -0.5
    b = torch.randn(o, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    return x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)


def _windows(x, weight, bias, padding):
    """float64 conv + bias cropped to the pooled region, as [N, O, Hp, Wp, 4] in max_pool2d's scan order."""
    conv = F.conv2d(x.double().cpu(), weight.double().cpu(), None if bias is None else bias.double().cpu(),
                    padding=padding)
    n, o, hc, wc = conv.shape
    hp, wp = hc // 2, wc // 2
    conv = conv[:, :, : 2 * hp, : 2 * wp].reshape(n, o, hp, 2, wp, 2)
    return conv.permute(0, 1, 2, 4, 3, 5).reshape(n, o, hp, wp, 4)


def _clear_mask(windows):
    top = windows.topk(2, dim=-1).values if windows.shape[-1] > 1 else windows
    return (top[..., 0] - top[..., 1] > MARGIN) & (top[..., 0].abs() > MARGIN)


def _expected_argmax(windows):
    best, idx = windows.max(dim=-1)  # first maximal index, as max_pool2d
    return torch.where(best > 0, idx, torch.full_like(idx, DROPPED)).to(torch.uint8)


def _clear_inputs(n, c, h, w, o, k, padding, bias=True, dtype=torch.float32, seed=0):
    for attempt in range(50):
        x, weight, b = _draw(n, c, h, w, o, k, padding, bias, dtype, seed * 1000 + attempt)
        if _clear_mask(_windows(x, weight, b, padding)).all():
            return x, weight, b
    raise AssertionError("no input draw with clear pooling windows; use a smaller shape")


def _poison_allocator():
    """Fill cached device blocks with 0x7F bytes (NaN in fp16, 3.4e38 in fp32/bf16, 127 as argmax), so an
    output element the kernels never write fails the comparisons."""
    blocks = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in range(16)]
    blocks += [torch.empty(s << 20, dtype=torch.uint8, device="cuda") for s in (4, 16, 64, 256)]
    for block in blocks:
        block.fill_(0x7F)
    del blocks


def _reference(x, weight, bias, padding, grad_out, need=(True, True, True)):
    """mmfast.reference in float64 on the CPU: out and the gradients of x, weight, bias."""
    leaves = [t.detach().double().cpu().requires_grad_(r) if t is not None else None
              for t, r in zip((x, weight, bias), need)]
    out = reference.conv2d_relu_maxpool2d(leaves[0], leaves[1], leaves[2], padding)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wanted, grad_out.double().cpu())
    return out.detach(), grads


def _assert_grads_close(got, expected, dtype):
    """grad_x, grad_weight[, grad_bias]. The weight and bias gradients are sums over every pooled pixel of the
    batch: their float32 rounding is compared relative to their largest entry."""
    tol = TOL[dtype]
    got = [g.detach().cpu().double() for g in got]
    assert_close(got[0], expected[0], **tol)
    for g, e in zip(got[1:], expected[1:]):
        assert_close(g, e, rtol=tol["rtol"], atol=max(tol["atol"], 1e-5 * e.abs().max().item()))


def _cuda_run(x, weight, bias, padding, grad_out):
    """Forward through the autograd op and backward for every input that requires grad, on CUDA."""
    leaves = [t.cuda().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    _poison_allocator()
    out, argmax = FWD(leaves[0], leaves[1], leaves[2], padding)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out.cuda())
    return out, argmax, grads


def _check_against_reference_and_cpu(x, weight, bias, padding, dtype):
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(7)
    hp, wp = ((s + 2 * padding - weight.shape[2] + 1) // 2 for s in x.shape[2:])
    grad_out = torch.randn(x.shape[0], weight.shape[0], hp, wp, generator=gen).to(dtype)
    out, argmax, grads = _cuda_run(x, weight, bias, padding, grad_out)
    assert out.dtype == dtype and argmax.dtype == torch.uint8 and out.is_contiguous()

    ref_out, ref_grads = _reference(x, weight, bias, padding, grad_out)
    assert_close(out.cpu().double(), ref_out, **tol)
    assert torch.equal(argmax.cpu(), _expected_argmax(_windows(x, weight, bias, padding)))
    _assert_grads_close(grads, ref_grads, dtype)

    # The CPU kernel (float64 on the same rounded inputs): same argmax, same gradients for that argmax.
    cpu = [None if t is None else t.double() for t in (x, weight, bias)]
    cpu_out, cpu_argmax = FWD(cpu[0], cpu[1], cpu[2], padding)
    assert torch.equal(argmax.cpu(), cpu_argmax)
    assert_close(out.cpu().double(), cpu_out, **tol)
    cpu_gx, cpu_gw, cpu_gb = BWD(grad_out.double(), cpu[0], cpu[1], cpu_argmax, padding, True)
    _assert_grads_close(grads, [cpu_gx, cpu_gw] + ([cpu_gb] if bias is not None else []), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,padding", KERNEL_PADDINGS)
@pytest.mark.parametrize("conv_hw", [(7, 9), (8, 5)], ids=str)  # conv output size; odd sizes drop a row/column
# C = 1, 5, 17 take each channel tile of the gradient kernels; O = 33 spans two 32-channel tiles.
@pytest.mark.parametrize("n,c,o,bias", [(2, 1, 3, True), (1, 5, 33, False), (2, 17, 7, True)], ids=str)
def test_matches_reference_and_cpu(dtype, k, padding, conv_hw, n, c, o, bias):
    h, w = (s - 2 * padding + k - 1 for s in conv_hw)
    x, weight, b = _clear_inputs(n, c, h, w, o, k, padding, bias, dtype)
    _check_against_reference_and_cpu(x, weight, b, padding, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 40, 13, 11, 70, 3, 1), (2, 3, 37, 41, 5, 3, 1), (2, 9, 19, 23, 17, 5, 2),
                                   (1, 20, 21, 18, 9, 7, 3), (5, 2, 12, 13, 4, 1, 0), (1, 6, 30, 17, 40, 5, 0)],
                         ids=str)
def test_medium_shapes(dtype, shape):
    # Several pooled tiles per image and several channel tiles (O up to 70, C up to 40).
    x, weight, b = _clear_inputs(*shape, dtype=dtype, seed=1)
    _check_against_reference_and_cpu(x, weight, b, shape[-1], dtype)


def _check_large(n, c, h, w, o, k, padding, dtype, seed):
    """Shapes with near-ties: out against the reference, argmax on the clear windows, backward against the
    CPU kernel in float64 given the CUDA argmax."""
    tol = TOL[dtype]
    x, weight, b = _draw(n, c, h, w, o, k, padding, True, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    hp, wp = (h + 2 * padding - k + 1) // 2, (w + 2 * padding - k + 1) // 2
    grad_out = torch.randn(n, o, hp, wp, generator=gen).to(dtype)
    out, argmax, (gx, gw, gb) = _cuda_run(x, weight, b, padding, grad_out)

    windows = _windows(x, weight, b, padding)
    assert_close(out.cpu().double(), F.relu(windows.max(dim=-1).values), **tol)
    clear = _clear_mask(windows)
    assert clear.double().mean() > 0.99
    argmax = argmax.cpu()
    assert torch.isin(argmax, torch.tensor([0, 1, 2, 3, DROPPED], dtype=torch.uint8)).all()
    assert torch.equal(argmax[clear], _expected_argmax(windows)[clear])
    del windows

    cpu_grads = BWD(grad_out.double(), x.double(), weight.double(), argmax, padding, True)
    _assert_grads_close((gx, gw, gb), cpu_grads, dtype)


@pytest.mark.parametrize("dtype,shape", [c[::2] for c in ISSUE_CASES],
                         ids=[f"{name}-{str(dtype)[6:]}-batch{shape[0]}" for dtype, name, shape in ISSUE_CASES])
def test_issue_shapes(dtype, shape):
    _check_large(*shape, dtype, seed=3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(100, 20, 9, 9, 40, 3, 1), (601, 1, 4, 4, 2, 3, 0), (150, 7, 20, 20, 9, 5, 2)],
                         ids=str)
def test_weight_gradient_chunks(dtype, shape):
    # Enough pooled tiles that a weight-gradient block sums several tiles, with a partial last chunk.
    _check_large(*shape, dtype, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_semantics(dtype):
    x = argmax_windows("cuda", dtype)  # seven windows: ties, drops, a bias at the threshold; exact in every dtype
    weight = torch.ones(1, 1, 1, 1, dtype=dtype, device="cuda")
    out, argmax = FWD(x, weight, None, 0)
    assert argmax.flatten().tolist() == [3, 0, 0, 1, DROPPED, DROPPED, 1]
    assert out.flatten().tolist() == [4.0, 5.0, 2.0, 7.0, 0.0, 0.0, 1.0]
    out, argmax = FWD(x, weight, torch.tensor([-4.0], dtype=dtype, device="cuda"), 0)
    assert argmax.flatten().tolist() == [DROPPED, 0, DROPPED, 1, DROPPED, DROPPED, DROPPED]
    assert out.flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    # Gradient flows only to the argmax position of kept windows.
    grad_out = torch.arange(1, 8, dtype=dtype, device="cuda").reshape(out.shape)
    gx, gw, gb = BWD(grad_out, x, weight, argmax, 0, True)
    expected = torch.zeros(2, x.shape[-1], dtype=dtype)
    expected[0, 2] = 2.0  # window 1, position 0
    expected[0, 7] = 4.0  # window 3, position 1
    assert torch.equal(gx.cpu().reshape(2, -1), expected)
    assert gb.item() == 6.0 and gw.item() == 2.0 * 5.0 + 4.0 * 7.0


@pytest.mark.parametrize("k,padding", [(3, 1), (5, 0), (1, 0)])
def test_backward_skips_grad_x_and_is_deterministic(k, padding):
    x, weight, b = (t.cuda() for t in _draw(4, 6, 19, 18, 40, k, padding, True, torch.float32, seed=5))
    out, argmax = FWD(x, weight, b, padding)
    grad_out = torch.randn_like(out)
    gx, gw, gb = BWD(grad_out, x, weight, argmax, padding, True)
    gx0, gw0, gb0 = BWD(grad_out, x, weight, argmax, padding, False)
    assert gx.shape == x.shape and gx0.shape == (0,) and gx0.device == x.device
    assert torch.equal(gw, gw0) and torch.equal(gb, gb0)  # no atomics: bitwise reproducible
    gx1, gw1, gb1 = BWD(grad_out, x, weight, argmax, padding, True)
    assert torch.equal(gx, gx1) and torch.equal(gw, gw1) and torch.equal(gb, gb1)
    out1, argmax1 = FWD(x, weight, b, padding)
    assert torch.equal(out, out1) and torch.equal(argmax, argmax1)


def test_autograd_skips_grad_x_for_frozen_input():
    x, weight, b = (t.cuda() for t in _clear_inputs(2, 3, 11, 10, 8, 3, 1))
    weight.requires_grad_()
    b.requires_grad_()
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, b, 1)
    gw, gb = torch.autograd.grad(out, (weight, b), torch.ones_like(out))
    _, (rgw, rgb) = _reference(x, weight, b, 1, torch.ones_like(out), need=(False, True, True))
    assert_close((gw.cpu().double(), gb.cpu().double()), (rgw, rgb), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_batch(dtype):
    x = torch.randn(0, 3, 9, 8, device="cuda", dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(4, device="cuda", dtype=dtype, requires_grad=True)
    out, argmax = FWD(x, weight, b, 1)
    assert out.shape == (0, 4, 4, 4) and argmax.shape == (0, 4, 4, 4) and out.is_cuda
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, weight, b))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(weight)) and torch.equal(gb, torch.zeros_like(b))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded_grad"])
def test_non_contiguous(layout):
    x, weight, b = (t.cuda() for t in _clear_inputs(2, 6, 9, 11, 4, 3, 1, seed=2))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "sliced":
        x = torch.stack([x, torch.randn_like(x)], 2).flatten(1, 2)[:, ::2]
        weight = torch.stack([weight, torch.randn_like(weight)], 2).flatten(1, 2)[:, ::2]
        b = torch.stack([b, torch.randn_like(b)], 1).flatten()[::2]
        assert not b.is_contiguous()
    if layout != "expanded_grad":
        assert not x.is_contiguous() and not weight.is_contiguous()
    x.requires_grad_()
    weight.requires_grad_()
    b.requires_grad_()
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, b, 1)
    # out.sum() backpropagates an expanded (stride 0) grad_out; other layouts a random one.
    grad_out = torch.ones_like(out).expand_as(out) if layout == "expanded_grad" else torch.randn_like(out)
    if layout == "expanded_grad":
        grads = torch.autograd.grad(out.sum(), (x, weight, b))
    else:
        grads = torch.autograd.grad(out, (x, weight, b), grad_out)
    ref_out, ref_grads = _reference(x, weight, b, 1, grad_out)
    assert_close(out.cpu().double(), ref_out, **TOL[torch.float32])
    _assert_grads_close(grads, ref_grads, torch.float32)


def test_rejects_float64_and_bad_backward_inputs():
    x, weight, b = (t.cuda() for t in _draw(2, 3, 8, 8, 4, 3, 1, True, torch.float64, seed=0))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 on CUDA"):
        FWD(x, weight, b, 1)
    x, weight, b = x.float(), weight.float(), b.float()
    out, argmax = FWD(x, weight, b, 1)
    with pytest.raises(RuntimeError, match="expected grad_out and argmax of shape"):
        BWD(out[:1], x, weight, argmax, 1, True)
    with pytest.raises(RuntimeError, match="argmax of dtype uint8"):
        BWD(out, x, weight, argmax.long(), 1, True)
    with pytest.raises(RuntimeError, match="expected grad_out and argmax on"):
        BWD(out, x, weight, argmax.cpu(), 1, True)


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(requires_grad, bias):
    x, weight, b = (None if t is None else t.cuda().requires_grad_(requires_grad)
                    for t in _draw(2, 3, 8, 8, 4, 3, 1, bias, torch.float32, seed=0))
    torch.library.opcheck(FWD, (x, weight, b, 1))


@pytest.mark.parametrize("need_grad_x", [False, True])
def test_opcheck_backward(need_grad_x):
    x, weight, b = (t.cuda() for t in _draw(2, 3, 8, 8, 4, 3, 1, True, torch.float32, seed=0))
    out, argmax = FWD(x, weight, b, 1)
    torch.library.opcheck(BWD, (torch.randn_like(out), x, weight, argmax, 1, need_grad_x))


@pytest.mark.parametrize("backend,dynamic", [("aot_eager", False), ("aot_eager", True), ("inductor", False)])
def test_compile_fullgraph(backend, dynamic):
    torch._dynamo.reset()
    x, weight, b = (t.cuda().requires_grad_() for t in _clear_inputs(3, 2, 9, 10, 4, 3, 1))

    def fn(x, weight, b):
        return mmfast.ops.conv2d_relu_maxpool2d(x, weight, b, 1) * 2.0

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    out, expected = compiled(x, weight, b), fn(x, weight, b)
    assert_close(out, expected, **TOL[torch.float32])
    g = torch.randn_like(out)
    assert_close(torch.autograd.grad(out, (x, weight, b), g), torch.autograd.grad(expected, (x, weight, b), g),
                 **TOL[torch.float32])


def test_cuda_graph_capture_and_replay():
    shape = (8, 5, 17, 15, 12, 3, 1)
    padding = shape[-1]
    x, weight, b = (t.cuda().requires_grad_() for t in _draw(*shape, True, torch.float32, seed=8))
    grad_out = torch.randn(8, 12, 8, 7, device="cuda")

    def step():
        out, argmax = FWD(x, weight, b, padding)
        return (out, argmax) + torch.autograd.grad(out, (x, weight, b), grad_out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs recommends
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    for seed in (11, 12):
        new = _draw(*shape, True, torch.float32, seed=seed)
        with torch.no_grad():
            for t, v in zip((x, weight, b), new):
                t.copy_(v)
            grad_out.normal_()
        graph.replay()
        eager = step()
        for got, expected in zip(static, eager):
            assert torch.equal(got, expected)


def test_no_host_sync():
    x, weight, b = (t.cuda().requires_grad_() for t in _draw(4, 3, 12, 12, 8, 3, 1, True, torch.float32, seed=9))
    grad_out = torch.randn(4, 8, 6, 6, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, argmax = FWD(x, weight, b, 1)
        torch.autograd.grad(out, (x, weight, b), grad_out)
        BWD(grad_out, x.detach(), weight.detach(), argmax, 1, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x, weight, b = (t.to("cuda:1") for t in _clear_inputs(2, 3, 9, 9, 5, 3, 1))
    out, argmax = FWD(x, weight, b, 1)
    assert out.device == x.device
    gx, gw, gb = BWD(torch.ones_like(out), x, weight, argmax, 1, True)
    assert gx.device == x.device
    ref_out, _ = _reference(x, weight, b, 1, torch.ones_like(out))
    assert_close(out.cpu().double(), ref_out, **TOL[torch.float32])
