"""Input handling shared by the data-side LID estimators: arrays of points
(torch CPU/CUDA, numpy, cupy) or batches of images, flattened to
[n_points, n_features], validated, and results returned as the caller's
array kind (a torch input gets its results on its own device)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .. import ops
from ..ops._arrays import as_tensor, check_finite
from ..ops.knn import query_batches
from ..ops.local_pca import check_not_constant

__all__ = ["prepare_points", "prepare_queries", "check_int", "Run", "setup", "neighbour_batches"]


def _float_2d(t: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """[n, ...] real array -> float [n, prod(...)] (integers and half
    precision become float32)."""
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape [{what}, n_features] (or [{what}, *image_shape]), "
                         f"got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    if not t.dtype.is_floating_point or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    # reshape(n, -1) is ambiguous for n = 0: the feature count comes from the shape
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def prepare_points(data: Any, name: str = "data", *, device=None,
                   min_features: int = 2) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """[N, ...] -> float [N, D] on ``device`` (default: the input's).

    Integer arrays (uint8 images) become float32, float16/bfloat16 become
    float32; float32/float64 are kept. Raises ValueError naming ``name`` for
    1-D, empty, non-finite or constant data, TypeError for bool/complex."""
    t, back = as_tensor(data, name)
    t = _float_2d(t, name, "n_points")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)} after flattening)")
    if t.shape[1] < min_features:
        raise ValueError(f"{name} must have at least {min_features} features, got {t.shape[1]}")
    orig_device = t.device
    if device is not None:
        t = t.to(torch.device(device))
    check_finite(t, name)
    if isinstance(data, torch.Tensor):
        return t.contiguous(), lambda r: back(r.to(orig_device))
    return t.contiguous(), back


def prepare_queries(queries: Any, data: torch.Tensor, device=None) -> torch.Tensor:
    """Queries flattened like data; same feature count and dtype. A torch
    tensor must be on the data's device unless ``device`` was given (then
    both are moved there); numpy/cupy arrays are moved as needed."""
    q, _ = as_tensor(queries, "queries")
    q = _float_2d(q, "queries", "n_queries")
    if q.shape[1] != data.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} features but data have {data.shape[1]}")
    if q.dtype != data.dtype:
        raise TypeError(f"queries dtype {q.dtype} differs from data dtype {data.dtype}")
    if q.shape[0] == 0:
        raise ValueError(f"queries is empty (shape {tuple(q.shape)})")
    if q.device != data.device:
        if isinstance(queries, torch.Tensor) and device is None:
            raise ValueError(f"queries are on {q.device} but data are on {data.device}")
        q = q.to(data.device)
    check_finite(q, "queries")
    return q.contiguous()


def check_int(v: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    v = int(v)
    if v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {rng}, got {v}")
    return v


def check_data(x: torch.Tensor, k: int, *, exclude_self: bool, min_k: int = 1) -> int:
    """k against the number of points; constant data rejected."""
    n = x.shape[0]
    avail = n - 1 if exclude_self else n
    if avail < min_k:
        raise ValueError(f"data has {n} points: too few for neighbourhoods of {min_k} points")
    k = check_int(k, "k", min_k, avail)
    check_not_constant(x)
    return k


@dataclass
class Run:
    """Prepared inputs of a pointwise estimator over M query points."""
    x: torch.Tensor            # data [N, D] on the compute device
    back: Callable             # result tensor -> the caller's array kind
    q: torch.Tensor | None     # queries [M, D], or None for the data points
    excl: bool                 # a data point is not its own neighbour
    k: int
    M: int
    batch: int
    update: Callable[[int], None]
    close: Callable[[], None]


def check_queries_arg(queries: Any, fn: str, k_default: int) -> None:
    """``fn(data, 20)`` means k = 20, but the second positional argument is
    ``queries``: say so instead of failing on an integer array."""
    if isinstance(queries, numbers.Number) and not isinstance(queries, bool):
        raise TypeError(f"{fn}: the second positional argument is queries (points to measure, [M, n_features]), "
                        f"got the number {queries!r}; k is keyword-only: call {fn}(data, k={queries!r}) "
                        f"(default k={k_default})")


def setup(data, queries, k, *, device, exclude_self, batch_size, progress, desc: str, fn: str, k_default: int,
          min_k: int = 2) -> Run:
    """Validate and convert the common arguments of the data-side estimators
    (``fn``, ``k_default``: the caller's name and default k, for messages)."""
    check_queries_arg(queries, fn, k_default)
    x, back = prepare_points(data, "data", device=device)
    q = None if queries is None else prepare_queries(queries, x, device)
    excl = bool(exclude_self) and q is None
    k = check_data(x, k, exclude_self=excl, min_k=min_k)
    M = x.shape[0] if q is None else q.shape[0]
    if batch_size is None:
        # Batches bound the [batch, k] neighbour lists and set the progress
        # granularity; the kernels keep their own working sets small. Each
        # batch re-reads the whole data (validation, centring), so not small.
        batch = 8192
    else:
        batch = check_int(batch_size, "batch_size", 1)
    _, update, close = query_batches(M, x.shape[0], x.shape[1], 1, progress, desc)
    return Run(x, back, q, excl, k, M, batch, update, close)


def neighbour_batches(run: Run) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(r0, r1, distances [r1 - r0, k], indices) for batches of the queries,
    updating the progress bar; closes it at the end."""
    try:
        for r0 in range(0, run.M, run.batch):
            r1 = min(run.M, r0 + run.batch)
            if run.q is None:
                d, nb = ops.knn(run.x, k=run.k, exclude_self=run.excl, rows=slice(r0, r1), progress=False)
            else:
                d, nb = ops.knn(run.x, run.q[r0:r1], run.k, progress=False)
            yield r0, r1, d, nb
            run.update(r1 - r0)
    finally:
        run.close()
