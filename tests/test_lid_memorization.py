"""classify_memorization on a construction with known answers.

Data: points on linear patches of dimensions 3, 5 and 8 in R^30, plus
duplicated points. LID_* is measured (not assumed): local PCA by brute force
-- each point's neighbourhood (its exact copies when it has any, else its k
nearest neighbours), centred on the point, ranked by ops.svd_rank's ratio rule -- which
gives the patch dimension on a patch and 0 at a duplicate.
Models: decoders whose Jacobian rank at each sample is controlled, measured by
jacobian_rank: a generalising model (rank = patch dimension), a perfect
memorizer (a constant map onto the training point: rank 0), a duplicated
point reproduced by the model (rank 0)."""
import numpy as np
import pytest
import torch

import mmh_fast
from mmh_fast import ops


def make_data(seed=0, n_per_patch=40, dims=(3, 5, 8), n_dup=6, copies=3, D=30):
    g = torch.Generator().manual_seed(seed)
    X, dim, bases = [], [], []
    for i, k in enumerate(dims):
        basis, _ = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))
        centre = 50.0 * i * torch.ones(D, dtype=torch.float64)  # patches far apart
        X.append(centre + torch.randn(n_per_patch, k, generator=g, dtype=torch.float64) @ basis.T)
        dim += [k] * n_per_patch
        bases += [basis] * n_per_patch
    dup = 200.0 + torch.randn(n_dup, D, generator=g, dtype=torch.float64)
    X.append(dup.repeat_interleave(copies, 0))
    dim += [0] * (n_dup * copies)
    bases += [torch.zeros(D, 1, dtype=torch.float64)] * (n_dup * copies)
    return torch.cat(X), np.array(dim), bases


def local_pca_lid(X, k=20):
    """Brute-force local PCA: copies of the point if it has any, else k nearest neighbours."""
    dist = torch.cdist(X, X)
    hoods = []
    for i in range(X.shape[0]):
        copies = torch.nonzero((X == X[i]).all(dim=1)).squeeze(1)
        idx = copies if copies.numel() > 1 else torch.topk(dist[i], k + 1, largest=False).indices
        hood = X[idx]
        hoods.append(hood - X[i])  # centred on the point: copies give exactly 0
    width = max(h.shape[0] for h in hoods)
    A = torch.zeros(len(hoods), width, X.shape[1], dtype=torch.float64)
    for i, h in enumerate(hoods):
        A[i, : h.shape[0]] = h   # zero rows do not change the rank
    lids, _ = ops.svd_rank(A, rule="ratio")
    return lids.numpy()


class PerSampleDecoder(torch.nn.Module):
    """G(z, which) = x[which] + tanh(P[which] z): Jacobian P[which] at z = 0 scaled by
    1 - tanh^2 elsewhere, of rank rank(P[which])."""

    def __init__(self, X, P):
        super().__init__()
        self.register_buffer("X", X.float())
        self.register_buffer("P", P.float())

    def forward(self, z, which):
        return self.X[which] + torch.tanh(torch.einsum("bdl,bl->bd", self.P[which], z))


def model_lid(X, bases, ranks, seed=1):
    """LID_theta by jacobian_rank of a decoder whose Jacobian at sample i has rank ranks[i]."""
    g = torch.Generator().manual_seed(seed)
    L = 8
    P = torch.zeros(X.shape[0], X.shape[1], L, dtype=torch.float64)
    for i, (basis, r) in enumerate(zip(bases, ranks)):
        if r:
            P[i, :, :r] = basis[:, :r] if basis.shape[1] >= r else torch.randn(X.shape[1], r, generator=g,
                                                                              dtype=torch.float64)
    G = PerSampleDecoder(X, P)
    z = 0.1 * torch.randn(X.shape[0], L, generator=g)
    return mmh_fast.jacobian_rank(G, z, threshold=1e-3, batch_size=25, which=torch.arange(X.shape[0])).numpy()


@pytest.fixture(scope="module")
def data():
    X, dim, bases = make_data()
    lid_star = local_pca_lid(X)
    return X, dim, bases, lid_star


def test_local_pca_recovers_the_construction(data):
    X, dim, bases, lid_star = data
    assert lid_star.tolist() == dim.tolist()


def test_generalising_model_is_none_and_duplicates_are_dd(data):
    X, dim, bases, lid_star = data
    lid_theta = model_lid(X, bases, dim)   # the model manifold = the data manifold
    assert lid_theta.tolist() == dim.tolist()
    res = mmh_fast.classify_memorization(lid_theta, lid_star)
    want = np.where(dim == 0, "dd_mem", "none")
    assert res.labels.tolist() == want.tolist()
    assert res.counts() == {"od_mem": 0, "dd_mem": int((dim == 0).sum()), "none": int((dim > 0).sum())}


def test_perfect_memorizer_is_od_on_non_duplicated_data(data):
    X, dim, bases, lid_star = data
    lid_theta = model_lid(X, bases, np.zeros_like(dim))   # constant map onto each training point
    assert lid_theta.tolist() == [0] * len(dim)
    res = mmh_fast.classify_memorization(lid_theta, lid_star)
    want = np.where(dim == 0, "dd_mem", "od_mem")
    assert res.labels.tolist() == want.tolist()
    # defaults are relative to the data's own LID distribution (dims 3, 5, 8 and 0)
    q25, q75 = np.percentile(lid_star, [25, 75])
    assert res.margin == pytest.approx(max(0.5 * (q75 - q25), 0.1 * np.median(lid_star)))
    assert res.low == pytest.approx(0.25 * np.median(lid_star))


def test_one_dimension_lost_is_not_clearly_below(data):
    X, dim, bases, lid_star = data
    lid_theta = model_lid(X, bases, np.maximum(dim - 1, 0))
    res = mmh_fast.classify_memorization(lid_theta, lid_star)
    # margin = half the IQR of LID_* (here 2.5): losing one dimension is within it
    assert res.margin > 1
    assert res.labels.tolist() == np.where(dim == 0, "dd_mem", "none").tolist()
    # a tight margin makes it OD-Mem
    res = mmh_fast.classify_memorization(lid_theta, lid_star, margin=0.5)
    assert res.labels.tolist() == np.where(dim == 0, "dd_mem", "od_mem").tolist()


def test_rule_and_explicit_thresholds():
    t = np.array([0.0, 0.0, 9.0, 2.0, 1.0, 7.0])
    s = np.array([0.0, 8.0, 8.0, 1.0, 2.0, 8.0])
    res = mmh_fast.classify_memorization(t, s, margin=1.5, low=2.0)
    # 0: s low, t not below -> dd; 1: t << s -> od; 2: t above s -> none;
    # 3: s low, t above -> dd; 4: s low and t below by 1 (< margin) -> dd; 5: below by 1 -> none
    assert res.labels.tolist() == ["dd_mem", "od_mem", "none", "dd_mem", "dd_mem", "none"]
    assert (res.low, res.margin) == (2.0, 1.5)
    # OD takes precedence where LID_* is itself low
    assert mmh_fast.classify_memorization([0.0], [2.0], margin=1.0, low=3.0).labels.tolist() == ["od_mem"]
    # torch inputs, mask helper
    res = mmh_fast.classify_memorization(torch.tensor(t), torch.tensor(s), margin=1.5, low=2.0)
    assert res.mask("od_mem").tolist() == [False, True, False, False, False, False]
    assert len(res) == 6


def test_bad_input_errors():
    with pytest.raises(ValueError, match="one value per sample each"):
        mmh_fast.classify_memorization([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="lid_model contains 1 NaN"):
        mmh_fast.classify_memorization([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="lid_data contains 1 NaN or inf"):
        mmh_fast.classify_memorization([1.0, 2.0], [1.0, float("inf")])
    with pytest.raises(ValueError, match="lid_model must be 1-D"):
        mmh_fast.classify_memorization(np.ones((2, 2)), np.ones(4))
    with pytest.raises(ValueError, match="lid_data must be non-empty"):
        mmh_fast.classify_memorization(np.ones(1), np.ones(0))
    with pytest.raises(TypeError, match="lid_model must hold real numbers"):
        mmh_fast.classify_memorization(["a", "b"], [1.0, 2.0])
    with pytest.raises(ValueError, match="margin must be >= 0"):
        mmh_fast.classify_memorization([1.0], [1.0], margin=-1.0)
    with pytest.raises(TypeError, match="low must be a real number"):
        mmh_fast.classify_memorization([1.0], [1.0], low="high")
    with pytest.raises(ValueError, match="margin must be finite"):
        mmh_fast.classify_memorization([1.0], [1.0], margin=float("nan"))
    res = mmh_fast.classify_memorization([1.0], [1.0])
    with pytest.raises(ValueError, match="label must be one of"):
        res.mask("memorized")


def test_low_data_lid_with_a_high_model_lid_is_not_dd_mem(data):
    """Fig. 1f: LID_* = 0 at the duplicates, but a model whose manifold there is
    5-dimensional does not reproduce them: that is not memorization (DD-Mem needs
    LID_theta low because LID_* is low, Sec. 2-3)."""
    X, dim, bases, lid_star = data
    ranks = np.where(dim == 0, 5, dim)   # the model spreads a 5-d patch over every duplicate
    lid_theta = model_lid(X, bases, ranks)
    assert lid_theta[dim == 0].tolist() == [5] * int((dim == 0).sum())
    res = mmh_fast.classify_memorization(lid_theta, lid_star)
    assert res.labels.tolist() == ["none"] * len(dim)
    # explicit thresholds: LID_* 0 with LID_theta 9 (far above LID_* + margin) is "none";
    # LID_theta within the margin of a low LID_* stays DD-Mem
    res = mmh_fast.classify_memorization([9.0, 1.5, 1.6, 0.0], [0.0, 0.0, 0.0, 0.0], margin=1.5, low=2.0)
    assert res.labels.tolist() == ["none", "dd_mem", "none", "dd_mem"]


def _mixed_model(data):
    """A model that keeps 1 of the 8-d patch's dimensions (OD-Mem there) and generalises elsewhere."""
    X, dim, bases, lid_star = data
    ranks = np.where(dim == 8, 1, dim)
    return model_lid(X, bases, ranks), np.where(dim == 8, "od_mem", np.where(dim == 0, "dd_mem", "none"))


def test_incompatible_scales_warn_and_median_ratio_maps_them(data):
    X, dim, bases, lid_star = data
    lid_theta, want = _mixed_model(data)
    assert mmh_fast.classify_memorization(lid_theta, lid_star).labels.tolist() == want.tolist()
    # the same model LIDs in units 700x larger (as raw FLIPD ~3600 of an untrained model against LID_* ~5):
    # compared directly, nothing is below LID_* and every OD-Mem point is lost -- now with a warning.
    # median_ratio maps FLIPD 1, 3, 5 onto 5/3, 5, 25/3 (medians 3 and 5): the 8-d patch stays clearly below
    raw = 700.0 * lid_theta
    with pytest.warns(UserWarning, match="not on one scale"):
        res = mmh_fast.classify_memorization(raw, lid_star)
    assert res.counts()["od_mem"] == 0
    # median_ratio: raw * median(LID_*) / median(raw) = lid_theta * median(LID_*) / median(lid_theta)
    factor = np.median(lid_star) / np.median(raw)
    res = mmh_fast.classify_memorization(raw, lid_star, scale="median_ratio")
    assert res.scale == pytest.approx(factor, rel=1e-12)
    assert res.scale == pytest.approx(np.median(lid_star) / np.median(lid_theta) / 700.0, rel=1e-12)
    ref = mmh_fast.classify_memorization(raw * factor, lid_star)
    assert res.labels.tolist() == ref.labels.tolist() == want.tolist()
    # a given factor
    res = mmh_fast.classify_memorization(raw, lid_star, scale=1 / 700)
    assert res.labels.tolist() == want.tolist() and res.scale == pytest.approx(1 / 700)
    assert mmh_fast.lid.memorization.scale_ratio(raw, lid_star) == pytest.approx(1 / factor)


def test_scales_within_the_tolerance_do_not_warn(data, recwarn):
    X, dim, bases, lid_star = data
    lid_theta, _ = _mixed_model(data)
    mmh_fast.classify_memorization(2.0 * lid_theta, lid_star)
    assert not [w for w in recwarn if "scale" in str(w.message)]


def test_mad_margin():
    t = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 0.0])
    s = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 8.0])
    diff = t - s
    mad = np.median(np.abs(diff - np.median(diff)))          # diffs 0,1,2,3,9,-8: median 1.5, MAD 1.5
    res = mmh_fast.classify_memorization(t, s, margin="mad", low=1.0)
    assert mad == 1.5 and res.margin == pytest.approx(3 * 1.4826 * 1.5)   # 6.67 > the default 0.1
    # t - s = -8 < -6.67: od_mem; t <= s + 6.67 with s = 1 <= low: dd_mem (t = 10 is not: none)
    assert res.labels.tolist() == ["dd_mem"] * 4 + ["none", "od_mem"]


def test_scale_errors():
    with pytest.raises(ValueError, match="scale must be one of"):
        mmh_fast.classify_memorization([1.0], [1.0], scale="median")
    with pytest.raises(ValueError, match="positive finite"):
        mmh_fast.classify_memorization([1.0], [1.0], scale=-2.0)
    with pytest.raises(TypeError, match="scale must be one of"):
        mmh_fast.classify_memorization([1.0], [1.0], scale=True)
    with pytest.raises(ValueError, match=r"needs positive medians.*pass scale=FACTOR .* or scale=.none."):
        mmh_fast.classify_memorization([1.0, 2.0, 3.0], [0.0, 0.0, 5.0], scale="median_ratio")
    with pytest.raises(ValueError, match="margin must be a number >= 0, None or 'mad'"):
        mmh_fast.classify_memorization([1.0], [1.0], margin="iqr")
    assert mmh_fast.lid.memorization.scale_ratio([1.0, 2.0, 3.0], [0.0, 0.0, 5.0]) is None
