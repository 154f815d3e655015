"""Singular values and numerical rank of batches of matrices (kernel family 2).

The rank rules (s_0 >= s_1 >= ... >= s_{k-1}, k = min(m, n), 0-based):

* ``"gap"`` -- the normal-bundle reference rule (Stanczuk et al. 2024; MMH
  paper Eq. 8): rank = argmax_i (s_i - s_{i+1}) + 1, the first maximum on ties.
* ``"threshold"`` -- rank = #{i : s_i > threshold} (the paper's App. C.1 rule;
  the reference NB variant #{s_i >= exp(-2 tau)} is the caller's choice of
  threshold).
* ``"ratio"`` -- the largest *ratio* gap: rank = argmax_i s_i / s_{i+1} + 1 when
  that ratio exceeds ``min_ratio``, else k (no significant gap: full rank).
  The absolute-gap rule has no answer at a point mass of a diffusion model
  (the centred normal-bundle score matrix has a flat spectrum there, LID 0 =
  full rank); the ratio rule with a significance floor returns full rank for
  it and the exact dimension on closed-form mixtures (see NOTES, "The
  normal-bundle rank rule"). ``min_ratio=3`` separated the normal singular
  values (O(1/sigma)) from the tangent noise there; random Gaussian matrices
  of the NB shape (K = 4d rows) have consecutive ratios far below 3.

The gap and ratio rules first raise every singular value to the noise floor
``rtol * s_0`` (default ``rtol = max(m, n) * eps``, the ``matrix_rank``
tolerance): values below it are indistinguishable (ratio 1, gap 0) and the
ratio into the floor, s_i / (rtol s_0), is finite, so exact zeros never give
NaN and a cluster of noise values straddling the floor does not create a
spurious gap. With ``rtol=0`` the ratio rule uses x / 0 = inf and 0 / 0 = 1.
A zero matrix has rank 0 under every rule.

Methods:

* ``"exact"`` -- Gram matrix and symmetric eigenvalues in float64. The
  Gram eigenvalues are within eps_G = 2 eps64 (max(m, n) + k) ||A||_F^2 of
  s_i^2, so each s_i is known to lie in an interval; the rule is evaluated on
  these intervals and the Gram answer is kept when every spectrum inside them
  gives the same rank -- in practice whenever the threshold, or the decisive
  gap, is well above sqrt(eps_G) ~ 1e-7 s_0. Matrices that fail this get a
  float64 SVD (torch.linalg.svdvals), so the rank is always that of the SVD.
* ``"randomized"`` -- Gaussian range finder with ``n_iter`` power iterations
  (re-orthonormalised after each product by a shifted Cholesky QR in
  float64; the final basis by Householder QR), sketch of ``rank_hint +
  oversample`` columns, then the exact singular values of Q^T A in float64.
  With the residual R = (I - QQ^T) A, Weyl's inequalities bound every s_i
  (s_i^2 in [lam_i, lam_i + ||R||_F^2] inside the sketch, s_i <= ||R||_F past
  it), and the rule is certified on those bounds. When it is not (the gap
  sits at the sketch edge, the tail bound is above the threshold, or -- for
  the ratio rule -- the tail is not numerically zero, since a ratio gap in an
  unseen tail cannot be excluded), the sketch doubles; once it would exceed
  ``max_sketch_fraction * k`` the exact path finishes those matrices. On
  matrices with a clear gap the rank therefore equals the full SVD's.
  Deterministic: the sketch of matrix b depends only on (seed, sample_ids[b]).
* ``"auto"`` -- ``"randomized"`` when k >= 512 and the rule is "gap" or
  "threshold"; ``"exact"`` otherwise (small matrices: batched Gram + eigh is
  cheapest; the ratio rule needs the bottom of the spectrum).
"""
from __future__ import annotations

import numbers

import torch

from ._arrays import as_tensor, check_finite, restore
from ._dispatch import kernel

__all__ = ["svd_rank", "RULES", "METHODS", "AUTO_RANDOMIZED_MIN_K", "default_rtol"]

RULES = {"gap": 0, "threshold": 1, "ratio": 2}
METHODS = {"exact": 0, "randomized": 1}
AUTO_RANDOMIZED_MIN_K = 512


def default_rtol(m: int, n: int, dtype: torch.dtype) -> float:
    """max(m, n) * eps of the computation dtype (float64 for float64 input,
    float32 otherwise), capped below 1."""
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return min(max(m, n) * eps, 0.5)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _threshold_tensor(threshold, rule: str, B: int, device) -> torch.Tensor:
    if rule != "threshold":
        if threshold is not None:
            raise ValueError(
                f"threshold is only used by rule='threshold' (got rule={rule!r}); the noise floor "
                "of the gap and ratio rules is set by rtol"
            )
        return torch.zeros(B, dtype=torch.float64, device=device)
    if threshold is None:
        raise ValueError("rule='threshold' needs a threshold (a number >= 0, or one per matrix)")
    if isinstance(threshold, numbers.Real) and not isinstance(threshold, bool):
        t = torch.full((B,), float(threshold), dtype=torch.float64, device=device)
    else:
        tt, _ = as_tensor(threshold, "threshold")
        if tt.dtype == torch.bool or tt.is_complex():
            raise TypeError(f"threshold must be real, got dtype {tt.dtype}")
        t = tt.to(device=device, dtype=torch.float64).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B).contiguous()
        elif t.numel() != B:
            raise ValueError(f"threshold must be a number or have one entry per matrix ({B}), "
                             f"got {t.numel()} entries")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("threshold must be finite")
    if bool((t < 0).any()):
        raise ValueError(f"threshold must be >= 0, got {float(t.min())}")
    return t


def svd_rank(A, threshold=None, rule: str = "gap", method: str = "auto", *,
             min_ratio: float = 3.0, rtol: float | None = None, rank_hint: int = 32,
             oversample: int = 10, n_iter: int = 2, max_sketch_fraction: float = 0.5,
             seed: int = 0, generator: torch.Generator | None = None, sample_ids=None):
    """Numerical rank and singular values of a batch of matrices.

    Args:
        A: [B, m, n] (or [m, n], treated as B = 1) float32 / float64 tensor
            (CPU or CUDA), numpy array or cupy array; float16 / bfloat16 are
            computed in float32. Must be finite.
        threshold: rule="threshold" only: a number >= 0 or one per matrix [B].
        rule: "gap", "threshold" or "ratio" (see the module docstring).
        method: "auto", "exact" or "randomized" (see the module docstring).
        min_ratio: significance floor of the ratio rule (> = 1; default 3).
        rtol: noise floor of the gap / ratio rules, relative to s_0; default
            max(m, n) * eps (float32 eps unless A is float64).
        rank_hint, oversample: the randomized sketch starts with
            min(k, rank_hint + oversample) columns and doubles as needed.
        n_iter: power iterations of the randomized range finder.
        max_sketch_fraction: the randomized path hands a matrix to the exact
            path once its sketch would exceed this fraction of k.
        seed: key of the counter-based Gaussian sketch; or ``generator``, from
            which a seed is drawn.
        sample_ids: [B] non-negative ids keying each matrix's sketch (default
            0..B-1), so a matrix's result does not depend on its batch.

    Returns:
        (ranks, singular_values): ranks [B] int64; singular values [B, r]
        descending, float64 for float64 input else float32. The exact path
        gives all k = min(m, n) values (r = k). The randomized path gives each
        matrix's sketch estimates (its top l values, lower bounds of the true
        ones, accurate for a clear gap); r is the largest l in the batch and
        entries beyond a matrix's own l are NaN (not computed). Same array
        kind as ``A``.
    """
    At, back = as_tensor(A, "A")
    if At.dim() not in (2, 3):
        raise ValueError(f"A must be a [B, m, n] batch of matrices or one [m, n] matrix, got shape "
                         f"{tuple(At.shape)}")
    if At.dim() == 2:
        At = At.unsqueeze(0)
    if At.dtype == torch.bool or At.is_complex() or not At.is_floating_point():
        raise TypeError(f"A must hold real floating-point values (float32/float64/float16/bfloat16), "
                        f"got dtype {At.dtype}")
    if At.numel() == 0:
        raise ValueError(f"A must be non-empty, got shape {tuple(At.shape)}")
    check_finite(At, "A")
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    if not isinstance(method, str) or method not in (*METHODS, "auto"):
        raise ValueError(f"method must be one of ['auto', 'exact', 'randomized'], got {method!r}")
    B, m, n = At.shape
    k = min(m, n)
    thr = _threshold_tensor(threshold, rule, B, At.device)
    min_ratio = _check_real(min_ratio, "min_ratio")
    if min_ratio < 1:
        raise ValueError(f"min_ratio must be >= 1 (a ratio of descending values is >= 1), got {min_ratio}")
    if rtol is None:
        rtol = default_rtol(m, n, At.dtype)
    rtol = _check_real(rtol, "rtol")
    if not 0 <= rtol < 1:
        raise ValueError(f"rtol must be in [0, 1), got {rtol}")
    rank_hint = _check_int(rank_hint, "rank_hint", 1)
    oversample = _check_int(oversample, "oversample", 0)
    n_iter = _check_int(n_iter, "n_iter", 0)
    max_sketch_fraction = _check_real(max_sketch_fraction, "max_sketch_fraction")
    if not 0 < max_sketch_fraction <= 1:
        raise ValueError(f"max_sketch_fraction must be in (0, 1], got {max_sketch_fraction}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    seed = _check_int(seed, "seed", 0)
    if sample_ids is None:
        ids = torch.arange(B, dtype=torch.int64, device=At.device)
    else:
        ids = torch.as_tensor(sample_ids, dtype=torch.int64, device=At.device).reshape(-1)
        if ids.numel() != B:
            raise ValueError(f"sample_ids has {ids.numel()} entries but A has {B} matrices")
        if bool((ids < 0).any()):
            raise ValueError("sample_ids must be non-negative")
    if method == "auto":
        method = "randomized" if (k >= AUTO_RANDOMIZED_MIN_K and rule != "ratio") else "exact"
    fn = kernel("svd_rank", At.device)
    ranks, values = fn(At, thr, ids, RULES[rule], METHODS[method], min_ratio, rtol,
                       rank_hint + oversample, n_iter, max_sketch_fraction, seed)
    return restore(back, ranks, values)
