"""Data-side LID (issue 4, local PCA part): lpca's rules against
scikit-dimension's lPCA on the same neighbourhoods, the paper's rule as a
point-mass detector, MLE and TwoNN against scikit-dimension and all of them
against the true dimensions of a union of manifolds with duplicated points."""
import warnings

import numpy as np
import pytest
import torch

import mmh_fast
from mmh_fast import ops
from mmh_fast.lid.lpca import RULES, apply_rule

skdim = pytest.importorskip("skdim")

K = 40


def union_of_manifolds(D, specs, n_per=250, n_dup=20, noise=1e-5, seed=0):
    """Spheres S^d (radius 1) and uniform linear patches [-1, 1]^d, each in a
    random subspace of R^D around its own far-apart centre, with isotropic
    noise of std ``noise``; then ``n_dup`` points of each manifold appended
    again as exact copies. Returns (X [N, D], true dims [N], duplicated [N])."""
    rng = np.random.default_rng(seed)
    parts, dims = [], []
    for c, (kind, d) in enumerate(specs):
        if kind == "sphere":
            z = rng.normal(size=(n_per, d + 1))
            z /= np.linalg.norm(z, axis=1, keepdims=True)
        else:
            z = rng.uniform(-1.0, 1.0, size=(n_per, d))
        basis = np.linalg.qr(rng.normal(size=(D, z.shape[1])))[0]
        centre = rng.normal(size=D)
        centre *= 30.0 * (c + 1) / np.linalg.norm(centre)
        parts.append(z @ basis.T + centre + noise * rng.normal(size=(n_per, D)))
        dims.append(np.full(n_per, d))
    x = np.concatenate(parts)
    dims = np.concatenate(dims)
    dup_src = np.concatenate([rng.choice(n_per, n_dup, replace=False) + i * n_per for i in range(len(specs))])
    duplicated = np.zeros(len(x) + len(dup_src), dtype=bool)
    duplicated[dup_src] = True
    duplicated[len(x):] = True
    return np.concatenate([x, x[dup_src]]), np.concatenate([dims, dims[dup_src]]), duplicated


DATASETS = {
    "D10": (10, [("sphere", 1), ("patch", 2), ("sphere", 3), ("patch", 4)]),
    "D50": (50, [("sphere", 5), ("patch", 6), ("sphere", 7), ("patch", 8)]),
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def union(request):
    D, specs = DATASETS[request.param]
    x, dims, dup = union_of_manifolds(D, specs, seed=D)
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    nbrs = NearestNeighbors(n_neighbors=K).fit(x).kneighbors()[1]  # skdim's fit_pw neighbourhoods
    spectra = [PCA().fit(x[i]).explained_variance_ for i in nbrs]
    kinds = {d: kind for kind, d in specs}
    return dict(x=x, dims=dims, dup=dup, nbrs=nbrs, spectra=spectra, kinds=kinds)


def test_fo_equals_skdim_fit_pw(union):
    x = union["x"]
    ours = mmh_fast.lpca(x, k=K, rule="fo")
    theirs = skdim.id.lPCA(ver="FO").fit_pw(x, n_neighbors=K).dimension_pw_
    assert isinstance(ours, np.ndarray) and ours.dtype == np.int64
    assert (ours == theirs).mean() >= 0.99
    # the estimator class is the drop-in
    est = mmh_fast.LocalPCA(k=7, rule="fo").fit_pw(x, n_neighbors=K)
    np.testing.assert_array_equal(est.dimension_pw_, ours)


@pytest.mark.parametrize("rule", ["maxgap", "ratio", "participation_ratio", "kaiser", "broken_stick"])
def test_rules_equal_skdim(union, rule):
    ver = RULES[rule]
    theirs = np.array([skdim.id.lPCA(ver=ver, fit_explained_variance=True).fit(ev).dimension_
                       for ev in union["spectra"]])
    ours = mmh_fast.lpca(union["x"], k=K, rule=rule)
    if rule == "participation_ratio":
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    else:  # maxgap included: rounding-level variances are floored (see apply_rule)
        assert (ours == theirs).mean() >= 0.99
    # the rule itself, on skdim's own spectra, is exactly skdim's
    ev = torch.from_numpy(np.stack(union["spectra"]))
    mine = apply_rule(ev, rule, 0.05).numpy()
    if rule == "participation_ratio":
        np.testing.assert_allclose(mine, theirs, rtol=1e-12)
    else:
        np.testing.assert_array_equal(mine, theirs)


def test_rules_on_degenerate_spectra_match_skdim():
    ev = torch.tensor([[4.0, 2.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0], [9.0, 0.0, 0.0, 0.0, 0.0]])
    for rule, ver in RULES.items():
        if ver is None:
            continue
        theirs = [skdim.id.lPCA(ver=ver, fit_explained_variance=True).fit(e.numpy()).dimension_ for e in ev]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            np.testing.assert_allclose(apply_rule(ev, rule, 0.05).numpy(), theirs, err_msg=rule)


def test_fo_mle_twonn_recover_true_dimensions(union):
    x, dims, dup, kinds = union["x"], union["dims"], union["dup"], union["kinds"]
    fo = mmh_fast.lpca(x, k=K)
    mle = mmh_fast.mle_lid(x, k=20)
    twonn = mmh_fast.twonn_lid(x, k=K)
    report = {}
    for d, kind in kinds.items():
        sel = (dims == d) & ~dup
        exact = float(np.mean(fo[sel] == d))
        within1 = float(np.mean((fo[sel] >= d) & (fo[sel] <= d + 1)))
        report[d] = (kind, exact, within1, float(np.mean(mle[sel])), float(np.nanmean(twonn[sel])))
        if kind == "patch":
            assert exact >= 0.97, report[d]
        else:  # curvature adds at most one direction above the FO threshold
            assert within1 >= 0.97, report[d]
        assert abs(np.mean(mle[sel]) / d - 1) < 0.2, report[d]
        assert abs(np.nanmean(twonn[sel]) / d - 1) < 0.25, report[d]
    print("FO exact / within +1, MLE mean, TwoNN mean per true dimension:", report)


def test_paper_rule_is_a_point_mass_detector(union):
    x, dup = union["x"], union["dup"]
    lid = mmh_fast.lpca(x, k=K, rule="paper")
    assert bool(np.all(lid[dup] == 0))
    assert lid[~dup].min() >= 1 and np.median(lid[~dup]) >= 2


def test_mle_equals_skdim(union):
    x, dup = union["x"], union["dup"]
    theirs = skdim.id.MLE().fit(x, n_neighbors=20).dimension_pw_
    ours = mmh_fast.mle_lid(x, k=20)
    # a point with an exact copy among its neighbours has R_1 = 0, hence 0;
    # scikit-learn's GEMM-form distances (skdim's, in higher D) can leave a
    # rounding-level R_1 there instead, so compare the others
    _, nb = ops.knn(x, k=20)
    clean = ~dup[nb].any(1) & ~dup
    np.testing.assert_allclose(ours[clean], theirs[clean], rtol=1e-9)
    assert np.all(ours[dup] == 0)
    np.testing.assert_allclose(mmh_fast.mle_lid(x, k=20, unbiased=True)[clean],
                               skdim.id.MLE(unbiased=True).fit(x, n_neighbors=20).dimension_pw_[clean], rtol=1e-9)


@pytest.mark.parametrize("method", ["linear", "mle"])
def test_twonn_equals_skdim_fit_pw(union, method):
    x, nbrs, dup = union["x"], union["nbrs"], union["dup"]
    ours = mmh_fast.twonn_lid(x, k=K, method=method)
    # skdim's fit_pw computes TwoNN().fit(X[nbrs[i]]) per point; do that on a
    # sample of points (it is slow), also through neighbourhoods holding copies
    rng = np.random.default_rng(0)
    clean = np.flatnonzero(~dup[nbrs].any(1))
    with_dups = np.flatnonzero(dup[nbrs].any(1))
    sample = np.concatenate([rng.choice(clean, 25, replace=False), with_dups[:5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.array([skdim.id.TwoNN(method=method).fit(x[nbrs[i]]).dimension_ for i in sample])
    np.testing.assert_allclose(ours[sample[:25]], theirs[:25], rtol=1e-9)
    if x.shape[1] <= 25:  # skdim's exact kNN branch drops the zero distances as we do
        np.testing.assert_allclose(ours[sample[25:]], theirs[25:], rtol=1e-9)


# --- API ---------------------------------------------------------------------

def _small(n=300, D=6, seed=1):
    x, _, _ = union_of_manifolds(D, [("sphere", 2), ("patch", 3)], n_per=n // 2, n_dup=0, noise=1e-3, seed=seed)
    return x


def test_local_pca_estimator_api():
    x = _small()
    q = _small(40, seed=2)
    est = mmh_fast.LocalPCA(k=30, rule="kaiser")
    lid = est.fit_transform(x)
    np.testing.assert_array_equal(lid, mmh_fast.lpca(x, k=30, rule="kaiser"))
    np.testing.assert_array_equal(est.lid_, est.transform())
    assert est.dimension_ == pytest.approx(float(np.mean(lid)))
    assert est.n_features_in_ == x.shape[1]
    # new points: neighbourhoods among the fitted data
    ev = ops.local_pca(x, 30, queries=q)
    np.testing.assert_array_equal(est.transform(q), apply_rule(torch.from_numpy(ev), "kaiser").numpy())
    assert est.get_params()["k"] == 30
    assert est.set_params(rule="fo").rule == "fo"
    with pytest.raises(ValueError, match="invalid parameter"):
        est.set_params(bogus=1)
    with pytest.raises(RuntimeError, match="not fitted"):
        mmh_fast.LocalPCA().transform()


def test_queries_for_every_rule():
    x = _small()
    q = _small(30, seed=3)
    ev = torch.from_numpy(ops.local_pca(x, 25, queries=q))
    for rule in RULES:
        if rule == "paper":
            continue
        want = apply_rule(ev, rule, 0.05).numpy()
        got = mmh_fast.lpca(x, q, k=25, rule=rule)
        np.testing.assert_allclose(got, want, err_msg=rule)
    # paper rule on queries: a query equal to a data point is a point mass of 2
    lid = mmh_fast.lpca(x, np.concatenate([q[:5], x[:5]]), k=25, rule="paper")
    assert (lid[5:] == 0).all() and (lid[:5] >= 1).all()


def test_images_are_flattened_and_integer_images_cast():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(200, 1, 4, 4), dtype=np.uint8)
    flat = img.reshape(200, -1).astype(np.float32)
    for fn in (mmh_fast.lpca, mmh_fast.mle_lid, mmh_fast.twonn_lid):
        np.testing.assert_array_equal(fn(img, k=20), fn(flat, k=20))
    t = torch.from_numpy(img)
    got = mmh_fast.lpca(t, k=20)
    assert isinstance(got, torch.Tensor) and torch.equal(got, torch.from_numpy(mmh_fast.lpca(flat, k=20)))


def test_streaming_batches_and_progress():
    x = _small(400)
    full = mmh_fast.lpca(x, k=20, rule="broken_stick")
    calls = []
    part = mmh_fast.lpca(x, k=20, rule="broken_stick", batch_size=64,
                         progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(part, full)
    assert calls[-1] == (400, 400)
    np.testing.assert_array_equal(mmh_fast.mle_lid(x, batch_size=50), mmh_fast.mle_lid(x))
    np.testing.assert_array_equal(mmh_fast.twonn_lid(x, k=20, batch_size=70), mmh_fast.twonn_lid(x, k=20))
    mmh_fast.lpca(x, k=20, batch_size=100, progress=True)  # a tqdm bar


@pytest.mark.parametrize("fn", [mmh_fast.lpca, mmh_fast.mle_lid, mmh_fast.twonn_lid])
def test_bad_input(fn):
    x = _small(60)
    with pytest.raises(ValueError, match=r"k must be in \[\d, 59\]"):
        fn(x, k=60)  # k >= N
    bad = x.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="data contains .* NaN"):
        fn(bad, k=5)
    with pytest.raises(ValueError, match="data must have shape"):
        fn(np.arange(10.0), k=3)  # 1-D data
    with pytest.raises(ValueError, match="queries have 5 features but data have 6"):
        fn(x, np.zeros((3, 5)), k=5)
    with pytest.raises(ValueError, match="zero variance"):
        fn(np.ones((30, 4)), k=5)
    with pytest.raises(TypeError, match="queries dtype"):
        fn(x, np.zeros((3, 6), dtype=np.float32), k=5)
    with pytest.raises(ValueError, match="queries are on meta"):
        fn(torch.from_numpy(x), torch.empty(3, 6, dtype=torch.float64, device="meta"), k=5)
    with pytest.raises(ValueError, match="at least 2 features"):
        fn(x[:, :1], k=5)
    with pytest.raises(TypeError, match="data must hold real numbers"):
        fn(np.ones((10, 3), dtype=bool), k=2)
    with pytest.raises(TypeError, match="k must be an integer"):
        fn(x, k=2.0)


def test_bad_options():
    x = _small(60)
    with pytest.raises(ValueError, match="rule must be one of"):
        mmh_fast.lpca(x, k=5, rule="mle")
    with pytest.raises(ValueError, match="alpha must be a number in"):
        mmh_fast.lpca(x, k=5, alpha=0.0)
    with pytest.raises(ValueError, match=r"k must be in \[2, 59\]"):
        mmh_fast.lpca(x, k=1)
    with pytest.raises(ValueError, match="method must be"):
        mmh_fast.twonn_lid(x, k=5, method="ols")
    with pytest.raises(ValueError, match="discard_fraction"):
        mmh_fast.twonn_lid(x, k=5, discard_fraction=1.0)
    with pytest.raises(ValueError, match="k must be >= 3 with unbiased"):
        mmh_fast.mle_lid(x, k=2, unbiased=True)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    x = _small(600)
    xt = torch.from_numpy(x).float()
    for rule in ("fo", "kaiser", "paper"):
        cpu = mmh_fast.lpca(xt, k=30, rule=rule)
        gpu = mmh_fast.lpca(xt.cuda(), k=30, rule=rule)
        assert gpu.device.type == "cuda"
        assert (gpu.cpu() == cpu).float().mean() > 0.99, rule
    assert (mmh_fast.lpca(x, k=30, device="cuda") == mmh_fast.lpca(x, k=30)).mean() > 0.99
    torch.testing.assert_close(mmh_fast.mle_lid(xt.cuda()).cpu(), mmh_fast.mle_lid(xt), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mmh_fast.twonn_lid(xt.cuda(), k=30).cpu(), mmh_fast.twonn_lid(xt, k=30),
                               rtol=1e-4, atol=1e-4, equal_nan=True)


# --- issue 13 items 8 and 9: copies, empty input, positional k, the raw digits ---------------

def _copies_of_one_image(seed=0):
    """200 Gaussian points in R^5, 25 copies of a far-away image q, and one
    point p at distance 0.1 from q: p's 20 nearest neighbours are all copies
    of q (R_1 = ... = R_20 = 0.1), each copy's are all at distance 0."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 5))
    q = x[0] + 50.0
    p = q.copy()
    p[0] += 0.1
    return np.concatenate([x, np.repeat(q[None], 25, 0), p[None]])


def test_mle_neighbours_all_copies_of_one_image_is_nan_with_a_warning():
    x = _copies_of_one_image()
    with pytest.warns(UserWarning, match=r"26 of 226 points .*\(25 at distance 0, 1 at a positive distance\)"):
        lid = mmh_fast.mle_lid(x, k=20)
    # m = (k - 1) / sum log(R_k / R_j) is 19 / 0 at p (scikit-dimension returns
    # inf there) and 0 / 0 at the copies: undefined, so NaN for both
    assert np.isnan(lid[200:]).all()
    assert np.isfinite(lid[:200]).all()
    theirs = skdim.id.MLE().fit(x, n_neighbors=20).dimension_pw_
    assert np.isinf(theirs[225]) and np.isnan(theirs[200:225]).all()  # the documented difference
    np.testing.assert_allclose(lid[:200], theirs[:200], rtol=1e-9)


def test_twonn_undefined_neighbourhoods_warn():
    x = _copies_of_one_image()
    with pytest.warns(UserWarning, match="twonn_lid: 26 of 226 points"):
        lid = mmh_fast.twonn_lid(x, k=20)
    # every ratio in those neighbourhoods has r1 = 0 (copies of q): none kept
    assert np.isnan(lid[200:]).all() and np.isfinite(lid[:200]).all()


@pytest.mark.parametrize("fn", [mmh_fast.lpca, mmh_fast.mle_lid, mmh_fast.twonn_lid])
def test_empty_data_and_positional_k(fn):
    with pytest.raises(ValueError, match=r"data is empty \(shape \(0, 10\)"):
        fn(np.zeros((0, 10)), k=5)
    with pytest.raises(ValueError, match="queries is empty"):
        fn(_small(60), np.zeros((0, 6)), k=5)
    name = fn.__name__
    with pytest.raises(TypeError, match=rf"second positional argument is queries .* call {name}\(data, k=20\)"):
        fn(_small(60), 20)
    # the keyword form is unchanged
    assert fn(_small(60), k=20).shape == (60,)


def test_local_pca_estimator_positional_k_and_bad_transform():
    x = _small(60)
    est = mmh_fast.LocalPCA(20, "kaiser").fit(x)  # the estimator's parameters stay positional (k, rule, alpha)
    np.testing.assert_array_equal(est.lid_, mmh_fast.lpca(x, k=20, rule="kaiser"))
    with pytest.raises(TypeError, match=r"transform\(X\) takes points"):
        est.transform(20)
    with pytest.raises(ValueError, match="data is empty"):
        mmh_fast.LocalPCA(k=5).fit(np.zeros((0, 10)))


@pytest.fixture(scope="module")
def raw_digits():
    """scikit-learn's digits as they ship: integer pixels 0..16, several
    pixels constant over the whole set and many more in a neighbourhood, and
    many tied distances."""
    from sklearn.datasets import load_digits

    return load_digits().data.astype(np.float64)


def test_digits_every_rule_and_twonn_equal_skdim_on_the_same_neighbourhoods(raw_digits):
    """Given our neighbour lists (precomputed_knn), scikit-dimension computes
    the same number on every point of the raw digits, for every rule and
    TwoNN (before the fix maxgap agreed on 0%: median 55 against 48)."""
    from sklearn.decomposition import PCA

    x, k = raw_digits, 100  # skdim's fit_pw default
    _, nb = ops.knn(x, k=k, exclude_self=True)
    np.testing.assert_array_equal(mmh_fast.lpca(x, k=k, rule="maxgap"),
                                  skdim.id.lPCA(ver="maxgap").fit_pw(x, precomputed_knn=nb).dimension_pw_)
    # the other rules from the spectra fit_pw computes (PCA per neighbourhood), once
    spectra = [PCA().fit(x[i]).explained_variance_ for i in nb]
    for rule, ver in RULES.items():
        if ver is None:
            continue
        ours = mmh_fast.lpca(x, k=k, rule=rule)
        theirs = np.array([skdim.id.lPCA(ver=ver, fit_explained_variance=True).fit(ev).dimension_
                           for ev in spectra])
        if rule == "participation_ratio":
            np.testing.assert_allclose(ours, theirs, rtol=1e-9, err_msg=rule)
        else:
            np.testing.assert_array_equal(ours, theirs, err_msg=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skdim warns about the dropped duplicates it meets
        theirs = skdim.id.TwoNN().fit_pw(x, precomputed_knn=nb).dimension_pw_
    np.testing.assert_allclose(mmh_fast.twonn_lid(x, k=k), theirs, rtol=1e-9)
    # MLE depends on the sorted distances only, so skdim's own kNN gives the same
    np.testing.assert_allclose(mmh_fast.mle_lid(x, k=20), skdim.id.MLE().fit(x, n_neighbors=20).dimension_pw_,
                               rtol=1e-9)


def test_digits_equal_skdim_fit_pw_wherever_the_neighbourhood_is_unambiguous(raw_digits):
    """With skdim's own kNN (scikit-learn's), the numbers agree on every point
    whose k-th and (k+1)-th neighbour distances differ. Where they tie, which
    of the equidistant points is the k-th neighbour is arbitrary: scikit-learn
    returns different sets for algorithm='brute' / 'kd_tree' / 'ball_tree'
    there (we take the lowest index)."""
    x, k = raw_digits, 100
    d, _ = ops.knn(x, k=k + 1, exclude_self=True)
    clear = d[:, k] > d[:, k - 1]
    # measured: 10.3% of the digits have such a tie at k = 100
    assert 0.05 < 1 - clear.mean() < 0.15
    ours = mmh_fast.lpca(x, k=k, rule="maxgap")
    theirs = skdim.id.lPCA(ver="maxgap").fit_pw(x, n_neighbors=k).dimension_pw_
    np.testing.assert_array_equal(ours[clear], theirs[clear])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = skdim.id.TwoNN().fit_pw(x, n_neighbors=k).dimension_pw_
    np.testing.assert_allclose(mmh_fast.twonn_lid(x, k=k)[clear], theirs[clear], rtol=1e-9)
