"""Exact k nearest neighbours by tiled brute force (kernel family 3).

Distances are Euclidean, as scikit-learn's ``NearestNeighbors.kneighbors``
returns them. The native kernels never hold more than a [query block, data
tile] slice of the distance matrix: keys |x|^2 - 2 q.x come from a GEMM per
tile, a fused selection keeps the k + ``extra_candidates`` best per query,
and the survivors' distances are recomputed exactly (sum of squared
differences, accumulated in float64) and sorted. Peak memory is the data,
the outputs and a few MiB per thread; queries are streamed in batches.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import torch

from ._arrays import as_tensor, check_finite
from .._native import native
from ._dispatch import kernel

__all__ = ["knn", "validate_points", "query_batches"]


def validate_points(x: torch.Tensor, name: str, *, allow_empty: bool = False, finite: bool = True) -> None:
    """Shape, dtype and (unless ``finite=False``) finiteness checks shared by
    the family-3 entries."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D array [n_points, n_features], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)})")
    if x.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if finite:
        check_finite(x, name)


def check_pair(data: torch.Tensor, queries: torch.Tensor) -> None:
    if queries.shape[1] != data.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} features but data have {data.shape[1]}")
    if queries.dtype != data.dtype:
        raise TypeError(f"queries dtype {queries.dtype} differs from data dtype {data.dtype}")
    if queries.device != data.device:
        raise ValueError(f"queries are on {queries.device} but data are on {data.device}")


def check_k(k: Any, n_data: int, exclude_self: bool, name: str = "k") -> int:
    if k is None:
        raise TypeError(f"{name} (the number of neighbours) is required")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(k).__name__}")
    k = int(k)
    avail = n_data - (1 if exclude_self else 0)
    if k < 1 or k > avail:
        extra = " (a point is not its own neighbour)" if exclude_self else ""
        raise ValueError(f"{name} must be in [1, {avail}] for {n_data} data points{extra}, got {k}")
    return k


def query_batches(n_queries: int, n_data: int, n_features: int, batch_size: int | None,
                  progress, desc: str = "kNN") -> tuple[int, Callable[[int], None], Callable[[], None]]:
    """Batch size and progress callbacks (update(n_done_in_batch), close()).

    ``progress``: None shows a tqdm bar for long runs (more than ~1e11
    multiply-adds), True always, False never; a callable receives
    ``(done, total)`` after each batch."""
    if batch_size is None:
        batch_size = 16384
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    work = float(n_queries) * n_data * n_features
    state = {"done": 0}
    if callable(progress):
        def update(n):
            state["done"] += n
            progress(state["done"], n_queries)
        return batch_size, update, lambda: None
    show = work > 1e11 if progress is None else bool(progress)
    if show and n_queries > batch_size:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_queries, unit="pt", desc=desc, leave=False)
        return batch_size, bar.update, bar.close
    return batch_size, lambda n: None, lambda: None


def check_rows(rows, n: int) -> tuple[int, int]:
    """A contiguous range of data rows (a slice with step 1) as (start, stop)."""
    if rows is None:
        return 0, n
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise TypeError(f"rows must be a slice with step 1 (a range of data rows), got {rows!r}")
    start, stop, _ = rows.indices(n)
    return start, max(start, stop)


def resolve_queries(x: torch.Tensor, queries, rows) -> tuple[torch.Tensor, int, bool]:
    """(query points, global index of the first, whether they are data rows):
    data[rows] when ``queries`` is None, else the validated queries."""
    if queries is None:
        offset, stop = check_rows(rows, x.shape[0])
        return x[offset:stop], offset, True
    if rows is not None:
        raise ValueError("rows selects data rows as queries; it cannot be combined with queries")
    q, _ = as_tensor(queries, "queries")
    if q.dim() != 2:
        raise ValueError(f"queries must be a 2-D array [n_queries, n_features], got shape {tuple(q.shape)}")
    validate_points(q, "queries", allow_empty=True, finite=False)
    check_pair(x, q)
    check_finite(q, "queries")
    return q, 0, False


# Reduced-precision screens (see ``knn(precision=...)``): candidates kept at
# least, and the certificate's factor on the largest screening error seen per
# row.
SCREEN_MIN_EXTRA = {"bf16": 32, "float32": 8}  # bf16 errors are 2^16 times float32's
SCREEN_CERTIFICATE = 4.0
# Smallest feature count where "auto" screens float32 data in bf16: below it
# the scan and the exact re-rank, not the GEMM, dominate the search.
BF16_MIN_FEATURES = 256
_PRECISIONS = ("auto", "full", "bf16", "float32")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or
    AMX), where a bf16 GEMM runs at 2-4x the float32 one."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(cpu, name, None)
        try:
            if probe is not None and probe():
                return True
        except Exception:  # an older torch without the probe
            pass
    return False


def check_precision(precision) -> str:
    """``precision`` of :func:`knn` (and of the retrieval functions built on
    it), or a ValueError naming the accepted values."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    return precision


def candidate_screen(precision: str, dtype: torch.dtype, device, n_features: int) -> str | None:
    """The reduced-precision screen ``knn(precision=...)`` uses for data of
    this dtype, device and width: "bf16", "float32", or None for the GEMM in
    the data's own dtype. Raises on an unknown or impossible precision."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "full":
        return None
    cpu = device.type == "cpu"
    if precision in ("bf16", "float32"):
        if not cpu:
            raise ValueError(f"precision={precision!r} screens on the CPU, got data on {device}")
        if precision == "bf16":
            return "bf16"
        return "float32" if dtype == torch.float64 else None  # float32 data: the full screen
    if not cpu:
        return None
    if dtype == torch.float64:
        return "float32"
    return "bf16" if n_features >= BF16_MIN_FEATURES and cpu_has_native_bf16() else None


def knn(data, queries=None, k: int | None = None, exclude_self: bool = True, *, squared: bool = False,
        batch_size: int | None = None, progress=None, extra_candidates: int = 8, rows: slice | None = None,
        precision: str = "auto"):
    """Exact k nearest neighbours of each query among ``data``.

    Args:
        data: [N, D] float32/float64 (torch CPU/CUDA tensor, numpy or cupy array).
        queries: [M, D] same dtype and device; None means the data points
            themselves (M = N).
        k: neighbours per query: 1 <= k <= N, or <= N - 1 when a point is
            excluded from its own neighbours.
        exclude_self: with ``queries=None``, a point is not its own neighbour
            (by index, as scikit-learn's ``kneighbors()`` without arguments;
            exact duplicates of it stay, at distance 0). Ignored when
            queries are given.
        squared: return squared Euclidean distances.
        batch_size: queries per native call (memory of the outputs, progress
            granularity); default 16384.
        progress: None (tqdm bar for long runs), True, False, or a callable
            ``(done, total)``.
        extra_candidates: candidates kept beyond k during the GEMM-based scan
            and re-ranked by exact distances (guards the k-th neighbour
            against the GEMM's rounding).
        rows: with ``queries=None``, query only the data rows in this slice
            (self exclusion still by global index), to stream a large
            dataset in pieces; the result has ``len(range(N)[rows])`` rows.
        precision: arithmetic of the GEMM that screens candidates; the k
            returned are always re-ranked by exact float64 distances.
            ``"full"``: the data dtype. ``"bf16"`` (CPU): bf16 inputs,
            ~2.5x the float32 GEMM throughput on CPUs with bf16 dot-product
            instructions. ``"float32"`` (CPU, float64 data): a float32 GEMM,
            2x the float64 one. A reduced screen keeps
            ``max(extra_candidates, 32)`` (bf16) or ``max(extra_candidates,
            8)`` (float32) candidates beyond k and takes them in key order,
            computing exact distances until the next key exceeds the k-th
            exact key by more than ``SCREEN_CERTIFICATE`` (4) times the
            largest screening error measured on the row's own candidates; a
            row whose candidates run out first is searched again with the
            full screen, so results are the same in every mode. ``"auto"``
            (default): ``"bf16"`` for float32 data on a CPU with native bf16
            (AVX512-BF16 or AMX) and D >= 256, where the GEMM dominates;
            ``"float32"`` for float64 data on a CPU; ``"full"`` otherwise.
            On CUDA the screen is always full: when torch's float32 matmul
            setting allows TF32 (``torch.backends.cuda.matmul.allow_tf32``,
            ``set_float32_matmul_precision("high")``), whose 10-bit mantissa
            would misorder near-duplicates beyond the spare candidates, the
            float32 keys come from a float64 GEMM instead. On either device,
            float32 inputs whose centred squared norms exceed 1e36 (keys
            could overflow) are searched in float64.

    Returns:
        (distances [M, k] in the data dtype, indices [M, k] int64), each row
        ascending by (distance, index), as the same array kind as ``data``.
    """
    x, back = as_tensor(data, "data")
    validate_points(x, "data")
    q, offset, self_mode = resolve_queries(x, queries, rows)
    excl = bool(exclude_self) and self_mode
    k = check_k(k, x.shape[0], excl)
    if isinstance(extra_candidates, bool) or not isinstance(extra_candidates, numbers.Integral) \
            or extra_candidates < 0:
        raise ValueError(f"extra_candidates must be a non-negative integer, got {extra_candidates!r}")
    screen = candidate_screen(precision, x.dtype, x.device, x.shape[1])
    if screen is None:
        fn = kernel("knn", x.device)
    else:
        screened, extra_s = native().knn_screened_cpu, max(int(extra_candidates), SCREEN_MIN_EXTRA[screen])

        def fn(x_, q_, k_, off_, sq_, _extra):
            d_, i_, _redone = screened(x_, q_, k_, off_, sq_, extra_s, SCREEN_CERTIFICATE, screen)
            return d_, i_
    M = q.shape[0]
    bs, update, close = query_batches(M, x.shape[0], x.shape[1], batch_size, progress)
    x = x.contiguous()
    d = i = None
    try:
        for r0 in range(0, max(M, 1), bs):
            r1 = min(M, r0 + bs)
            db, ib = fn(x, q[r0:r1], k, offset + r0 if excl else -1, bool(squared), int(extra_candidates))
            if r0 == 0 and r1 == M:
                d, i = db, ib
            else:
                if d is None:  # one output buffer, filled batch by batch
                    d = torch.empty((M, k), dtype=db.dtype, device=db.device)
                    i = torch.empty((M, k), dtype=ib.dtype, device=ib.device)
                d[r0:r1] = db
                i[r0:r1] = ib
            update(r1 - r0)
    finally:
        close()
    return back(d), back(i)
