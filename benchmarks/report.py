"""Turn a pytest-benchmark JSON (``--benchmark-json``) into a markdown table of mmfast speedups, and optionally a PNG.

Usage: python3 benchmarks/report.py BENCH.json [CARD] [--card CARD] [--markdown OUT.md] [--png OUT.png]

Conventions of the benchmark suites (benchmarks/conftest.py):
- each benchmark's ``group`` is "<op> <kind> <device> <shape>", e.g. "lstm fwd+bwd cpu (64, 32, 128, 64)";
- ``extra_info`` holds op, kind, impl, device, shape and, in newer runs, device_name and torch (torch.__version__);
- impl is "mmfast", "mmfast_cuda_graph" (mmfast replayed from a CUDA graph) or a baseline: "native" (eager, default
  layout) or "native_<variant>" such as "native_channels_last", "native_compile" or "native_cuda_graph". A group
  holds one mmfast benchmark, one or more baselines and, on CUDA, mmfast_cuda_graph.

Every row compares a baseline with an mmfast impl from the same group, i.e. the same process on the same device; the
speedup is baseline median / mmfast median. Each baseline is compared with "mmfast"; "mmfast_cuda_graph" gets one
more row, against "native_cuda_graph" only (graph against graph: the GPU time without launch overhead), or against
no baseline where the group has none (the native training step cannot be captured). The table's "mmfast" column
names each row's mmfast impl. Older JSON files lack device_name and torch: the device name then comes from the CARD
argument (or, for CPU benchmarks, the CPU brand in machine_info) and torch is shown as "?".
Exit status: 0, also when BENCH.json does not exist (gpu_check.sh reports whatever stage ran); 2 for unreadable input.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime
from typing import NamedTuple, Optional

MMFAST = "mmfast"
# mmfast impls other than MMFAST -> the one baseline each is compared with, like for like.
MMFAST_VARIANT_BASELINES = {"mmfast_cuda_graph": "native_cuda_graph"}
DEVICES = ("cuda", "cpu")


class ReportError(Exception):
    """Input that cannot be reported on; main() prints it without a traceback and exits 2."""


class Row(NamedTuple):
    op: str
    kind: str
    shape: str
    device: str
    baseline: Optional[str]  # None: the group has no baseline benchmark (for this mmfast impl)
    mmfast_impl: str  # MMFAST or a key of MMFAST_VARIANT_BASELINES
    baseline_s: Optional[float]  # medians in seconds; None where the benchmark is missing
    mmfast_s: Optional[float]
    device_name: str
    torch: str

    @property
    def speedup(self) -> Optional[float]:
        if self.baseline_s is None or not self.mmfast_s:
            return None
        return self.baseline_s / self.mmfast_s

    @property
    def label(self) -> str:
        variant = "" if self.mmfast_impl == MMFAST else f" {self.mmfast_impl}"
        return f"{self.op} {self.kind} {self.shape}{variant} vs {self.baseline or '-'}"


def load(path: str) -> dict:
    """Read a pytest-benchmark JSON file; ReportError (naming the file) when it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f'{path}: not a pytest-benchmark JSON file (no "benchmarks" list)')
    for i, bench in enumerate(data["benchmarks"]):
        # Checked here, so that rows() can index without guarding and a broken file never gives a traceback.
        median = ((bench.get("stats") or {}).get("median") if isinstance(bench, dict) else None)
        if not isinstance(median, (int, float)):
            raise ReportError(f"{path}: benchmark {i} has no stats.median")
    return data


def _cpu_brand(data: dict) -> Optional[str]:
    return ((data.get("machine_info") or {}).get("cpu") or {}).get("brand_raw")


def _split_group(group: str) -> tuple[str, str, str, str]:
    """(op, kind, device, shape) from a group name; only used where extra_info lacks the fields."""
    words = group.split(" ")
    # The device word anchors the split: shapes contain spaces, op and kind do not.
    cut = next((i for i, w in enumerate(words) if w in DEVICES), None)
    if cut is None:
        return group, "", "?", ""
    return " ".join(words[:1]), " ".join(words[1:cut]), words[cut], " ".join(words[cut + 1:])


def _natural(s: str) -> list:
    # Numbers compare as numbers, so "B64" sorts before "B256" and (64, ...) before (256, ...).
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t]


def rows(data: dict, card: Optional[str] = None) -> list[Row]:
    """One Row per (group, baseline, mmfast impl) pair, sorted by op, kind, device, shape, then baseline ("native"
    first, None last), then mmfast impl (MMFAST first).

    A group without a baseline gives one row with baseline None; a group without mmfast keeps its baseline rows,
    with mmfast_s None. Each impl of MMFAST_VARIANT_BASELINES in the group adds a row against its baseline, or
    against None where the group lacks it."""
    groups: dict[str, dict] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        name = bench.get("group") or bench.get("name", "?")
        op, kind, device, shape = _split_group(name)
        g = groups.setdefault(name, {
            "op": info.get("op", op), "kind": info.get("kind", kind),
            "device": info.get("device", device), "shape": str(info.get("shape", shape)),
            "device_name": None, "torch": None, "times": {},
        })
        g["device_name"] = g["device_name"] or info.get("device_name")
        g["torch"] = g["torch"] or info.get("torch")
        g["times"][info.get("impl", "?")] = bench["stats"]["median"]

    out = []
    for g in groups.values():
        device_name = g["device_name"] or card or (_cpu_brand(data) if g["device"] == "cpu" else None) or "?"
        times = g["times"]
        baselines = [impl for impl in times if impl != MMFAST and impl not in MMFAST_VARIANT_BASELINES] or [None]
        pairs = [(baseline, MMFAST) for baseline in baselines]
        pairs += [(baseline if baseline in times else None, variant)
                  for variant, baseline in MMFAST_VARIANT_BASELINES.items() if variant in times]
        for baseline, mmfast_impl in pairs:
            out.append(Row(g["op"], g["kind"], g["shape"], g["device"], baseline, mmfast_impl,
                           times.get(baseline), times.get(mmfast_impl), device_name, g["torch"] or "?"))
    out.sort(key=lambda r: (r.op, r.kind, r.device, _natural(r.shape),
                            (r.baseline is None, r.baseline != "native", r.baseline or ""), r.mmfast_impl))
    return out


def _date(data: dict) -> str:
    try:
        return datetime.fromisoformat(str(data.get("datetime"))).strftime("%Y-%m-%d")
    except ValueError:
        return "?"


def _distinct(values) -> str:
    return ", ".join(dict.fromkeys(values)) or "?"


def header(data: dict, table: list[Row]) -> str:
    parts = [f"mmfast benchmarks: {_distinct(r.device_name for r in table)}",
             f"torch {_distinct(r.torch for r in table)}", _date(data)]
    brand = _cpu_brand(data)
    if any(r.device == "cpu" for r in table) and brand and brand not in parts[0]:  # not already the device name
        parts.append(f"CPU {brand}")
    return "### " + ", ".join(parts)


def _times(a: Optional[float], b: Optional[float]) -> tuple[str, str]:
    """Both medians of a row in one unit: us when the larger is below 1 ms, ms otherwise."""
    largest = max((t for t in (a, b) if t is not None), default=0.0)
    scale, unit, digits = (1e6, "us", 1) if largest < 1e-3 else (1e3, "ms", 3)
    return tuple("-" if t is None else f"{t * scale:.{digits}f} {unit}" for t in (a, b))


def _speedup(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def to_markdown(data: dict, card: Optional[str] = None) -> str:
    table = rows(data, card)
    if not table:
        return header(data, table) + "\n\nno benchmarks in the file\n"
    cells = [("op", "kind", "shape", "device", "baseline", "mmfast", "baseline median", "mmfast median", "speedup")]
    for r in table:
        cells.append((r.op, r.kind, r.shape, r.device, r.baseline or "-", r.mmfast_impl,
                      *_times(r.baseline_s, r.mmfast_s), _speedup(r.speedup)))
    cells = [tuple(c.replace("|", "\\|") for c in row) for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    numeric = [False] * 6 + [True] * 3  # right-aligned, so the digits line up in the terminal too

    def line(row):
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric)) + " |"
    return "\n".join([header(data, table), "", line(cells[0]), rule, *map(line, cells[1:])]) + "\n"


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1 with FreeType)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def to_png(data: dict, path: str, card: Optional[str] = None) -> None:
    """Horizontal bar chart of the speedups, one bar per row of the table, linear axis from 0 with a line at 1x."""
    from PIL import Image, ImageDraw

    table = rows(data, card)
    font, title_font = _font(13), _font(15)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_w(s, f=font):
        box = probe.textbbox((0, 0), s, font=f)
        return box[2] - box[0]

    row_h, pad, plot_w = 22, 12, 560
    title = f"mmfast speedup (baseline median / mmfast median): {_distinct(r.device_name for r in table)}, {_date(data)}"
    label_w = max((text_w(r.label) for r in table), default=0)
    left = pad + label_w + pad
    top = pad + 2 * row_h
    width = max(left + plot_w + 60, pad + text_w(title, title_font) + pad)
    height = top + max(len(table), 1) * row_h + 2 * row_h + pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), title, fill="black", font=title_font)

    speedups = [r.speedup for r in table if r.speedup is not None]
    x_max = max(speedups + [1.0]) * 1.1  # always show the 1x line, with room for the largest bar
    bottom = top + len(table) * row_h

    def x_of(v):
        return left + round(v / x_max * plot_w)

    # Grid and tick labels first, so that the bars are drawn over them.
    step = next(s for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20, 25, 50, 100, 1e9) if x_max / s <= 8)
    for i in range(int(x_max / step) + 1):
        x, v = x_of(i * step), i * step
        draw.line([(x, top - 4), (x, bottom)], fill=(225, 225, 225))
        tick = f"{v:g}x"
        draw.text((x - text_w(tick) // 2, bottom + 6), tick, fill=(90, 90, 90), font=font)

    values = []
    for i, r in enumerate(table):
        y = top + i * row_h
        draw.text((left - pad - text_w(r.label), y + 3), r.label, fill="black", font=font)
        if r.speedup is None:
            values.append((left + 4, y + 3, "n/a (no baseline)" if r.baseline is None else "n/a (missing benchmark)"))
            continue
        # Green where mmfast is at least as fast as the baseline, red where it is slower.
        colour = (46, 139, 87) if r.speedup >= 1 else (200, 60, 50)
        end = max(x_of(r.speedup), left + 1)
        draw.rectangle([left, y + 3, end, y + row_h - 4], fill=colour)
        values.append((end + 4, y + 3, _speedup(r.speedup)))

    draw.line([(left, top - 4), (left, bottom)], fill="black")
    one = x_of(1.0)
    draw.line([(one, top - 8), (one, bottom + 2)], fill="black", width=2)
    draw.text((one - text_w("1x") // 2, top - 8 - row_h + 6), "1x", fill="black", font=font)
    # Values last, on a white box: bars near 1x end right at the reference line, which would cross their digits.
    for x, y, s in values:
        draw.rectangle([x - 2, y - 1, x + text_w(s) + 2, y + row_h - 6], fill="white")
        draw.text((x, y), s, fill="black", font=font)
    img.save(path)


def main(argv: list[str]) -> int:
    """argv without the program name, as in main(sys.argv[1:])."""
    parser = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", metavar="BENCH.json")
    parser.add_argument("card", nargs="?", help="device name for files without extra_info device_name")
    parser.add_argument("--card", dest="card_option", metavar="CARD", help="same as the CARD argument")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the table to this file")
    parser.add_argument("--png", metavar="OUT.png", help="write a bar chart of the speedups")
    args = parser.parse_args(argv)
    card = args.card_option or args.card

    # gpu_check.sh calls this after every run; a missing file means the benchmark stage did not get that far.
    if not os.path.exists(args.bench):
        print(f"no benchmark results ({args.bench} missing)")
        return 0
    try:
        data = load(args.bench)
    except ReportError as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2

    text = to_markdown(data, card)
    print(text, end="")
    try:
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
        if args.png:
            to_png(data, args.png, card)
    except OSError as e:
        print(f"report.py: cannot write output ({e})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
