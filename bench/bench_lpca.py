"""Local PCA and the kNN LID estimators against scikit-dimension, side by
side in one run (issues 2 and 4):

- ops.local_pca / ops.local_pca_count / lpca(rule="fo") (kNN included) vs
  skdim.id.lPCA().fit_pw at N = 10,000, D = 64, k = 100: >= 20x faster, same
  integer LIDs for >= 99% of points (full tier; quick: N = 1,000); where the time goes (kNN, FO count,
  full spectra);
- mle_lid and twonn_lid vs skdim's MLE / TwoNN.fit_pw: >= 10x, same values;
- lpca at N = 50,000, D = 784 (MNIST-sized; full tier, skdim estimated);
- lpca at N = 100,000, D = 64 with a progress bar (full tier).

Run: .venv/bin/python -m pytest bench/bench_lpca.py -q -o addopts= --benchmark-enable --benchmark-only [--tier full]
"""
import time
import warnings

import numpy as np
import pytest
import torch
from _harness import best_time, compare, manifold_data

import mmh_fast
from mmh_fast import ops

skdim = pytest.importorskip("skdim")

D, K = 64, 100
# quick: a smaller N so that the whole quick tier fits in 3 minutes (skdim costs
# ~10-20 ms a point here); full: the N = 10,000
SIZES = {"quick": 1_000, "full": 10_000}


_ANCHORS = {}


def _anchor(name, fn, rounds=1):
    """Run a slow anchor once per session (shared by several benchmarks)."""
    if name not in _ANCHORS:
        out = {}

        def run():
            out["result"] = fn()

        _ANCHORS[name] = (best_time(run, rounds=rounds, warmup=0), out["result"])
    return _ANCHORS[name]


def _record(benchmark, anchor_name, anchor_s, target, **extra):
    ours_s = float(benchmark.stats.stats.min)
    benchmark.extra_info.update(anchor=anchor_name, anchor_s=anchor_s, ours_s=ours_s, ratio=ours_s / anchor_s,
                                speedup=anchor_s / ours_s, target=target, **extra)


def _skdim_fo(x):
    return _anchor(f"skdim lPCA FO {x.shape}",
                   lambda: skdim.id.lPCA(ver="FO").fit_pw(x, n_neighbors=K).dimension_pw_)


@pytest.mark.tier("quick", "full")
def test_lpca_fo_vs_skdim(benchmark, tier):
    N = SIZES[tier]
    x = manifold_data(N, D)
    anchor_s, theirs = _skdim_fo(x)
    ours = benchmark.pedantic(lambda: mmh_fast.lpca(x, k=K, rule="fo"), rounds=3, warmup_rounds=1, iterations=1)
    # where the time goes: the kNN search, then the FO count (gather,
    # covariance, Lanczos, LDL^T) or the full spectra (gather, covariance,
    # Householder + QR) on the same neighbourhoods
    xt = torch.from_numpy(x)
    _, nb = ops.knn(xt, k=K)
    t_knn = best_time(lambda: ops.knn(xt, k=K), rounds=2, warmup=0)
    t_count = best_time(lambda: ops.local_pca_count(xt, neighbors=nb), rounds=2, warmup=0)
    t_spec = best_time(lambda: ops.local_pca(xt, neighbors=nb), rounds=2, warmup=0)
    same = float(np.mean(ours == theirs))
    _record(benchmark, "skdim.id.lPCA(ver='FO').fit_pw", anchor_s,
            ">= 20x faster (speedup >= 20), same integer LIDs for >= 99% of points",
            N=N, D=D, k=K, same_lid_fraction=same, knn_s=t_knn, fo_count_s=t_count, spectra_s=t_spec)
    assert same >= 0.99


@pytest.mark.tier("quick", "full")
def test_local_pca_spectra_vs_skdim(benchmark, tier):
    """ops.local_pca (kNN included) then the FO rule on the spectra: the
    issue-2 benchmark of the kernel entry itself."""
    N = SIZES[tier]
    x = manifold_data(N, D)
    anchor_s, theirs = _skdim_fo(x)
    ev = benchmark.pedantic(lambda: ops.local_pca(x, K), rounds=2, warmup_rounds=1, iterations=1)
    ours = (ev > 0.05 * ev[:, :1]).sum(1)
    same = float(np.mean(ours == theirs))
    _record(benchmark, "skdim.id.lPCA(ver='FO').fit_pw", anchor_s,
            ">= 20x faster (speedup >= 20), same integer LIDs for >= 99% of points",
            N=N, D=D, k=K, same_lid_fraction=same)
    assert same >= 0.99


@pytest.mark.tier("quick", "full")
def test_mle_vs_skdim(benchmark, tier):
    N = SIZES[tier]
    x = manifold_data(N, D).astype(np.float64)
    anchor_s, theirs = _anchor(f"skdim MLE {N}", lambda: skdim.id.MLE().fit(x, n_neighbors=20).dimension_pw_)
    ours = benchmark.pedantic(lambda: mmh_fast.mle_lid(x, k=20), rounds=3, warmup_rounds=1, iterations=1)
    _record(benchmark, "skdim.id.MLE().fit(n_neighbors=20).dimension_pw_", anchor_s,
            ">= 10x faster, same values", N=N, D=D, k=20,
            max_rel_diff=float(np.max(np.abs(ours - theirs) / np.abs(theirs))))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


@pytest.mark.tier("quick", "full")
def test_twonn_vs_skdim(benchmark, tier):
    # skdim's TwoNN.fit_pw costs ~20-40 ms a point here: N is smaller than
    # the other benchmarks' so that the anchor runs in about a minute
    n = 4_000 if tier == "full" else 600
    x = manifold_data(n, D).astype(np.float64)

    def anchor():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return skdim.id.TwoNN().fit_pw(x, n_neighbors=K).dimension_pw_

    anchor_s, theirs = _anchor(f"skdim TwoNN {n}", anchor)
    ours = benchmark.pedantic(lambda: mmh_fast.twonn_lid(x, k=K), rounds=3, warmup_rounds=1, iterations=1)
    _record(benchmark, "skdim.id.TwoNN().fit_pw(n_neighbors=100)", anchor_s, ">= 10x faster, same values",
            N=n, D=D, k=K, max_rel_diff=float(np.nanmax(np.abs(ours - theirs) / np.abs(theirs))))
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)


def mnist_like(n, seed=0):
    """[n, 28, 28] float32 images on a 12-dimensional nonlinear manifold:
    smooth random features of a latent z (tanh of random projections), plus
    a little pixel noise. No download needed."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, size=(n, 12)).astype(np.float32)
    w1 = rng.normal(size=(12, 64)).astype(np.float32)
    w2 = rng.normal(size=(64, 784)).astype(np.float32) / 8
    x = np.tanh(np.tanh(z @ w1) @ w2) + 0.01 * rng.normal(size=(n, 784)).astype(np.float32)
    return x.reshape(n, 28, 28)


@pytest.mark.tier("full")
def test_lpca_mnist_sized(benchmark):
    """N = 50,000, D = 784: our time; skdim's is estimated from its kNN on
    the full set (timed) plus its per-point PCA cost on 500 points (timed),
    since the full run would take a large part of an hour on this machine."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    n = 50_000
    x = mnist_like(n)
    compare(benchmark, lambda: mmh_fast.lpca(x, k=K, progress=False), None, anchor_name="skdim (estimated)",
            rounds=1, warmup=0, N=n, D=784, k=K)
    flat = x.reshape(n, -1)
    t0 = time.perf_counter()
    nbrs = NearestNeighbors(n_neighbors=K).fit(flat).kneighbors()[1]
    t_knn = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in nbrs[:500]:
        skdim.id.lPCA(ver="FO").fit(flat[i])
    per_point = (time.perf_counter() - t0) / 500
    est = t_knn + per_point * n
    ours_s = float(benchmark.stats.stats.min)
    benchmark.extra_info.update(anchor_s=est, ratio=ours_s / est, speedup=est / ours_s,
                                skdim_knn_s=t_knn, skdim_pca_per_point_s=per_point,
                                target="report both times (skdim estimated from timed parts)")


@pytest.mark.tier("full")
def test_lpca_100k_with_progress(benchmark):
    """N = 100,000, D = 64, k = 100 finishes on this CPU, with a tqdm bar."""
    x = manifold_data(100_000, D)
    compare(benchmark, lambda: mmh_fast.lpca(x, k=K, progress=True), None, anchor_name="none",
            rounds=1, warmup=0, N=100_000, D=D, k=K, target="finishes, with a progress bar")
