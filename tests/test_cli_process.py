"""`mmh-fast` as separate processes: kill -9 and Ctrl-C mid-scan then resume,
torchrun with 2 gloo processes against 1 process, exit codes and --help."""
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from mmh_fast.cli import main
from mmh_fast.cli.writer import part_files, table_metadata

from cli_data import PLUGIN, make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _rows_in_parts(out):
    return sum(pq.read_metadata(p).num_rows for _, _, p in part_files(str(out)))


def _wait_for_parts(out, n, proc, timeout=90):
    t = time.monotonic()
    while len(part_files(str(out))) < n:
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() - t < timeout, "scan made no progress"
        time.sleep(0.02)


def test_kill9_and_ctrl_c_then_resume_gives_every_key_once(tmp_path):
    good = make_folder(tmp_path / "imgs", n=24)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmh_fast", "scan", "--data", str(tmp_path / "imgs"), "--out", str(out),
           "--metrics", "slow_px", "--plugin", PLUGIN, "--batch-size", "2", "--unit-size", "4", "--part-rows", "3",
           "--workers", "1", "--option", "sleep=0.1"]
    # 1. kill -9 while the scan is in the middle of its units
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_parts(out, 3, p)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    after_kill = _rows_in_parts(out)
    assert 0 < after_kill < 24 and not (out / "results.parquet").exists()
    assert not list(out.glob("part-*.tmp*"))  # no half-written part under a final name
    # 2. restart, then Ctrl-C: stops cleanly after the current batch, exit code 1
    p = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_parts(out, len(part_files(str(out))) + 2, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    err = err.decode()
    assert p.returncode == 1, err
    assert "resuming" in err and "interrupted" in err and "Traceback" not in err
    after_int = _rows_in_parts(out)
    assert after_kill < after_int and not (out / "results.parquet").exists()
    # 3. the same command once more finishes the job
    r = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = pq.read_table(out / "results.parquet").to_pylist()
    keys = [x["key"] for x in rows]
    assert keys == sorted(good) and len(set(keys)) == 24  # every key exactly once, in source order
    for x in rows:
        assert x["error"] is None and x["slow_px"] == pytest.approx(good[x["key"]].mean(), abs=1e-9)
    scanned_last = int(r.stderr.split("scanned ")[1].split(" ")[0])
    assert scanned_last <= 24 - after_int  # finished work was not redone


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=11, corrupt=(5,))
    args = ["scan", "--model", "toy-ddpm", "--data", str(tmp_path / "imgs"), "--metrics", "mean_px,flipd",
            "--plugin", PLUGIN, "--batch-size", "2", "--unit-size", "2", "--workers", "1", "--device", "cpu"]
    r = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "mmh_fast", *args, "--out",
                        str(tmp_path / "two")], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes (OMP_NUM_THREADS=1): same summation order
    try:
        assert main(args + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    one = pq.read_table(tmp_path / "one" / "results.parquet").to_pylist()
    two = pq.read_table(tmp_path / "two" / "results.parquet").to_pylist()
    assert len(one) == 11 and one == two  # row for row, value for value
    # each rank wrote its own, disjoint units: unit u by rank u % 2
    ranks = {u: table_metadata(p)["part"]["rank"] for u, _, p in part_files(str(tmp_path / "two"))}
    assert ranks == {u: u % 2 for u in range(6)}


def test_exit_codes_and_readable_errors(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=2)
    os.makedirs(tmp_path / "empty")
    os.makedirs(tmp_path / "notapipe")
    base = ["scan", "--out", str(tmp_path / "o"), "--plugin", PLUGIN]
    cases = [
        (base + ["--data", str(tmp_path / "imgs"), "--model", str(tmp_path / "missing"), "--metrics", "eps_norm"],
         "is neither a directory holding a diffusers pipeline"),
        (base + ["--data", str(tmp_path / "imgs"), "--model", str(tmp_path / "notapipe"), "--metrics", "eps_norm"],
         "has no model_index.json"),
        (base + ["--data", str(tmp_path / "empty"), "--metrics", "mean_px"], "holds no images"),
        (base + ["--data", str(tmp_path / "imgs"), "--metrics", "mean_px,nope"], "unknown metric 'nope'"),
        (base + ["--data", str(tmp_path / "imgs"), "--metrics", "eps_norm"], "need a model: pass --model"),
        (base + ["--data", str(tmp_path / "imgs"), "--metrics", "mean_px", "--t0", "2"], "--t0 must be in (0, 1]"),
        (base + ["--data", str(tmp_path / "imgs"), "--metrics", "mean_px", "--option", "x"], "NAME=VALUE"),
        (base + ["--data", str(tmp_path / "imgs"), "--metrics", "mean_px", "--option", "sleep=1"],
         "not an option of the selected metrics"),
        (base + ["--data", str(tmp_path / "imgs"), "--metrics", "flipd_cond", "--model", "toy-ddpm"],
         "need a text-conditioned model"),
        (["report", str(tmp_path / "nothing.parquet"), "--out", str(tmp_path / "r")], "does not exist"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    for argv in (["scan", "--data", "x"], ["scan", "--out", "o", "--data", "x", "--batch-size", "0"], ["bogus"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    # a bad value is one line, without the usage block; a missing argument keeps the usage
    with pytest.raises(SystemExit):
        main(["scan", "--out", "o", "--data", "x", "--batch-size", "0"])
    assert capsys.readouterr().err == "mmh-fast scan: error: argument --batch-size: expected an integer >= 1, got 0\n"
    with pytest.raises(SystemExit):
        main(["scan", "--data", "x"])
    assert "usage: mmh-fast scan" in capsys.readouterr().err
    for opt in ("--threads", "--max-detection", "--max-mitigation"):  # the lab's counts, checked by the parser
        with pytest.raises(SystemExit) as e:
            main(["lab", "--out", str(tmp_path / "lab"), opt, "0"])
        assert e.value.code == 2
        assert capsys.readouterr().err == f"mmh-fast lab: error: argument {opt}: expected an integer >= 1, got 0\n"
    assert not os.path.exists(tmp_path / "lab")
    for cmd in ("scan", "merge", "lid-data", "classify", "report", "metrics", "demo", "train", "lab"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "usage: mmh-fast " + cmd in capsys.readouterr().out


def test_python_dash_m_is_the_same_command(capsys):
    argv = ["merge", "/nonexistent-dir"]
    r = subprocess.run([sys.executable, "-m", "mmh_fast", *argv], env=ENV, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert main(argv) == r.returncode == 2
    assert r.stderr == capsys.readouterr().err == "mmh-fast merge: error: '/nonexistent-dir' is not a directory\n"
