import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import mmfast
from mmfast import reference
from mmfast.testing import TOL, argmax_windows

# Tests of the CPU kernels (float64 and gradcheck included); the CUDA kernels have tests/test_*_cuda.py.
DEVICES = ["cpu"]
from mmfast.testing import make_conv2d_relu_maxpool2d_inputs as make

DROPPED = 255
KERNEL_PADDINGS = [(k, p) for k in (1, 3, 5, 7) for p in range(k // 2 + 1)]


def fused(x, weight, bias=None, padding=0):
    return torch.ops.mmfast.conv2d_relu_maxpool2d.default(x, weight, bias, padding)


def grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def assert_matches_reference(x, weight, bias, padding, tol):
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)
    expected = reference.conv2d_relu_maxpool2d(x, weight, bias, padding)
    assert out.shape == expected.shape
    assert not out.isnan().any()
    assert_close(out, expected, **tol)
    g = torch.randn_like(out)
    assert_close(grads(out, (x, weight, bias), g), grads(expected, (x, weight, bias), g), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,padding", KERNEL_PADDINGS)
@pytest.mark.parametrize("conv_hw", [(7, 9), (8, 5)], ids=str)  # conv output size: odd sizes drop a row/column
@pytest.mark.parametrize("n,c,bias", [(2, 1, True), (1, 5, False)], ids=str)
def test_matches_reference(device, dtype, k, padding, conv_hw, n, c, bias):
    torch.manual_seed(0)
    h, w = (s - 2 * padding + k - 1 for s in conv_hw)
    args = make(device, dtype, n=n, c=c, h=h, w=w, o=3, k=k, padding=padding, bias=bias, requires_grad=True)
    assert_matches_reference(*args, TOL[dtype])


# The CPU kernel works in chunks of ceil(256 / conv pixels) images and sums weight gradients over groups of
# ceil(chunks / 16) chunks: 8x8 conv outputs give 4-image chunks (7 images: a full and a partial chunk);
# 16x16 ones give 1-image chunks, and 40 of them 14 groups of up to 3.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,hw", [(7, 9), (40, 16)], ids=str)
def test_matches_reference_chunks_and_groups(device, dtype, n, hw):
    torch.manual_seed(0)
    x, weight, bias, padding = make(device, dtype, n=n, c=2, h=hw, w=hw, o=3, k=3, padding=1,
                                    requires_grad=True)
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)
    g = torch.randn_like(out)
    # Oracle in float64: the weight gradient sums n*64 float32 terms of size ~1, where the float32 reference
    # itself is off by ~1e-4 (and the kernel by ~2e-5), so float32 gets atol 1e-4.
    inputs64 = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    expected = reference.conv2d_relu_maxpool2d(*inputs64, padding)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    assert_close(out.double(), expected, **tol)
    actual_grads = [t.double() for t in grads(out, (x, weight, bias), g)]
    assert_close(actual_grads, list(grads(expected, inputs64, g.double())), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_semantics(device):
    x = argmax_windows(device)  # seven windows: ties, drops, a bias at the threshold
    weight = torch.ones(1, 1, 1, 1, device=device)
    out, argmax = fused(x, weight)
    assert argmax.dtype == torch.uint8
    assert argmax.flatten().tolist() == [3, 0, 0, 1, DROPPED, DROPPED, 1]
    assert out.flatten().tolist() == [4.0, 5.0, 2.0, 7.0, 0.0, 0.0, 1.0]
    # A bias moves the threshold: max + bias <= 0 is dropped, and out includes the bias.
    out, argmax = fused(x, weight, torch.tensor([-4.0], device=device))
    assert argmax.flatten().tolist() == [DROPPED, 0, DROPPED, 1, DROPPED, DROPPED, DROPPED]
    assert out.flatten().tolist() == [0.0, 1.0, 0.0, 3.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_like_native(device):
    torch.manual_seed(0)
    x, weight, bias, padding = make(device, torch.float32, n=2, c=1, h=9, w=9, o=2, k=3, padding=1)
    x[0, 0, 4, 4] = float("nan")
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)
    expected = reference.conv2d_relu_maxpool2d(x, weight, bias, padding)
    assert expected.isnan().any()
    assert torch.equal(out.isnan(), expected.isnan())
    assert_close(out, expected, equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding", [0, 1])
def test_argmax_matches_max_pool2d_indices(device, padding):
    torch.manual_seed(0)
    x, weight, bias, _ = make(device, torch.float64, n=2, c=3, h=9, w=11, o=4, k=3, padding=padding)
    out, argmax = fused(x, weight, bias, padding)
    conv = F.relu(F.conv2d(x, weight, bias, padding=padding))
    expected, flat = F.max_pool2d(conv, 2, return_indices=True)
    wc = conv.shape[3]
    hp, wp = torch.meshgrid(torch.arange(out.shape[2], device=device), torch.arange(out.shape[3], device=device),
                            indexing="ij")
    window_index = 2 * (flat // wc - 2 * hp) + (flat % wc - 2 * wp)
    kept = expected > 0
    assert kept.any() and (~kept).any()
    assert_close(out, expected, **TOL[torch.float64])
    assert torch.equal(argmax[kept].long(), window_index[kept])
    assert (argmax[~kept] == DROPPED).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_gradcheck(device, bias, x_requires_grad):
    torch.manual_seed(0)
    x, weight, b, padding = make(device, torch.float64, n=2, c=2, h=5, w=4, o=2, k=3, padding=1, bias=bias,
                                 requires_grad=True)
    x.requires_grad_(x_requires_grad)
    assert torch.autograd.gradcheck(mmfast.ops.conv2d_relu_maxpool2d, (x, weight, b, padding))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_skips_grad_x(device):
    torch.manual_seed(0)
    x, weight, bias, padding = make(device, torch.float32, n=3, c=2, h=9, w=8, o=4, k=3, padding=1)
    out, argmax = fused(x, weight, bias, padding)
    grad_out = torch.randn_like(out)
    backward = torch.ops.mmfast._conv2d_relu_maxpool2d_backward.default
    gx, gw, gb = backward(grad_out, x, weight, argmax, padding, True)
    gx0, gw0, gb0 = backward(grad_out, x, weight, argmax, padding, False)
    assert gx.shape == x.shape and gx0.shape == (0,)
    assert torch.equal(gw, gw0) and torch.equal(gb, gb0)


class RecordBackwardCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.need_grad_x = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.mmfast._conv2d_relu_maxpool2d_backward.default:
            self.need_grad_x.append(args[5])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_autograd_asks_for_grad_x_only_when_needed(device, x_requires_grad):
    x, weight, bias, padding = make(device, torch.float32, requires_grad=True)
    x.requires_grad_(x_requires_grad)
    with RecordBackwardCalls() as mode:
        mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding).sum().backward()
    assert mode.need_grad_x == [x_requires_grad]
    assert (x.grad is not None) == x_requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad,bias", [(False, True), (True, True), (True, False)])
def test_opcheck(device, requires_grad, bias):
    args = make(device, torch.float32, bias=bias, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.mmfast.conv2d_relu_maxpool2d.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_grad_x", [False, True])
def test_opcheck_backward(device, need_grad_x):
    x, weight, bias, padding = make(device, torch.float32)
    out, argmax = fused(x, weight, bias, padding)
    torch.library.opcheck(torch.ops.mmfast._conv2d_relu_maxpool2d_backward.default,
                          (torch.randn_like(out), x, weight, argmax, padding, need_grad_x))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph(dynamic):
    torch.manual_seed(0)
    x, weight, bias, padding = make("cpu", torch.float32, n=3, c=2, h=9, w=10, o=4, k=3, padding=1,
                                    requires_grad=True)

    def fn(x, weight, bias):
        return mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    out, expected = compiled(x, weight, bias), fn(x, weight, bias)
    assert_close(out, expected, **TOL[torch.float32])
    g = torch.randn_like(out)
    assert_close(grads(out, (x, weight, bias), g), grads(expected, (x, weight, bias), g), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
def test_non_contiguous(device, layout):
    torch.manual_seed(0)
    x, weight, bias, padding = make(device, torch.float32, n=2, c=6, h=9, w=11, o=4, k=3, padding=1)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        weight = weight.to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
        weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        x, weight = x[:, ::2], weight[:, ::2]
        bias = torch.randn(8, device=device)[::2]
    assert not x.is_contiguous() and not weight.is_contiguous()
    if layout == "sliced":
        assert not bias.is_contiguous()
        bias.requires_grad_()
    x.requires_grad_()
    weight.requires_grad_()
    assert_matches_reference(x, weight, bias, padding, TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_grad_out(device):
    # out.sum() backpropagates an expanded (stride 0) grad_out.
    x, weight, bias, padding = make(device, torch.float32, requires_grad=True)
    mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding).sum().backward()
    expected = torch.autograd.grad(reference.conv2d_relu_maxpool2d(x, weight, bias, padding).sum(), (x, weight, bias))
    assert_close((x.grad, weight.grad, bias.grad), expected, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, weight, bias, padding = make(device, torch.float32, n=0, h=9, w=8, requires_grad=True)
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)
    assert out.shape == (0, 4, 4, 4)
    gx, gw, gb = torch.autograd.grad(out.sum(), (x, weight, bias))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(weight)) and torch.equal(gb, torch.zeros_like(bias))


@pytest.mark.parametrize("n,c,hw", [(16, 3, 16), (40, 2, 16), (1, 8, 40)], ids=str)
def test_grads_independent_of_thread_count(n, c, hw):
    torch.manual_seed(0)
    x, weight, bias, padding = make("cpu", torch.float32, n=n, c=c, h=hw, w=hw, o=8, k=3, padding=1,
                                    requires_grad=True)
    g = None
    results = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if g is None else g
            results.append(torch.autograd.grad(out, (x, weight, bias), g))
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_raises(device):
    x, weight, bias, padding = make(device, torch.float64, requires_grad=True)
    out = mmfast.ops.conv2d_relu_maxpool2d(x, weight, bias, padding)
    (gw,) = torch.autograd.grad(out.sum(), (weight,), create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gw.sum(), (weight,))


BAD_INPUTS = {  # name -> (args from x [2, 3, 8, 8], w [4, 3, 3, 3], b [4]; expected message)
    "x_rank": (lambda x, w, b: (x[0], w, b, 1), "expected x to be 4-D"),
    "weight_rank": (lambda x, w, b: (x, w[0], b, 1), "expected weight to be 4-D"),
    "dtype_mismatch": (lambda x, w, b: (x, w.double(), b, 1), "expected weight of dtype Float"),
    "integer_dtype": (lambda x, w, b: (x.long(), w.long(), b.long(), 1), "expected x of dtype float32 or float64"),
    "kernel_2": (lambda x, w, b: (x, w[:, :, :2, :2], b, 1), "square kernel of size 1, 3, 5 or 7"),
    "kernel_4": (lambda x, w, b: (x, w.new_ones(4, 3, 4, 4), b, 1), "square kernel of size 1, 3, 5 or 7"),
    "kernel_9": (lambda x, w, b: (x.new_ones(1, 3, 12, 12), w.new_ones(4, 3, 9, 9), b, 1),
                 "square kernel of size 1, 3, 5 or 7"),
    "non_square": (lambda x, w, b: (x, w[:, :, :, :1], b, 0), "square kernel of size 1, 3, 5 or 7"),
    "channels": (lambda x, w, b: (x, w[:, :2], b, 1), "expected weight with 3 input channels"),
    "bias_shape": (lambda x, w, b: (x, w, b[:3], 1), r"expected bias of shape \[4\]"),
    "bias_rank": (lambda x, w, b: (x, w, b[None], 1), r"expected bias of shape \[4\]"),
    "padding_negative": (lambda x, w, b: (x, w, b, -1), r"expected padding in \[0, 1\] for kernel size 3, got -1"),
    "padding_too_large": (lambda x, w, b: (x, w, b, 2), r"expected padding in \[0, 1\] for kernel size 3, got 2"),
    "too_small": (lambda x, w, b: (x[:, :, :3], w, b, 0), "at least 2x2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_rejects_bad_inputs(case):
    build, message = BAD_INPUTS[case]
    x, w, b, _ = make("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="mmfast::conv2d_relu_maxpool2d: .*" + message):
        mmfast.ops.conv2d_relu_maxpool2d(*build(x, w, b))


@pytest.mark.skipif(not torch.cuda.is_available() or not mmfast.with_cuda, reason="device mismatch needs CUDA")
def test_rejects_device_mismatch():
    x, w, b, padding = make("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="mmfast::conv2d_relu_maxpool2d: expected weight on cpu"):
        mmfast.ops.conv2d_relu_maxpool2d(x, w.cuda(), b, padding)
