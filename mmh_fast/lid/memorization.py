"""The memorization classes of the manifold memorization hypothesis (MMH
paper, Sec. 3): overfitting-driven (OD-Mem) and data-driven (DD-Mem)
memorization, told apart by comparing LID_theta(x) (the model manifold) with
LID_*(x) (the data manifold)."""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["classify_memorization", "MemorizationClasses", "LABELS", "SCALES", "SCALE_TOLERANCE",
           "scale_ratio"]

LABELS = ("od_mem", "dd_mem", "none")

#: the named values of ``classify_memorization(scale=...)``
SCALES = ("none", "median_ratio")

#: Two estimators of one manifold's dimension disagree by their biases (FLIPD
#: against local PCA on the demo's digits: medians 28.6 and 47, a factor 1.6),
#: not by orders of magnitude; a ratio of medians beyond this factor (either
#: way) means the numbers are not on one scale (raw FLIPD of an untrained model,
#: ~3600, against LID_* ~3: a factor 1200) and comparing them is meaningless.
SCALE_TOLERANCE = 10.0


@dataclass(frozen=True)
class MemorizationClasses:
    """Result of :func:`classify_memorization`.

    Attributes:
        labels: [N] numpy array of str, each "od_mem", "dd_mem" or "none".
        low: LID_* at or below this value is "low" (the DD-Mem threshold used).
        margin: the margin used: LID_theta below LID_* - margin is "clearly
            below" (OD-Mem); within LID_* + margin it "matches" (DD-Mem).
        scale: the factor LID_theta was multiplied by before the comparison
            (1.0 with ``scale="none"``).
    """

    labels: np.ndarray
    low: float
    margin: float
    scale: float = 1.0

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


def scale_ratio(lid_model, lid_data) -> float | None:
    """median(lid_model) / median(lid_data): how many times larger the model's
    LIDs are than the data's, typically; None when a median is <= 0 (the ratio
    says nothing then: e.g. more than half the data are duplicates, LID_* = 0).

    Args:
        lid_model, lid_data: [N] LIDs (array-like, finite).
    """
    t = _as_lid_array(lid_model, "lid_model")
    s = _as_lid_array(lid_data, "lid_data")
    mt, ms = float(np.median(t)), float(np.median(s))
    if mt <= 0 or ms <= 0:
        return None
    return mt / ms


def _resolve_scale(scale, t: np.ndarray, s: np.ndarray) -> float:
    """The factor applied to LID_theta; warns when the scales are incompatible and none is applied."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES} or a positive number, got {scale!r}")
        ratio = scale_ratio(t, s)
        if scale == "median_ratio":
            if ratio is None:
                raise ValueError("scale='median_ratio' needs positive medians of lid_model and lid_data, got "
                                 f"{float(np.median(t))} and {float(np.median(s))} (at least half of one side is 0, e.g. "
                                 "exact duplicates of LID_* 0); pass scale=FACTOR (a positive number mapping "
                                 "lid_model onto the lid_data scale) or scale='none'")
            return 1.0 / ratio
        if ratio is not None and not (1 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE):
            warnings.warn(
                f"classify_memorization: lid_model and lid_data are not on one scale (median {np.median(t):.4g} "
                f"against {np.median(s):.4g}, a factor {ratio:.4g}); the labels compare the numbers directly "
                "and mean nothing here. Map LID_theta onto the LID_* scale with scale='median_ratio' or a "
                "factor, or check the model (an untrained network's FLIPD is about the ambient dimension)",
                UserWarning, stacklevel=3)
        return 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be one of {SCALES} or a positive number, got {type(scale).__name__}")
    scale = float(scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def classify_memorization(lid_model, lid_data, *, margin: float | str | None = None,
                          low: float | None = None, scale: str | float = "none") -> MemorizationClasses:
    """Label samples by the MMH memorization classes.

    The paper's definitions (Sec. 2, Fig. 1): OD-Mem is LID_theta(x) <
    LID_*(x), the model manifold too constrained at x (overfitting, Fig. 1a-b);
    DD-Mem is a low LID_theta(x) *because* LID_*(x) is low, the model
    reproducing a low-dimensional part of the data faithfully (duplicates,
    Prop. 3.1; Fig. 1d-e; Prop. A.2: a perfect model of such data memorizes).
    Both are memorization: the model's LID is low at x. A point whose LID_* is
    low but whose LID_theta is high is neither: the model does not reproduce
    it (a poorly fit region, Fig. 1f, where the MMH says nothing).

    With t_i = scale * LID_theta(x_i) and s_i = LID_*(x_i):

    * ``"od_mem"`` if t_i < s_i - margin: the model manifold is clearly of
      lower dimension than the data manifold at x_i (takes precedence, also
      where s_i is itself low);
    * ``"dd_mem"`` otherwise, if s_i <= low and t_i <= s_i + margin: the data
      manifold is low-dimensional at x_i and the model's matches it (so
      t_i <= low + margin: low too);
    * ``"none"`` otherwise (including s_i low with t_i high: Fig. 1f).

    Both LIDs must be on one scale: the rule compares the numbers directly.
    Estimators of different families (FLIPD against local PCA) are put on one
    scale with ``scale``; with ``scale="none"`` a ratio of medians beyond
    :data:`SCALE_TOLERANCE` (either way) gives a UserWarning, since the labels
    are then meaningless.

    Args:
        lid_model: [N] LID_theta estimates (e.g. :func:`jacobian_rank`, FLIPD, NB).
        lid_data: [N] LID_* estimates of the same samples (e.g. local PCA).
        margin: how far from LID_* counts as clearly below / still matching
            (>= 0, in LID_* units). Default (None): half the interquartile
            range of ``lid_data`` (the typical variation of LID_* between
            samples), and at least a tenth of its median, so that a dataset of
            constant LID_* still gets a margin. ``"mad"``: three robust standard
            deviations (1.4826 x the median absolute deviation) of the
            difference t - s, never below the default: for two estimators
            whose disagreement exceeds the spread of LID_* (FLIPD against
            local PCA in the demo).
        low: LID_* at or below this is low. Default: a quarter of the median
            of ``lid_data`` (a point mass, LID 0, is always low).
        scale: how LID_theta is mapped onto the LID_* scale before the
            comparison: ``"none"`` (default: already on one scale),
            ``"median_ratio"`` (times median(LID_*) / median(LID_theta): the
            typical point gets equal LIDs; both medians must be positive), or
            a positive number (the factor).

    Returns:
        :class:`MemorizationClasses` with ``labels`` [N] (numpy str array) and
        the ``low``, ``margin`` and ``scale`` actually used.
    """
    t = _as_lid_array(lid_model, "lid_model")
    s = _as_lid_array(lid_data, "lid_data")
    if t.shape != s.shape:
        raise ValueError(f"lid_model and lid_data must have one value per sample each, got {t.size} and {s.size}")
    factor = _resolve_scale(scale, t, s)
    t = t * factor
    med = float(np.median(s))
    q25, q75 = np.percentile(s, [25, 75])
    spread = max(0.5 * float(q75 - q25), 0.1 * abs(med))
    if margin is None:
        margin = spread
    elif isinstance(margin, str):
        if margin != "mad":
            raise ValueError(f"margin must be a number >= 0, None or 'mad', got {margin!r}")
        diff = t - s
        margin = max(3 * 1.4826 * float(np.median(np.abs(diff - np.median(diff)))), spread)
    else:
        margin = _check_threshold(margin, "margin")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
    low = 0.25 * med if low is None else _check_threshold(low, "low")
    od = t < s - margin
    dd = ~od & (s <= low) & (t <= s + margin)
    labels = np.full(t.shape, "none", dtype="<U6")
    labels[od] = "od_mem"
    labels[dd] = "dd_mem"
    return MemorizationClasses(labels=labels, low=float(low), margin=float(margin), scale=float(factor))
