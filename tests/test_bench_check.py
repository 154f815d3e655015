"""The benchmark regression checker: a planted 2x slowdown fails, noise within
tolerance passes, both on synthetic ratios and on a real pytest-benchmark run."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_check", os.path.join(ROOT, "bench", "check.py"))
check = importlib.util.module_from_spec(spec)
sys.modules["bench_check"] = check  # dataclasses look their module up
spec.loader.exec_module(check)


def _results(path, ratios):
    doc = {"machine_info": {"node": "test"}, "datetime": "now",
           "benchmarks": [{"name": n, "fullname": n, "extra_info": {"ratio": r}, "stats": {"min": r}}
                          for n, r in ratios.items()]}
    path.write_text(json.dumps(doc))
    return str(path)


def test_compare_ratios_statuses():
    rows = {r.name: r.status for r in check.compare_ratios(
        {"a": 1.0, "b": 0.5, "c": 2.0, "gone": 1.0}, {"a": 2.0, "b": 0.55, "c": 1.0, "new": 3.0}, 0.25)}
    assert rows == {"a": "regressed", "b": "ok", "c": "improved", "gone": "missing", "new": "new"}
    with pytest.raises(ValueError, match="tolerance"):
        check.compare_ratios({}, {}, -1)


def test_main_fails_on_planted_slowdown_and_passes_noise(tmp_path, capsys):
    base = str(tmp_path / "base.json")
    assert check.main([_results(tmp_path / "r0.json", {"x": 0.4, "y": 1.2}), "--baseline", base,
                       "--save-baseline"]) == 0
    assert check.main([_results(tmp_path / "r1.json", {"x": 0.44, "y": 1.1}), "--baseline", base]) == 0
    assert check.main([_results(tmp_path / "r2.json", {"x": 0.8, "y": 1.2}), "--baseline", base]) == 1
    assert check.main([_results(tmp_path / "r2.json", {"x": 0.8, "y": 1.2}), "--baseline", base,
                       "--no-fail"]) == 0
    assert check.main([str(tmp_path / "missing.json"), "--baseline", base]) == 2
    assert "regressed" in capsys.readouterr().out


def test_real_benchmark_run_detects_planted_slowdown(tmp_path):
    bench_file = tmp_path / "bench_selftest.py"
    bench_file.write_text(textwrap.dedent("""
        import os, time
        from _harness import compare

        def test_sleep(benchmark):
            factor = float(os.environ.get("PLANTED_SLOWDOWN", "1"))
            compare(benchmark, lambda: time.sleep(0.02 * factor), lambda: time.sleep(0.02),
                    anchor_name="sleep", rounds=3, warmup=0)
    """))

    def run(factor, out):
        env = dict(os.environ, PLANTED_SLOWDOWN=str(factor),
                   PYTHONPATH=os.path.join(ROOT, "bench") + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(bench_file),
                        "--benchmark-enable", f"--benchmark-json={out}", "-o", "addopts=", "--rootdir", str(tmp_path)],
                       check=True, env=env, cwd=tmp_path, capture_output=True)
        return str(out)

    base = str(tmp_path / "baseline.json")
    assert check.main([run(1, tmp_path / "a.json"), "--baseline", base, "--save-baseline"]) == 0
    assert check.main([run(1, tmp_path / "b.json"), "--baseline", base]) == 0
    assert check.main([run(2, tmp_path / "c.json"), "--baseline", base]) == 1
