"""Print the mmfast / native pairs of a pytest-benchmark JSON as a table (median times, same run, one card).

Usage: python3 benchmarks/report.py bench.json [card]
Groups are named "<op> <kind> <device> <shape>" and hold one benchmark with extra_info impl "mmfast" and one with
impl "native".
"""
import json
import os
import sys


def rows(data):
    groups = {}
    for bench in data.get("benchmarks", []):
        impl = bench.get("extra_info", {}).get("impl", "?")
        groups.setdefault(bench.get("group") or bench["name"], {})[impl] = bench["stats"]["median"] * 1e6
    for group, times in sorted(groups.items()):
        words = group.split(" ")
        cut = next((i for i, w in enumerate(words) if w in ("cuda", "cpu")), len(words))
        native, fused = times.get("native"), times.get("mmfast")
        speedup = f"{native / fused:.2f}x" if native and fused else "-"
        yield (" ".join(words[:cut]), " ".join(words[cut + 1:]), _us(native), _us(fused), speedup)


def _us(t):
    return "-" if t is None else f"{t:.1f}"


def main(argv):
    path, card = argv[1], argv[2] if len(argv) > 2 else "?"
    if not os.path.exists(path):
        print(f"no benchmark results ({path} missing)")
        return 0
    with open(path) as f:
        table = [("op", "shape", "native us", "mmfast us", "speedup", "card")]
        table += [(*row, card) for row in rows(json.load(f))]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print(f"== benchmarks (median, same run, {card})")
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
