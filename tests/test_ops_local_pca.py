"""mmh_fast.ops.local_pca / local_pca_count: native kernels against the
plain-PyTorch reference and scikit-learn's PCA on scikit-dimension's
neighbourhoods; the FO count (Lanczos + Bunch-Kaufman inertia) against the
spectrum; bad input."""
import numpy as np
import pytest
import torch

from mmh_fast import ops
from mmh_fast.ops import reference as ref


def _manifold_points(n, d, D, seed=0, noise=0.0, dtype=torch.float64):
    """n points on a curved d-dimensional surface in R^D (a d-sphere
    embedded by a random rotation), plus isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    rot, _ = torch.linalg.qr(torch.randn(D, d + 1, generator=g, dtype=torch.float64))
    x = z @ rot.T + noise * torch.randn(n, D, generator=g, dtype=torch.float64)
    return x.to(dtype)


def _tol(dtype, scale):
    return dict(rtol=0, atol=(1e-4 if dtype == torch.float32 else 1e-10) * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,D,k", [(400, 6, 30), (300, 40, 12), (200, 20, 20)])
def test_spectra_match_reference(device, dtype, n, D, k):
    # k > D: covariance path; k < D: Gram path; k == D
    x = _manifold_points(n, 4, D, seed=n + D, noise=0.01, dtype=dtype)
    _, nb = ops.knn(x, k=k)
    got = ops.local_pca(x.to(device), k)
    want = ref.local_pca(x, nb)
    assert got.shape == (n, min(k, D)) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, **_tol(dtype, float(want.max())))
    assert bool((got[:, 1:] <= got[:, :-1]).all()) and bool((got >= 0).all())


def test_matches_sklearn_pca_on_skdim_neighbourhoods():
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    for D, k in [(8, 25), (30, 10)]:
        x = rng.normal(size=(80, D)) * np.linspace(1, 3, D)
        nbrs = NearestNeighbors(n_neighbors=k).fit(x).kneighbors()[1]  # as skdim's fit_pw
        want = np.stack([PCA().fit(x[i]).explained_variance_ for i in nbrs])
        got = ops.local_pca(x, k)
        assert isinstance(got, np.ndarray) and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12 * want.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sizes_restrict_to_leading_neighbours(device, dtype):
    x = _manifold_points(120, 3, 10, seed=2, noise=0.05, dtype=dtype)
    _, nb = ops.knn(x, k=15)
    sizes = torch.randint(0, 16, (120,), generator=torch.Generator().manual_seed(0))
    got = ops.local_pca(x.to(device), neighbors=nb.to(device), sizes=sizes.to(device))
    want = ref.local_pca(x, nb, sizes)
    torch.testing.assert_close(got.cpu(), want, **_tol(dtype, float(want.max())))
    assert bool((got[sizes < 2] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d,D,k", [(2, 8, 40), (5, 12, 60), (3, 40, 20), (6, 7, 30)])
def test_fo_count_equals_spectrum_count(device, dtype, d, D, k):
    # curved manifolds (close top eigenvalues, the hard case for lambda_max),
    # noiseless (rank-deficient, zero eigenvalues) and full-rank
    x = _manifold_points(300, d, D, seed=d * D, noise=0.002, dtype=dtype)
    _, nb = ops.knn(x, k=k)
    spectra = ref.local_pca(x.to(torch.float64), nb)
    for alpha in (0.01, 0.05, 0.3):
        got, top = ops.local_pca_count(x.to(device), neighbors=nb.to(device), alpha=alpha,
                                       return_largest=True)
        want = (spectra > alpha * spectra[:, :1]).sum(1)
        # exact but for eigenvalues within rounding of the threshold
        near = ((spectra - alpha * spectra[:, :1]).abs() <= 1e-5 * spectra[:, :1]).any(1)
        assert torch.equal(got.cpu()[~near], want[~near])
        torch.testing.assert_close(top.cpu().to(torch.float64), spectra[:, 0], rtol=1e-5, atol=0)


def test_fo_count_on_exact_copies_and_flat_directions():
    x = _manifold_points(60, 2, 6, seed=5)
    x = torch.cat([x, x[:1].repeat(12, 1)])  # a point with 12 exact copies
    _, nb = ops.knn(x, k=10)
    counts = ops.local_pca_count(x, neighbors=nb)
    spectra = ops.local_pca(x, neighbors=nb)
    copies = torch.cat([torch.tensor([0]), torch.arange(60, 72)])
    assert bool((spectra[copies] == 0).all())  # a neighbourhood of copies has no variance at all
    assert bool((counts[copies] == 0).all())
    assert torch.equal(counts, (spectra > 0.05 * spectra[:, :1]).sum(1))
    others = counts[1:60]
    assert float((others >= 2).float().mean()) > 0.9 and bool((others <= 3).all())


def test_fo_count_default_search_and_queries(device):
    x = _manifold_points(500, 3, 9, seed=6, noise=0.01).to(device)
    q = _manifold_points(40, 3, 9, seed=7, noise=0.01).to(device)
    _, nb = ops.knn(x, q, 25)
    assert torch.equal(ops.local_pca_count(x, 25, queries=q), ops.local_pca_count(x, neighbors=nb))
    torch.testing.assert_close(ops.local_pca(x, 25, queries=q), ops.local_pca(x, neighbors=nb))
    part = ops.local_pca_count(x, 25, rows=slice(100, 160))
    assert torch.equal(part, ops.local_pca_count(x, 25)[100:160])


# --- bad input -------------------------------------------------------------

def test_bad_input():
    x = _manifold_points(30, 2, 4, seed=8)
    with pytest.raises(ValueError, match="k must be >= 2"):
        ops.local_pca(x, 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 29\]"):
        ops.local_pca(x, 30)
    with pytest.raises(ValueError, match="zero variance"):
        ops.local_pca(torch.ones(20, 3), 5)
    with pytest.raises(ValueError, match="zero variance"):
        ops.local_pca_count(torch.ones(20, 3), 5)
    with pytest.raises(ValueError, match="neighbors must index rows of data"):
        ops.local_pca(x, neighbors=torch.tensor([[0, 30]]))
    with pytest.raises(TypeError, match="neighbors must hold integer indices"):
        ops.local_pca(x, neighbors=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="neighbors must be a 2-D"):
        ops.local_pca(x, neighbors=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="sizes has 1 entries for 2"):
        ops.local_pca(x, neighbors=torch.zeros(2, 3, dtype=torch.int64), sizes=torch.tensor([2]))
    with pytest.raises(ValueError, match="alpha must be a number in"):
        ops.local_pca_count(x, 5, alpha=1.5)
    with pytest.raises(ValueError, match="data must be a 2-D"):
        ops.local_pca(torch.zeros(10), 2)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ops.local_pca(bad, 5)
    with pytest.raises(ValueError, match="queries have 3 features"):
        ops.local_pca(x, 5, queries=torch.zeros(2, 3, dtype=x.dtype))
    with pytest.raises(TypeError, match="queries dtype"):
        ops.local_pca_count(x, 5, queries=torch.zeros(2, 4, dtype=torch.float32))
    with pytest.raises(ValueError, match="queries are on meta"):
        ops.local_pca(x, 5, queries=torch.empty(2, 4, dtype=x.dtype, device="meta"))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = _manifold_points(2000, 5, 30, seed=9, noise=0.01, dtype=torch.float32)
    _, nb = ops.knn(x, k=50)
    torch.testing.assert_close(ops.local_pca(x.cuda(), neighbors=nb.cuda()).cpu(),
                               ops.local_pca(x, neighbors=nb), rtol=1e-4, atol=1e-5)
    assert (ops.local_pca_count(x.cuda(), neighbors=nb.cuda()).cpu()
            == ops.local_pca_count(x, neighbors=nb)).float().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_twonn_ratios_match_reference(device, dtype):
    x = _manifold_points(300, 3, 20, seed=11, noise=0.01, dtype=dtype)
    x[40] = x[7]  # an exact copy: r1 = 0 inside neighbourhoods holding both
    _, nb = ops.knn(x, k=25)
    got = ops.twonn_ratios(x.to(device), nb.to(device))
    want = ref.twonn_ratios(x, nb)
    assert got.dtype == torch.float64 and got.shape == (300, 25)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=0, equal_nan=True)
    assert bool(torch.isinf(got[nb == 7]).any() | torch.isinf(got[nb == 40]).any())
    with pytest.raises(ValueError, match="at least 3 points"):
        ops.twonn_ratios(x, nb[:, :2])
