"""benchmarks/report.py on small synthetic pytest-benchmark JSON files (no benchmarks are run)."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

_spec = importlib.util.spec_from_file_location("report", Path(__file__).resolve().parents[1] / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _bench(op, kind, device, shape, impl, median, **extra):
    info = dict(op=op, kind=kind, impl=impl, device=device, shape=shape, **extra)
    return {"group": f"{op} {kind} {device} {shape}", "name": f"test_{kind}[{impl}]", "extra_info": info,
            "stats": {"median": median, "mean": median}}


def _data(new_format=True):
    extra = dict(device_name="Intel Xeon Test (2 threads)", torch="2.5.1") if new_format else {}
    shape = "(64, 32, 128, 64)"
    return {
        "datetime": "2026-11-27T01:39:30.914549+00:00",
        "machine_info": {"cpu": {"brand_raw": "Intel Xeon Test"}, "python_version": "3.11.9", "node": "vm"},
        "benchmarks": [
            # Group 1: mmfast with two baselines, listed out of order to check the sorting.
            _bench("lstm", "fwd+bwd", "cpu", shape, "native_compile", 3e-3, **extra),
            _bench("lstm", "fwd+bwd", "cpu", shape, "mmfast", 1e-3, **extra),
            _bench("lstm", "fwd+bwd", "cpu", shape, "native", 4e-3, **extra),
            # Group 2: a baseline without mmfast, microsecond scale.
            _bench("concat_linear", "fwd", "cpu", "(256, (72, 64), 128)", "native", 250e-6, **extra),
        ],
    }


def _write(tmp_path, data, name="bench.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _table_rows(text):
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]  # after header and rule


def test_rows_pairs_each_baseline_with_mmfast():
    rows = report.rows(_data())
    assert [(r.op, r.baseline) for r in rows] == [
        ("concat_linear", "native"), ("lstm", "native"), ("lstm", "native_compile")]
    assert rows[0].mmfast_s is None and rows[0].speedup is None
    assert rows[1].speedup == pytest.approx(4.0)
    assert rows[2].speedup == pytest.approx(3.0)
    assert {r.device_name for r in rows} == {"Intel Xeon Test (2 threads)"}


def test_group_without_baseline_gets_a_row():
    data = _data()
    data["benchmarks"].append(_bench("lstm", "fwd", "cpu", "(8, 4)", "mmfast", 1e-3))
    (row,) = [r for r in report.rows(data) if r.kind == "fwd" and r.op == "lstm"]
    assert row.baseline is None and row.speedup is None
    assert ["lstm", "fwd", "(8, 4)", "cpu", "-", "mmfast", "-", "1.000 ms", "-"] in _table_rows(report.to_markdown(data))


def test_markdown(tmp_path, capsys):
    path = _write(tmp_path, _data())
    out_md = tmp_path / "out.md"
    assert report.main([str(path), "--markdown", str(out_md)]) == 0
    text = capsys.readouterr().out
    assert out_md.read_text() == text
    head = text.splitlines()[0]
    for word in ("Intel Xeon Test (2 threads)", "torch 2.5.1", "2026-11-27"):
        assert word in head
    assert head.count("Intel Xeon Test") == 1  # the brand is not repeated when the device name holds it
    assert "| op " in text and "| speedup |" in text
    assert _table_rows(text) == [
        ["concat_linear", "fwd", "(256, (72, 64), 128)", "cpu", "native", "mmfast", "250.0 us", "-", "-"],
        ["lstm", "fwd+bwd", "(64, 32, 128, 64)", "cpu", "native", "mmfast", "4.000 ms", "1.000 ms", "4.00x"],
        ["lstm", "fwd+bwd", "(64, 32, 128, 64)", "cpu", "native_compile", "mmfast", "3.000 ms", "1.000 ms", "3.00x"],
    ]


def _graphed_group(impls):
    """A CUDA group of ``impls``, out of order, with medians from 40 us (mmfast_cuda_graph) to 200 us (native)."""
    medians = {"native": 200e-6, "mmfast": 100e-6, "native_cuda_graph": 80e-6, "mmfast_cuda_graph": 40e-6}
    data = _data()
    data["benchmarks"] = [_bench("lstm", "fwd+bwd", "cuda", "(256, 32, 128, 64)", impl, medians[impl])
                          for impl in impls]
    return data


def test_mmfast_cuda_graph_is_compared_with_native_cuda_graph_only():
    data = _graphed_group(["mmfast_cuda_graph", "native_cuda_graph", "mmfast", "native"])
    rows = report.rows(data)
    # The rows against eager mmfast stay as they were; the graphed mmfast adds one row, graph against graph.
    assert [(r.baseline, r.mmfast_impl, r.speedup) for r in rows] == [
        ("native", "mmfast", pytest.approx(2.0)), ("native_cuda_graph", "mmfast", pytest.approx(0.8)),
        ("native_cuda_graph", "mmfast_cuda_graph", pytest.approx(2.0))]
    assert rows[2].label == "lstm fwd+bwd (256, 32, 128, 64) mmfast_cuda_graph vs native_cuda_graph"
    assert rows[1].label == "lstm fwd+bwd (256, 32, 128, 64) vs native_cuda_graph"
    assert _table_rows(report.to_markdown(data))[1:] == [
        ["lstm", "fwd+bwd", "(256, 32, 128, 64)", "cuda", "native_cuda_graph", "mmfast", "80.0 us", "100.0 us",
         "0.80x"],
        ["lstm", "fwd+bwd", "(256, 32, 128, 64)", "cuda", "native_cuda_graph", "mmfast_cuda_graph", "80.0 us",
         "40.0 us", "2.00x"],
    ]


def test_mmfast_cuda_graph_without_a_native_graph_has_no_baseline():
    # The training step: the native model cannot be captured, so the graphed mmfast row has nothing to compare with.
    rows = report.rows(_graphed_group(["mmfast_cuda_graph", "native", "mmfast"]))
    assert [(r.baseline, r.mmfast_impl, r.mmfast_s, r.speedup) for r in rows] == [
        ("native", "mmfast", 100e-6, pytest.approx(2.0)), (None, "mmfast_cuda_graph", 40e-6, None)]


def test_png_lists_the_graphed_rows(tmp_path):
    png = tmp_path / "out.png"
    report.to_png(_graphed_group(["native", "mmfast"]), str(png))
    with Image.open(png) as img:
        one_row = img.size
    report.to_png(_graphed_group(["mmfast_cuda_graph", "native_cuda_graph", "mmfast", "native"]), str(png))
    with Image.open(png) as img:
        width, height = img.size
    assert width > one_row[0] and height > one_row[1]  # the graphed row's longer label; three rows instead of one


def test_shapes_sort_numerically():
    data = _data()
    data["benchmarks"] = [_bench("train_step", "fwd+bwd+adamw", "cuda", s, i, 1e-3)
                          for s in ("B256", "B64") for i in ("native", "mmfast")]
    assert [r.shape for r in report.rows(data)] == ["B64", "B256"]


def test_png(tmp_path, capsys):
    path = _write(tmp_path, _data())
    png = tmp_path / "out.png"
    assert report.main([str(path), "--png", str(png)]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG"
        width, height = img.size
        # Three rows: wide enough for the labels plus the plot, and a few rows tall, not a poster.
        assert 600 <= width <= 3000 and 100 <= height <= 600
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (46, 139, 87) in colours  # a bar at or above 1x; the row without mmfast has no bar


def test_png_colours_slower_bars_differently(tmp_path):
    data = _data()
    data["benchmarks"][2]["stats"]["median"] = 0.5e-3  # native now faster than mmfast
    png = tmp_path / "out.png"
    report.to_png(data, str(png))
    with Image.open(png) as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert {(46, 139, 87), (200, 60, 50)} <= colours


def test_old_format_uses_card_argument(tmp_path, capsys):
    data = _data(new_format=False)
    for b in data["benchmarks"]:
        b["extra_info"]["device"] = "cuda"
        b["group"] = b["group"].replace(" cpu ", " cuda ")
    path = _write(tmp_path, data)
    assert report.main([str(path), "NVIDIA H200"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "NVIDIA H200" in head and "torch ?" in head and "CPU" not in head
    assert report.main([str(path), "--card", "NVIDIA H100"]) == 0
    assert "NVIDIA H100" in capsys.readouterr().out.splitlines()[0]
    assert {r.device_name for r in report.rows(data)} == {"?"}


def test_old_format_cpu_falls_back_to_cpu_brand():
    rows = report.rows(_data(new_format=False))
    assert {r.device_name for r in rows} == {"Intel Xeon Test"}
    assert {r.torch for r in rows} == {"?"}


def test_group_name_parsed_when_extra_info_lacks_fields():
    data = _data()
    for b in data["benchmarks"]:
        b["extra_info"] = {"impl": b["extra_info"]["impl"]}
    row = report.rows(data, card="X")[1]
    assert (row.op, row.kind, row.device, row.shape, row.device_name) == (
        "lstm", "fwd+bwd", "cpu", "(64, 32, 128, 64)", "X")


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.json"
    assert report.main([str(path), "card"]) == 0
    assert capsys.readouterr().out.strip() == f"no benchmark results ({path} missing)"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"machine_info": {}}), "[1, 2]",
                                     json.dumps({"benchmarks": [{"group": "g", "stats": {}}]})])
def test_bad_input_exits_2_naming_the_file(tmp_path, capsys, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    assert report.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert str(path) in captured.err and "Traceback" not in captured.err
    with pytest.raises(report.ReportError, match="broken.json"):
        report.load(str(path))
