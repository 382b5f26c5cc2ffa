"""The drop-in modules: same parameters, state_dicts both ways, and the same outputs and gradients as the
native modules they replace."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

import mmfast
from mmfast.testing import TOL


def _grads(module, loss):
    names = [n for n, p in module.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(module.parameters()))))


@pytest.mark.parametrize("k,padding,bias", [(3, 0, True), (5, 2, False), (1, 0, True)])
def test_conv_block_matches_native(k, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, k, padding=padding, bias=bias).double()
    native = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
    fused = mmfast.nn.Conv2dReLUMaxPool2d.from_native(conv)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    x = torch.randn(3, 4, 11, 10, dtype=torch.float64, requires_grad=True)
    out_n, out_f = native(x), fused(x)
    assert_close(out_f, out_n, **TOL[torch.float64])
    g = torch.randn_like(out_n)
    assert_close(torch.autograd.grad(out_f, [x, *fused.parameters()], g),
                 torch.autograd.grad(out_n, [x, *conv.parameters()], g), **TOL[torch.float64])


def test_conv_block_init_and_state_dict_both_ways():
    torch.manual_seed(1)
    fused = mmfast.nn.Conv2dReLUMaxPool2d(3, 8, (3, 3), padding=1)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    conv.load_state_dict(fused.state_dict())           # mmfast -> native
    assert_close(conv.weight, fused.weight)
    fused2 = mmfast.nn.Conv2dReLUMaxPool2d(3, 8, 3, padding=1)
    fused2.load_state_dict(conv.state_dict())          # native -> mmfast
    assert_close(fused2.weight, fused.weight)
    # nn.Conv2d's init: uniform within 1/sqrt(fan_in)
    bound = 1 / (3 * 3 * 3) ** 0.5
    assert fused.weight.abs().max() <= bound and fused.bias.abs().max() <= bound
    assert "kernel_size=3, padding=1" in repr(fused)


def test_conv_block_from_native_rejects_unsupported():
    for conv in [nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 3, groups=2),
                 nn.Conv2d(3, 4, 3, padding="same"), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")]:
        with pytest.raises(ValueError, match="Conv2dReLUMaxPool2d.from_native"):
            mmfast.nn.Conv2dReLUMaxPool2d.from_native(conv)
    with pytest.raises(ValueError, match="square kernel_size"):
        mmfast.nn.Conv2dReLUMaxPool2d(3, 4, (3, 5))


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_matches_native(bias):
    torch.manual_seed(0)
    native = nn.LSTM(5, 7, bias=bias, batch_first=True).double()
    fused = mmfast.nn.LSTM.from_native(native)
    assert list(fused.state_dict()) == list(native.state_dict())
    x = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 1, 3, 6])
    h0 = torch.randn(1, 4, 7, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 4, 7, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    y_p, (h_n, c_n) = native(packed, (h0, c0))
    y_n = pad_packed_sequence(y_p, batch_first=True, total_length=6)[0]
    y_f, (h_f, c_f) = fused(x, (h0, c0), lengths=lengths)
    assert_close((y_f, h_f, c_f), (y_n, h_n, c_n), **TOL[torch.float64])
    loss_n = (y_n * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum() + h_n.sum() * 2 + c_n.sum()
    loss_f = (y_f * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum() + h_f.sum() * 2 + c_f.sum()
    assert_close(torch.autograd.grad(loss_f, [x, h0, c0, *fused.parameters()]),
                 torch.autograd.grad(loss_n, [x, h0, c0, *native.parameters()]), **TOL[torch.float64])


def test_lstm_without_lengths_matches_native_unpacked():
    torch.manual_seed(2)
    native = nn.LSTM(3, 4, batch_first=True)
    fused = mmfast.nn.LSTM(3, 4)
    fused.load_state_dict(native.state_dict())
    x = torch.randn(2, 5, 3)
    y_n, (h_n, c_n) = native(x)
    y_f, (h_f, c_f) = fused(x)
    assert_close((y_f, h_f, c_f), (y_n, h_n, c_n), **TOL[torch.float32])


def test_lstm_rejects_unsupported():
    with pytest.raises(ValueError, match="batch_first=True"):
        mmfast.nn.LSTM(3, 4, batch_first=False)
    for lstm in [nn.LSTM(3, 4, num_layers=2, batch_first=True), nn.LSTM(3, 4, bidirectional=True, batch_first=True),
                 nn.LSTM(3, 4, proj_size=2, batch_first=True), nn.LSTM(3, 4)]:
        with pytest.raises(ValueError, match="LSTM.from_native"):
            mmfast.nn.LSTM.from_native(lstm)


@pytest.mark.parametrize("relu", [True, False])
def test_concat_fusion_matches_native(relu):
    torch.manual_seed(0)
    linear = nn.Linear(10, 4).double()
    fused = mmfast.nn.ConcatFusion.from_native(linear, [6, 4], dropout=0.5, relu=relu).eval()
    native = nn.Sequential(nn.Dropout(0.5), linear, *([nn.ReLU()] if relu else [])).eval()
    a = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out_f, out_n = fused(a, b), native(torch.cat([a, b], 1))
    assert_close(out_f, out_n, **TOL[torch.float64])
    assert_close(fused([a, b]), out_n, **TOL[torch.float64])
    g = torch.randn_like(out_n)
    assert_close(torch.autograd.grad(out_f, [a, b, *fused.parameters()], g),
                 torch.autograd.grad(out_n, [a, b, *linear.parameters()], g), **TOL[torch.float64])


def test_concat_fusion_dropout_only_in_training():
    fused = mmfast.nn.ConcatFusion([8, 8], 16, dropout=0.5, relu=False)
    x = [torch.randn(32, 8), torch.randn(32, 8)]
    fused.eval()
    assert torch.equal(fused(*x), fused(*x))
    fused.train()
    torch.manual_seed(0)
    first = fused(*x)
    torch.manual_seed(0)
    assert torch.equal(fused(*x), first)
    assert not torch.equal(first, fused.eval()(*x))


def test_concat_fusion_state_dict_and_errors():
    fused = mmfast.nn.ConcatFusion([3, 5], 2)
    linear = nn.Linear(8, 2)
    linear.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == ["weight", "bias"]
    with pytest.raises(ValueError, match=r"expected inputs of widths \[3, 5\]"):
        fused(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="1 to 8"):
        mmfast.nn.ConcatFusion([], 2)
    with pytest.raises(ValueError, match="dropout"):
        mmfast.nn.ConcatFusion([3], 2, dropout=1.5)
    with pytest.raises(ValueError, match="sum to 8"):
        mmfast.nn.ConcatFusion.from_native(nn.Linear(7, 2), [3, 5])


def test_native_model_and_mmfast_twin_train_identically():
    """One SGD step through a small image+text model, native vs mmfast twin: same loss, same gradients."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    lstm = nn.LSTM(6, 5, batch_first=True).double()
    head = nn.Linear(4 * 4 * 4 + 5, 3).double()
    images = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    tokens = torch.randn(6, 7, 6, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 0, 5, 7, 1])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])

    def native_loss():
        img = nn.functional.max_pool2d(torch.relu(conv(images)), 2).flatten(1)
        h = torch.zeros(6, 5, dtype=torch.float64)
        rows = lengths > 0
        packed = pack_padded_sequence(tokens[rows], lengths[rows], batch_first=True, enforce_sorted=False)
        h = h.index_put((rows,), lstm(packed)[1][0][0])
        return nn.functional.cross_entropy(torch.relu(head(torch.cat([img, h], 1))), labels)

    f_conv = mmfast.nn.Conv2dReLUMaxPool2d.from_native(conv)
    f_lstm = mmfast.nn.LSTM.from_native(lstm)
    f_head = mmfast.nn.ConcatFusion.from_native(head, [64, 5])

    def fused_loss():
        _, (h_n, _) = f_lstm(tokens, lengths=lengths)
        return nn.functional.cross_entropy(f_head(f_conv(images).flatten(1), h_n[0]), labels)

    native_params = [*conv.parameters(), *lstm.parameters(), *head.parameters()]
    fused_params = [*f_conv.parameters(), *f_lstm.parameters(), *f_head.parameters()]
    ln, lf = native_loss(), fused_loss()
    assert_close(lf, ln, **TOL[torch.float64])
    assert_close(torch.autograd.grad(lf, fused_params), torch.autograd.grad(ln, native_params), **TOL[torch.float64])
