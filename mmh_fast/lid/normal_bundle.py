"""The normal-bundle (NB) estimator of LID for diffusion models.

Stanczuk et al. (2024); MMH paper Eq. 7-8 (App. B.1): near the model manifold
and at small t0, scores at noisy copies of x point along the normal space, so
the score matrix S(x, t0) = [s(psi x + sigma e_k, t0)]_k (K x d) has rank
d - LID and NB(x, t0) = d - rank S.

- Copies: K = ``n_samples`` (default 4d, the paper's k = 4d) noisy copies
  psi(t0) x + sigma(t0) e_k of each point; e_k is keyed by (seed, sample id, k)
  in the native counter-based generator, so a point's copies, and its LID, do
  not depend on the batch it is in.
- Rank: :func:`mmh_fast.ops.svd_rank` on the batch of score matrices.
  ``rule="ratio"`` (default) on the *centred* score matrix (mean score over the
  copies removed): the largest ratio between consecutive singular values, full
  rank (LID 0) when no ratio exceeds ``min_ratio``. On closed-form mixtures this
  is exact for every component, point masses included (NOTES: centring removes
  the shared tangent offset that otherwise adds one singular value; the
  absolute-gap rule has no answer at point masses). ``rule="gap"`` on the raw
  matrix is the reference rule; ``rule="threshold"`` with
  ``threshold=exp(-2 tau)`` the reference's thresholded variant.
- ``rule="percentile"``: the paper's own setting (App. C.1, Fig. 5c and 8a, with
  t0 = 0.1): one threshold tau, the ``percentile``-th (10th) percentile of all
  singular values over the batch (or over a ``calibration`` set), LID = d -
  #{s_i > tau}, as :func:`mmh_fast.jacobian_rank` does.
- Undetermined points. A flat spectrum has no significant gap; the ratio rule
  reads it as full rank (LID 0, a point mass), but an untrained network gives
  the same flat spectrum with no structure at all. Measured (d = 48, K = 4d,
  16 points x 3 seeds of an untrained ``tiny_unet2d``, t0 = 0.01 / 0.05 / 0.1):
  largest consecutive ratio 1.2-2.2, smallest singular value x sigma / sqrt(K)
  at most 0.028; point masses of closed-form mixtures (d = 24, 48) give
  0.44-0.49 (a point mass's centred scores are -e_k / sigma: the
  Marchenko-Pastur edge 1 - sqrt(d / (K - 1)) ~ 0.5), and their other
  components a decisive ratio of 4.7 (t0 = 0.1) to 230 (t0 = 0.01). So every
  point gets a *decisiveness*: inside the spectrum, the ratio at the cut
  s_{r-1} / s_r over ``min_ratio``; at full rank, the smallest singular value x
  sigma / sqrt(K_eff) over ``point_mass_floor`` x (1 - sqrt(d / K_eff)), K_eff =
  K - 1 centred, K otherwise. A point is *determined* when its decisiveness
  exceeds 1 and its rank is below the cap min(K_eff, d) or equals d. The
  untrained network: all undetermined; the mixtures at t0 = 0.01-0.1: all
  determined and exact. A trained network (an MLP denoiser, d = 8, trained
  3000 steps on 200 points of a plane plus one point duplicated 100 times):
  plane points LID 2, the duplicate LID 0, all determined (decisiveness
  1.2-5.3 at t0 = 0.05 and 0.1). ``undetermined="warn"`` (default) warns with the count;
  ``"nan"`` gives NaN there (float64 result), ``"raise"`` an error, ``"ignore"``
  nothing; ``return_details=True`` returns the mask and the decisiveness.
- The default stays ``rule="ratio"``: on the closed-form mixtures it is exact for
  every component at t0 = 0.01-0.1, point masses included, where the reference
  gap rule is wrong at point masses and the percentile rule depends on the batch's
  mix of dimensions (a 10th-percentile tau cuts through some component's normal
  values unless the batch holds enough tangent ones); with the undetermined flag
  its one failure mode (flat spectra of unstructured networks) is visible.
- n_samples < d: the rank cannot exceed K_eff, so LID >= d - K_eff for every
  point, a bound rather than a measurement: a warning, and points at the cap
  are undetermined.
- Memory is bounded: points are processed in groups whose score matrices fit in
  ``max_elements`` numbers, and network calls take at most ``batch_size`` rows
  (default from :func:`mmh_fast.models.batching.default_batch_size`; halved and
  retried on out-of-memory). A NaN / inf network output or score raises
  :class:`~mmh_fast.models.batching.NonFiniteOutputError` naming the points.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..models.batching import NonFiniteOutputError, check_finite, default_batch_size, run_chunked
from ..models.schedules import check_t
from ..ops._dispatch import kernel
from ..ops.svd_rank import default_rtol, svd_rank
from .flipd import _call_checked, _check_int, _prepare

__all__ = ["normal_bundle", "NB_RULES", "NB_UNDETERMINED", "NBDetails"]

NB_RULES = ("ratio", "gap", "threshold", "percentile")
NB_UNDETERMINED = ("warn", "nan", "raise", "ignore")
#: probe-index offset of NB's noise stream (FLIPD probes of the same seed use indices from 0)
_NB_STREAM = 0x4E42_0000
_PROBE_GAUSSIAN = 1


@dataclass
class NBDetails:
    """Per-point result of :func:`normal_bundle` with ``return_details=True``.

    Attributes:
        lid: [B] LID estimates (int64; float64 with NaN at undetermined points
            under ``undetermined="nan"``).
        determined: [B] bool, False where the spectrum does not decide the rank
            (no significant gap and no point-mass scale, or the rank at the K cap).
        decisiveness: [B] float64: the evidence for the decision over its bar
            (> 1: determined; see the module docstring): cut ratio / ``min_ratio``
            inside the spectrum, smallest normal value / point-mass floor at full rank.
        singular_values: [B, min(K, d)] of the (centred) score matrices, descending.
        threshold: the singular-value threshold used (rule "threshold": as given;
            rule "percentile": tau), else None.
        rule: the rank rule.
        n_samples: K, copies per point.
    """

    lid: torch.Tensor
    determined: torch.Tensor
    decisiveness: torch.Tensor
    singular_values: torch.Tensor
    threshold: object
    rule: str
    n_samples: int


def _percentile_tau(values: torch.Tensor, percentile: float, what: str) -> float:
    v = values.detach().reshape(-1).to("cpu", torch.float64)
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        raise ValueError(f"{what} holds no finite singular values")
    return float(np.percentile(v.numpy(), percentile))


def _decisiveness(sv: torch.Tensor, rank: torch.Tensor, *, d: int, K_eff: int, sigma: float, min_ratio: float,
                  point_mass_floor: float, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(decisiveness [B], determined [B]) from the singular values [B, k] and ranks [B]."""
    B, k = sv.shape
    s = sv.to(torch.float64)
    s = torch.where(torch.isnan(s), torch.zeros_like(s), s)
    floor = (s[:, :1] * rtol).clamp_min(torch.finfo(torch.float64).tiny)
    s_f = torch.maximum(s, floor)
    r = rank.to(torch.int64).cpu().clamp(0, k)
    i_hi = (r - 1).clamp(0, k - 1).reshape(-1, 1)
    i_lo = r.clamp(0, k - 1).reshape(-1, 1)
    cut = s_f.gather(1, i_hi).reshape(-1) / s_f.gather(1, i_lo).reshape(-1) / min_ratio
    edge = 1.0 - math.sqrt(d / K_eff) if K_eff > d else 0.0
    pm = s.gather(1, i_hi).reshape(-1) * sigma / math.sqrt(K_eff) / (point_mass_floor * edge) if edge > 0 else \
        torch.zeros(B, dtype=torch.float64)
    dec = torch.where(r >= k, pm, cut)
    dec = torch.where(r == 0, torch.zeros_like(dec), dec)
    capped = (r >= min(K_eff, d)) & (K_eff < d)
    det = (dec > 1) & ~capped & torch.isfinite(dec)
    return dec, det


def normal_bundle(model, x, t0: float = 0.01, *, scheduler=None, cond=None, uncond=None, guidance_scale=None,
                  n_samples: int | None = None, threshold=None, rule: str | None = None, min_ratio: float = 3.0,
                  center: bool | None = None, seed: int = 0, batch_size: int | None = None, sample_ids=None,
                  prediction_type: str | None = None, encode: bool = True, max_elements: int = 1 << 26,
                  svd_method: str = "auto", return_singular_values: bool = False, percentile: float = 10.0,
                  calibration=None, undetermined: str = "warn", point_mass_floor: float = 0.5,
                  return_details: bool = False):
    """NB(x, t0) = d - rank S(x, t0) (MMH paper Eq. 8).

    Args:
        model, x, t0, scheduler, cond, uncond, guidance_scale, prediction_type, encode,
            sample_ids: as :func:`mmh_fast.flipd` (x: [B, ...] points, or images in [-1, 1]
            for a pipeline; t0 in (0, 1], the reference uses 0.01, the paper's
            experiments 0.1 with ``rule="percentile"``).
        n_samples: noisy copies per point K (default 4 d). K < d warns: LID >= d - K + 1
            (centred) for every point, and points at that cap are undetermined.
        threshold: a singular-value threshold (number or [B]); implies ``rule="threshold"``
            (the reference's exp(-2 tau)).
        rule: "ratio" (default; or "threshold" when ``threshold`` is given), "gap" (the
            reference's largest absolute gap), "threshold", or "percentile" (the paper's
            App. C.1 setting: tau = the ``percentile``-th percentile of all singular
            values of the batch, or of ``calibration``; LID = d - #{s_i > tau}).
        min_ratio: significance floor of the ratio rule (no larger ratio: full rank), and
            the bar of the decisiveness of a cut inside the spectrum, for every rule.
        center: subtract the mean score over the copies before the SVD; default: True for
            the ratio rule, False for "gap" / "threshold" / "percentile" (as the reference).
        seed: key of the noise (with the sample ids).
        batch_size: most rows (noisy copies) per network call (default:
            :func:`~mmh_fast.models.batching.default_batch_size` of the network and the
            sample shape, at most the copies of one group); halved on out-of-memory.
        max_elements: bound on the numbers held in score matrices at once (points are grouped).
        svd_method: ``method`` of :func:`mmh_fast.ops.svd_rank` ("exact" for rule="percentile").
        return_singular_values: also return the singular values [B, min(K, d)].
        percentile: rule="percentile": in [0, 100] (default 10, the paper's).
        calibration: rule="percentile": singular values (any shape; NaN ignored) whose
            percentile sets tau, e.g. ``torch.cat`` of the ``singular_values`` of earlier
            calls on the dataset (same t0, K and ``center``); default: this batch's.
        undetermined: what to do with points the spectrum does not decide (module
            docstring): "warn" (default: a UserWarning with the count), "nan" (NaN
            there; the result is then float64), "raise" (ValueError) or "ignore".
        point_mass_floor: a full-rank (LID 0) answer is determined when the smallest
            singular value x sigma / sqrt(K_eff) is at least this fraction of the
            Marchenko-Pastur edge 1 - sqrt(d / K_eff) that an exact point mass reaches.
        return_details: return an :class:`NBDetails` (lid, determined mask,
            decisiveness, singular values, threshold) instead.

    Returns:
        int64 tensor [B] of LID estimates in [0, d] on x's device (float64 with NaN under
        ``undetermined="nan"``), and the singular values (float32 / float64) with
        ``return_singular_values``; or an :class:`NBDetails` with ``return_details``.

    Raises:
        NonFiniteOutputError: a network output or score is NaN / inf (``.positions``:
            the points).
    """
    if rule is None:
        rule = "threshold" if threshold is not None else "ratio"
    if rule not in NB_RULES:
        raise ValueError(f"rule must be one of {NB_RULES}, got {rule!r}")
    if rule == "threshold" and threshold is None:
        raise ValueError("rule='threshold' needs a threshold (e.g. exp(-2 tau) as the reference)")
    if rule != "threshold" and threshold is not None:
        raise ValueError(f"threshold is only used by rule='threshold', got rule={rule!r}")
    if rule != "percentile" and calibration is not None:
        raise ValueError(f"calibration is only used by rule='percentile', got rule={rule!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    if undetermined not in NB_UNDETERMINED:
        raise ValueError(f"undetermined must be one of {NB_UNDETERMINED}, got {undetermined!r}")
    if isinstance(point_mass_floor, bool) or not isinstance(point_mass_floor, numbers.Real) or \
            not 0 < point_mass_floor <= 1:
        raise ValueError(f"point_mass_floor must be a number in (0, 1], got {point_mass_floor!r}")
    t0 = check_t(t0, "t0")
    seed = _check_int(seed, "seed", 0)
    res, z, ids, back, out_dev = _prepare(model, x, scheduler=scheduler, cond=cond, uncond=uncond,
                                          guidance_scale=guidance_scale, prediction_type=prediction_type,
                                          encode=encode, sample_ids=sample_ids)
    B = z.shape[0]
    d = z[0].numel()
    K = 4 * d if n_samples is None else _check_int(n_samples, "n_samples", 2)
    if center is None:
        center = rule == "ratio"
    K_eff = K - 1 if center else K
    if K_eff < d:
        warnings.warn(f"normal_bundle: n_samples={K} < d={d}: the rank of the {'centred ' if center else ''}score "
                      f"matrix cannot exceed {K_eff}, so every LID is >= {d - K_eff} (a bound, not a measurement); "
                      f"points at that bound are reported undetermined. Use n_samples >= {d + 1} (the paper: 4d).",
                      UserWarning, stacklevel=2)
    max_elements = _check_int(max_elements, "max_elements", 1)
    group = max(1, min(B, max_elements // (K * d)))
    net = res.denoiser.model
    passes = 1 if res.guidance_scale is None else 2
    if batch_size is None:
        rows_cap = min(group * K, default_batch_size(net, tuple(z.shape[1:]), passes=passes, device=z.device))
    else:
        rows_cap = _check_int(batch_size, "batch_size", 1)
    thr = threshold
    if rule == "threshold" and isinstance(threshold, torch.Tensor) and threshold.numel() == B:
        thr = threshold.reshape(-1).to(torch.float64)
    svd_rule = "gap" if rule == "percentile" else rule
    if rule == "percentile":
        svd_method = "exact"  # the percentile needs every singular value
    tau = None if calibration is None else _percentile_tau(torch.as_tensor(calibration), percentile, "calibration")

    den = res.denoiser
    psi, sigma, ts = den.coefficients(t0, z.device)
    gen = kernel("hutchinson_probes", z.device)
    what = f"the network's noise prediction at t0={t0:g}"
    ranks, svals = [], []
    for g0 in range(0, B, group):
        pts = torch.arange(g0, min(B, g0 + group), device=z.device)
        G = len(pts)
        gid = ids.index_select(0, pts)
        # noise keyed by (seed, sample id, copy index); [K, G, d] -> [G, K, d]
        e = gen(gid, d, _NB_STREAM, K, seed, _PROBE_GAUSSIAN, z.dtype).transpose(0, 1)
        Y = (psi * z.index_select(0, pts).reshape(G, 1, d) + sigma * e).reshape((G * K,) + tuple(z.shape[1:]))
        S = torch.empty(G * K, d, dtype=z.dtype, device=z.device)

        # run_chunked calls this within the iteration, so the loop's names bind as they are now
        def rows(r0: int, r1: int) -> int:
            # rows r0..r1 belong to points r // K of the group
            p_idx = torch.arange(r0 // K, (r1 - 1) // K + 1, device=z.device)
            counts = torch.full_like(p_idx, K)
            counts[0] -= r0 - int(p_idx[0]) * K
            counts[-1] -= (int(p_idx[-1]) + 1) * K - r1
            c, u = res.kwargs_for(torch.repeat_interleave(pts[p_idx], counts), B)

            def f(inp):
                return den.eps_at(inp, psi, sigma, ts, cond=c, uncond=u, guidance_scale=res.guidance_scale)

            with torch.no_grad():
                eps = _call_checked(f, Y[r0:r1])
            check_finite(eps, what=what, index=g0 + torch.arange(r0, r1) // K)
            S[r0:r1] = eps.reshape(r1 - r0, d).to(S.dtype)
            return r1 - r0

        sizes = run_chunked(rows, G * K, batch_size=rows_cap, what="normal_bundle's network calls")
        rows_cap = min(rows_cap, max(sizes))  # an OOM-halved size stays for the next groups
        S = S.reshape(G, K, d).mul_(-1.0 / sigma)
        if center:
            S = S - S.mean(dim=1, keepdim=True)
        check_finite(S, what=f"the score matrix -eps/sigma at t0={t0:g} (overflow)", offset=g0)
        # the SVD squares the scores in float64 (Gram matrix): entries beyond
        # sqrt(max / (K d)) could overflow there, which svd_rank rejects as a whole batch
        big = S.abs().amax(dim=(1, 2)).to(torch.float64) > math.sqrt(torch.finfo(torch.float64).max / (K * d))
        if bool(big.any()):
            raise NonFiniteOutputError(f"the score matrix -eps/sigma at t0={t0:g} (too large to square in float64)",
                                       (g0 + big.nonzero().reshape(-1).cpu()).tolist())
        t_g = thr[g0:g0 + G] if isinstance(thr, torch.Tensor) and thr.dim() == 1 and thr.numel() == B else thr
        rk, sv = svd_rank(S, t_g, rule=svd_rule, method=svd_method, min_ratio=min_ratio, seed=seed, sample_ids=gid)
        bad = ~torch.isfinite(sv[:, :1]).reshape(-1)  # the top value is always computed
        if bool(bad.any()):
            raise NonFiniteOutputError(f"the singular values of the score matrix at t0={t0:g} (overflow)",
                                       (g0 + bad.nonzero().reshape(-1).cpu()).tolist())
        ranks.append(rk.cpu())
        svals.append(sv.cpu())
    width = max(s.shape[1] for s in svals)
    sv = torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1]), value=float("nan")) for s in svals])
    if rule == "percentile":
        if tau is None:
            tau = _percentile_tau(sv, percentile, "the batch")
        rank = (sv.to(torch.float64) > tau).sum(1).to(torch.int64)
    else:
        rank = torch.cat(ranks).to(torch.int64)
    dec, det = _decisiveness(sv, rank, d=d, K_eff=K_eff, sigma=sigma, min_ratio=min_ratio,
                             point_mass_floor=float(point_mass_floor), rtol=default_rtol(K, d, z.dtype))
    lid = d - rank
    n_und = int((~det).sum())
    if n_und and undetermined == "raise":
        raise ValueError(f"normal_bundle: {n_und} of {B} point(s) undetermined (no significant gap in the score "
                         "spectrum and no point-mass scale, or the rank at the n_samples cap); positions "
                         f"{(~det).nonzero().reshape(-1)[:8].tolist()}")
    if n_und and undetermined == "warn":
        warnings.warn(f"normal_bundle: {n_und} of {B} point(s) undetermined: their score spectrum has no "
                      "significant gap and not the scale of a point mass (or the rank is at the n_samples cap), "
                      "so their LID is not a measurement (a network without structure looks like this). Pass "
                      "undetermined='nan' for NaN there, or return_details=True for the mask and decisiveness.",
                      UserWarning, stacklevel=2)
    if undetermined == "nan":
        lid = torch.where(det, lid.to(torch.float64), torch.full((B,), float("nan"), dtype=torch.float64))
    if return_details:
        t_out = tau if rule == "percentile" else threshold
        return NBDetails(back(lid.to(out_dev)), back(det.to(out_dev)), back(dec.to(out_dev)),
                         back(sv.to(out_dev)), t_out, rule, K)
    if return_singular_values:
        return back(lid.to(out_dev)), back(sv.to(out_dev))
    return back(lid.to(out_dev))
