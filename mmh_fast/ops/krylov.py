"""Leading eigenvalues of a batch of linear operators known only through
matrix-vector products (a Jacobian-vector product of a network, say).

Arnoldi iteration (Saad, "Numerical Methods for Large Eigenvalue Problems",
Alg. 6.1) with full re-orthogonalisation: after m products the orthonormal
basis Q_m of the Krylov space K_m(A, q_1) and the Hessenberg matrix
H_m = Q_m^T A Q_m give the Ritz values eig(H_m). For a symmetric A (a Hessian)
H_m is tridiagonal (Lanczos) and ``symmetric=True`` takes eig((H_m + H_m^T) / 2)
= eig(Q_m^T ((A + A^T) / 2) Q_m): the Rayleigh-Ritz values of the symmetric
part, real. When K_m becomes invariant (A q_m lies in span Q_m) the iteration
restarts from a fresh keyed random vector orthogonal to Q_m, so an operator
with repeated eigenvalues (c I, say) still yields m Ritz values, all exact.
The start and restart vectors are keyed by (seed, sample id, index), so a
sample's spectrum does not depend on the batch it is in.
"""
from __future__ import annotations

from typing import Callable

import torch

from .hutchinson import hutchinson_probes

__all__ = ["krylov_eigenvalues"]


def krylov_eigenvalues(matvec: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, k: int, *,
                       symmetric: bool = True, seed: int = 0, sample_ids=None) -> torch.Tensor:
    """Ritz values of the operators A_b after ``k`` Arnoldi steps, largest magnitude first.

    Args:
        matvec: maps V [B, ...] (shaped like ``x``) to A V, row b through A_b.
            Called exactly ``k`` times.
        x: tensor [B, ...] fixing the batch, shape, dtype and device.
        k: Krylov dimension, 1 <= k <= d (d = numel of one sample); k = d gives the
            whole spectrum up to rounding.
        symmetric: Rayleigh-Ritz values of the symmetric part (real, the Lanczos
            answer for a Hessian); False: eig(H_k), complex in general.
        seed, sample_ids: key of the Gaussian start / restart vectors (see
            :func:`mmh_fast.ops.hutchinson_probes`).

    Returns:
        [B, k] float64 (complex128 when ``symmetric=False``), sorted by |lambda| descending.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] == 0:
        raise TypeError("x must be a floating-point tensor [B, ...] with B >= 1")
    B = x.shape[0]
    d = x[0].numel()
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}] (the dimension of one sample), got {k!r}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device

    def fresh(index: int) -> torch.Tensor:
        return hutchinson_probes(tuple(x.shape), 1, probe="gaussian", seed=seed, sample_ids=sample_ids,
                                 probe_begin=index, dtype=torch.float64, device=dev)[0].reshape(B, d)

    Q = torch.zeros(k + 1, B, d, dtype=torch.float64, device=dev)
    H = torch.zeros(B, k + 1, k, dtype=torch.float64, device=dev)
    q = fresh(0)
    Q[0] = q / q.norm(dim=1, keepdim=True)
    for j in range(k):
        w = matvec(Q[j].to(dt).reshape(x.shape))
        if not isinstance(w, torch.Tensor) or w.shape != x.shape:
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"matvec must return a tensor shaped like x {tuple(x.shape)}, got {got}")
        w = w.detach().reshape(B, d).to(torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("matvec returned NaN or inf (the operator is not finite at this point)")
        scale = w.norm(dim=1)
        # classical Gram-Schmidt twice ("twice is enough", Giraud et al. 2005) against q_0..q_j
        for _ in range(2):
            c = torch.einsum("jbd,bd->bj", Q[:j + 1], w)
            H[:, :j + 1, j] += c
            w = w - torch.einsum("bj,jbd->bd", c, Q[:j + 1])
        nrm = w.norm(dim=1)
        H[:, j + 1, j] = nrm
        if j + 1 == k:
            break
        # an invariant Krylov space (relative residual at rounding level): restart orthogonally
        dead = nrm <= 1e-10 * scale.clamp_min(torch.finfo(torch.float64).tiny)
        if bool(dead.any()):
            H[dead, j + 1, j] = 0
            # keyed by the step, not by a batch-wide restart count, so a sample's restart
            # vector does not depend on whether a batch-mate restarted first
            r = fresh(j + 1)
            for _ in range(2):
                r = r - torch.einsum("bj,jbd->bd", torch.einsum("jbd,bd->bj", Q[:j + 1], r), Q[:j + 1])
            w = torch.where(dead[:, None], r, w)
            nrm = w.norm(dim=1)
        Q[j + 1] = w / nrm[:, None]
    Hk = H[:, :k, :k]
    if symmetric:
        ev = torch.linalg.eigvalsh((Hk + Hk.transpose(1, 2)) / 2)
    else:
        ev = torch.linalg.eigvals(Hk)
    order = ev.abs().argsort(dim=1, descending=True)
    return ev.gather(1, order)
