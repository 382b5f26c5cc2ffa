"""mmfast.bench: training-step variants on one batch, and the memory each op keeps for its backward pass.

The memory checks are issue 5's "no op keeps more for backward than its native composition" at the seed's
shapes; they count bytes, so they are deterministic (timings live in benchmarks/, never in tests).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mmfast
from mmfast import reference
from mmfast.bench import VARIANTS, bench_train_step, make_case, make_train_step, saved_tensor_bytes
from mmfast.testing import make_concat_linear_inputs, make_conv2d_relu_maxpool2d_inputs, make_lstm_inputs


def test_saved_tensor_bytes_counts_distinct_activations_only():
    x = torch.randn(4, 8, requires_grad=True)
    # exp saves its output (4*8 float32); x itself is excluded; the same storage saved twice counts once.
    assert saved_tensor_bytes(lambda: torch.exp(x), exclude=[x]) == 4 * 8 * 4
    assert saved_tensor_bytes(lambda: x * x, exclude=[x]) == 0
    assert saved_tensor_bytes(lambda: x * x) == 4 * 8 * 4
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: torch.exp(x)) == 0


def _conv_case():
    x, w, b, p = make_conv2d_relu_maxpool2d_inputs("cpu", torch.float32, n=64, c=32, h=16, w=16, o=64, k=3, padding=1,
                                                   requires_grad=True)
    return (x, w, b, p), [x, w, b]


def _lstm_case():
    x, lengths, h0, c0, *weights = make_lstm_inputs("cpu", torch.float32, b=64, t=32, i=128, h=64, state=False,
                                                    requires_grad=True)
    return (x, lengths, h0, c0, *weights), [x, *weights]


def _head_case():
    inputs, w, b = make_concat_linear_inputs("cpu", torch.float32, n=64, widths=(7200, 64), o=128, requires_grad=True)
    return (inputs, w, b), [*inputs, w, b]


def _native_head(inputs, w, b):
    return F.relu(F.linear(F.dropout(torch.cat(inputs, 1), 0.5, training=True), w, b))


def _fused_head(inputs, w, b):
    return mmfast.ops.concat_linear(inputs, w, b, 0.5, training=True, relu=True)


@pytest.mark.parametrize("case,fused,native", [
    (_conv_case, mmfast.ops.conv2d_relu_maxpool2d, reference.conv2d_relu_maxpool2d),
    (_lstm_case, mmfast.ops.lstm, reference.lstm),
    (_head_case, _fused_head, _native_head),
], ids=["conv2d_relu_maxpool2d", "lstm", "concat_linear"])
def test_ops_keep_no_more_for_backward_than_native(case, fused, native):
    args, leaves = case()
    kept_fused = saved_tensor_bytes(lambda: fused(*args), exclude=leaves)
    kept_native = saved_tensor_bytes(lambda: native(*args), exclude=leaves)
    assert 0 < kept_fused <= kept_native, (kept_fused, kept_native)


def test_train_step_variants_start_from_the_same_weights_and_batch():
    case = make_case("builtin", "cpu", batch_size=8, max_len=12)
    losses = {}
    for variant in ("native", "mmfast", "native_channels_last"):
        step, model = make_train_step(case, variant)
        model.eval()  # no dropout: the first loss must agree across variants
        losses[variant] = step()
    assert_close(losses["mmfast"], losses["native"], rtol=1e-4, atol=1e-5)
    assert_close(losses["native_channels_last"], losses["native"], rtol=1e-4, atol=1e-5)


def test_bench_train_step_rows_and_errors():
    rows = bench_train_step(batch_size=8, steps=2, warmup=1, max_len=12)
    assert [r["variant"] for r in rows] == ["native", "mmfast"]
    assert rows[0]["speedup"] == 1.0 and all(r["ms_per_step"] > 0 and r["saved_mb"] > 0 for r in rows)
    with pytest.raises(ValueError, match="unknown training-step variant 'fast'"):
        make_train_step(make_case(batch_size=2, max_len=4), "fast")
    assert set(VARIANTS) >= {"native", "mmfast", "native_channels_last", "native_compile"}
