"""CUDA kernels of mmfast::lstm: the persistent (cooperative) path and the per-step fallback path, against the
float64 reference on the CPU, the CPU kernel, each other, opcheck, torch.compile, CUDA graphs and sync checks."""
import pytest
import torch
from torch.testing import assert_close

import mmfast
from mmfast import reference
from mmfast.testing import TOL

CUDA = ["cuda"] if mmfast.with_cuda and torch.cuda.is_available() else []
if not CUDA:
    pytest.skip("needs a CUDA build of mmfast and a GPU", allow_module_level=True)

OP = torch.ops.mmfast.lstm.default
BWD = torch.ops.mmfast._lstm_backward.default
FALLBACK = "MMFAST_LSTM_CUDA_FALLBACK"  # "1": per-step fallback instead of the persistent kernel
MAX_CHUNK = "MMFAST_LSTM_CUDA_MAX_CHUNK"  # caps the rows staged per chunk in the persistent kernels
HAS_CPU_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key("mmfast::lstm", "CPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ISSUE_SHAPES = [(256, 32, 128, 64), (256, 64, 128, 256), (32, 128, 256, 512)]  # (B, T, I, H)


@pytest.fixture(autouse=True)
def poison_allocator():
    """Fill freed blocks of both caching-allocator pools with 0xFF bytes (NaN in every float dtype): the op's
    at::empty outputs reuse them, so an element a kernel fails to write shows up as NaN."""
    blocks = [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(8)]
    blocks.append(torch.full((1 << 26,), 255, dtype=torch.uint8, device="cuda"))
    del blocks
    yield


@pytest.fixture(params=["persistent", "fallback"])
def path(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setenv(FALLBACK, "1")
    else:
        monkeypatch.delenv(FALLBACK, raising=False)
    return request.param


def make(b, t, i, h, lengths="random", state=True, bias="both", seed=0):
    """float64 CPU (x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh) and upstream grads (gy, gh, gc).
    lengths: "none" | "random" (0..t, t present) | "zero_one" (0, 1 and t present) | "all_t" | "zeros";
    bias: "both" | "none" | "ih" | "hh"."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    sc = h ** -0.5
    x = rn(b, t, i)
    if lengths == "none":
        lens = None
    elif lengths == "all_t":
        lens = torch.full((b,), t, dtype=torch.int64)
    elif lengths == "zeros":
        lens = torch.zeros(b, dtype=torch.int64)
    else:
        lens = torch.randint(0, t + 1, (b,), generator=g, dtype=torch.int64)
        if lengths == "zero_one":
            lens[: min(b, 3)] = torch.tensor([0, 1, t])[: min(b, 3)]
        elif b > 0:
            lens[int(torch.randint(0, b, (), generator=g))] = t
    h0 = rn(1, b, h) if state else None
    c0 = rn(1, b, h) if state else None
    w_ih, w_hh = rn(4 * h, i, scale=sc), rn(4 * h, h, scale=sc)
    b_ih = rn(4 * h, scale=sc) if bias in ("both", "ih") else None
    b_hh = rn(4 * h, scale=sc) if bias in ("both", "hh") else None
    upstream = (rn(b, t, h), rn(1, b, h), rn(1, b, h))
    return (x, lens, h0, c0, w_ih, w_hh, b_ih, b_hh), upstream


def to_cuda(args, dtype, len_device="cuda", requires_grad=True):
    x, lens, *rest = args

    def cast(a):
        return None if a is None else a.to("cuda", dtype).requires_grad_(requires_grad)

    return (cast(x), None if lens is None else lens.to(len_device), *map(cast, rest))


def as_reference(args):
    """float64 CPU leaves holding the same (rounded) values as `args`."""
    x, lens, *rest = args

    def cast(a):
        return None if a is None else a.detach().to("cpu", torch.float64).requires_grad_(True)

    return (cast(x), None if lens is None else lens.cpu(), *map(cast, rest))


def fused(*args):
    y, (h_n, c_n) = mmfast.ops.lstm(*args)
    return y, h_n, c_n


def run(fn, args, upstream, use=(True, True, True)):
    """(y, h_n, c_n) and the grads of every tensor input for loss = sum(out * upstream) over the used outputs;
    `upstream` must already be on the outputs' device and dtype."""
    outs = fn(*args)
    leaves = [a for k, a in enumerate(args) if k != 1 and a is not None]
    loss = sum((o * u).sum() for o, u, keep in zip(outs, upstream, use) if keep)
    if not leaves[0].requires_grad:
        return [o.detach() for o in outs], []
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # the reference skips unused inputs
    return [o.detach() for o in outs], [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads)]


def up_like(upstream, dtype, device="cuda"):
    return tuple(u.to(device, dtype) for u in upstream)


_REFERENCE_CACHE = {}


def check_against_reference(args, upstream, dtype, use=(True, True, True), rel=None, cache_key=None):
    """Runs mmfast on CUDA and the reference in float64 on the CPU from the same rounded values; compares
    outputs and grads with TOL[dtype] (grads: atol scaled by their magnitude, as they sum many terms) or, where
    `rel` is given, max |error| <= rel * max(|reference|, 1). The reference of the large shapes is computed once
    per `cache_key` (which must determine the inputs) and shared by both paths."""
    outs, grads = run(fused, args, up_like(upstream, dtype), use)
    key = (cache_key, dtype, use)
    if cache_key is not None and key in _REFERENCE_CACHE:
        ref_outs, ref_grads = _REFERENCE_CACHE[key]
    else:
        ref_outs, ref_grads = run(reference.lstm, as_reference(args), up_like(upstream, torch.float64, "cpu"), use)
        if cache_key is not None:
            _REFERENCE_CACHE[key] = (ref_outs, ref_grads)
    assert len(grads) == len(ref_grads)
    for k, (got, exp) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        got = got.double().cpu()
        assert torch.isfinite(got).all(), f"tensor {k} has non-finite values"
        scale = max(exp.abs().max().item(), 1.0) if exp.numel() else 1.0
        if rel is not None:
            err = (got - exp).abs().max().item() if exp.numel() else 0.0
            assert err <= rel * scale, f"tensor {k}: max abs error {err:.3g} > {rel * scale:.3g}"
        else:
            tol = dict(TOL[dtype])
            if k >= 3:
                tol["atol"] *= scale
            assert_close(got, exp, **tol, msg=lambda m: f"tensor {k}: {m}")
    return outs, grads


SMALL_SHAPES = [(1, 1, 3, 2), (3, 5, 4, 6), (7, 9, 5, 13), (1, 6, 2, 7), (9, 1, 8, 3), (33, 4, 6, 40)]


LENGTHS = [("none", "cuda"), ("random", "cuda"), ("random", "cpu"), ("zero_one", "cuda"), ("zero_one", "cpu"),
           ("zeros", "cuda"), ("all_t", "cpu")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("lengths,len_device", LENGTHS, ids=str)
def test_matches_reference(path, dtype, shape, lengths, len_device):
    args, upstream = make(*shape, lengths=lengths)
    cuda_args = to_cuda(args, dtype, len_device)
    outs, grads = check_against_reference(cuda_args, upstream, dtype)
    y, lens = outs[0], args[1]
    if lens is not None:
        for b, n in enumerate(lens.tolist()):
            assert torch.count_nonzero(y[b, n:]) == 0
    if dtype == torch.float32 and HAS_CPU_KERNEL:  # the CPU kernel on the same float32 inputs
        cpu_args = tuple(None if a is None else a.detach().cpu().requires_grad_(a.dtype.is_floating_point)
                         for a in cuda_args)
        cpu_outs, cpu_grads = run(fused, cpu_args, up_like(upstream, dtype, "cpu"))
        assert_close([t.cpu() for t in outs + grads], cpu_outs + cpu_grads, **TOL[dtype])


@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("bias", ["both", "none", "ih", "hh"])
def test_state_and_bias_options(path, state, bias):
    args, upstream = make(7, 6, 5, 4, lengths="zero_one", state=state, bias=bias)
    _, grads = check_against_reference(to_cuda(args, torch.float32), upstream, torch.float32)
    assert len(grads) == 3 + 2 * state + (bias == "both") + (bias != "none")


@pytest.mark.parametrize("use", [(False, True, False), (False, False, True), (True, False, False),
                                 (False, True, True)], ids=str)
def test_only_some_outputs_used(path, use):  # the backward op gets None for the unused grads
    args, upstream = make(5, 6, 3, 4, lengths="zero_one")
    check_against_reference(to_cuda(args, torch.float32), upstream, torch.float32, use=use)


@pytest.mark.parametrize("shape", ISSUE_SHAPES, ids=str)
def test_issue_shapes_float32(path, shape):
    args, upstream = make(*shape, lengths="random")
    check_against_reference(to_cuda(args, torch.float32), upstream, torch.float32, rel=1e-4, cache_key=shape)


@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)], ids=str)
def test_issue_shape_reduced_precision(path, dtype, rel):
    args, upstream = make(*ISSUE_SHAPES[0], lengths="random")
    check_against_reference(to_cuda(args, dtype), upstream, dtype, rel=rel, cache_key=ISSUE_SHAPES[0])


@pytest.mark.parametrize("shape", ISSUE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_persistent_matches_fallback_and_is_deterministic(monkeypatch, shape, dtype):
    args, upstream = make(*shape, lengths="random")
    cuda_args, up = to_cuda(args, dtype), up_like(upstream, dtype)
    monkeypatch.delenv(FALLBACK, raising=False)
    first = run(fused, cuda_args, up)
    second = run(fused, cuda_args, up)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)
    monkeypatch.setenv(FALLBACK, "1")
    other = run(fused, cuda_args, up)
    rel = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    for k, (a, b) in enumerate(zip(first[0] + first[1], other[0] + other[1])):
        err = (a.double() - b.double()).abs().max().item()
        scale = max(b.double().abs().max().item(), 1.0)
        assert err <= rel * scale, f"tensor {k}: persistent vs fallback {err:.3g}"


def cuda_kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("shape,persistent", [(ISSUE_SHAPES[0], True), (ISSUE_SHAPES[2], True),
                                              ((4, 3, 8, 1536), False)], ids=str)
def test_path_selection(monkeypatch, shape, persistent):
    """The issue shapes (H up to 512) run the persistent kernels; w_hh of H=1536 does not fit on chip (37.7 MB
    in float) and falls back to the per-step kernels."""
    monkeypatch.delenv(FALLBACK, raising=False)
    args, upstream = make(*shape, lengths="random")
    cuda_args, up = to_cuda(args, torch.float32), up_like(upstream, torch.float32)
    names = cuda_kernel_names(lambda: run(fused, cuda_args, up))
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here")
    joined = "\n".join(names)
    for kernel in ("lstm_fwd_persistent_kernel", "lstm_bwd_persistent_kernel"):
        assert (kernel in joined) == persistent, joined
    for kernel in ("lstm_fwd_step_kernel", "lstm_bwd_step_kernel"):
        assert (kernel in joined) != persistent, joined


@pytest.mark.parametrize("shape", [(4, 3, 8, 1536), (64, 4, 32, 1024), (4096, 3, 16, 64)], ids=str)
def test_large_shapes(shape):
    """H=1536: automatic fallback; H=1024: persistent kernels staging h / dgates in chunks; B=4096: several
    blocks per SM."""
    args, upstream = make(*shape, lengths="random")
    check_against_reference(to_cuda(args, torch.float32), upstream, torch.float32, rel=1e-4)


@pytest.mark.parametrize("chunk", [1, 7, 32])
@pytest.mark.parametrize("shape", [(20, 5, 6, 40), (3, 4, 5, 9)], ids=str)
def test_chunked_staging(monkeypatch, chunk, shape):
    monkeypatch.delenv(FALLBACK, raising=False)
    monkeypatch.setenv(MAX_CHUNK, str(chunk))
    args, upstream = make(*shape, lengths="zero_one")
    check_against_reference(to_cuda(args, torch.float32), upstream, torch.float32)


@pytest.mark.parametrize("lengths", ["none", "zero_one", "zeros"])
def test_workspace(path, lengths):
    """gates/cells hold the activated gates and c_t of each step (y = o * tanh(c), c = f * c_prev + i * g) and
    are zero at and past each length."""
    b, t, h = 6, 5, 7
    args, _ = make(b, t, 3, h, lengths=lengths)
    cuda_args = to_cuda(args, torch.float32, requires_grad=False)
    y, h_n, c_n, gates, cells = OP(*cuda_args)
    assert torch.isfinite(gates).all() and torch.isfinite(cells).all()
    i, f, g, o = gates.split(h, dim=2)
    c_prev = torch.cat([cuda_args[3].transpose(0, 1), cells[:, :-1]], 1)
    lens = [t] * b if args[1] is None else args[1].tolist()
    for k, n in enumerate(lens):
        assert torch.count_nonzero(gates[k, n:]) == 0 and torch.count_nonzero(cells[k, n:]) == 0
        assert_close(y[k, :n], o[k, :n] * torch.tanh(cells[k, :n]))
        assert_close(cells[k, :n], f[k, :n] * c_prev[k, :n] + i[k, :n] * g[k, :n])
        assert ((i[k, :n] >= 0) & (i[k, :n] <= 1)).all() and (g[k, :n].abs() <= 1).all()
        assert_close(h_n[0, k], y[k, n - 1] if n > 0 else cuda_args[2][0, k])
        assert_close(c_n[0, k], cells[k, n - 1] if n > 0 else cuda_args[3][0, k])


@pytest.mark.parametrize("b,t", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("state", [True, False])
def test_empty(path, b, t, state):
    args, upstream = make(b, t, 4, 6, lengths="random", state=state)
    cuda_args = to_cuda(args, torch.float32)
    (y, h_n, c_n), grads = run(fused, cuda_args, up_like(upstream, torch.float32))
    assert y.shape == (b, t, 6) and h_n.shape == c_n.shape == (1, b, 6)
    h0, c0 = cuda_args[2], cuda_args[3]
    assert_close(h_n, h0.detach() if state else torch.zeros(1, b, 6, device="cuda"))
    assert_close(c_n, c0.detach() if state else torch.zeros(1, b, 6, device="cuda"))
    assert grads[0].shape == (b, t, 4)
    for gr in grads[-4:]:  # weights and biases: no step ran
        assert torch.count_nonzero(gr) == 0
    if state:  # the state grads pass straight through
        assert_close(grads[1], upstream[1].to("cuda", torch.float32))
        assert_close(grads[2], upstream[2].to("cuda", torch.float32))


@pytest.mark.parametrize("len_device", ["cuda", "cpu"])
def test_non_contiguous_inputs(path, len_device):
    b, t, i, h = 4, 6, 5, 3
    dev, dt = "cuda", torch.float32
    x = torch.randn(t, b, i, device=dev, dtype=dt).transpose(0, 1)
    h0 = torch.randn(1, b, 2 * h, device=dev, dtype=dt)[..., ::2]
    c0 = torch.randn(1, h, b, device=dev, dtype=dt).transpose(1, 2)
    w_ih = torch.randn(i, 4 * h, device=dev, dtype=dt).t()
    w_hh = torch.randn(h, 4 * h, device=dev, dtype=dt).t()
    b_ih = torch.randn(8 * h, device=dev, dtype=dt)[::2]
    b_hh = torch.randn(4 * h, device=dev, dtype=dt)
    lengths = torch.tensor([6, 0, 6, 2, 1, 3, 6, 4], device=len_device)[::2]
    for a in (x, h0, c0, w_ih, w_hh, b_ih, lengths):
        assert not a.is_contiguous()
    for a in (x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        a.requires_grad_(True)
    args = (x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh)
    gy = torch.randn(h, t, b, dtype=torch.float64).permute(2, 1, 0)
    gh = torch.randn(1, b, 2 * h, dtype=torch.float64)[..., ::2]
    gc = torch.randn(1, h, b, dtype=torch.float64).transpose(1, 2)
    up = tuple(u.to(dev, dt) for u in (gy, gh, gc))  # .to keeps the strides of gy and gc; gh: see below
    up = (up[0], up[1].new_empty(1, b, 2 * h)[..., ::2].copy_(up[1]), up[2])
    assert not any(u.is_contiguous() for u in up)
    outs, grads = run(fused, args, up)
    ref_outs, ref_grads = run(reference.lstm, as_reference(args), (gy, gh, gc))
    assert_close([a.double().cpu() for a in outs + grads], ref_outs + ref_grads, **TOL[dt])


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("len_device", ["cuda", "cpu"])
@pytest.mark.parametrize("lengths,state,bias", [("zero_one", True, "both"), ("none", False, "none"),
                                                ("random", True, "ih")], ids=str)
def test_opcheck(path, requires_grad, len_device, lengths, state, bias):
    args, _ = make(3, 5, 4, 6, lengths=lengths, state=state, bias=bias)
    torch.library.opcheck(OP, to_cuda(args, torch.float32, len_device, requires_grad))


@pytest.mark.parametrize("len_device", ["cuda", "cpu"])
def test_opcheck_backward(path, len_device):
    args, upstream = make(3, 5, 4, 6, lengths="zero_one")
    x, lens, h0, c0, w_ih, w_hh, b_ih, b_hh = to_cuda(args, torch.float32, len_device, requires_grad=False)
    y, _, _, gates, cells = OP(x, lens, h0, c0, w_ih, w_hh, b_ih, b_hh)
    gy, gh, gc = up_like(upstream, torch.float32)
    torch.library.opcheck(BWD, (gy, gh, gc, x, lens, h0, c0, w_ih, w_hh, y, gates, cells))
    torch.library.opcheck(BWD, (None, gh, None, x, lens, None, None, w_ih, w_hh, y, gates, cells))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(path, dynamic):
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for shape in [(5, 6, 4, 3), (4, 7, 4, 3)]:  # a second shape: recompile or reuse
        args, upstream = make(*shape, lengths="zero_one")
        cuda_args, up = to_cuda(args, torch.float32), up_like(upstream, torch.float32)
        assert_close(run(compiled, cuda_args, up), run(fused, cuda_args, up))


@pytest.mark.parametrize("shape", [(6, 5, 4, 7), ISSUE_SHAPES[0]], ids=str)
def test_cuda_graph_capture_and_replay(path, shape):
    """Forward + backward captured once and replayed on new values, new lengths included (the loop bound is
    computed on the device), against eager runs."""
    args, upstream = make(*shape, lengths="random", seed=0)
    static = to_cuda(args, torch.float32)
    up = up_like(upstream, torch.float32)

    def step():
        outs, grads = run(fused, static, up)
        return outs + grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    for seed, lengths in [(1, "random"), (2, "zero_one"), (3, "zeros")]:
        new_args, new_up = make(*shape, lengths=lengths, seed=seed)
        with torch.no_grad():
            for dst, src in zip(static, to_cuda(new_args, torch.float32, requires_grad=False)):
                if dst is not None:
                    dst.copy_(src)
            for dst, src in zip(up, up_like(new_up, torch.float32)):
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        assert_close(captured, expected, **TOL[torch.float32])


def test_cpu_lengths_rejected_while_capturing():
    args, _ = make(3, 4, 2, 5, lengths="random")
    cuda_args = to_cuda(args, torch.float32, len_device="cpu", requires_grad=False)
    OP(*cuda_args)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="lengths on the device while capturing"):
        with torch.cuda.graph(graph):
            OP(*cuda_args)


@pytest.mark.parametrize("len_device", ["cuda", "cpu", None])
def test_no_host_sync(path, len_device):
    args, upstream = make(*ISSUE_SHAPES[0], lengths="random" if len_device else "none")
    cuda_args = to_cuda(args, torch.float32, len_device or "cuda")
    up = up_like(upstream, torch.float32)
    run(fused, cuda_args, up)  # first call: layout choice, cuBLAS handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(fused, cuda_args, up)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_rejects_float64_and_foreign_lengths():
    args, _ = make(3, 4, 2, 5)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16 on CUDA"):
        OP(*to_cuda(args, torch.float64, requires_grad=False))
    if torch.cuda.device_count() > 1:
        bad = list(to_cuda(args, torch.float32, requires_grad=False))
        bad[1] = bad[1].to("cuda:1")
        with pytest.raises(RuntimeError, match="expected lengths on the CPU or on"):
            OP(*bad)
