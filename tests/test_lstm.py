import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

import mmfast
from mmfast import reference
from mmfast.testing import TOL, make_lstm_inputs

# Tests of the CPU kernels (float64 and gradcheck included); the CUDA kernels have tests/test_*_cuda.py.
DEVICES = ["cpu"]

OP = torch.ops.mmfast.lstm.default
NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")


def make(device, dtype, b=3, t=5, i=4, h=6, lengths="random", state=True, bias="both", requires_grad=True):
    """make_lstm_inputs with lengths "none" | "random" (0..t, t present) | "zero_one" (0, 1, t, ...) | "all_t"
    and bias "both" | "none" | "ih" | "hh"."""
    x, lens, h0, c0, w_ih, w_hh, b_ih, b_hh = make_lstm_inputs(
        device, dtype, b, t, i, h, lengths=lengths == "random", state=state, bias=bias != "none",
        requires_grad=requires_grad)
    if lengths == "zero_one":
        lens = torch.tensor([[0, 1, t][k % 3] if k < 3 else (k * 7) % (t + 1) for k in range(b)], device=device)
    elif lengths == "all_t":
        lens = torch.full((b,), t, dtype=torch.int64, device=device)
    if bias == "ih":
        b_hh = None
    elif bias == "hh":
        b_ih = None
    return x, lens, h0, c0, w_ih, w_hh, b_ih, b_hh


def _run(fn, args, use=(True, True, True), grad_seed=0):
    """(y, h_n, c_n) of fn(*args) and the gradients of every floating input that requires grad, for random
    upstream gradients of the outputs selected by `use` (the others do not enter the loss)."""
    y, h_n, c_n = fn(*args)
    outs = [o for o, u in zip((y, h_n, c_n), use) if u]
    gen = torch.Generator(y.device).manual_seed(grad_seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen)).sum() for o in outs)
    inputs = [a for k, a in enumerate(args) if k != 1 and a is not None and a.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if inputs else ()
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(inputs, grads)]
    return (y, h_n, c_n), grads


def fused(*args):
    y, (h_n, c_n) = mmfast.ops.lstm(*args)
    return y, h_n, c_n


def native(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """A real nn.LSTM(batch_first=True) with these weights on the packed input (lengths must be > 0)."""
    hidden = w_hh.shape[1]
    has_bias = b_ih is not None or b_hh is not None
    module = nn.LSTM(x.shape[2], hidden, batch_first=True, bias=has_bias, device=x.device, dtype=x.dtype)
    params = {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}
    if has_bias:
        params["bias_ih_l0"] = b_ih if b_ih is not None else torch.zeros_like(b_hh)
        params["bias_hh_l0"] = b_hh if b_hh is not None else torch.zeros_like(b_ih)
    hx = None if h0 is None else (h0, c0)
    if lengths is None:
        y, (h_n, c_n) = functional_call(module, params, (x, hx))
        return y, h_n, c_n
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, (h_n, c_n) = functional_call(module, params, (packed, hx))
    return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0], h_n, c_n


def _assert_zero_past_lengths(y, lengths):
    if lengths is None:
        return
    for b, length in enumerate(lengths.tolist()):
        assert torch.count_nonzero(y[b, length:]) == 0
    assert torch.count_nonzero(y) > 0 or y.numel() == 0 or int(lengths.max()) == 0


SHAPES = [(1, 1, 3, 2), (3, 5, 4, 6), (7, 9, 5, 13), (3, 9, 1, 1), (7, 1, 8, 3), (1, 5, 2, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("lengths", ["none", "random", "zero_one", "all_t"])
def test_matches_reference(device, dtype, shape, lengths):
    args = make(device, dtype, *shape, lengths=lengths)
    outs, grads = _run(fused, args)
    ref_outs, ref_grads = _run(reference.lstm, args)
    assert_close(outs, ref_outs, **TOL[dtype])
    assert_close(grads, ref_grads, **TOL[dtype])
    assert len(grads) == 7
    _assert_zero_past_lengths(outs[0], args[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("state", [True, False])
@pytest.mark.parametrize("bias", ["both", "none", "ih", "hh"])
@pytest.mark.parametrize("lengths", ["none", "zero_one"])
def test_state_and_bias_options_match_reference(device, dtype, state, bias, lengths):
    args = make(device, dtype, 7, 6, 5, 4, lengths=lengths, state=state, bias=bias)
    outs, grads = _run(fused, args)
    ref_outs, ref_grads = _run(reference.lstm, args)
    assert_close(outs, ref_outs, **TOL[dtype])
    assert_close(grads, ref_grads, **TOL[dtype])
    assert len(grads) == 3 + 2 * state + (bias == "both") + (bias != "none")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 3, 2), (3, 5, 4, 6), (7, 9, 5, 13)], ids=str)
@pytest.mark.parametrize("lengths", ["none", "random_nonzero", "all_t"])
@pytest.mark.parametrize("state,bias", [(True, "both"), (False, "none"), (True, "ih")])
def test_matches_nn_lstm(device, dtype, shape, lengths, state, bias):
    args = list(make(device, dtype, *shape, lengths="none" if lengths == "random_nonzero" else lengths,
                     state=state, bias=bias))
    if lengths == "random_nonzero":  # pack_padded_sequence rejects length 0; 1 and T are present
        b, t = shape[:2]
        args[1] = torch.tensor([[1, t][k % 2] if k < 2 else 1 + (k * 5) % t for k in range(b)], device=device)
    outs, grads = _run(fused, args)
    ref_outs, ref_grads = _run(native, args)
    assert_close(outs, ref_outs, **TOL[dtype])
    assert_close(grads, ref_grads, **TOL[dtype])


def test_seed_shape_matches_nn_lstm():
    torch.manual_seed(0)  # long enough rows for the parallel, vectorized paths
    args = list(make("cpu", torch.float32, 64, 32, 128, 64, lengths="none"))
    args[1] = torch.randint(1, 33, (64,))
    outs, grads = _run(fused, args)
    ref_outs, ref_grads = _run(native, args)
    assert_close(outs, ref_outs, rtol=1e-4, atol=1e-5)
    assert_close(grads, ref_grads, rtol=1e-4, atol=1e-4)
    _assert_zero_past_lengths(outs[0], args[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use", [(False, True, False), (False, False, True), (True, False, False),
                                 (False, True, True)], ids=str)
def test_only_some_outputs_used(device, use):
    args = make(device, torch.float64, 5, 6, 3, 4, lengths="zero_one")
    outs, grads = _run(fused, args, use=use)
    ref_outs, ref_grads = _run(reference.lstm, args, use=use)
    assert_close(grads, ref_grads, **TOL[torch.float64])
    y, (h_n, c_n) = mmfast.ops.lstm(*args)
    h_n.sum().backward()  # grad_y and grad_c_n are None for the backward op
    assert_close(args[0].grad, torch.autograd.grad(reference.lstm(*args)[1].sum(), args[0])[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths,state,bias", [([0, 2, 4], True, "both"), (None, False, "none"),
                                                ([1, 0, 3], False, "hh")], ids=str)
def test_gradcheck(device, lengths, state, bias):
    x, _, h0, c0, w_ih, w_hh, b_ih, b_hh = make(device, torch.float64, 3, 4, 2, 3, state=state, bias=bias)
    lens = None if lengths is None else torch.tensor(lengths, device=device)
    present = [a for a in (x, h0, c0, w_ih, w_hh, b_ih, b_hh) if a is not None]
    slots = [k for k, a in enumerate((x, h0, c0, w_ih, w_hh, b_ih, b_hh)) if a is not None]

    def fn(*tensors):
        full = [None] * 7
        for k, a in zip(slots, tensors):
            full[k] = a
        return fused(full[0], lens, *full[1:])

    assert torch.autograd.gradcheck(fn, present)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("lengths,state,bias", [("zero_one", True, "both"), ("none", False, "none"),
                                                ("random", True, "ih")], ids=str)
def test_opcheck(device, requires_grad, lengths, state, bias):
    args = make(device, torch.float32, lengths=lengths, state=state, bias=bias, requires_grad=requires_grad)
    torch.library.opcheck(OP, args)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    args = make("cpu", torch.float32, 5, 6, 4, 3, lengths="zero_one")
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    assert_close(_run(compiled, args), _run(fused, args))
    args2 = make("cpu", torch.float32, 4, 7, 4, 3, lengths="random")  # a second shape: recompile or reuse
    assert_close(_run(compiled, args2), _run(fused, args2))


def test_non_contiguous_inputs():
    b, t, i, h = 4, 6, 5, 3
    x = torch.randn(t, b, i, dtype=torch.float64).transpose(0, 1)
    h0 = torch.randn(1, b, 2 * h, dtype=torch.float64)[..., ::2]
    c0 = torch.randn(1, h, b, dtype=torch.float64).transpose(1, 2)
    w_ih = torch.randn(i, 4 * h, dtype=torch.float64).t()
    w_hh = torch.randn(h, 4 * h, dtype=torch.float64).t()
    b_ih = torch.randn(8 * h, dtype=torch.float64)[::2]
    b_hh = torch.randn(4 * h, dtype=torch.float64)
    lengths = torch.tensor([6, 0, 6, 2, 1, 3, 6, 4])[::2]
    for a in (x, h0, c0, w_ih, w_hh, b_ih, lengths):
        assert not a.is_contiguous()
    for a in (x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        a.requires_grad_(True)
    args = (x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh)
    outs, grads = _run(fused, args)
    ref_outs, ref_grads = _run(reference.lstm, args)
    assert_close(outs, ref_outs, **TOL[torch.float64])
    assert_close(grads, ref_grads, **TOL[torch.float64])

    # non-contiguous upstream gradients
    y, (h_n, c_n) = mmfast.ops.lstm(*args)
    gy = torch.randn(h, t, b, dtype=torch.float64).permute(2, 1, 0)
    gh = torch.randn(b, 1, h, dtype=torch.float64).transpose(0, 1)
    got = torch.autograd.grad((y, h_n), (x, w_hh), (gy, gh))
    ry, rh, _ = reference.lstm(*args)
    assert_close(got, torch.autograd.grad((ry, rh), (x, w_hh), (gy, gh)), **TOL[torch.float64])


@pytest.mark.parametrize("b,t", [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("state", [True, False])
def test_empty(b, t, state):
    x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh = make("cpu", torch.float32, b, t, 4, 6, lengths="random", state=state)
    y, (h_n, c_n) = mmfast.ops.lstm(x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh)
    assert y.shape == (b, t, 6) and h_n.shape == c_n.shape == (1, b, 6)
    assert_close(h_n, h0 if state else torch.zeros(1, b, 6))
    assert_close(c_n, c0 if state else torch.zeros(1, b, 6))
    (y.sum() + 2 * h_n.sum() + 3 * c_n.sum()).backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(x.grad) == 0
    for w in (w_ih, w_hh, b_ih, b_hh):  # nothing ran
        assert_close(w.grad, torch.zeros_like(w))
    if state:  # the states pass through unchanged
        assert_close(h0.grad, torch.full_like(h0, 2.0))
        assert_close(c0.grad, torch.full_like(c0, 3.0))


def test_outputs_and_workspace_are_deterministic():
    args = make("cpu", torch.float32, 7, 9, 5, 13, lengths="zero_one", requires_grad=False)
    first = OP(*args)
    torch.full((7 * 9 * 52 * 4,), float("nan"))  # dirty some memory the allocator may hand out next
    assert all(torch.equal(a, b) for a, b in zip(first, OP(*args)))


def test_bias_grads_are_independent_and_accumulate():
    args = make("cpu", torch.float64, 3, 4, 2, 3)
    b_ih, b_hh = args[6], args[7]
    for _ in range(2):
        y, (h_n, c_n) = mmfast.ops.lstm(*args)
        (y.sum() + h_n.sum()).backward()
    expected = torch.autograd.grad(sum(o.sum() for o in reference.lstm(*args)[:2]), b_ih)[0] * 2
    assert b_ih.grad.data_ptr() != b_hh.grad.data_ptr()
    assert_close(b_ih.grad, expected)
    assert_close(b_hh.grad, expected)


def test_double_backward_is_not_supported():
    args = make("cpu", torch.float64)
    y, _ = mmfast.ops.lstm(*args)
    (gw,) = torch.autograd.grad(y.sum(), [args[4]], create_graph=True)
    with pytest.raises(RuntimeError, match="_lstm_backward"):
        gw.sum().backward()


def test_nn_module_matches_native_module():
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7, batch_first=True)
    mod = mmfast.nn.LSTM.from_native(ref)
    x, lengths = torch.randn(4, 6, 5), torch.tensor([6, 1, 3, 6])
    y, (h_n, c_n) = mod(x, lengths=lengths)
    out, (rh, rc) = ref(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
    assert_close(y, pad_packed_sequence(out, batch_first=True, total_length=6)[0])
    assert_close((h_n, c_n), (rh, rc))


def _bad(**overrides):
    x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh = make("cpu", torch.float32, 3, 5, 4, 6, requires_grad=False)
    args = dict(x=x, lengths=lengths, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(x=torch.randn(3, 4)), r"expected x to be 3-D \[B, T, I\]"),
        (dict(x=torch.randn(3, 5, 4, 1)), r"expected x to be 3-D"),
        (dict(x=torch.randn(3, 5, 4, dtype=torch.float64)), "expected w_hh of dtype Double"),
        (dict(w_ih=torch.randn(24, 4, dtype=torch.float64)), "expected w_ih of dtype Float"),
        (dict(h0=torch.randn(1, 3, 6, dtype=torch.float64)), "expected h0 of dtype Float"),
        (dict(x=torch.randint(0, 3, (3, 5, 4))), "float32 or float64"),
        (dict(w_ih=torch.randn(24, 5)), r"expected w_ih of shape \[24, 4\]"),
        (dict(w_ih=torch.randn(24)), r"expected w_ih to be 2-D"),
        (dict(w_hh=torch.randn(25, 6)), r"expected w_hh of shape \[4H, H\]"),
        (dict(w_hh=torch.randn(24, 6, 1)), r"expected w_hh to be 2-D"),
        (dict(b_ih=torch.randn(23)), r"expected b_ih of shape \[24\]"),
        (dict(b_hh=torch.randn(1, 24)), r"expected b_hh of shape \[24\]"),
        (dict(h0=torch.randn(3, 6)), r"expected h0 of shape \[1, 3, 6\]"),
        (dict(c0=torch.randn(1, 2, 6)), r"expected c0 of shape \[1, 3, 6\]"),
        (dict(lengths=torch.tensor([1, 2, 3], dtype=torch.int32)), "expected lengths of dtype int64"),
        (dict(lengths=torch.tensor([1.0, 2.0, 3.0])), "expected lengths of dtype int64"),
        (dict(lengths=torch.tensor([1, 2])), r"expected lengths of shape \[3\]"),
        (dict(lengths=torch.tensor([[1, 2, 3]])), r"expected lengths of shape \[3\]"),
        (dict(lengths=torch.tensor([1, -1, 3])), r"expected lengths in \[0, T=5\]"),
        (dict(lengths=torch.tensor([1, 6, 3])), r"expected lengths in \[0, T=5\]"),
    ],
)
def test_bad_inputs(overrides, match):
    args = _bad(**overrides)
    with pytest.raises(RuntimeError, match="mmfast::lstm") as info:
        OP(*args.values())
    assert info.match(match)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="lengths on another device needs a second device (CUDA)")
def test_lengths_on_another_device():
    args = _bad(lengths=torch.tensor([1, 2, 3], device="cuda"))
    with pytest.raises(RuntimeError, match="mmfast::lstm"):
        OP(*args.values())
