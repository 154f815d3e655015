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
- Memory is bounded: points are processed in groups whose score matrices fit in
  ``max_elements`` numbers, and network calls take at most ``batch_size`` rows.
"""
from __future__ import annotations

import torch

from ..models.schedules import check_t
from ..ops._dispatch import kernel
from ..ops.svd_rank import svd_rank
from .flipd import _call_checked, _check_int, _prepare

__all__ = ["normal_bundle", "NB_RULES"]

NB_RULES = ("ratio", "gap", "threshold")
#: probe-index offset of NB's noise stream (FLIPD probes of the same seed use indices from 0)
_NB_STREAM = 0x4E42_0000
_PROBE_GAUSSIAN = 1


def normal_bundle(model, x, t0: float = 0.01, *, scheduler=None, cond=None, uncond=None, guidance_scale=None,
                  n_samples: int | None = None, threshold=None, rule: str | None = None, min_ratio: float = 3.0,
                  center: bool | None = None, seed: int = 0, batch_size: int | None = None, sample_ids=None,
                  prediction_type: str | None = None, encode: bool = True, max_elements: int = 1 << 26,
                  svd_method: str = "auto", return_singular_values: bool = False):
    """NB(x, t0) = d - rank S(x, t0) (MMH paper Eq. 8).

    Args:
        model, x, t0, scheduler, cond, uncond, guidance_scale, prediction_type, encode,
            sample_ids: as :func:`mmh_fast.flipd` (x: [B, ...] points, or images in [-1, 1]
            for a pipeline; t0 in (0, 1], the reference uses 0.01).
        n_samples: noisy copies per point K (default 4 d).
        threshold: a singular-value threshold (number or [B]); implies ``rule="threshold"``
            (the reference's exp(-2 tau)).
        rule: "ratio" (default; or "threshold" when ``threshold`` is given), "gap" (the
            reference's largest absolute gap) or "threshold".
        min_ratio: significance floor of the ratio rule (no larger ratio: LID 0).
        center: subtract the mean score over the copies before the SVD; default: True for
            the ratio rule, False for "gap" / "threshold" (as the reference).
        seed: key of the noise (with the sample ids).
        batch_size: most rows (noisy copies) per network call (default min(K x points, 4096)).
        max_elements: bound on the numbers held in score matrices at once (points are grouped).
        svd_method: ``method`` of :func:`mmh_fast.ops.svd_rank`.
        return_singular_values: also return the singular values [B, min(K, d)].

    Returns:
        int64 tensor [B] of LID estimates in [0, d] on x's device (and the singular
        values, float32 / float64, with ``return_singular_values``).
    """
    if rule is None:
        rule = "threshold" if threshold is not None else "ratio"
    if rule not in NB_RULES:
        raise ValueError(f"rule must be one of {NB_RULES}, got {rule!r}")
    if rule == "threshold" and threshold is None:
        raise ValueError("rule='threshold' needs a threshold (e.g. exp(-2 tau) as the reference)")
    if rule != "threshold" and threshold is not None:
        raise ValueError(f"threshold is only used by rule='threshold', got rule={rule!r}")
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
    max_elements = _check_int(max_elements, "max_elements", 1)
    group = max(1, min(B, max_elements // (K * d)))
    rows_cap = min(group * K, 4096) if batch_size is None else _check_int(batch_size, "batch_size", 1)
    thr = threshold
    if rule == "threshold" and isinstance(threshold, torch.Tensor) and threshold.numel() == B:
        thr = threshold.reshape(-1).to(torch.float64)

    den = res.denoiser
    psi, sigma, ts = den.coefficients(t0, z.device)
    gen = kernel("hutchinson_probes", z.device)
    ranks, svals = [], []
    for g0 in range(0, B, group):
        pts = torch.arange(g0, min(B, g0 + group), device=z.device)
        G = len(pts)
        gid = ids.index_select(0, pts)
        # noise keyed by (seed, sample id, copy index); [K, G, d] -> [G, K, d]
        e = gen(gid, d, _NB_STREAM, K, seed, _PROBE_GAUSSIAN, z.dtype).transpose(0, 1)
        Y = (psi * z.index_select(0, pts).reshape(G, 1, d) + sigma * e).reshape((G * K,) + tuple(z.shape[1:]))
        S = torch.empty(G * K, d, dtype=z.dtype, device=z.device)
        for r0 in range(0, G * K, rows_cap):
            r1 = min(G * K, r0 + rows_cap)
            # rows r0..r1 belong to points r // K of the group
            p_idx = torch.arange(r0 // K, (r1 - 1) // K + 1, device=z.device)
            counts = torch.full_like(p_idx, K)
            counts[0] -= r0 - int(p_idx[0]) * K
            counts[-1] -= (int(p_idx[-1]) + 1) * K - r1
            c, u = res.kwargs_for(torch.repeat_interleave(pts[p_idx], counts), B)

            def f(inp, c=c, u=u):
                return den.eps_at(inp, psi, sigma, ts, cond=c, uncond=u, guidance_scale=res.guidance_scale)

            with torch.no_grad():
                eps = _call_checked(f, Y[r0:r1])
            S[r0:r1] = eps.reshape(r1 - r0, d).to(S.dtype)
        S = S.reshape(G, K, d).mul_(-1.0 / sigma)
        if center:
            S = S - S.mean(dim=1, keepdim=True)
        t_g = thr[g0:g0 + G] if isinstance(thr, torch.Tensor) and thr.dim() == 1 and thr.numel() == B else thr
        rk, sv = svd_rank(S, t_g, rule=rule, method=svd_method, min_ratio=min_ratio, seed=seed, sample_ids=gid)
        ranks.append(rk.cpu())
        if return_singular_values:
            svals.append(sv.cpu())
    lid = (d - torch.cat(ranks)).to(torch.int64).to(out_dev)
    if return_singular_values:
        width = max(s.shape[1] for s in svals)
        sv = torch.cat([torch.nn.functional.pad(s, (0, width - s.shape[1]), value=float("nan")) for s in svals])
        return back(lid), back(sv.to(out_dev))
    return back(lid)
