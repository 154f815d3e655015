"""ops.knn against faiss-cpu IndexFlatL2 and scikit-learn's brute-force
NearestNeighbors at N = 20,000 (full tier; quick: 10,000), D = 64, k = 100, float32 (issue 2: within
1.5x of faiss-cpu), and its peak memory at N = 200,000 (under 2 GiB).

Run: .venv/bin/python -m pytest bench/bench_knn.py -q -o addopts= --benchmark-enable --benchmark-only [--tier full]
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _harness import compare

from mmh_fast import ops

D, K = 64, 100
SIZES = {"quick": 10_000, "full": 20_000}  # quick: a quarter of the work, to fit the 3-minute tier


def _data(n, d, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.tier("quick", "full")
def test_knn_vs_faiss(benchmark, tier):
    faiss = pytest.importorskip("faiss")
    N = SIZES[tier]
    x = _data(N, D)
    index = faiss.IndexFlatL2(D)
    index.add(x)
    got = {}

    def anchor():  # k + 1: faiss returns the point itself first
        got["faiss"] = index.search(x, K + 1)

    dist, idx = compare(benchmark, lambda: ops.knn(x, k=K), anchor, anchor_name="faiss IndexFlatL2",
                        rounds=3 if tier == "full" else 2, warmup=1, target="within 1.5x of faiss-cpu (ratio <= 1.5)",
                        N=N, D=D, k=K, dtype="float32")
    fi = got["faiss"][1][:, 1:]
    benchmark.extra_info["same_neighbours_as_faiss"] = float((fi == idx).mean())
    assert (fi == idx).mean() > 0.999


@pytest.mark.tier("quick", "full")
def test_knn_vs_sklearn_brute(benchmark, tier):
    from sklearn.neighbors import NearestNeighbors

    N = SIZES[tier]
    x = _data(N, D)
    nn = NearestNeighbors(n_neighbors=K, algorithm="brute").fit(x)
    got = {}

    def anchor():
        got["sk"] = nn.kneighbors()

    dist, idx = compare(benchmark, lambda: ops.knn(x, k=K), anchor,
                        anchor_name="sklearn NearestNeighbors(algorithm='brute')",
                        rounds=3 if tier == "full" else 2, warmup=1,
                        target="faster than scikit-learn brute force", N=N, D=D, k=K, dtype="float32")
    benchmark.extra_info["same_neighbours_as_sklearn"] = float((got["sk"][1] == idx).mean())


_MEMORY_SCRIPT = r"""
import json, sys, time
import numpy as np, torch
from mmh_fast import ops

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0  # MiB

n, d, k = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
x = torch.from_numpy(np.random.default_rng(0).normal(size=(n, d)).astype(np.float32))
ops.knn(x[:2000], k=10)  # load the extension and warm the thread pool
try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
t = time.perf_counter()
dist, idx = ops.knn(x, k=k, progress=False)
sec = time.perf_counter() - t
peak = status("VmHWM")
out = (dist.numel() * dist.element_size() + idx.numel() * idx.element_size()) / 2**20
print(json.dumps({"delta_mib": peak - before, "outputs_mib": out, "seconds": sec,
                  "data_mib": x.numel() * 4 / 2**20}))
"""


@pytest.mark.tier("quick", "full")
def test_knn_peak_memory(benchmark, tier):
    """Peak RSS growth of one ops.knn call in a fresh process (VmHWM after
    resetting it, minus VmRSS before the call): the outputs ([N, k] float32
    + int64) plus a bounded working set, never N x N."""
    n = 200_000 if tier == "full" else 20_000
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + \
        env.get("PYTHONPATH", "")
    res = {}

    def run():
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n), str(D), str(K)], env=env,
                             check=True, capture_output=True, text=True)
        res.update(json.loads(out.stdout.strip().splitlines()[-1]))

    compare(benchmark, run, None, anchor_name="none (memory bound)", rounds=1, warmup=0,
            target="peak memory < 2 GiB at N = 200,000, D = 64", N=n, D=D, k=K)
    benchmark.extra_info.update(peak_rss_delta_mib=res["delta_mib"], outputs_mib=res["outputs_mib"],
                                knn_seconds=res["seconds"], dense_matrix_would_be_mib=n * n * 4 / 2**20)
    assert res["delta_mib"] < 2048
