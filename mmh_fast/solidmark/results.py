"""Scores of an evaluation: l_SM per image, the (l_SM, delta)-eidetic counts
and the chance level of a constant guess."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..retrieval import eidetic_count

#: the eidetic thresholds reported by :func:`mmh_fast.solidmark.evaluate` (key units)
DEFAULT_DELTAS = (0.1, 0.05, 0.01, 0.005, 0.001)


def chance_rate(delta) -> np.ndarray | float:
    """P(|k - 0.5| <= delta) for k ~ U(0, 1): min(2 delta, 1), exactly.

    This is the eidetic rate of the constant guess 0.5, the best constant
    guess (any constant c scores |[c - delta, c + delta] & [0, 1]| <= 2 delta):
    a model that ignores the interior cannot beat it on average."""
    d = np.asarray(delta, dtype=np.float64)
    if (d < 0).any() or not np.isfinite(d).all():
        raise ValueError(f"delta must be finite and >= 0, got {delta!r}")
    out = np.minimum(2 * d, 1.0)
    return float(out) if out.ndim == 0 else out


@dataclass
class SolidMarkResult:
    """Output of :func:`evaluate`.

    Attributes:
        l_sm: [N] float64, |key - mean(inpainted border)| in key units.
        predicted_keys: [N] float64, the inpainted border mean in key units
            (not clipped to [0, 1]).
        keys: [N] float64, the true keys.
        table: one dict per delta with ``delta``, ``eidetic_count`` (#{l_SM <=
            delta}), ``eidetic_rate``, ``chance_rate`` (min(2 delta, 1), the
            constant guess 0.5), ``chance_count`` (N * chance_rate) and
            ``p_value`` (binomial P(count >= observed) under chance).
        images: the inpainted images [N, ..., H + 2t, W + 2t] when requested.
    """

    l_sm: np.ndarray
    predicted_keys: np.ndarray
    keys: np.ndarray
    table: list = field(default_factory=list)
    images: torch.Tensor | None = None

    def format_table(self) -> str:
        lines = ["delta     eidetic   rate      chance    chance_n  p_value"]
        for r in self.table:
            lines.append(f"{r['delta']:<9g} {r['eidetic_count']:<9d} {r['eidetic_rate']:<9.4f} "
                         f"{r['chance_rate']:<9.4f} {r['chance_count']:<9.2f} {r['p_value']:.3g}")
        return "\n".join(lines)

    def __str__(self):
        return f"SolidMarkResult(N={self.l_sm.size})\n" + self.format_table()


def eidetic_table(l_sm, deltas: Sequence[float] = DEFAULT_DELTAS) -> list[dict]:
    """The eidetic counts of ``l_sm`` at each delta beside the chance level of
    a constant guess (see :class:`SolidMarkResult`)."""
    from scipy.stats import binom

    l_sm = np.asarray(l_sm, dtype=np.float64)
    n = l_sm.size
    rows = []
    for d in deltas:
        c = int(eidetic_count(l_sm, float(d)))
        p = chance_rate(float(d))
        rows.append({"delta": float(d), "eidetic_count": c, "eidetic_rate": c / n if n else float("nan"),
                     "chance_rate": p, "chance_count": n * p,
                     "p_value": float(binom.sf(c - 1, n, p)) if n else float("nan")})
    return rows


def _result(k, pred, deltas, images) -> SolidMarkResult:
    l_sm = np.abs(k - pred)
    return SolidMarkResult(l_sm, pred, k, eidetic_table(l_sm, deltas), images)
