"""CUDA kernels of mmfast::concat_linear: every output and gradient against the float64 reference (on the CPU,
from the same inputs) and the CPU kernel, the dropout mask bit for bit, opcheck, torch.compile, CUDA graphs and
the absence of host syncs. Runs only where mmfast was built with CUDA and a GPU is present."""
import pytest
import torch
from torch.testing import assert_close

import mmfast
from mmfast import reference
from mmfast.testing import TOL
from mmfast.testing import make_concat_linear_inputs as make

if not (mmfast.with_cuda and torch.cuda.is_available()):
    pytest.skip("needs mmfast built with CUDA and a GPU", allow_module_level=True)

DEV = "cuda"
OP = torch.ops.mmfast.concat_linear.default
BWD = torch.ops.mmfast._concat_linear_backward.default
SEED = 20261126
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TALL = (65535 * 4 + 7, (3, 2), 4)  # more rows than the dropout kernel's grid covers in one pass
# (batch, widths, out_features): the seed model's fusion head at batch 256 and 64, odd widths, a zero width,
# eight inputs, widths around the dropout kernel's 1024-column tile, no outputs at all, the largest batch of the
# fused float32 GEMM kernels and one more (cuBLAS), and TALL (cuBLAS).
SHAPES = [
    (256, (7200, 64), 128),
    (64, (7200, 64), 128),
    (8192, (37, 5), 8),
    (8193, (37, 5), 8),
    (9, (1, 16, 2, 9), 5),
    (33, (4, 0, 3), 7),
    (5, (2,) * 8, 3),
    (17, (1023, 1025, 3), 33),
    (6, (3, 4), 0),
    TALL,
]
# TALL only in float32: its 262k-long weight-gradient reduction is a test of cuBLAS, not of these kernels.
CASES = [(dtype, shape) for shape in SHAPES for dtype in DTYPES if dtype == torch.float32 or shape != TALL]
CONFIGS = [(True, True, 0.5), (False, False, 0.3), (True, False, 0.0), (True, True, 1.0)]  # bias, relu, dropout_p


def _check(actual, expected, dtype, *lengths):
    """assert_close for a tensor or a list of tensors with TOL[dtype]. float32's tolerance is widened by
    sqrt(longest reduction / 256) (float32 rounding grows like sqrt(length)), and its atol is taken relative to
    the largest expected magnitude: a long sum that cancels to ~0 keeps the rounding error of its large terms."""
    if isinstance(actual, torch.Tensor):
        actual, expected = [actual], [expected]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        tol = TOL[dtype]
        if dtype == torch.float32:
            f = 1e-5 * max(1.0, (max(lengths, default=1) / 256) ** 0.5)
            tol = dict(rtol=f, atol=f * max(1.0, e.abs().max().item() if e.numel() else 0.0))
        assert_close(a, e, **tol)


def _poison():
    """Fill the caching allocator's free blocks with all-ones bytes (NaN in every float dtype), so that an element
    an op leaves unwritten in a fresh output shows up as NaN."""
    junk = [torch.full((1 << 26,), -1, dtype=torch.int32, device=DEV)]
    junk += [torch.full((1 << 17,), -1, dtype=torch.int32, device=DEV) for _ in range(32)]
    del junk


def _cpu(t):
    return None if t is None else t.detach().cpu()


def _to64(t):
    return None if t is None else t.detach().cpu().double().requires_grad_()


def _params(inputs, weight, bias):
    return [*inputs, weight] + ([bias] if bias is not None else [])


def _ours(inputs, weight, bias, p, relu, seed, g):
    """The op's output and the gradients of every input, weight and bias (through autograd) for upstream g."""
    _poison()
    out = OP(inputs, weight, bias, p, relu, torch.tensor(seed, device=DEV))
    _poison()
    return out.detach(), [t.detach() for t in torch.autograd.grad(out, _params(inputs, weight, bias), g)]


def _reference(inputs, weight, bias, p, relu, seed, g, out):
    """float64 reference on the CPU from the same inputs: its output, and its gradients under out's ReLU mask.

    The dropped input (mask from reference.dropout_keep_mask) is rounded to the inputs' dtype, as the kernels
    store it, with the exact dropout gradient passed straight through, so that float16/bfloat16 are compared with
    the GEMM they actually ran. Gradients take `out > 0` as the ReLU mask, as the backward op does: where the
    float64 pre-activation is within rounding of 0 (the forward comparison bounds that), the two masks may differ.
    """
    x64, w64, b64 = [_to64(x) for x in inputs], _to64(weight), _to64(bias)
    segments = x64
    if p > 0:
        keep = reference.dropout_keep_mask(seed, p, x64[0].shape[0], w64.shape[1]).double()
        scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
        segments, offset = [], 0
        for x in x64:
            exact = x * keep[:, offset:offset + x.shape[1]] * scale
            segments.append(exact + (exact.to(inputs[0].dtype).double() - exact).detach())
            offset += x.shape[1]
    pre = reference.concat_linear(segments, w64, b64, 0.0, True, False)
    ref_out = pre.clamp_min(0) if relu else pre
    with_mask = pre * (_cpu(out) > 0) if relu else pre
    grads = torch.autograd.grad(with_mask, _params(x64, w64, b64), _cpu(g).double())
    return ref_out.detach(), list(grads)


@pytest.mark.parametrize("dtype,shape", CASES, ids=str)
@pytest.mark.parametrize("bias,relu,p", CONFIGS)
def test_matches_reference_and_cpu_kernel(dtype, shape, bias, relu, p):
    n, widths, o = shape
    torch.manual_seed(0)
    inputs, weight, b = make(DEV, dtype, n, widths, o, bias=bias, requires_grad=True)
    g = torch.randn(n, o, device=DEV, dtype=dtype)
    out, grads = _ours(inputs, weight, b, p, relu, SEED, g)
    lengths = (n, sum(widths), o)
    ref_out, ref_grads = _reference(inputs, weight, b, p, relu, SEED, g, out)
    _check(_cpu(out).double(), ref_out, dtype, *lengths)
    _check([_cpu(t).double() for t in grads], ref_grads, dtype, *lengths)
    if dtype != torch.float32:
        return  # the CPU kernel has float32 and float64 only
    _check(_cpu(out).double(), reference.concat_linear([_to64(x) for x in inputs], _to64(weight), _to64(b), p, True,
                                                       relu, seed=SEED).detach(), dtype, *lengths)
    seed_cpu = torch.tensor(SEED)
    inputs_cpu = [_cpu(x) for x in inputs]
    _check(_cpu(out), OP(inputs_cpu, _cpu(weight), _cpu(b), p, relu, seed_cpu), dtype, *lengths)
    grad_inputs, grad_weight, grad_bias = BWD(_cpu(g), inputs_cpu, _cpu(weight), _cpu(out), p, relu, seed_cpu)
    _check([_cpu(t) for t in grads], _params(grad_inputs, grad_weight, grad_bias if bias else None), dtype, *lengths)


@pytest.mark.parametrize("seed", [SEED, 2**62 - 1, 1])
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_mask_bit_identical_to_cpu_and_reference_at_seed_shape(seed, p):
    # One output of weight 1 and upstream gradient 1: grad of the concatenated input = mask * scale, per element.
    n, widths = 256, (7200, 64)

    def grad_inputs(device):
        inputs = [torch.randn(n, k, device=device, requires_grad=True) for k in widths]
        weight = torch.ones(1, sum(widths), device=device)
        out = OP(inputs, weight, None, p, False, torch.tensor(seed, device=device))
        return torch.cat(torch.autograd.grad(out, inputs, torch.ones_like(out)), 1)

    gpu = grad_inputs(DEV)
    keep = reference.dropout_keep_mask(seed, p, n, sum(widths), device=DEV)
    assert torch.equal(gpu != 0, keep)
    assert torch.equal(gpu[keep], torch.full_like(gpu[keep], 1.0 / (1.0 - p)))
    assert torch.equal(gpu.cpu(), grad_inputs("cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_dropout_bit_identical_to_cpu_and_reference(dtype):
    # Small integers and an identity weight: every GEMM product and sum is exact, so out = dropped input exactly.
    n, widths, p = 64, (300, 37), 0.5
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(-8, 9, (n, k), generator=gen).float() for k in widths]
    eye = torch.eye(sum(widths))
    gpu = OP([x.to(DEV, dtype) for x in inputs], eye.to(DEV, dtype), None, p, False, torch.tensor(SEED, device=DEV))
    cpu = OP(inputs, eye, None, p, False, torch.tensor(SEED))
    keep = reference.dropout_keep_mask(SEED, p, n, sum(widths))
    assert torch.equal(gpu.cpu().float(), cpu)
    assert torch.equal(cpu, torch.cat(inputs, 1) * keep * 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_layout", ["expanded", "transposed"])
def test_non_contiguous_inputs_and_grad(dtype, grad_layout):
    torch.manual_seed(1)
    inputs = [torch.randn(10, 6, device=DEV, dtype=dtype).t()[:5],       # [5, 10], transposed
              torch.randn(5, 24, device=DEV, dtype=dtype)[:, ::2]]       # [5, 12], column stride 2
    weight = (torch.randn(16, 44, device=DEV, dtype=dtype) * 0.2)[:, ::2]  # [16, 22], column stride 2
    bias = torch.randn(32, device=DEV, dtype=dtype)[::2]                 # [16], stride 2
    for t in [*inputs, weight, bias]:
        assert not t.is_contiguous()
        t.requires_grad_(True)
    g = (torch.randn(1, 16, device=DEV, dtype=dtype).expand(5, 16) if grad_layout == "expanded"
         else torch.randn(16, 5, device=DEV, dtype=dtype).t())
    out, grads = _ours(inputs, weight, bias, 0.2, True, SEED, g)
    ref_out, ref_grads = _reference(inputs, weight, bias, 0.2, True, SEED, g, out)
    _check(_cpu(out).double(), ref_out, dtype)
    _check([_cpu(t).double() for t in grads], ref_grads, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch(dtype):
    inputs, weight, b = make(DEV, dtype, n=0, widths=(3, 5), o=6, requires_grad=True)
    out = mmfast.ops.concat_linear(inputs, weight, b, 0.5, True)
    assert out.shape == (0, 6)
    _poison()
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert torch.equal(b.grad, torch.zeros_like(b))
    assert [x.grad.shape for x in inputs] == [(0, 3), (0, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_input_of_width_zero(dtype):
    inputs, weight, b = make(DEV, dtype, n=3, widths=(0, 0), o=4, requires_grad=True)
    _poison()
    out = OP(inputs, weight, b, 0.5, True, torch.tensor(SEED, device=DEV))
    assert torch.equal(out, b.detach().relu().expand(3, 4))
    out.sum().backward()
    assert torch.equal(b.grad, (b.detach() > 0).to(dtype) * 3)
    assert weight.grad.shape == (4, 0) and [x.grad.shape for x in inputs] == [(3, 0), (3, 0)]


def test_grad_bias_is_deterministic():
    inputs, weight, b = make(DEV, torch.float32, n=256, widths=(7200, 64), o=128)
    out = OP(inputs, weight, b, 0.5, True, torch.tensor(SEED, device=DEV))
    g = torch.randn_like(out)
    first, second = (BWD(g, inputs, weight, out, 0.5, True, torch.tensor(SEED, device=DEV))[2] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("p,seed", [(0.0, None), (0.25, SEED)])
def test_opcheck(dtype, requires_grad, p, seed):
    inputs, weight, b = make(DEV, dtype, requires_grad=requires_grad)
    seed_t = None if seed is None else torch.tensor(seed, device=DEV)
    torch.library.opcheck(OP, (inputs, weight, b, p, True, seed_t))


def test_opcheck_backward():
    inputs, weight, b = make(DEV, torch.float32, n=7, widths=(3, 0, 5), o=6)
    seed = torch.tensor(SEED, device=DEV)
    out = OP(inputs, weight, b, 0.25, True, seed)
    torch.library.opcheck(BWD, (torch.randn_like(out), inputs, weight, out, 0.25, True, seed))


def _out_and_grads(fn, inputs, weight, bias, g):
    out = fn(inputs, weight, bias)
    return [out.detach().clone()] + [t.clone() for t in torch.autograd.grad(out, _params(inputs, weight, bias), g)]


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    inputs, weight, b = make(DEV, torch.float32, n=9, widths=(7, 5), o=6, requires_grad=True)
    seed = torch.tensor(SEED, device=DEV)
    g = torch.randn(9, 6, device=DEV)

    def fn(i, w, bb):
        return OP(i, w, bb, 0.3, True, seed)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    assert_close(_out_and_grads(compiled, inputs, weight, b, g), _out_and_grads(fn, inputs, weight, b, g))


def test_compile_inductor_reduce_overhead():
    inputs, weight, b = make(DEV, torch.float32, n=64, widths=(7200, 64), o=128, requires_grad=True)
    seed = torch.tensor(SEED, device=DEV)
    g = torch.randn(64, 128, device=DEV)

    def fn(i, w, bb):
        return OP(i, w, bb, 0.5, True, seed)

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    expected = _out_and_grads(fn, inputs, weight, b, g)
    for _ in range(3):  # the later calls replay CUDA graphs
        torch.compiler.cudagraph_mark_step_begin()
        got = _out_and_grads(compiled, inputs, weight, b, g)
    _check(got, expected, torch.float32, 7264)


def test_cuda_graph_capture_and_replay_with_new_seed():
    torch.manual_seed(2)
    inputs, weight, b = make(DEV, torch.float32, n=64, widths=(7200, 64), o=128, requires_grad=True)
    params = _params(inputs, weight, b)
    seed = torch.tensor(SEED, device=DEV)
    g = torch.randn(64, 128, device=DEV)

    def step():
        out = OP(inputs, weight, b, 0.5, True, seed)
        out.backward(g)
        return out

    side = torch.cuda.Stream()  # warm-up on a side stream, then capture, as torch's CUDA-graph docs do
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for t in params:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in params:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    static = [static_out] + [t.grad for t in params]

    replays = []
    for value in (SEED, SEED + 1):
        seed.fill_(value)  # the kernels read the seed on the device, so a replay picks up the new value
        graph.replay()
        replays.append([t.clone() for t in static])
        expected = _out_and_grads(lambda i, w, bb: OP(i, w, bb, 0.5, True, torch.tensor(value, device=DEV)),
                                  inputs, weight, b, g)
        _check(replays[-1], expected, torch.float32, 7264)
    assert not torch.equal(replays[0][0], replays[1][0])


def test_no_host_sync():
    inputs, weight, b = make(DEV, torch.float32, n=64, widths=(7200, 64), o=128, requires_grad=True)
    seed = torch.tensor(SEED, device=DEV)
    g = torch.randn(64, 128, device=DEV)
    mmfast.ops.concat_linear(inputs, weight, b, 0.5, True).backward(g)  # warm-up: cuBLAS handles, allocator
    torch.cuda.set_sync_debug_mode("error")
    try:
        mmfast.ops.concat_linear(inputs, weight, b, 0.5, True).backward(g)  # seed drawn on the device
        OP(inputs, weight, b, 0.5, False, seed).backward(g)
        OP(inputs, weight, None, 0.0, True, None).backward(g)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_public_function_draws_a_new_mask_on_every_graph_replay():
    x, eye = torch.ones(16, 256, device=DEV), torch.eye(256, device=DEV)

    def step():
        return mmfast.ops.concat_linear([x], eye, None, 0.5, True, relu=False)  # out = dropped x

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    masks = []
    for _ in range(2):
        graph.replay()
        masks.append(static_out != 0)
        assert abs(masks[-1].float().mean().item() - 0.5) < 0.05
    assert not torch.equal(masks[0], masks[1])


def test_rejects_float64_on_cuda():
    inputs, weight, b = make(DEV, torch.float64)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 on CUDA"):
        OP(inputs, weight, b, 0.0, True, None)


def test_backward_rejects_grad_on_another_device():
    inputs, weight, b = make(DEV, torch.float32)
    out = OP(inputs, weight, b, 0.0, True, None)
    with pytest.raises(RuntimeError, match="expected grad_out and out on cuda"):
        BWD(out.cpu(), inputs, weight, out, 0.0, True, None)
