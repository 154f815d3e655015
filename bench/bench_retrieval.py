"""calibrated_l2 (Carlini et al.'s calibrated l2, n = 50, alpha = 0.5) against
scikit-learn's brute-force NearestNeighbors(n_neighbors=50) + numpy, the way
the field computes it. Issue 6 target: at least 3x faster for 10,000
generated vs 50,000 training vectors of D = 3072 on CPU, memory bounded.

    pytest bench/bench_retrieval.py -o addopts= --benchmark-enable --benchmark-only --tier quick
"""
import numpy as np
import pytest
from _harness import compare, peak_rss_delta_mib

from mmh_fast.retrieval import calibrated_l2

SIZES = {"quick": (500, 10000, 3072), "full": (10000, 50000, 3072)}
N_NEIGHBORS, ALPHA = 50, 0.5


def _data(m, n, d):
    rng = np.random.default_rng(0)
    train = rng.random((n, d), dtype=np.float32)
    gen = rng.random((m, d), dtype=np.float32)
    gen[: m // 100] = train[: m // 100] + 0.01 * rng.standard_normal((m // 100, d)).astype(np.float32)
    return gen, train


def _sklearn(gen, train):
    from sklearn.neighbors import NearestNeighbors

    d, _ = NearestNeighbors(n_neighbors=N_NEIGHBORS, algorithm="brute").fit(train).kneighbors(gen)
    return d[:, 0] / (ALPHA * d.mean(1))


@pytest.mark.tier("quick", "full")
@pytest.mark.parametrize("precision", ["auto", "full"])
def test_calibrated_l2_cpu(benchmark, tier, precision):
    """precision="auto" screens candidates with a bf16 GEMM where the CPU has
    bf16 instructions (the default); "full" with a float32 GEMM. Both return
    the exact scores."""
    from mmh_fast.ops.knn import cpu_has_native_bf16

    m, n, d = SIZES[tier]
    gen, train = _data(m, n, d)
    run = lambda: calibrated_l2(gen, train, n=N_NEIGHBORS, alpha=ALPHA, precision=precision)  # noqa: E731
    rss = peak_rss_delta_mib(run)
    rounds, warmup = (2, 1) if tier == "quick" else (1, 0)
    ours = compare(benchmark, run,
                   lambda: _sklearn(gen, train), anchor_name="sklearn NearestNeighbors(brute, 50) + numpy",
                   rounds=rounds, warmup=warmup, target="speedup >= 3 (issue 6)",
                   size=f"{m} x {n} x {d} float32", peak_rss_growth_mib=rss,
                   screen="bf16" if precision == "auto" and cpu_has_native_bf16() else "float32",
                   input_mib=(gen.nbytes + train.nbytes) / 2**20)
    np.testing.assert_allclose(ours[:200], _sklearn(gen[:200], train), rtol=1e-4)  # the same numbers
