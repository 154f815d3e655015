"""Local PCA: explained variances of each point's k-nearest-neighbour
neighbourhood (kernel family 3), and the Fukunaga-Olsen count without the
spectrum.

Neighbourhoods are built exactly as scikit-dimension's
``lPCA().fit_pw(X, n_neighbors=k)`` builds them: the k nearest neighbours of
the point from scikit-learn's ``kneighbors()`` (the point itself excluded),
centred on their own mean; the explained variances are those of
``sklearn.decomposition.PCA`` on that neighbourhood: eigenvalues of the
covariance with denominator k - 1, min(k, D) of them, descending. The
kernels form the D x D covariance when k > D and the k x k Gram matrix of
the centred points otherwise (same nonzero eigenvalues, k^2 D instead of
k D^2 work).
"""
from __future__ import annotations

import numbers
from typing import Iterator

import torch

from ._arrays import as_tensor
from ._dispatch import kernel
from .knn import check_k, knn, query_batches, resolve_queries, validate_points

__all__ = ["local_pca", "local_pca_count", "twonn_ratios", "check_not_constant"]


def check_not_constant(x: torch.Tensor, name: str = "data") -> None:
    """Zero-variance data (all rows identical) have no local geometry."""
    if x.shape[0] > 0 and bool((x == x[:1]).all()):
        raise ValueError(f"{name} has zero variance (all {x.shape[0]} points are identical); "
                         "local dimension is undefined")


def _as_neighbors(neighbors, x: torch.Tensor, name: str = "neighbors") -> torch.Tensor:
    nb, _ = as_tensor(neighbors, name)
    if nb.dim() != 2:
        raise ValueError(f"{name} must be a 2-D integer array [n_points, k], got shape {tuple(nb.shape)}")
    if nb.dtype.is_floating_point or nb.dtype.is_complex or nb.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer indices, got {nb.dtype}")
    nb = nb.to(device=x.device, dtype=torch.int64)
    if nb.numel() and (int(nb.min()) < 0 or int(nb.max()) >= x.shape[0]):
        raise ValueError(f"{name} must index rows of data in [0, {x.shape[0]}), "
                         f"got values in [{int(nb.min())}, {int(nb.max())}]")
    return nb.contiguous()


def _neighbourhoods(x: torch.Tensor, k, queries, neighbors, exclude_self: bool, batch_size,
                    progress, desc: str, rows=None) -> tuple[int, int, Iterator[tuple[int, int, torch.Tensor]]]:
    """(number of rows, neighbourhood size, iterator of (r0, r1, neighbours [r1 - r0, K]))."""
    if neighbors is not None:
        if queries is not None or rows is not None:
            raise ValueError("neighbors gives the neighbourhoods: do not combine it with queries or rows")
        nb = _as_neighbors(neighbors, x)
        M, K = nb.shape
        if k is not None and int(k) != K:
            raise ValueError(f"k={k} does not match neighbors.shape[1]={K}")

        def it():
            bs, update, close = query_batches(M, K, x.shape[1] * K, batch_size, progress, desc)
            try:
                for r0 in range(0, M, bs):
                    r1 = min(M, r0 + bs)
                    yield r0, r1, nb[r0:r1]
                    update(r1 - r0)
            finally:
                close()

        return M, K, it()
    q, offset, self_mode = resolve_queries(x, queries, rows)
    excl = bool(exclude_self) and self_mode
    K = check_k(k, x.shape[0], excl)
    M = q.shape[0]

    def it():
        bs, update, close = query_batches(M, x.shape[0], x.shape[1], batch_size, progress, desc)
        try:
            for r0 in range(0, M, bs):
                r1 = min(M, r0 + bs)
                if excl:
                    _, nb = knn(x, k=K, exclude_self=True, rows=slice(offset + r0, offset + r1), progress=False)
                else:
                    _, nb = knn(x, q[r0:r1], K, exclude_self=False, progress=False)
                yield r0, r1, nb
                update(r1 - r0)
        finally:
            close()

    return M, K, it()


def local_pca(data, k: int | None = None, *, queries=None, neighbors=None, sizes=None,
              exclude_self: bool = True, batch_size: int | None = None, progress=None,
              rows: slice | None = None):
    """Explained variances of each neighbourhood, descending (App. B.2).

    For point x with neighbourhood {y_1..y_n} (its k nearest neighbours),
    centred on their mean ybar: the eigenvalues of
    C = 1/(n-1) sum_j (y_j - ybar)(y_j - ybar)^T, as
    ``sklearn.decomposition.PCA().fit(Y).explained_variance_`` gives them
    (scikit-dimension's lPCA.fit_pw neighbourhoods).

    Args:
        data: [N, D] float32/float64 (torch CPU/CUDA, numpy, cupy).
        k: neighbourhood size (2 <= k <= N - 1 with self exclusion).
        queries: [M, D]: neighbourhoods of these points among ``data``
            (the query itself is not added); None: the data points.
        neighbors: [M, K] int indices into data, instead of a kNN search
            (then ``k`` may be omitted); e.g. a precomputed ``knn`` result.
        sizes: with ``neighbors``: [M] ints, row i uses only its first
            sizes[i] neighbours (fewer than 2 give all-zero variances).
        exclude_self: a point is not its own neighbour (queries=None only).
        batch_size: rows per native call (memory is O(batch_size * k)).
        rows: with queries=None, only the data rows in this slice (to stream
            a large dataset in pieces).
        progress: None (tqdm bar for long runs), True, False, or a callable
            ``(done, total)``.

    Returns:
        [M, min(K, D)] explained variances in the data dtype, descending,
        clamped at 0 (entries past the neighbourhood's rank are ~0), as the
        array kind of ``data``.
    """
    x, back = as_tensor(data, "data")
    validate_points(x, "data")
    check_not_constant(x)
    if neighbors is None and k is not None:
        check_k(k, x.shape[0], bool(exclude_self) and queries is None)
        if int(k) < 2:
            raise ValueError(f"k must be >= 2 for local PCA (a neighbourhood needs 2 points), got {k}")
    if sizes is not None and neighbors is None:
        raise ValueError("sizes needs neighbors")
    M, K, batches = _neighbourhoods(x, k, queries, neighbors, exclude_self, batch_size, progress,
                                    "local PCA", rows)
    sz = None
    if sizes is not None:
        sz, _ = as_tensor(sizes, "sizes")
        sz = sz.to(device=x.device, dtype=torch.int64).reshape(-1)
        if sz.numel() != M:
            raise ValueError(f"sizes has {sz.numel()} entries for {M} neighbourhoods")
        if sz.numel() and (int(sz.min()) < 0 or int(sz.max()) > K):
            raise ValueError(f"sizes must be in [0, {K}]")
    elif K < 2:
        raise ValueError(f"a neighbourhood needs at least 2 points, got {K} neighbours")
    fn = kernel("local_pca", x.device)
    x = x.contiguous()
    out = torch.empty((M, min(K, x.shape[1])), dtype=x.dtype, device=x.device)
    for r0, r1, nb in batches:
        out[r0:r1] = fn(x, nb, None if sz is None else sz[r0:r1].contiguous())
    return back(out)


def local_pca_count(data, k: int | None = None, *, alpha: float = 0.05, queries=None, neighbors=None,
                    exclude_self: bool = True, batch_size: int | None = None, progress=None,
                    rows: slice | None = None, return_largest: bool = False):
    """The Fukunaga-Olsen rule without the spectrum: per neighbourhood, the
    number of explained variances strictly greater than ``alpha`` times the
    largest one (scikit-dimension's lPCA(ver="FO", alphaFO=alpha)).

    The largest variance comes from a short Lanczos run and the count from
    the inertia of C - alpha * lambda_max * I, read off a Bunch-Kaufman
    LDL^T factorisation (Sylvester's law of inertia: the number of positive
    eigenvalues of C - tau I equals the number of positive 1x1 pivots plus,
    for each 2x2 pivot, one if its determinant is negative, two if it is
    positive with positive trace). About k D min(k, D) for the matrix plus
    min(k, D)^3 / 6 for the factorisation, against ~min(k, D)^3 for a full
    eigendecomposition. Rows whose Lanczos run does not settle fall back to
    the full spectrum. Same neighbourhoods and arguments as
    :func:`local_pca` (no ``sizes``). The returned largest variance is the
    Lanczos estimate (a lower bound within ~1e-6 relative). On CUDA the count is read off
    at::linalg_eigvalsh spectra.

    Returns:
        counts [M] int64 (and with ``return_largest`` the largest explained
        variance [M] in the data dtype), as the array kind of ``data``.
    """
    x, back = as_tensor(data, "data")
    validate_points(x, "data")
    check_not_constant(x)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if neighbors is None and k is not None:
        check_k(k, x.shape[0], bool(exclude_self) and queries is None)
        if int(k) < 2:
            raise ValueError(f"k must be >= 2 for local PCA (a neighbourhood needs 2 points), got {k}")
    M, K, batches = _neighbourhoods(x, k, queries, neighbors, exclude_self, batch_size, progress,
                                    "FO count", rows)
    if K < 2:
        raise ValueError(f"a neighbourhood needs at least 2 points, got {K} neighbours")
    fn = kernel("local_pca_count", x.device)
    x = x.contiguous()
    counts = torch.empty((M,), dtype=torch.int64, device=x.device)
    largest = torch.empty((M,), dtype=x.dtype, device=x.device)
    for r0, r1, nb in batches:
        c, lm = fn(x, nb, float(alpha))
        counts[r0:r1] = c
        largest[r0:r1] = lm
    if return_largest:
        return back(counts), back(largest)
    return back(counts)


def twonn_ratios(data, neighbors):
    """TwoNN ratios inside given neighbourhoods (Facco et al. 2017; the
    quantity scikit-dimension's pointwise TwoNN fits on each neighbourhood).

    For each of the K points of neighbourhood i, data[neighbors[i]], mu =
    r2 / r1: its second over its first nearest distance to the other K - 1
    points of the neighbourhood. The two nearest come from the Gram matrix of
    the centred neighbourhood (float64); their distances are recomputed as
    sums of squared differences, so exact copies give r1 = 0 exactly (mu is
    then inf, or NaN when r2 = 0 too).

    Args:
        data: [N, D] float32/float64 (torch CPU/CUDA, numpy, cupy).
        neighbors: [M, K] integer indices into data, K >= 3.

    Returns:
        [M, K] float64, as the array kind of ``data``.
    """
    x, back = as_tensor(data, "data")
    validate_points(x, "data")
    nb = _as_neighbors(neighbors, x)
    if nb.shape[1] < 3:
        raise ValueError(f"TwoNN needs neighbourhoods of at least 3 points, got {nb.shape[1]}")
    return back(kernel("twonn_ratios", x.device)(x.contiguous(), nb))
