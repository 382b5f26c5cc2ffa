import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mmfast
from mmfast import reference
from mmfast.testing import DEVICES, TOL
from mmfast.testing import make_concat_linear_inputs as make

OP = torch.ops.mmfast.concat_linear.default
# float64 runs on the CPU kernels only; CUDA kernels take float32/float16/bfloat16 (tests/test_*_cuda.py).
DEVICE_DTYPES = [("cpu", torch.float32), ("cpu", torch.float64)] + [(d, torch.float32) for d in DEVICES if d != "cpu"]
SEED = 20261126


def _run(fn, inputs, weight, bias, grad_seed=0):
    """fn(...) and the gradients of every input, weight and bias for a fixed random upstream gradient."""
    out = fn(inputs, weight, bias)
    params = [t for t in [*inputs, weight, bias] if t is not None]
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=torch.Generator(out.device).manual_seed(grad_seed))
    return out, torch.autograd.grad(out, params, g)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("widths", [(7,), (3, 5), (1, 16, 2, 9), (4, 0, 3), (2,) * 8], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_matches_reference(device, dtype, widths, bias, relu, p):
    inputs, weight, b = make(device, dtype, n=9, widths=widths, o=5, bias=bias, requires_grad=True)
    seed = torch.tensor(SEED, device=device)
    out, grads = _run(lambda i, w, bb: OP(i, w, bb, p, relu, seed), inputs, weight, b)
    ref_out, ref_grads = _run(lambda i, w, bb: reference.concat_linear(i, w, bb, p, True, relu, seed=SEED),
                              inputs, weight, b)
    assert_close(out, ref_out, **TOL[dtype])
    assert_close(grads, ref_grads, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_no_dropout_matches_native_composition(device):
    inputs, weight, b = make(device, torch.float32, n=16, widths=(20, 12), o=8, requires_grad=True)
    native = lambda i, w, bb: F.relu(F.linear(F.dropout(torch.cat(i, 1), 0.5, training=False), w, bb))  # noqa: E731
    out, grads = _run(lambda i, w, bb: mmfast.ops.concat_linear(i, w, bb, 0.5, training=False), inputs, weight, b)
    ref_out, ref_grads = _run(native, inputs, weight, b)
    assert_close(out, ref_out, **TOL[torch.float32])
    assert_close(grads, ref_grads, **TOL[torch.float32])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_statistics_and_scale(p):
    n, k = 256, 512
    inputs = [torch.ones(n, k, dtype=torch.float64)]
    weight = torch.eye(k, dtype=torch.float64)  # out = dropped input
    torch.manual_seed(0)
    out = mmfast.ops.concat_linear(inputs, weight, None, p, training=True, relu=False)
    kept = out != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    # rows and columns are not correlated: no two rows share a mask
    assert torch.unique(kept, dim=0).shape[0] == n


def test_dropout_reproducible_under_manual_seed_and_same_mask_in_backward():
    inputs, weight, b = make("cpu", torch.float64, n=32, widths=(40, 24), o=16, requires_grad=True)
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        out, grads = _run(lambda i, w, bb: mmfast.ops.concat_linear(i, w, bb, 0.5, True), inputs, weight, b)
        results.append((out, grads))
    assert_close(results[0], results[1], rtol=0, atol=0)
    torch.manual_seed(8)
    other = mmfast.ops.concat_linear(inputs, weight, b, 0.5, True)
    assert not torch.equal(other, results[0][0])
    # Backward used forward's mask: an input element that was dropped gets zero gradient.
    x = torch.ones(8, 64, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    out = mmfast.ops.concat_linear([x], torch.eye(64, dtype=torch.float64), None, 0.5, True, relu=False)
    out.sum().backward()
    assert torch.equal(x.grad != 0, out != 0)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):  # float64: CPU kernels only (CUDA kernels are float32/16/bf16)
    device = "cpu"
    inputs, weight, b = make(device, torch.float64, n=3, widths=(2, 3), o=4, bias=bias, requires_grad=True)
    seed = torch.tensor(SEED, device=device)

    def fn(x0, x1, w, *maybe_b):
        return OP([x0, x1], w, maybe_b[0] if maybe_b else None, 0.4, True, seed)

    args = [*inputs, weight] + ([b] if bias else [])
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("p,seed", [(0.0, None), (0.25, SEED)])
def test_opcheck(device, requires_grad, p, seed):
    inputs, weight, b = make(device, torch.float32, requires_grad=requires_grad)
    seed_t = None if seed is None else torch.tensor(seed, device=device)
    torch.library.opcheck(OP, (inputs, weight, b, p, True, seed_t))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    inputs, weight, b = make("cpu", torch.float32, requires_grad=True)
    seed = torch.tensor(SEED)

    def fn(i, w, bb):
        return OP(i, w, bb, 0.3, True, seed)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    assert_close(_run(compiled, inputs, weight, b), _run(fn, inputs, weight, b))


def test_compile_public_function_draws_seed_inside_graph():
    inputs, weight, b = make("cpu", torch.float32, requires_grad=True)
    compiled = torch.compile(lambda i, w, bb: mmfast.ops.concat_linear(i, w, bb, 0.5, True), backend="aot_eager",
                             fullgraph=True)
    out = compiled(inputs, weight, b)
    assert out.shape == (4, 6)
    out.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_non_contiguous_inputs():
    inputs = [torch.randn(10, 6, dtype=torch.float64).t()[:5],            # [5, 10], transposed
              torch.randn(5, 12, dtype=torch.float64)[:, ::2]]             # [5, 6], stride 2
    weight = torch.randn(16, 32, dtype=torch.float64)[:, ::2]              # [16, 16], stride 2
    for t in [*inputs, weight]:
        assert not t.is_contiguous()
        t.requires_grad_(True)
    seed = torch.tensor(SEED)
    out, grads = _run(lambda i, w, bb: OP(i, w, bb, 0.2, True, seed), inputs, weight, None)
    ref_out, ref_grads = _run(lambda i, w, bb: reference.concat_linear(i, w, bb, 0.2, True, True, seed=SEED),
                              inputs, weight, None)
    assert_close(out, ref_out, **TOL[torch.float64])
    assert_close(grads, ref_grads, **TOL[torch.float64])


def test_empty_batch():
    inputs, weight, b = make("cpu", torch.float32, n=0, requires_grad=True)
    out = mmfast.ops.concat_linear(inputs, weight, b, 0.5, True)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert_close(weight.grad, torch.zeros_like(weight))
    assert_close(b.grad, torch.zeros_like(b))
    assert inputs[0].grad.shape == (0, 3)


def test_double_backward_is_not_supported():
    inputs, weight, b = make("cpu", torch.float64, requires_grad=True)
    out = mmfast.ops.concat_linear(inputs, weight, b)
    (gw,) = torch.autograd.grad(out.sum(), [weight], create_graph=True)
    with pytest.raises(RuntimeError, match="_concat_linear_backward"):
        gw.sum().backward()


def _bad(**overrides):
    inputs, weight, b = make("cpu", torch.float32, n=4, widths=(3, 5), o=6)
    args = dict(inputs=inputs, weight=weight, bias=b, dropout_p=0.0, relu=True, seed=None)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(inputs=[]), "expected 1 to 8 input tensors, got 0"),
        (dict(inputs=[torch.randn(4, 1)] * 9, weight=torch.randn(6, 9)), "expected 1 to 8 input tensors, got 9"),
        (dict(inputs=[torch.randn(4, 3, 1), torch.randn(4, 5)]), r"expected inputs\[0\] to be 2-D"),
        (dict(inputs=[torch.randn(4, 3), torch.randn(5, 5)]), "expected every input to have 4 rows"),
        (dict(inputs=[torch.randn(4, 3), torch.randn(4, 5, dtype=torch.float64)]), "dtype"),
        (dict(inputs=[torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (4, 5))]), "float32 or float64"),
        (dict(weight=torch.randn(6, 7)), r"expected weight of shape \[O, 8\]"),
        (dict(weight=torch.randn(6, 8, 1)), "expected weight to be 2-D"),
        (dict(weight=torch.randn(6, 8, dtype=torch.float64)), "expected weight of dtype Float"),
        (dict(bias=torch.randn(5)), r"expected bias of shape \[6\]"),
        (dict(dropout_p=1.5), r"expected dropout_p in \[0, 1\]"),
        (dict(dropout_p=0.5, seed=torch.tensor(1.0)), "expected seed to be a one-element int64 tensor"),
        (dict(dropout_p=0.5, seed=torch.tensor([1, 2])), "expected seed to be a one-element int64 tensor"),
    ],
)
def test_bad_inputs(overrides, match):
    args = _bad(**overrides)
    with pytest.raises(RuntimeError, match="mmfast::concat_linear") as info:
        OP(args["inputs"], args["weight"], args["bias"], args["dropout_p"], args["relu"], args["seed"])
    assert info.match(match)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="device mismatch needs a second device (CUDA)")
def test_device_mismatch():
    inputs, weight, b = make("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="mmfast::concat_linear"):
        OP(inputs, weight.cuda(), b, 0.0, True, None)
