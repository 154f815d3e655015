"""Plain-PyTorch statements of every native kernel.

These are the tests' truth and the readable version of the math: no native
code, no tricks beyond what is needed to express the same computation. They
are slow; the entries in :mod:`mmh_fast.ops` dispatch to the compiled kernels.
"""
from __future__ import annotations

import math

import torch

__all__ = ["philox4x32_10", "hutchinson_probes", "hutchinson_reduce", "rank_from_singular_values",
           "svd_rank", "knn", "local_pca", "local_pca_count", "twonn_ratios"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32 x 32 -> 64-bit product split in (hi, lo) words, in int64 arithmetic
    without overflow (b is split into 16-bit halves)."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p1 = a * b_lo  # < 2^48
    p2 = a * b_hi  # < 2^48
    t = p1 + ((p2 & 0xFFFF) << 16)
    lo = t & _MASK32
    hi = (p2 >> 16) + (t >> 32)
    return hi & _MASK32, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 (Salmon et al. 2011) on int64 tensors holding uint32 words.
    Returns the four output words. Mirrors csrc/kernels/philox.h."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def hutchinson_probes(sample_ids: torch.Tensor, numel: int, probe_begin: int, n_probes: int,
                      seed: int, kind: str = "rademacher", dtype=torch.float32) -> torch.Tensor:
    """Probes [n_probes, B, numel]: entry e of probe p of sample s is a pure
    function of (seed, s, probe_begin + p, e), through the Philox counter
    (e // 4 | (p >> 32) << 30, p mod 2**32, s mod 2**32, s >> 32) and key seed. Rademacher from the top bit of
    each word; Gaussian by Box-Muller on word pairs (0, 1) and (2, 3), in float64."""
    ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(1, -1, 1)
    blocks = (numel + 3) // 4
    # the counter holds a 34-bit probe index beside a 30-bit block index
    if not (0 <= probe_begin and probe_begin + n_probes <= 2 ** 34 and numel <= 2 ** 32):
        raise ValueError(f"probes [{probe_begin}, {probe_begin + n_probes}) of {numel} elements are outside "
                         "the counter (probe index < 2**34, numel <= 2**32)")
    p = torch.arange(probe_begin, probe_begin + n_probes, dtype=torch.int64).reshape(-1, 1, 1)
    blk = torch.arange(blocks, dtype=torch.int64).reshape(1, 1, -1)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    words = philox4x32_10(blk | ((p >> 32) << 30), p & _MASK32, ids & _MASK32, (ids >> 32) & _MASK32,
                          seed & _MASK32, seed >> 32)
    w = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # [P, B, blocks, 4]
    if kind == "rademacher":
        v = torch.where((w >> 31) == 1, -1.0, 1.0).to(torch.float64)
    elif kind == "gaussian":
        u = (w.to(torch.float64) + 0.5) * 2.0 ** -32
        r = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))
        th = 2.0 * math.pi * u[..., 1::2]
        v = torch.stack([r[..., 0] * torch.cos(th[..., 0]), r[..., 0] * torch.sin(th[..., 0]),
                         r[..., 1] * torch.cos(th[..., 1]), r[..., 1] * torch.sin(th[..., 1])], dim=-1)
    else:
        raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
    return v.reshape(n_probes, ids.shape[1], blocks * 4)[..., :numel].to(dtype)


def hutchinson_reduce(av: torch.Tensor, sample_ids: torch.Tensor, probe_begin: int, seed: int,
                      kind: str = "rademacher"):
    """(mean over probes of v . av [B], its standard error [B], dots [P, B]) in float64,
    for av [P, B, n] = A v with v the probes of :func:`hutchinson_probes`."""
    P, B, n = av.shape
    v = hutchinson_probes(sample_ids, n, probe_begin, P, seed, kind, torch.float64)
    dots = (v * av.to(torch.float64)).sum(-1)
    mean = dots.mean(0)
    se = dots.std(0, unbiased=True) / math.sqrt(P) if P > 1 else torch.full((B,), float("nan"),
                                                                            dtype=torch.float64)
    return mean, se, dots


# ---------------------------------------------------------------------------
# Kernel family 2: singular values and numerical rank (mmh_fast.ops.svd_rank)
# ---------------------------------------------------------------------------

def rank_from_singular_values(s: torch.Tensor, rule: str = "gap", threshold=None,
                              min_ratio: float = 3.0, rtol: float = 0.0) -> torch.Tensor:
    """Ranks [B] int64 from exact singular values s [B, k] (descending).

    gap: argmax_i (s'_i - s'_{i+1}) + 1 (first maximum; k = 1 gives 1);
    threshold: #{s_i > threshold}; ratio: argmax_i s'_i / s'_{i+1} + 1 if that
    ratio > min_ratio else k, with x / 0 = inf, 0 / 0 = 1. s' = max(s, rtol * s_0)
    (the noise floor); a zero matrix gives rank 0 (gap and ratio)."""
    s = s.to(torch.float64)
    B, k = s.shape
    if rule == "threshold":
        thr = torch.as_tensor(threshold, dtype=torch.float64).reshape(-1, 1)
        return (s > thr).sum(1).to(torch.int64)
    sp = torch.maximum(s, rtol * s[:, :1])
    zero = sp[:, 0] == 0
    if k == 1:
        rank = torch.ones(B, dtype=torch.int64)
    elif rule == "gap":
        rank = torch.argmax(sp[:, :-1] - sp[:, 1:], dim=1) + 1
    elif rule == "ratio":
        num, den = sp[:, :-1], sp[:, 1:]
        ratio = torch.where(den > 0, num / den.clamp_min(1e-300),
                            torch.where(num > 0, torch.full_like(num, math.inf), torch.ones_like(num)))
        best, arg = ratio.max(dim=1)
        rank = torch.where(best > min_ratio, arg + 1, torch.full_like(arg, k))
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return torch.where(zero, torch.zeros_like(rank), rank)


def svd_rank(A: torch.Tensor, threshold=None, rule: str = "gap", min_ratio: float = 3.0,
             rtol: float | None = None):
    """(ranks [B], singular values [B, k] float64) of A [B, m, n] by a float64
    SVD; rtol defaults to max(m, n) * eps (float32 eps unless A is float64)."""
    B, m, n = A.shape
    if rtol is None:
        eps = torch.finfo(torch.float64 if A.dtype == torch.float64 else torch.float32).eps
        rtol = min(max(m, n) * eps, 0.5)
    s = torch.linalg.svdvals(A.to(torch.float64))
    return rank_from_singular_values(s, rule, threshold, min_ratio, rtol), s


# --- Kernel family 3: k nearest neighbours and local PCA --------------------


def knn(data: torch.Tensor, queries: torch.Tensor | None, k: int, exclude_self: bool = True,
        squared: bool = False):
    """Exact kNN by brute force in float64: squared distances as sums of
    squared differences (no GEMM form), rows sorted by (distance, index); a
    point is not its own neighbour when ``queries`` is None and
    ``exclude_self``. Returns (distances [M, k] in the data dtype, indices
    [M, k] int64)."""
    x = data.to(torch.float64)
    self_mode = queries is None
    q = x if self_mode else queries.to(torch.float64)
    N, M = x.shape[0], q.shape[0]
    ds, ids = [], []
    for r0 in range(0, M, 64):
        qq = q[r0:r0 + 64]
        # direct differences (not the |q|^2 + |x|^2 - 2 q.x form)
        d2 = torch.cdist(qq, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # [m, N]
        if self_mode and exclude_self:
            rows = torch.arange(qq.shape[0])
            d2[rows, rows + r0] = float("inf")
        # sort by index (already) then stably by distance: ties keep index order
        order = torch.sort(d2, dim=1, stable=True).indices[:, :k]
        ds.append(d2.gather(1, order))
        ids.append(order)
    d2 = torch.cat(ds) if ds else torch.empty(0, k, dtype=torch.float64)
    idx = torch.cat(ids) if ids else torch.empty(0, k, dtype=torch.int64)
    d = d2 if squared else d2.sqrt()
    return d.to(data.dtype), idx


def local_pca(data: torch.Tensor, neighbors: torch.Tensor, sizes: torch.Tensor | None = None):
    """Explained variances [M, min(K, D)] of the neighbourhoods
    data[neighbors[i, :n_i]] (n_i = K or sizes[i]): eigenvalues of the D x D
    covariance of the points centred on their mean, denominator n_i - 1,
    descending, clamped at 0, zero past min(n_i, D); all zeros when n_i < 2.
    float64, batched torch.linalg.eigvalsh."""
    x = data.to(torch.float64)
    M, K = neighbors.shape
    D = x.shape[1]
    n = torch.full((M,), K, dtype=torch.int64) if sizes is None else sizes.to(torch.int64).cpu()
    w = (torch.arange(K).unsqueeze(0) < n.unsqueeze(1)).to(torch.float64).unsqueeze(2)  # [M, K, 1]
    y = x[neighbors.cpu()] * w
    mean = y.sum(1, keepdim=True) / n.clamp_min(1).to(torch.float64).view(M, 1, 1)
    y = (y - mean) * w
    cov = y.transpose(1, 2) @ y / (n - 1).clamp_min(1).to(torch.float64).view(M, 1, 1)
    ev = torch.linalg.eigvalsh(cov).flip(1).clamp_min(0)[:, :min(K, D)]
    keep = torch.arange(ev.shape[1]).unsqueeze(0) < torch.minimum(n, torch.tensor(D)).unsqueeze(1)
    ev = ev * (keep & (n >= 2).unsqueeze(1))
    return ev.to(data.dtype)


def local_pca_count(data: torch.Tensor, neighbors: torch.Tensor, alpha: float = 0.05):
    """FO count per neighbourhood: #(explained variance > alpha * largest),
    from :func:`local_pca` in float64. Returns (counts [M] int64, largest [M])."""
    ev = local_pca(data.to(torch.float64), neighbors)
    top = ev[:, :1]
    return (ev > alpha * top).sum(1), top[:, 0].to(data.dtype)


def twonn_ratios(data: torch.Tensor, neighbors: torch.Tensor):
    """[M, K] float64: for each point of each neighbourhood data[neighbors[i]],
    its second over its first nearest distance to the other points of the
    neighbourhood, from direct float64 differences (inf / NaN when the first
    is 0)."""
    x = data.to(torch.float64)
    y = x[neighbors.cpu()]  # [M, K, D]
    d = torch.cdist(y, y, compute_mode="donot_use_mm_for_euclid_dist")
    d.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    r = d.topk(2, dim=2, largest=False).values  # ascending: r1, r2
    return r[..., 1] / r[..., 0]
