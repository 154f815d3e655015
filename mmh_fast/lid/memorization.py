"""The memorization classes of the manifold memorization hypothesis (MMH
paper, Sec. 3): overfitting-driven (OD-Mem) and data-driven (DD-Mem)
memorization, told apart by comparing LID_theta(x) (the model manifold) with
LID_*(x) (the data manifold)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["classify_memorization", "MemorizationClasses", "LABELS"]

LABELS = ("od_mem", "dd_mem", "none")


@dataclass(frozen=True)
class MemorizationClasses:
    """Result of :func:`classify_memorization`.

    Attributes:
        labels: [N] numpy array of str, each "od_mem", "dd_mem" or "none".
        low: LID_* at or below this value is "low" (the DD-Mem threshold used).
        margin: LID_theta below LID_* - margin is "clearly below" (the OD-Mem margin used).
    """

    labels: np.ndarray
    low: float
    margin: float

    def counts(self) -> dict:
        """Number of samples per label, every label present as a key."""
        return {name: int((self.labels == name).sum()) for name in LABELS}

    def mask(self, label: str) -> np.ndarray:
        """Boolean [N] mask of one label."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        return self.labels == label

    def __len__(self) -> int:
        return len(self.labels)


def _as_lid_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one LID per sample), got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} must be non-empty")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} NaN or inf value(s)")
    return a


def _check_threshold(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number or None, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def classify_memorization(lid_model, lid_data, *, margin: float | None = None,
                          low: float | None = None) -> MemorizationClasses:
    """Label samples by the MMH memorization classes.

    For sample i with model LID t_i = LID_theta(x_i) and data LID s_i = LID_*(x_i):

    * ``"od_mem"`` if t_i < s_i - margin: the model manifold is clearly of
      lower dimension than the data manifold at x_i (overfitting-driven; this
      takes precedence, also where s_i is itself low);
    * ``"dd_mem"`` otherwise, if s_i <= low: the data manifold itself is
      low-dimensional at x_i (duplicates, very simple images) and the model
      is not below it (data-driven);
    * ``"none"`` otherwise.

    Both LIDs must be on one scale (the same estimator family, or estimators
    calibrated against each other): the rule compares the numbers directly.

    Args:
        lid_model: [N] LID_theta estimates (e.g. :func:`jacobian_rank`, FLIPD, NB).
        lid_data: [N] LID_* estimates of the same samples (e.g. local PCA).
        margin: how far below LID_* counts as clearly below (>= 0). Default:
            half the interquartile range of ``lid_data`` (the typical
            variation of LID_* between samples), and at least a tenth of its
            median, so that a dataset of constant LID_* still gets a margin.
        low: LID_* at or below this is low. Default: a quarter of the median
            of ``lid_data`` (a point mass, LID 0, is always low).

    Returns:
        :class:`MemorizationClasses` with ``labels`` [N] (numpy str array) and
        the ``low`` and ``margin`` actually used.
    """
    t = _as_lid_array(lid_model, "lid_model")
    s = _as_lid_array(lid_data, "lid_data")
    if t.shape != s.shape:
        raise ValueError(f"lid_model and lid_data must have one value per sample each, got {t.size} and {s.size}")
    med = float(np.median(s))
    if margin is None:
        q25, q75 = np.percentile(s, [25, 75])
        margin = max(0.5 * float(q75 - q25), 0.1 * abs(med))
    else:
        margin = _check_threshold(margin, "margin")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
    low = 0.25 * med if low is None else _check_threshold(low, "low")
    od = t < s - margin
    dd = ~od & (s <= low)
    labels = np.full(t.shape, "none", dtype="<U6")
    labels[od] = "od_mem"
    labels[dd] = "dd_mem"
    return MemorizationClasses(labels=labels, low=float(low), margin=float(margin))
