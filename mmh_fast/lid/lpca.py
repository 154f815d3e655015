"""LID of the data by local PCA (LID_*, App. B.2 and C.1 of the MMH paper).

Each point's neighbourhood is its k nearest neighbours (the point itself
excluded), centred on its own mean, exactly as scikit-dimension's
``lPCA(ver=...).fit_pw(X, n_neighbors=k)`` builds it; the explained
variances are those of ``sklearn.decomposition.PCA`` on the neighbourhood
(covariance eigenvalues, denominator k - 1, min(k, D) of them). The rules
turn a spectrum into a dimension exactly as scikit-dimension's ``lPCA``
versions do; ``rule="paper"`` is the paper's App. C.1 variant.
"""
from __future__ import annotations

import numbers

import torch

from .. import ops
from ._points import check_int, neighbour_batches, setup

__all__ = ["lpca", "LocalPCA", "RULES", "apply_rule"]

#: rule name -> scikit-dimension's lPCA ``ver``
RULES = {
    "fo": "FO",
    "maxgap": "maxgap",
    "ratio": "ratio",
    "participation_ratio": "participation_ratio",
    "kaiser": "Kaiser",
    "broken_stick": "broken_stick",
    "paper": None,
}


def _check_rule(rule: str) -> str:
    if not isinstance(rule, str) or rule.lower() not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    return rule.lower()


def apply_rule(ev: torch.Tensor, rule: str, alpha: float = 0.05) -> torch.Tensor:
    """Dimension from explained variances ``ev`` [B, m] (descending), one per
    row, as scikit-dimension's ``lPCA(ver=...)`` computes it from
    ``explained_variance_`` (``alpha`` is its alphaFO / alphaRatio):

    - ``fo``: #(ev > alpha * ev[0]) (Fukunaga-Olsen).
    - ``maxgap``: 1 + position of the largest ratio ev[i] / ev[i+1] (ratios
      0/0 ignored; a row with no defined ratio gives 0, where skdim raises).
      Variances at rounding level, at most m * eps * ev[0] (eps of the
      spectrum's dtype), are set to 0 first, so the first x / 0 = inf sits
      at the neighbourhood's numerical rank. Why: a rank-deficient
      neighbourhood (constant pixels, k <= D, noiseless data) has variances
      that are 0 up to rounding. scikit-dimension's SVD leaves them near
      eps^2 ev[0] and of one size (ratios near 1), so its largest ratio is
      the one into them, at the rank; the covariance / Gram eigenvalues of
      :func:`mmh_fast.ops.local_pca` leave them near eps ev[0] with arbitrary
      ratios and exact zeros among them, whose x / 0 = inf would otherwise
      win anywhere in the tail (on the raw digits at k = 100: 0% agreement,
      median 55 against 48, before this floor; 100% after it).
    - ``ratio``: 1 + #(cumsum(ev) / sum(ev) < alpha).
    - ``participation_ratio``: sum(ev)^2 / sum(ev^2) (float64; NaN for an
      all-zero spectrum, as skdim).
    - ``kaiser``: #(ev > mean(ev)).
    - ``broken_stick``: the first i with b_i > ev[i] / sum(ev), where
      b_i = (1/m) sum_{j >= i} 1/(j+1); 0 if there is none (as skdim).

    Comparisons are made in the spectrum's dtype, as skdim makes them in its
    input's. Returns int64 [B] (float64 for participation_ratio).
    """
    rule = _check_rule(rule)
    if rule == "paper":
        raise ValueError("rule='paper' needs the whole dataset: use lpca(..., rule='paper')")
    m = ev.shape[1]
    if rule == "fo":
        return (ev > alpha * ev[:, :1]).sum(1)
    if rule == "kaiser":
        return (ev > ev.mean(1, keepdim=True)).sum(1)
    if rule == "ratio":
        cs = torch.cumsum(ev, 1)
        norm = cs / cs.amax(1, keepdim=True)
        return (norm < alpha).sum(1) + 1
    if rule == "participation_ratio":
        e = ev.to(torch.float64)
        return e.sum(1) ** 2 / (e ** 2).sum(1)
    if rule == "maxgap":
        if m < 2:
            return torch.ones(ev.shape[0], dtype=torch.int64, device=ev.device)
        ev = _floor_zeros(ev)
        gaps = ev[:, :-1] / ev[:, 1:]
        nan = torch.isnan(gaps)
        gaps = gaps.masked_fill(nan, float("-inf"))
        out = gaps.argmax(1) + 1
        return out.masked_fill(nan.all(1), 0)
    # broken stick
    inv = 1.0 / torch.arange(1, m + 1, dtype=torch.float64, device=ev.device)
    bs = torch.flip(torch.cumsum(torch.flip(inv, [0]), 0), [0]) / m
    norm = (ev / ev.sum(1, keepdim=True)).to(torch.float64)
    below = bs.unsqueeze(0) > norm
    first = below.to(torch.int64).argmax(1)
    return torch.where(below.any(1), first, torch.zeros_like(first))


def _pair_distance_quantile(x: torch.Tensor, q: float, n_pairs: int, seed: int) -> float:
    """q-quantile (linear interpolation) of the distances between distinct
    points, over all pairs when there are at most ``n_pairs``, else over
    ``n_pairs`` pairs drawn uniformly (seeded)."""
    n = x.shape[0]
    if n * (n - 1) // 2 <= n_pairs:
        d = torch.pdist(x.to(torch.float64))
    else:
        g = torch.Generator().manual_seed(int(seed))
        i = torch.randint(0, n, (n_pairs,), generator=g)
        j = (i + torch.randint(1, n, (n_pairs,), generator=g)) % n  # j != i
        i, j = i.to(x.device), j.to(x.device)
        # in blocks of pairs: all at once, the float64 gathers cost 3 x n_pairs x D x 8 bytes
        # (7 GiB for 100,000 pairs of 32 x 32 RGB images)
        d = torch.cat([(x[i[b:b + 4096]].to(torch.float64) - x[j[b:b + 4096]].to(torch.float64)).pow(2).sum(1).sqrt()
                       for b in range(0, n_pairs, 4096)])
    return float(torch.quantile(d.cpu(), q))


def _floor_zeros(ev: torch.Tensor, scale2: float = 0.0) -> torch.Tensor:
    """Set explained variances within floating error of 0 to 0: below
    m * eps * ev[0] (rank deficiency seen through rounding) or below
    (m * eps)^2 * scale2 (noise of a neighbourhood of near-copies)."""
    m = max(ev.shape[1], 1)
    eps = torch.finfo(ev.dtype).eps
    tol = torch.clamp_min(m * eps * ev[:, :1], (m * eps) ** 2 * scale2)
    return torch.where(ev <= tol, torch.zeros_like(ev), ev)


def _quantile_large(v: torch.Tensor, q: float) -> float:
    """torch.quantile's linear interpolation, for any number of values."""
    v = v.reshape(-1)
    n = v.numel()
    pos = q * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    a = float(torch.kthvalue(v.cpu(), lo + 1).values)
    b = float(torch.kthvalue(v.cpu(), hi + 1).values) if hi != lo else a
    return a + (b - a) * (pos - lo)


def _paper(run, quantile: float, n_pairs: int, seed: int):
    """App. C.1: global variance threshold + restricted neighbourhoods (see lpca)."""
    x, q = run.x, run.q
    r_star = _pair_distance_quantile(x, quantile, n_pairs, seed)
    scale2 = float(x.to(torch.float64).pow(2).sum(1).mean())
    # A query is not a data row: its neighbourhood (which includes it) is
    # indexed in data followed by the queries.
    ext = x if q is None else torch.cat([x, q])
    base = 0 if q is None else x.shape[0]
    spectra = []
    for r0, r1, d, nb in neighbour_batches(run):
        own = torch.arange(base + r0, base + r1, device=x.device).unsqueeze(1)
        n_dup = (d <= 0).sum(1)  # exact copies (distances are recomputed exactly)
        n_near = (d <= r_star).sum(1)
        # neighbours used: the copies if any, else those within r*, else all k
        use = torch.where(n_dup > 0, n_dup, torch.where(n_near > 0, n_near, torch.full_like(n_near, run.k)))
        idx = torch.cat([own, nb], 1)  # the point itself first, then its neighbours
        ev = ops.local_pca(ext, neighbors=idx, sizes=use + 1, progress=False)
        spectra.append(_floor_zeros(ev, scale2))
    ev = torch.cat(spectra)
    tau = max(_quantile_large(ev, quantile), 0.0)
    return (ev > tau).sum(1), tau, r_star


def lpca(data, queries=None, *, k: int = 100, rule: str = "fo", alpha: float = 0.05,
         batch_size: int | None = None, device=None, exclude_self: bool = True, progress=None,
         quantile: float = 0.1, pair_sample: int = 100_000, seed: int = 0):
    """Pointwise LID_* by local PCA.

    Args:
        data: [N, D] points or [N, *image_shape] images (flattened), torch
            (CPU/CUDA), numpy or cupy; integer images are cast to float32.
        queries: [M, ...] points whose LID is measured on neighbourhoods in
            ``data`` (the query itself is not part of its neighbourhood);
            None: every data point, a point not being its own neighbour.
        k: neighbourhood size (scikit-dimension's n_neighbors; the paper
            uses 100 or 1000).
        rule: "fo" (default; scikit-dimension's default), "maxgap", "ratio",
            "participation_ratio", "kaiser", "broken_stick" -- each the same
            number as ``skdim.id.lPCA(ver=...).fit_pw(X, n_neighbors=k)``
            (see :func:`apply_rule`; "fo" uses the native FO count, no
            spectrum) -- or "paper" (below).
        alpha: alphaFO for "fo", alphaRatio for "ratio".
        batch_size: points per batch (default 8192); memory is O(batch_size * k)
            besides the data.
        device: where to compute (default: the data's device).
        exclude_self: with queries=None, a point is not its own neighbour.
        progress: None (tqdm bar for long runs), True, False or a callable
            ``(done, total)``.
        quantile, pair_sample, seed: rule="paper" only (below).

    rule="paper" (App. C.1) -- a point-mass / near-duplicate detector, not a
    dimension estimator. My reading of its two modifications:

    (i) one global threshold tau = the ``quantile`` (10%) quantile of all
        explained variances over the dataset; the LID is #(variances > tau).
        Variances within floating error of 0 are set to 0 first, so with
        D > k or noiseless data (most variances 0) tau is 0 and a generic
        point gets the rank of its neighbourhood.
    (ii) "if a datapoint has neighbours within the 10th percentile of all
        pairwise distances, restrict the neighbourhood to those points":
        r* = the ``quantile`` quantile of the distances between distinct
        points, estimated from ``pair_sample`` random pairs (seeded; all
        pairs when fewer), never an N x N matrix. The neighbourhood is the
        point itself plus: its exact copies (kNN distance 0) when it has any
        -- the closest neighbours that exist, taken to the limit, which is
        what makes a duplicated point a 0-dimensional point mass whatever
        the density around it; otherwise its kNN neighbours within r* when
        there are some; otherwise all k. Reading the percentile as one of
        all pairwise distances alone does not isolate duplicates on dense
        low-dimensional data (NOTES), hence the copies first.
    Exact duplicates therefore get 0; a generic point gets at least 1 as
    long as tau is 0 (its restricted neighbourhood holds two distinct
    points). For queries, the neighbourhood is the query plus its kNN in
    data with the same restriction. Spectra of all points are kept until
    tau is known (N x min(k + 1, D) values).

    Returns:
        [M] LIDs: int64 (float64 for participation_ratio), as the array kind
        of ``data`` (torch on the data's device).
    """
    rule = _check_rule(rule)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    run = setup(data, queries, k, device=device, exclude_self=exclude_self, batch_size=batch_size,
                progress=progress, desc="lpca", fn="lpca", k_default=100)
    if rule == "paper":
        if not 0.0 < float(quantile) < 1.0:
            run.close()
            raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
        lid, _, _ = _paper(run, float(quantile), check_int(pair_sample, "pair_sample", 1), seed)
        return run.back(lid)
    x, q, M = run.x, run.q, run.M
    out = torch.empty(M, dtype=torch.float64 if rule == "participation_ratio" else torch.int64,
                      device=x.device)
    try:
        for r0 in range(0, M, run.batch):
            r1 = min(M, r0 + run.batch)
            sel = dict(rows=slice(r0, r1)) if q is None else dict(queries=q[r0:r1])
            if rule == "fo":
                out[r0:r1] = ops.local_pca_count(x, run.k, alpha=float(alpha), exclude_self=run.excl,
                                                 progress=False, **sel)
            else:
                ev = ops.local_pca(x, run.k, exclude_self=run.excl, progress=False, **sel)
                out[r0:r1] = apply_rule(ev, rule, float(alpha))
            run.update(r1 - r0)
    finally:
        run.close()
    return run.back(out)


class LocalPCA:
    """scikit-learn-style pointwise local PCA, a drop-in for
    ``skdim.id.lPCA(ver=...).fit_pw(X, n_neighbors=k)``.

    Parameters: k, rule, alpha and the keyword options of :func:`lpca`.

    Attributes after ``fit(X)``:
        lid_ (= dimension_pw_): [N] pointwise LIDs of the points of X, each
            on its k nearest other points of X;
        dimension_: their mean (skdim's global summary);
        n_features_in_.

    ``transform(X)`` measures new points on neighbourhoods in the fitted
    data (a point of the fitted data passed again is then its own nearest
    neighbour); ``transform()`` without X returns ``lid_``.
    """

    def __init__(self, k: int = 100, rule: str = "fo", alpha: float = 0.05, *, batch_size=None,
                 device=None, progress=None, quantile: float = 0.1, pair_sample: int = 100_000,
                 seed: int = 0):
        self.k = k
        self.rule = rule
        self.alpha = alpha
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.quantile = quantile
        self.pair_sample = pair_sample
        self.seed = seed

    _PARAMS = ("k", "rule", "alpha", "batch_size", "device", "progress", "quantile", "pair_sample", "seed")

    def get_params(self, deep: bool = True) -> dict:
        return {p: getattr(self, p) for p in self._PARAMS}

    def set_params(self, **params) -> "LocalPCA":
        for key, value in params.items():
            if key not in self._PARAMS:
                raise ValueError(f"invalid parameter {key!r} for LocalPCA; valid: {self._PARAMS}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        return f"LocalPCA(k={self.k!r}, rule={self.rule!r}, alpha={self.alpha!r})"

    def _opts(self) -> dict:
        return dict(k=self.k, rule=self.rule, alpha=self.alpha, batch_size=self.batch_size,
                    device=self.device, progress=self.progress, quantile=self.quantile,
                    pair_sample=self.pair_sample, seed=self.seed)

    def fit(self, X, y=None) -> "LocalPCA":
        self.lid_ = lpca(X, **self._opts())
        self.dimension_pw_ = self.lid_
        self.dimension_ = float(torch.as_tensor(self.lid_).to(torch.float64).mean())
        self._X = X
        shape = tuple(X.shape)
        self.n_features_in_ = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        return self

    def fit_pw(self, X, precomputed_knn=None, smooth: bool = False, n_neighbors: int | None = None,
               n_jobs: int = 1) -> "LocalPCA":
        """skdim's ``fit_pw`` signature: ``n_neighbors`` overrides ``k``
        (precomputed_knn, smooth and n_jobs are not supported)."""
        if precomputed_knn is not None or smooth:
            raise ValueError("precomputed_knn and smooth are not supported; use mmh_fast.ops.local_pca "
                             "with neighbors= for precomputed neighbourhoods")
        if n_neighbors is not None:
            self.k = n_neighbors
        return self.fit(X)

    def transform(self, X=None):
        if not hasattr(self, "lid_"):
            raise RuntimeError("LocalPCA is not fitted yet: call fit(X) first")
        if X is None:
            return self.lid_
        if isinstance(X, numbers.Number):
            raise TypeError(f"LocalPCA.transform(X) takes points [M, n_features] (or nothing), got the number {X!r}")
        return lpca(self._X, X, **self._opts())

    def fit_transform(self, X, y=None):
        return self.fit(X).lid_

    def transform_pw(self, X=None):
        """skdim's name for the pointwise results."""
        return self.transform(X)
