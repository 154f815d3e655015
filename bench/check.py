#!/usr/bin/env python
"""Regression check of benchmark ratios against a committed baseline.

Absolute times on shared machines drift; the ratio of our time to an anchor
measured in the same run (``extra_info["ratio"]``, lower is better) does not,
to first order. This script compares those ratios with a baseline file and
fails when one worsens by more than ``--tolerance`` (default 25%).

    python bench/check.py .benchmarks/latest.json --baseline bench/baselines/cpu-quick.json
    python bench/check.py .benchmarks/latest.json --baseline ... --save-baseline   # refresh deliberately

Exit status: 0 all within tolerance (or --no-fail), 1 a regression, 2 bad input.
Absolute times are kept in the baseline for information only.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from dataclasses import dataclass

__all__ = ["load_ratios", "compare_ratios", "save_baseline", "main", "Row"]


@dataclass
class Row:
    name: str
    baseline: float | None
    current: float | None
    status: str  # "ok", "regressed", "improved", "new", "missing"

    @property
    def change(self) -> float | None:
        if self.baseline and self.current is not None:
            return self.current / self.baseline - 1.0
        return None


def load_ratios(results_path: str) -> tuple[dict, dict, dict]:
    """(ratios, times, info) from a pytest-benchmark JSON file, keyed by the
    benchmark's fullname; only benchmarks that recorded a ratio count."""
    with open(results_path) as f:
        data = json.load(f)
    if "benchmarks" not in data:
        raise ValueError(f"{results_path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    ratios, times = {}, {}
    for b in data["benchmarks"]:
        ratio = (b.get("extra_info") or {}).get("ratio")
        name = b.get("fullname") or b["name"]
        times[name] = b.get("stats", {}).get("min")
        if ratio is not None:
            ratios[name] = float(ratio)
    info = {"machine": data.get("machine_info", {}).get("node", platform.node()),
            "cpu": data.get("machine_info", {}).get("cpu", {}).get("brand_raw", platform.processor()),
            "datetime": data.get("datetime")}
    return ratios, times, info


def compare_ratios(baseline: dict, current: dict, tolerance: float = 0.25) -> list[Row]:
    """Rows per benchmark: regressed when current > baseline * (1 + tolerance)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    rows = []
    for name in sorted(set(baseline) | set(current)):
        b, c = baseline.get(name), current.get(name)
        if b is None:
            status = "new"
        elif c is None:
            status = "missing"
        elif c > b * (1 + tolerance):
            status = "regressed"
        elif c < b / (1 + tolerance):
            status = "improved"
        else:
            status = "ok"
        rows.append(Row(name, b, c, status))
    return rows


def save_baseline(path: str, ratios: dict, times: dict, info: dict, tier: str | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "tier": tier,
           "machine": info, "ratios": ratios, "times_s": {k: times.get(k) for k in ratios}}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _fmt(v):
    return "-" if v is None else f"{v:.3g}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--baseline", default="bench/baselines/cpu-quick.json")
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed relative worsening (default 0.25)")
    p.add_argument("--save-baseline", action="store_true", help="write the current ratios as the baseline")
    p.add_argument("--tier", default=None, help="tier name recorded with a saved baseline")
    p.add_argument("--no-fail", action="store_true", help="report only (CI smoke runs)")
    args = p.parse_args(argv)
    try:
        ratios, times, info = load_ratios(args.results)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        print(f"check: error: {exc}", file=sys.stderr)
        return 2
    if args.save_baseline:
        save_baseline(args.baseline, ratios, times, info, args.tier)
        print(f"baseline written: {args.baseline} ({len(ratios)} ratios)")
        return 0
    if not os.path.exists(args.baseline):
        print(f"check: error: no baseline {args.baseline}; create one with --save-baseline", file=sys.stderr)
        return 2
    with open(args.baseline) as f:
        base = json.load(f).get("ratios", {})
    rows = compare_ratios(base, ratios, args.tolerance)
    width = max([len(r.name) for r in rows] + [9])
    print(f"{'benchmark':<{width}}  {'baseline':>9}  {'current':>9}  {'change':>8}  status")
    for r in rows:
        ch = "-" if r.change is None else f"{100 * r.change:+.0f}%"
        print(f"{r.name:<{width}}  {_fmt(r.baseline):>9}  {_fmt(r.current):>9}  {ch:>8}  {r.status}")
    bad = [r for r in rows if r.status == "regressed"]
    if bad:
        print(f"{len(bad)} benchmark ratio(s) worsened by more than {100 * args.tolerance:.0f}%", file=sys.stderr)
        return 0 if args.no_fail else 1
    print("all ratios within tolerance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
