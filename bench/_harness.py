"""Side-by-side timing: ours under pytest-benchmark, the anchor with the same
rounds in the same process, the ratio recorded for the regression checker."""
from __future__ import annotations

import gc
import time
from typing import Any, Callable

__all__ = ["best_time", "compare", "manifold_data", "peak_rss_delta_mib"]


def best_time(fn: Callable[[], Any], rounds: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of ``rounds`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def compare(benchmark, ours: Callable[[], Any], anchor: Callable[[], Any] | None, *, anchor_name: str,
            rounds: int = 3, warmup: int = 1, target: str | None = None, **extra) -> Any:
    """Time ``ours`` with pytest-benchmark and ``anchor`` with :func:`best_time`.

    Stores in ``benchmark.extra_info``: ``anchor`` (name), ``anchor_s`` and
    ``ours_s`` (minimum seconds), ``ratio`` = ours_s / anchor_s (lower is
    better: the quantity bench/check.py tracks), ``speedup`` = 1 / ratio, the
    issue's ``target`` as text, and any ``extra`` values. Returns ours' result.
    """
    result = benchmark.pedantic(ours, rounds=rounds, warmup_rounds=warmup, iterations=1)
    ours_s = float(benchmark.stats.stats.min)
    info = {"anchor": anchor_name, "ours_s": ours_s}
    if anchor is not None:
        anchor_s = best_time(anchor, rounds=rounds, warmup=warmup)
        info.update(anchor_s=anchor_s, ratio=ours_s / anchor_s, speedup=anchor_s / ours_s)
    if target:
        info["target"] = target
    info.update(extra)
    benchmark.extra_info.update(info)
    return result


def peak_rss_delta_mib(fn: Callable[[], Any]) -> float:
    """Growth of the process's peak resident set while running ``fn`` (MiB).

    Linux ru_maxrss is a high-water mark, so this measures how far ``fn``
    pushes the peak above what the process had already reached."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0


def manifold_data(n, D, seed=0, noise=0.01):
    """Half the points on a 5-sphere, half on a 10-dim linear patch, both in
    random subspaces of R^D, plus isotropic noise (float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n // 2, 6))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.uniform(-1, 1, size=(n - n // 2, 10))
    ra = np.linalg.qr(rng.normal(size=(D, 6)))[0]
    rb = np.linalg.qr(rng.normal(size=(D, 10)))[0]
    x = np.concatenate([a @ ra.T, b @ rb.T + 5.0]) + noise * rng.normal(size=(n, D))
    return x.astype(np.float32)
