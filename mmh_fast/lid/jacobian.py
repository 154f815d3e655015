"""LID of a decoder-based model: the rank of its Jacobian (MMH paper App. B.3, C.1).

For a generator G: R^d -> R^D (GAN generator, VAE decoder, flow) and a
generated point x = G(z), LID_theta(x) = rank grad G(z). Numerically the rank is
the number of singular values of the D x d Jacobian above a threshold tau; the
paper sets tau to the 10th percentile of all singular values computed over the
generated set (App. C.1), because computed singular values are rarely exactly 0.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import numpy as np
import torch

from .. import ops
# An OOM is always re-raised, never taken for missing forward-mode AD or a
# failed batched product, whose fallbacks would hide it behind a slower path.
from ..models.batching import is_oom as _is_oom

__all__ = ["jacobian_rank", "AUTO_RANDOMIZED_MIN_LATENT", "JACOBIAN_BUDGET"]

# method="auto" sketches only latents larger than this (and only with an explicit threshold).
AUTO_RANDOMIZED_MIN_LATENT = 256
# Entries of Jacobian (or of one-hot cotangents) held at once when batch_size is None.
JACOBIAN_BUDGET = 1 << 25
# Posterior error probes of the randomized sketch (failure probability 10**-P, see _sketch_chunk).
_N_ERROR_PROBES = 10
# Probe indices of the error probes: far above the sketch's [0, l) with l <= d,
# and inside the counter's 2**34 probe indices (ops.PROBE_INDEX_LIMIT), so they
# are independent of the sketch's columns (index 2**40 once aliased to 0).
_ERROR_PROBE_OFFSET = 1 << 33


def _check_generator_output(x, z: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"generator must return a tensor, got {type(x).__name__}; wrap it, e.g. "
            "jacobian_rank(lambda z: vae.decode(z).sample, z)")
    if x.dim() < 1 or x.shape[0] != z.shape[0]:
        raise ValueError(f"generator output must have the batch dimension of z first ({z.shape[0]}), "
                         f"got shape {tuple(x.shape)}")
    return x


def _slice_kwargs(kwargs: dict, B: int, sl) -> dict:
    """Per-sample keyword tensors (leading dimension B) follow the chunk of z."""
    return {k: (v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v)
            for k, v in kwargs.items()}


class _Operator:
    """Matvecs of the Jacobians of one chunk of samples z [b, *latent].

    Samples are assumed independent inside G (eval mode), so one JVP with
    tangent v [b, *latent] gives J_b v_b for every sample at once, and a batch
    of c tangents [c, b, *latent] is vmapped."""

    def __init__(self, G: Callable, z: torch.Tensor, kwargs: dict):
        self.G, self.z, self.kwargs = G, z, kwargs
        self.b = z.shape[0]
        self.d = z[0].numel()

    def f(self, zz):
        return _check_generator_output(self.G(zz, **self.kwargs), zz)

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """V [c, b, d] -> J V [c, b, D] (forward mode, vmapped over c)."""
        c = V.shape[0]
        V = V.reshape(c, *self.z.shape).to(self.z.dtype)

        def one(v):
            return torch.func.jvp(self.f, (self.z,), (v,))[1]

        with torch.no_grad():
            out = torch.func.vmap(one)(V)
        return out.reshape(c, self.b, -1)

    def vjp(self, U: torch.Tensor, out_shape) -> torch.Tensor:
        """U [c, b, D] -> J^T U [c, b, d] (reverse mode, vmapped over c)."""
        c = U.shape[0]
        _, fn = torch.func.vjp(self.f, self.z)
        g = torch.func.vmap(lambda u: fn(u)[0])(U.reshape(c, *out_shape).to(self.z.dtype))
        return g.reshape(c, self.b, -1)


def _jacobian_forward(op: _Operator) -> torch.Tensor:
    """J [b, D, d]: one JVP per latent direction, all samples at once."""
    eye = torch.eye(op.d, dtype=op.z.dtype, device=op.z.device)
    basis = eye.unsqueeze(1).expand(op.d, op.b, op.d)
    return op.jvp(basis).permute(1, 2, 0)


def _jacobian_reverse(op: _Operator) -> torch.Tensor:
    """J [b, D, d] by reverse mode only: one VJP per output coordinate (rows of
    J), batched over chunks of coordinates with is_grads_batched; one plain
    backward per coordinate if the model cannot be vmapped. D VJPs instead of
    d JVPs: the slow path for models without forward-mode AD."""
    zz = op.z.detach().requires_grad_(True)
    with torch.enable_grad():
        x = op.f(zz).reshape(op.b, -1)
    D = x.shape[1]
    J = torch.empty(op.b, D, op.d, dtype=op.z.dtype, device=op.z.device)
    c = max(1, min(D, JACOBIAN_BUDGET // max(1, op.b * D)))
    batched = True
    for i0 in range(0, D, c):
        i1 = min(D, i0 + c)
        if batched:
            E = torch.zeros(i1 - i0, op.b, D, dtype=x.dtype, device=x.device)
            E[torch.arange(i1 - i0), :, torch.arange(i0, i1)] = 1
            try:
                g = torch.autograd.grad(x, zz, E, retain_graph=True, is_grads_batched=True)[0]
                J[:, i0:i1, :] = g.reshape(i1 - i0, op.b, op.d).permute(1, 0, 2)
                continue
            except RuntimeError as exc:
                if _is_oom(exc):
                    raise
                batched = False
        for i in range(i0, i1):
            g = torch.autograd.grad(x[:, i].sum(), zz, retain_graph=True)[0]
            J[:, i, :] = g.reshape(op.b, op.d)
    return J.detach()


def _sketch_chunk(op: _Operator, ids: torch.Tensor, l: int, n_iter: int, seed: int):
    """Randomized range finder on the Jacobians of a chunk (Halko, Martinsson &
    Tropp 2011, Alg. 4.4): Q = orth(J Omega), n_iter power iterations through
    J^T (VJPs) and J (JVPs) with QR after each product, then M = Q^T J [b, l, d]
    by VJPs. Returns (M, err): err[b] bounds ||(I - Q Q^T) J_b||_2 with
    probability at least 1 - 10^-10 (ibid. Lemma 4.1: 10 sqrt(2/pi) times the
    largest residual of 10 fresh Gaussian probes)."""
    dtype = op.z.dtype
    omega = ops.hutchinson_probes((op.b, op.d), l, probe="gaussian", seed=seed, sample_ids=ids,
                                  dtype=dtype, device=op.z.device)           # [l, b, d]
    Y = op.jvp(omega)                                                       # [l, b, D]
    with torch.no_grad():
        out_shape = tuple(op.f(op.z).shape)
    Q = torch.linalg.qr(Y.permute(1, 2, 0)).Q                               # [b, D, l]
    for _ in range(n_iter):
        Z = torch.linalg.qr(op.vjp(Q.permute(2, 0, 1), out_shape).permute(1, 2, 0)).Q  # [b, d, l]
        Q = torch.linalg.qr(op.jvp(Z.permute(2, 0, 1)).permute(1, 2, 0)).Q
    M = op.vjp(Q.permute(2, 0, 1), out_shape).permute(1, 0, 2).detach()  # [b, l, d] = Q^T J
    w = ops.hutchinson_probes((op.b, op.d), _N_ERROR_PROBES, probe="gaussian", seed=seed, sample_ids=ids,
                              probe_begin=_ERROR_PROBE_OFFSET, dtype=dtype, device=op.z.device)
    Jw = op.jvp(w).permute(1, 2, 0)                                         # [b, D, p]
    res = Jw - Q @ (Q.transpose(1, 2) @ Jw)
    err = 10.0 * math.sqrt(2.0 / math.pi) * res.norm(dim=1).max(dim=1).values
    return M, err.detach()


def _check_z(z) -> torch.Tensor:
    if isinstance(z, np.ndarray):
        z = torch.from_numpy(np.ascontiguousarray(z))
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor or numpy.ndarray, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"z must be a batch [B, *latent_shape] with at least 2 dimensions, got shape "
                         f"{tuple(z.shape)}")
    if z.shape[0] == 0 or z[0].numel() == 0:
        raise ValueError(f"z must be non-empty, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be floating point, got dtype {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z contains NaN or inf values")
    return z


def _warn_batchnorm(G) -> None:
    if isinstance(G, torch.nn.Module):
        for m in G.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training:
                warnings.warn("generator has BatchNorm layers in training mode, which couple the samples "
                              "of a batch; call generator.eval() so that each Jacobian is per sample",
                              stacklevel=3)
                return


def jacobian_rank(generator: Callable, z, *, threshold: float | None = None, percentile: float = 10,
                  method: str = "auto", batch_size: int | None = None,
                  return_singular_values: bool = False, ad: str = "auto", rank_hint: int = 32,
                  oversample: int = 10, n_iter: int = 1, seed: int = 0, **gen_kwargs):
    """Rank of the generator Jacobian grad G(z) per sample: LID_theta of G(z).

    Args:
        generator: torch module or callable, ``generator(z, **gen_kwargs)`` ->
            tensor [B, *out_shape] (any output shape; flattened to D entries).
            Samples must be processed independently (call ``.eval()``); a model
            returning a structure needs a wrapper, e.g. ``lambda z: vae.decode(z).sample``.
        z: latents [B, *latent_shape] (d = prod(latent_shape)), float tensor
            on the model's device, or a numpy array.
        threshold: singular values > threshold count. None: the paper's rule,
            tau = the ``percentile``-th percentile (numpy's linear
            interpolation) of all B * min(D, d) singular values of this call.
        percentile: in [0, 100] (default 10).
        method: "exact" -- the full Jacobian J [B, D, d] and its singular
            values (ops.svd_rank, Gram + eigh in float64 with SVD fallback);
            "randomized" -- a sketch of J from JVP/VJP matvecs (needs an
            explicit threshold, since the percentile rule needs every singular
            value): l = rank_hint + oversample columns, n_iter power
            iterations, the exact singular values of Q^T J, and a posterior
            bound on the residual; samples whose count of values above the
            threshold is not decided by those bounds get a sketch twice as
            wide, up to d / 2, then the exact path. "auto" -- "randomized"
            when threshold is given and d > 256 (AUTO_RANDOMIZED_MIN_LATENT),
            else "exact" (d JVPs per sample are cheap for small latents).
        batch_size: samples per chunk (bounds memory: the exact path holds
            batch_size * D * d Jacobian entries). None: as many as fit in
            JACOBIAN_BUDGET = 2**25 entries (at least one).
        return_singular_values: also return the singular values.
        ad: "auto" (forward mode; on failure -- some modules have no
            forward-mode AD, e.g. diffusers attention on CPU -- a warning and
            reverse mode), "forward", or "reverse" (one VJP per output
            coordinate: D backward passes instead of d forward ones). An
            out-of-memory error is never a reason to fall back: it is raised
            (lower ``batch_size``).
        rank_hint, oversample, n_iter, seed: randomized sketch (seed keys the
            counter-based Gaussian probes by sample index, so a sample's sketch
            does not depend on batch_size).
        **gen_kwargs: passed to the generator; tensors whose first dimension is
            B are sliced with the chunks of z (e.g. class labels).

    Returns:
        ranks [B] int64 (on z's device); with ``return_singular_values`` also
        the singular values [B, r] descending (exact: r = min(D, d);
        randomized: each sample's sketch estimates, NaN past its own sketch).
    """
    if not callable(generator):
        raise TypeError(f"generator must be callable (a torch module or function), got {type(generator).__name__}")
    z = _check_z(z)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a real number or None, got {type(threshold).__name__}")
        threshold = float(threshold)
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real) or not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}")
    if ad not in ("auto", "forward", "reverse"):
        raise ValueError(f"ad must be 'auto', 'forward' or 'reverse', got {ad!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    for name, value, low in (("rank_hint", rank_hint, 1), ("oversample", oversample, 0), ("n_iter", n_iter, 0),
                             ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    B, d = z.shape[0], z[0].numel()
    if method == "randomized" and threshold is None:
        raise ValueError("method='randomized' needs an explicit threshold: the percentile rule "
                         "(threshold=None) needs every singular value, which only method='exact' computes")
    if method == "auto":
        method = "randomized" if (threshold is not None and d > AUTO_RANDOMIZED_MIN_LATENT) else "exact"
    _warn_batchnorm(generator)

    # output size from the first samples (also validates the generator's output;
    # two samples, not one, so that training-mode BatchNorm still runs)
    head = slice(0, min(B, 2))
    with torch.no_grad():
        x0 = _check_generator_output(generator(z[head], **_slice_kwargs(gen_kwargs, B, head)), z[head])
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("generator output contains NaN or inf values at z[:2]")
    D = x0[0].numel()
    if batch_size is None:
        batch_size = max(1, JACOBIAN_BUDGET // max(1, D * d))

    state = {"ad": ad}

    def full_jacobian(op: _Operator) -> torch.Tensor:
        if state["ad"] in ("auto", "forward"):
            try:
                J = _jacobian_forward(op)
                state["ad"] = "forward"
                return J
            except (RuntimeError, NotImplementedError, TypeError) as exc:
                if state["ad"] == "forward" or _is_oom(exc):
                    raise
                warnings.warn(f"forward-mode AD failed for this generator ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); using reverse mode (one VJP per output "
                              f"coordinate, {D} per chunk)", stacklevel=3)
                state["ad"] = "reverse"
        return _jacobian_reverse(op)

    ranks = torch.zeros(B, dtype=torch.int64)
    values: list[tuple[torch.Tensor, torch.Tensor]] = []  # (sample indices, singular values)
    for start in range(0, B, batch_size):
        sl = slice(start, min(B, start + batch_size))
        op = _Operator(generator, z[sl], _slice_kwargs(gen_kwargs, B, sl))
        pending = torch.arange(sl.start, sl.stop)
        if method == "randomized":
            pending = _randomized_chunk(op, pending, threshold, ranks, values, rank_hint + oversample,
                                        n_iter, seed, state)
        if pending.numel() == 0:
            continue
        if pending.numel() < op.b:
            op = _Operator(generator, z[pending], _slice_kwargs(gen_kwargs, B, pending))
        J = full_jacobian(op)
        if not bool(torch.isfinite(J).all()):
            raise ValueError("the generator Jacobian contains NaN or inf values")
        if threshold is None:
            # a threshold above every singular value (twice the largest Frobenius
            # norm) makes svd_rank return the values with no SVD fallback; the
            # percentile rule counts once all chunks are in
            big = 2.0 * float(torch.linalg.vector_norm(J, dim=(1, 2)).max()) + 1.0
            _, s = ops.svd_rank(J, threshold=big, rule="threshold", method="exact")
        else:
            r, s = ops.svd_rank(J, threshold=threshold, rule="threshold", method="exact")
            ranks[pending] = r.cpu()
        values.append((pending, s.cpu()))

    width = max(s.shape[1] for _, s in values)
    dtype = values[0][1].dtype
    S = torch.full((B, width), float("nan"), dtype=dtype)
    for idx, s in values:
        S[idx, : s.shape[1]] = s
    if threshold is None:
        tau = float(np.percentile(S[torch.isfinite(S)].numpy(), percentile))
        ranks = (S > tau).sum(dim=1).to(torch.int64)
    ranks = ranks.to(z.device)
    if return_singular_values:
        return ranks, S.to(z.device)
    return ranks


def _randomized_chunk(op: _Operator, idx: torch.Tensor, tau: float, ranks: torch.Tensor, values: list,
                      l0: int, n_iter: int, seed: int, state: dict) -> torch.Tensor:
    """Sketch the chunk's Jacobians, growing the sketch for samples whose rank
    the bounds do not decide; returns the sample indices left for the exact path."""
    d = op.d
    l = min(d, l0)
    eps = torch.finfo(op.z.dtype).eps
    local = torch.arange(op.b)
    while local.numel() > 0 and 2 * l <= d and state["ad"] != "reverse":
        sub = op if local.numel() == op.b else _Operator(op.G, op.z[local],
                                                         _slice_kwargs(op.kwargs, op.b, local))
        try:
            M, err = _sketch_chunk(sub, idx[local].to(op.z.device), l, n_iter, seed)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            if state["ad"] == "forward" or _is_oom(exc):
                raise
            break  # no forward AD: the exact path falls back to reverse mode
        _, s = ops.svd_rank(M, threshold=tau, rule="threshold", method="exact")
        s64 = s.to(torch.float64)
        # rounding of the float matvecs, then Weyl: s_i^2 <= shat_i^2 + err^2
        slack = 8.0 * eps * math.sqrt(M.shape[2]) * s64[:, :1]
        lo = (s64 - slack).clamp_min(0)
        hi = torch.sqrt((s64 + slack) ** 2 + err.to(torch.float64)[:, None] ** 2)
        decided = ((lo > tau) | (hi <= tau)).all(dim=1) & (err.to(torch.float64) <= tau)
        done = decided.cpu()
        if bool(done.any()):
            ranks[idx[local[done]]] = (lo[decided] > tau).sum(dim=1).cpu()
            values.append((idx[local[done]], s[decided].cpu()))
        local = local[~done]
        l *= 2
    return idx[local]
