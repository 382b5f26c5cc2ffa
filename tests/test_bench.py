"""mmfast.bench: training-step variants on one batch, and the memory each op keeps for its backward pass.

The memory checks are issue 5's "no op keeps more for backward than its native composition" at the seed's
shapes; they count bytes, so they are deterministic (timings live in benchmarks/, never in tests).
"""
import pytest
import torch
from torch.testing import assert_close

from mmfast.bench import (VARIANTS, bench_train_step, make_case, make_train_step, op_memory_cases, op_memory_table,
                          saved_tensor_bytes)


def test_saved_tensor_bytes_counts_distinct_activations_only():
    x = torch.randn(4, 8, requires_grad=True)
    # exp saves its output (4*8 float32); x itself is excluded; the same storage saved twice counts once.
    assert saved_tensor_bytes(lambda: torch.exp(x), exclude=[x]) == 4 * 8 * 4
    assert saved_tensor_bytes(lambda: x * x, exclude=[x]) == 0
    assert saved_tensor_bytes(lambda: x * x) == 4 * 8 * 4
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: torch.exp(x)) == 0


@pytest.mark.parametrize("name", list(op_memory_cases()))
def test_ops_keep_no_more_for_backward_than_native(name):
    fused, native, leaves = op_memory_cases()[name]
    kept_fused = saved_tensor_bytes(fused, exclude=leaves)
    kept_native = saved_tensor_bytes(native, exclude=leaves)
    assert 0 < kept_fused <= kept_native, (kept_fused, kept_native)


def test_op_memory_table():
    table = op_memory_table().splitlines()
    assert table[0].startswith("| op") and len(table) == 2 + len(op_memory_cases())
    assert all(row.endswith(" |") and "MiB" in row for row in table[2:])


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
