"""The native kernels not covered elsewhere, each against the plain-PyTorch
code a user would write for the same quantity (issue 8: every native kernel
beside its anchor, fixed seeded inputs, ratio in extra_info).

- ``ops.hutchinson_probes`` (Rademacher, Gaussian) vs ``torch.randint`` /
  ``torch.randn`` of the same size. The anchor is not keyed per sample (its
  probes change with the batch), so it is the floor of what a generator costs,
  not an equivalent.
- ``ops.hutchinson_trace`` vs a plain loop (host probes, matvec, ``(v * Av)``
  sums, mean and standard error in torch) on a batch of dense symmetric
  operators applied by ``torch.bmm``; both estimate the same known trace.
- ``ops.local_pca`` and ``ops.local_pca_count`` on given neighbourhoods (kNN
  excluded; bench_lpca.py times them with the kNN against scikit-dimension)
  vs chunked gather + centred covariance by ``torch.bmm`` + float64
  ``torch.linalg.eigvalsh``: same spectra / same FO counts.
- ``ops.twonn_ratios`` on given neighbourhoods vs chunked ``torch.cdist`` +
  ``torch.topk`` inside each neighbourhood: the same ratios.

``ops.knn`` and ``ops.svd_rank`` are in bench_knn.py and bench_svd_rank.py.

Run: .venv/bin/python -m pytest bench/bench_kernels.py -q -o addopts= --benchmark-enable --benchmark-only [--tier full]
"""
import math

import pytest
import torch
from _harness import compare, manifold_data

from mmh_fast import ops

# quick / full sizes
PROBE_SHAPE = {"quick": (64, 4, 32, 32), "full": (256, 4, 64, 64)}
TRACE_SIZE = {"quick": (32, 256), "full": (64, 2048)}  # (B, d)
NEIGHBOURHOODS = {"quick": 1_000, "full": 10_000}  # M, with K = 100, D = 64
K, D = 100, 64


@pytest.mark.tier("quick", "full")
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_probes_vs_torch(benchmark, tier, probe):
    shape, n_probes = PROBE_SHAPE[tier], 4
    g = torch.Generator().manual_seed(0)
    if probe == "rademacher":
        def anchor():
            return torch.randint(0, 2, (n_probes,) + shape, generator=g).float().mul_(2).sub_(1)
    else:
        def anchor():
            return torch.randn((n_probes,) + shape, generator=g)

    v = compare(benchmark, lambda: ops.hutchinson_probes(shape, n_probes, probe=probe, seed=0), anchor,
                anchor_name=f"torch.{'randint' if probe == 'rademacher' else 'randn'} (not keyed per sample)",
                rounds=5, warmup=1, target="report (keyed probes vs an unkeyed generator)",
                shape=[n_probes, *shape], probe=probe, numbers=n_probes * math.prod(shape))
    # the values are what they claim to be: +-1, or standard normal moments
    if probe == "rademacher":
        assert bool(((v == 1) | (v == -1)).all())
    else:
        assert abs(float(v.mean())) < 0.01 and abs(float(v.var()) - 1) < 0.01


def _spd_batch(B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(B, d, d, generator=g) / math.sqrt(d)
    return m @ m.transpose(1, 2) + torch.eye(d)  # symmetric positive definite, trace ~ 2d


def plain_hutchinson(matvec, shape, n_probes, seed=0):
    """The anchor: probes drawn on the host per probe, one matvec each, the
    per-sample dot products, mean and standard error in torch."""
    g = torch.Generator().manual_seed(seed)
    dots = []
    for _ in range(n_probes):
        v = torch.randint(0, 2, shape, generator=g).float().mul_(2).sub_(1)
        dots.append((v * matvec(v)).flatten(1).sum(1).double())
    dots = torch.stack(dots)
    return dots.mean(0), dots.std(0) / math.sqrt(n_probes)


@pytest.mark.tier("quick", "full")
def test_hutchinson_trace_vs_plain_loop(benchmark, tier):
    B, d = TRACE_SIZE[tier]
    n_probes = 16
    A = _spd_batch(B, d)
    truth = A.diagonal(dim1=1, dim2=2).sum(1).double()

    def matvec(v):
        return torch.bmm(A, v.unsqueeze(2)).squeeze(2)

    x = torch.zeros(B, d)
    est, se = compare(benchmark, lambda: ops.hutchinson_trace(matvec, x, n_probes, return_stderr=True),
                      lambda: plain_hutchinson(matvec, (B, d), n_probes),
                      anchor_name="plain loop: torch.randint probes, matvec, torch mean / std", rounds=5, warmup=1,
                      target="report (the matvec dominates; overhead only)", batch=B, d=d, n_probes=n_probes)
    z = ((est.double() - truth) / se.double()).abs()
    benchmark.extra_info["max_abs_z_vs_true_trace"] = float(z.max())
    assert float(z.max()) < 6.0  # B samples, each within a few standard errors of the exact trace


@pytest.fixture(scope="module")
def neighbourhoods(tier):
    m = NEIGHBOURHOODS[tier]
    x = torch.from_numpy(manifold_data(m, D))
    _, nb = ops.knn(x, k=K)
    return x, nb


def torch_spectra(x, nb, chunk=1000):
    """The anchor: explained variances (descending, float64) per neighbourhood
    by gather, centring, covariance by bmm and batched eigvalsh, in chunks."""
    out = []
    for s in range(0, nb.shape[0], chunk):
        y = x[nb[s:s + chunk]].double()
        y = y - y.mean(1, keepdim=True)
        cov = y.transpose(1, 2) @ y / (nb.shape[1] - 1)
        out.append(torch.linalg.eigvalsh(cov).flip(1).clamp_min(0))
    return torch.cat(out)


@pytest.mark.tier("quick", "full")
def test_local_pca_kernel_vs_torch_eigvalsh(benchmark, neighbourhoods):
    x, nb = neighbourhoods
    got = {}

    def anchor():
        got["ev"] = torch_spectra(x, nb)

    ev = compare(benchmark, lambda: ops.local_pca(x, neighbors=nb), anchor,
                 anchor_name="chunked gather + bmm covariance + torch.linalg.eigvalsh (float64)", rounds=3,
                 warmup=1, target="faster than plain PyTorch (ratio < 1)", M=nb.shape[0], K=K, D=D)
    ref = got["ev"][:, :ev.shape[1]]
    top = ref[:, :1]
    err = float(((ev.double() - ref).abs() / top).max())
    benchmark.extra_info["max_err_relative_to_largest"] = err
    assert err < 1e-4


@pytest.mark.tier("quick", "full")
def test_local_pca_count_kernel_vs_torch_eigvalsh(benchmark, neighbourhoods):
    x, nb = neighbourhoods
    got = {}

    def anchor():
        ev = torch_spectra(x, nb)
        got["counts"] = (ev > 0.05 * ev[:, :1]).sum(1)

    counts = compare(benchmark, lambda: ops.local_pca_count(x, neighbors=nb, alpha=0.05), anchor,
                     anchor_name="torch.linalg.eigvalsh spectra (float64) + FO count", rounds=3, warmup=1,
                     target="faster than plain PyTorch (ratio < 1), same counts", M=nb.shape[0], K=K, D=D)
    same = float((counts == got["counts"]).double().mean())
    benchmark.extra_info["same_count_fraction"] = same
    assert same >= 0.99


def torch_twonn_ratios(x, nb, chunk=500):
    """The anchor: r2 / r1 inside each neighbourhood by cdist + topk (float64)."""
    out = []
    for s in range(0, nb.shape[0], chunk):
        y = x[nb[s:s + chunk]].double()
        d = torch.cdist(y, y)
        d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        r = d.topk(2, dim=2, largest=False).values
        out.append(r[..., 1] / r[..., 0])
    return torch.cat(out)


@pytest.mark.tier("quick", "full")
def test_twonn_ratios_kernel_vs_torch_cdist(benchmark, neighbourhoods):
    x, nb = neighbourhoods
    got = {}

    def anchor():
        got["mu"] = torch_twonn_ratios(x, nb)

    mu = compare(benchmark, lambda: ops.twonn_ratios(x, nb), anchor,
                 anchor_name="chunked torch.cdist + torch.topk (float64)", rounds=3, warmup=1,
                 target="faster than plain PyTorch (ratio < 1), same ratios", M=nb.shape[0], K=K, D=D)
    rel = float(((mu - got["mu"]).abs() / got["mu"]).max())
    benchmark.extra_info["max_rel_diff"] = rel
    assert rel < 1e-6
