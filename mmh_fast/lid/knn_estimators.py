"""Pointwise LID_* estimators on k-nearest-neighbour distances, the ones users
compare local PCA against: Levina-Bickel maximum likelihood and TwoNN. Both
share the native kNN kernel (:func:`mmh_fast.ops.knn`) and match
scikit-dimension's pointwise definitions.
"""
from __future__ import annotations

import numbers
import warnings

import torch

from .. import ops
from ._points import neighbour_batches, setup

__all__ = ["mle_lid", "twonn_lid"]


def mle_lid(data, queries=None, *, k: int = 20, unbiased: bool = False, batch_size: int | None = None,
            device=None, exclude_self: bool = True, progress=None):
    """Levina-Bickel MLE of the local dimension of every point (Levina &
    Bickel 2005; Haro et al. 2008 without noise):

        m(x) = (k - 1) / sum_{j=1..k} log(R_k(x) / R_j(x))

    with R_j(x) the distance to the j-th nearest neighbour (the j = k term
    is 0); ``unbiased`` uses k - 2. This is scikit-dimension's
    ``MLE().fit(X, n_neighbors=k).dimension_pw_`` (its default k = 20,
    dnoise=None, neighborhood_based=True): a point with a neighbour at
    distance 0 (and some neighbour beyond it) gets 0, as there.

    Undefined points are NaN, with one warning giving their count: a point
    whose k neighbours are all at one distance R_1 = R_k, i.e. copies of one
    image. At distance 0 (the point is duplicated k times) m is 0 / 0, NaN
    in scikit-dimension too; at a positive distance (the neighbours are
    copies of another image) every log(R_k / R_j) is 0, m = (k - 1) / 0, and
    scikit-dimension returns inf. The likelihood there grows without bound
    in m (a sphere of copies looks infinite-dimensional); that is a fact
    about the duplicates, not a dimension of the point, so it is reported as
    undefined rather than as inf.

    Args:
        data: [N, D] points or [N, *image_shape] images (torch CPU/CUDA,
            numpy, cupy). queries: points measured on neighbourhoods in data.
        k: neighbours (>= 2). batch_size, device, exclude_self, progress: as
            :func:`mmh_fast.lpca`.

    Returns:
        [M] float64 LIDs as the array kind of ``data``.
    """
    run = setup(data, queries, k, device=device, exclude_self=exclude_self, batch_size=batch_size,
                progress=progress, desc="MLE", fn="mle_lid", k_default=20)
    kfac = run.k - 2 if unbiased else run.k - 1
    if kfac < 1:
        run.close()
        raise ValueError(f"k must be >= 3 with unbiased=True, got {run.k}")
    out = torch.empty(run.M, dtype=torch.float64, device=run.x.device)
    n_zero = n_pos = 0
    for r0, r1, d, _ in neighbour_batches(run):
        d = d.to(torch.float64)
        m = kfac / torch.log(d[:, -1:] / d).sum(1)
        one = d[:, 0] == d[:, -1]  # sorted: all k at one distance
        n_zero += int((one & (d[:, 0] == 0)).sum())
        n_pos += int((one & (d[:, 0] > 0)).sum())
        out[r0:r1] = m.masked_fill(one, float("nan"))
    if n_zero + n_pos:
        warnings.warn(f"mle_lid: {n_zero + n_pos} of {run.M} points have all {run.k} nearest neighbours at one "
                      f"distance, i.e. copies of one image ({n_zero} at distance 0, {n_pos} at a positive "
                      "distance): the MLE is undefined there (0/0 or 1/0) and they are returned as NaN",
                      stacklevel=2)
    return run.back(out)


def _twonn_fit(mu: torch.Tensor, discard_fraction: float, method: str) -> torch.Tensor:
    """skdim TwoNN._twonn on each row of ratios mu [B, k] (non-finite dropped,
    the largest discard_fraction discarded, line through the origin fitted to
    (log mu, -log(1 - F_emp)), or the censored MLE). NaN where fewer than 2
    ratios are kept."""
    B, k = mu.shape
    finite = torch.isfinite(mu)
    n = finite.sum(1)  # N per row
    s, _ = torch.where(finite, mu, torch.full_like(mu, float("inf"))).sort(1)
    # n_keep = int(N * (1 - discard_fraction)), the same float64 arithmetic as skdim
    n_keep = torch.floor(n.to(torch.float64) * (1.0 - discard_fraction)).to(torch.int64)
    pos = torch.arange(k, device=mu.device).unsqueeze(0)
    keep = pos < n_keep.unsqueeze(1)
    lx = torch.where(keep, torch.log(torch.where(keep, s, torch.ones_like(s))), torch.zeros_like(s))
    if method == "mle":
        last = lx.gather(1, (n_keep - 1).clamp_min(0).unsqueeze(1)).squeeze(1)
        d = (n_keep - 1).to(torch.float64) / (lx.sum(1) + (n - n_keep).to(torch.float64) * last)
    else:
        femp = (pos + 1).to(torch.float64) / n.clamp_min(1).unsqueeze(1).to(torch.float64)
        ly = torch.where(keep, -torch.log(torch.where(keep, 1.0 - femp, torch.ones_like(femp))),
                         torch.zeros_like(femp))
        d = (lx * ly).sum(1) / (lx * lx).sum(1)
    return torch.where(n_keep >= 2, d, torch.full_like(d, float("nan")))


def twonn_lid(data, queries=None, *, k: int = 100, discard_fraction: float = 0.1, method: str = "linear",
              batch_size: int | None = None, device=None, exclude_self: bool = True, progress=None):
    """Pointwise TwoNN (Facco et al. 2017) as scikit-dimension computes it:
    ``TwoNN(discard_fraction, method).fit_pw(X, n_neighbors=k).dimension_pw_``,
    i.e. the global TwoNN estimate fitted on each point's neighbourhood of k
    nearest neighbours (the point excluded). Inside the neighbourhood each
    point's ratio mu = r2 / r1 of its second to first nearest-neighbour
    distance is taken (:func:`mmh_fast.ops.twonn_ratios`, a native kernel);
    ratios with r1 = 0 (duplicates) are dropped (skdim
    warns and drops them too), the largest ``discard_fraction`` are
    discarded, and

    - ``method="linear"``: the slope of the line through the origin fitted
      by least squares to (log mu_(i), -log(1 - i/N)), i = 1..n_keep;
    - ``method="mle"``: (n_keep - 1) / (sum log mu_(i) + (N - n_keep) log mu_(n_keep)).

    A neighbourhood with fewer than 2 ratios kept gives NaN (skdim raises),
    with one warning giving the count (e.g. a neighbourhood made of copies
    of one image: every r1 is 0).

    Args: as :func:`mle_lid`; k defaults to skdim's fit_pw default 100.

    Returns:
        [M] float64 LIDs as the array kind of ``data``.
    """
    if method not in ("linear", "mle"):
        raise ValueError(f"method must be 'linear' or 'mle', got {method!r}")
    if isinstance(discard_fraction, bool) or not isinstance(discard_fraction, numbers.Real) \
            or not 0.0 <= float(discard_fraction) < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction!r}")
    run = setup(data, queries, k, device=device, exclude_self=exclude_self, batch_size=batch_size,
                progress=progress, desc="TwoNN", fn="twonn_lid", k_default=100, min_k=3)
    out = torch.empty(run.M, dtype=torch.float64, device=run.x.device)
    for r0, r1, _, nb in neighbour_batches(run):
        mu = ops.twonn_ratios(run.x, nb)
        out[r0:r1] = _twonn_fit(mu, float(discard_fraction), method)
    n_nan = int(torch.isnan(out).sum())
    if n_nan:
        warnings.warn(f"twonn_lid: {n_nan} of {run.M} points have fewer than 2 usable ratios r2 / r1 in their "
                      f"neighbourhood of {run.k} (r1 = 0 for duplicates): their TwoNN is undefined, returned as "
                      "NaN", stacklevel=2)
    return run.back(out)
