"""Retrieval-based memorization metrics.

Definitions (SolidMark paper, Sec. 3): for a distance l between a generation
(or an inpainting) and the training data, an (l, delta)-eidetic metric counts
the distances l <= delta; a training image x is (l, delta)-eidetically
memorized when the model returns a generation x_hat with l(x_hat, x) <= delta.
The percentile score (Somepalli et al. 2023) summarises a set of scores by one
percentile (the 95th of SSCD similarities, for instance), which the SolidMark
paper shows can miss reductions in the tail (its Fig. 2).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["eidetic_count", "eidetic_rate", "percentile_score"]


def _scores(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        a = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers (numpy, torch or a sequence), got {type(x).__name__}") from None
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} NaN or inf value(s)")
    return a


def _deltas(delta) -> np.ndarray:
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim > 1 or not np.isfinite(d).all():
        raise ValueError(f"delta must be a finite number or a 1-D sequence of them, got {delta!r}")
    return d


def eidetic_count(distances, delta):
    """(l, delta)-eidetic count: #{i : distances[i] <= delta}.

    Args:
        distances: [N] distances l (numpy, torch or a sequence; flattened).
        delta: a threshold, or a 1-D sequence of thresholds.

    Returns:
        an int for a scalar delta, an int64 array [len(delta)] otherwise.
    """
    a = _scores(distances, "distances")
    d = _deltas(delta)
    counts = np.searchsorted(np.sort(a), d, side="right").astype(np.int64)
    return int(counts) if d.ndim == 0 else counts


def eidetic_rate(distances, delta):
    """(l, delta)-eidetic rate: eidetic_count / N (a float, or an array for
    several deltas). Raises ValueError for an empty set."""
    a = _scores(distances, "distances")
    if a.size == 0:
        raise ValueError("distances is empty: the eidetic rate is undefined")
    c = eidetic_count(a, delta)
    return c / a.size if isinstance(c, int) else c.astype(np.float64) / a.size


def percentile_score(scores, q: float = 95) -> float:
    """The q-th percentile of ``scores`` (linear interpolation between order
    statistics, numpy's default), e.g. the 95th percentile of SSCD
    similarities of Somepalli et al. (2023)."""
    a = _scores(scores, "scores")
    if a.size == 0:
        raise ValueError("scores is empty")
    q = float(q)
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    return float(np.percentile(a, q))
