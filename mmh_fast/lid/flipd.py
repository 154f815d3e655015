"""FLIPD: local intrinsic dimension of a diffusion model at a point.

FLIPD(x, t0) = d + sigma(t0)^2 ( tr grad s(psi(t0) x, t0) + |s(psi(t0) x, t0)|^2 )
(MMH paper Eq. 6; Eq. 14 for DDIM's rescaled process gives the same number),
evaluated at psi(t0) x with no noise added. With s = -eps / sigma this is

    FLIPD = d - sigma tr(d eps / d x_t) + |eps|^2,

which is what is computed: one network evaluation gives eps (hence |eps|^2)
and keeps the graph; the trace comes from matrix-vector products with the
Jacobian of eps at that same evaluation:

- ``method="vjp"`` (default, works for every diffusers network): v^T J v =
  (J^T v) . v, one backward pass per probe through the retained graph.
- ``method="jvp"``: forward-mode AD (torch.func.jvp) over a batch holding one
  copy of x per probe; the primal output of that same pass gives |eps|^2.
  diffusers networks are run on the math attention path (see
  :mod:`mmh_fast.models.forward_ad`).

The trace is exact (``trace="exact"``: the d basis vectors, batched through the
network as replicated rows) or a Hutchinson estimate whose probes come from the
native counter-based kernel keyed by (seed, sample id, probe index): a sample's
value does not depend on ``batch_size`` or on the other samples in its batch.
With ``guidance_scale`` the score is the CFG-adjusted one,
s_u + lambda (s_c - s_u), and its Jacobian's trace is taken (Eq. 26).
All reductions and the final combination are in float64, returned as float32
(float64 for float64 input), whatever the network's precision.

Samples run in chunks (default size from the network's parameter count and
the sample size, :func:`mmh_fast.models.batching.default_batch_size`, with a
backward pass); an out-of-memory error halves the chunk and retries it, and
the probes' keys make the values independent of the chunking. A NaN or inf
in the network's eps, or a value that overflows the returned dtype, raises
:class:`~mmh_fast.models.batching.NonFiniteOutputError` naming the positions.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from ..models.batching import check_finite as check_finite_output
from ..models.batching import default_batch_size, is_oom, run_chunked
from ..models.denoiser import model_device
from ..models.forward_ad import forward_ad_safe
from ..models.pipelines import ResolvedModel, resolve_model
from ..models.schedules import check_t
from ..ops._arrays import as_tensor, check_finite
from ..ops._dispatch import kernel
from ..ops.hutchinson import PROBE_KINDS

__all__ = ["flipd", "flipd_curve", "FLIPD_TRACES", "FLIPD_METHODS", "EXACT_TRACE_MAX_DIM"]

FLIPD_TRACES = ("auto", "exact", "hutchinson")
FLIPD_METHODS = ("vjp", "jvp")
#: ``trace="auto"`` takes the exact trace up to this dimension
EXACT_TRACE_MAX_DIM = 64
#: with an explicit batch_size, the replicated (exact / jvp) paths still take up to this many rows per call
_DEFAULT_ROWS = 256


@dataclass
class _Plan:
    trace: str
    method: str
    n_probes: int
    kind: int
    seed: int
    batch_size: int
    probe_batch: int | None
    return_stderr: bool
    rows: int  # most rows per network call in the replicated paths (scaled down with the chunk on OOM)


def _check_int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {lo}, got {v!r}")
    v = int(v)
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


def _plan(d: int, B: int, *, trace, method, n_probes, probe, seed, batch_size, probe_batch, return_stderr,
          default_rows: int) -> _Plan:
    if trace not in FLIPD_TRACES:
        raise ValueError(f"trace must be one of {FLIPD_TRACES}, got {trace!r}")
    if method not in FLIPD_METHODS:
        raise ValueError(f"method must be one of {FLIPD_METHODS}, got {method!r}")
    if probe not in PROBE_KINDS:
        raise ValueError(f"probe must be one of {sorted(PROBE_KINDS)}, got {probe!r}")
    n_probes = _check_int(n_probes, "n_probes", 1)
    seed = _check_int(seed, "seed", 0)
    if batch_size is None:
        # default_rows: network rows that fit the memory budget with a backward pass
        # (default_batch_size); one row per sample in the Hutchinson-vjp path
        batch_size, rows = min(B, default_rows), default_rows
    else:
        batch_size = _check_int(batch_size, "batch_size", 1)
        rows = max(batch_size, _DEFAULT_ROWS)
    probe_batch = None if probe_batch is None else _check_int(probe_batch, "probe_batch", 1)
    if trace == "auto":
        trace = "exact" if d <= EXACT_TRACE_MAX_DIM else "hutchinson"
    if return_stderr and trace == "hutchinson" and n_probes < 2:
        raise ValueError("return_stderr needs n_probes >= 2 (a standard error from one probe is undefined)")
    return _Plan(trace, method, n_probes, PROBE_KINDS[probe], seed, batch_size, probe_batch, bool(return_stderr),
                 rows)


def _prepare(model, x, *, scheduler, cond, uncond, guidance_scale, prediction_type, encode, sample_ids):
    """Validate x, resolve the model, encode x into the network's space.
    Returns (resolved, z [B, ...] float32/64 on the model device, ids [B] int64, back, out_device)."""
    xt, back = as_tensor(x, "x")
    if not xt.is_floating_point():
        raise TypeError(f"x must hold floating-point values, got dtype {xt.dtype}")
    if xt.dim() < 2 or xt.shape[0] == 0 or xt[0].numel() == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...] with B >= 1 and at least one feature, "
                         f"got shape {tuple(xt.shape)}")
    check_finite(xt, "x")
    B = xt.shape[0]
    res = resolve_model(model, scheduler=scheduler, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                        prediction_type=prediction_type, n=B)
    work = torch.float64 if xt.dtype == torch.float64 else torch.float32
    if res.pipeline is not None and encode:
        lo, hi = float(xt.min()), float(xt.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"x must be images in [-1, 1] when model is a pipeline, got values in [{lo:.3g}, "
                             f"{hi:.3g}] (pass encode=False if x is already in the network's space)")
        # the VAE in chunks sized from its parameters and the image size (halved on OOM)
        enc = getattr(res.pipeline, "vae", None) or res.denoiser.model
        xw = xt.to(work)
        z = torch.cat(run_chunked(lambda a, b: res.encode(xw[a:b]), B, what="the pipeline's image encoder",
                                  batch_size=default_batch_size(enc, tuple(xt.shape[1:]), device=model_device(enc))))
        check_finite_output(z, what="the VAE latents of x", dim=0)
    else:
        z = xt
    net = res.denoiser.model
    z = z.to(model_device(net), work)
    _check_fits(net, z)
    if sample_ids is None:
        ids = torch.arange(B, dtype=torch.int64)
    else:
        ids = torch.as_tensor(sample_ids).reshape(-1)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"sample_ids must be integers, got dtype {ids.dtype}")
        ids = ids.to(torch.int64)
        if ids.numel() != B:
            raise ValueError(f"sample_ids has {ids.numel()} entries but x has {B} samples")
        if bool((ids < 0).any()):
            raise ValueError("sample_ids must be non-negative")
    return res, z, ids.to(z.device), back, xt.device


def _check_fits(net, z: torch.Tensor) -> None:
    """Cheap shape checks for diffusers networks (the generic check is the
    first network call, whose failure is reported with x's shape)."""
    cfg = getattr(net, "config", None)
    if cfg is None:
        return
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    c = get("in_channels", None)
    if isinstance(c, int) and (z.dim() != 4 or z.shape[1] != c):
        raise ValueError(f"x (in the network's space) has shape {tuple(z.shape)}, but {type(net).__name__} "
                         f"takes [B, {c}, H, W]")


def _call_checked(fn, inp, *, jvp_mode: bool = False):
    """Run fn and turn a failure of the network on this input into a clear error."""
    try:
        return fn(inp)
    except (RuntimeError, IndexError) as e:
        if is_oom(e):
            raise
        raise ValueError(f"the model failed on input of shape {tuple(inp.shape)}: does x fit the model? "
                         f"({type(e).__name__}: {e})") from e


def _chunk_terms(res: ResolvedModel, z: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, n_total: int,
                 t0: float, plan: _Plan, max_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(|eps|^2 [b], trace of J_eps [b], probe dots [P, b] or None) at psi(t0) z[rows]
    (rows: consecutive positions of x); replicated calls take at most max_rows rows.
    A non-finite eps raises NonFiniteOutputError with the positions in x."""
    den = res.denoiser
    psi, sigma, ts = den.coefficients(t0, z.device)
    x_t = psi * z.index_select(0, rows)
    b = x_t.shape[0]
    d = x_t[0].numel()
    gs = res.guidance_scale

    def eps_of(rep: int):
        rr = rows.repeat(rep)
        cond, uncond = res.kwargs_for(rr, n_total)

        def f(inp):
            return den.eps_at(inp, psi, sigma, ts, cond=cond, uncond=uncond, guidance_scale=gs)
        return f

    gen = kernel("hutchinson_probes", z.device)
    reduce = kernel("hutchinson_reduce", z.device)
    what = f"the network's noise prediction at t0={t0:g}"
    first = int(rows[0])

    if plan.trace == "hutchinson" and plan.method == "vjp":
        f = eps_of(1)
        xin = x_t.detach().requires_grad_(True)
        with torch.enable_grad():
            eps = _call_checked(f, xin)
        check_finite_output(eps, what=what, offset=first)
        sq = eps.detach().reshape(b, -1).to(torch.float64).pow(2).sum(1)
        dots = []
        for p in range(plan.n_probes):
            v = gen(ids, d, p, 1, plan.seed, plan.kind, eps.dtype).reshape(eps.shape)
            (g,) = torch.autograd.grad(eps, xin, v, retain_graph=p < plan.n_probes - 1)
            dots.append(reduce(g.detach().reshape(1, b, d), ids, p, plan.seed, plan.kind)[2])
        dots = torch.cat(dots)
        return sq, dots.mean(0), dots

    # replicated rows: `rep` copies of the chunk per network call, one per probe / basis vector
    n_vec = d if plan.trace == "exact" else plan.n_probes
    rows_cap = max_rows if plan.probe_batch is None else plan.probe_batch * b
    per_call = max(1, min(n_vec, rows_cap // b))
    sq = None
    acc = []
    for p0 in range(0, n_vec, per_call):
        rep = min(per_call, n_vec - p0)
        f = eps_of(rep)
        X = x_t.detach().repeat((rep,) + (1,) * (x_t.dim() - 1))
        if plan.trace == "exact":
            # basis vectors e_{p0..p0+rep-1}, the same for every sample of the chunk
            V = torch.zeros(rep, b, d, dtype=X.dtype, device=X.device)
            V[torch.arange(rep), :, p0 + torch.arange(rep)] = 1
        else:
            V = gen(ids, d, p0, rep, plan.seed, plan.kind, X.dtype)
        V = V.reshape(X.shape)
        if plan.method == "jvp":
            eps, av = _jvp(den.model, f, X, V)
        else:
            xin = X.requires_grad_(True)
            with torch.enable_grad():
                eps = _call_checked(f, xin)
                (av,) = torch.autograd.grad(eps, xin, V)
        # copy j of sample i is row j b + i
        check_finite_output(eps, what=what, index=first + torch.arange(eps.shape[0]) % b)
        if sq is None:
            sq = eps[:b].detach().reshape(b, -1).to(torch.float64).pow(2).sum(1)
        av = av.detach().reshape(rep, b, d)
        if plan.trace == "exact":
            acc.append(av[torch.arange(rep), :, p0 + torch.arange(rep)].to(torch.float64))  # [rep, b] diagonal
        else:
            acc.append(reduce(av, ids, p0, plan.seed, plan.kind)[2])
    dots = torch.cat(acc)
    if plan.trace == "exact":
        return sq, dots.sum(0), None
    return sq, dots.mean(0), dots


def _jvp(model, f, X, V):
    """(f(X), J_f(X) V) by forward-mode AD, with a clear error where torch or the
    network has no forward-AD support."""
    try:
        with forward_ad_safe(model):
            return torch.func.jvp(f, (X,), (V,))
    except (RuntimeError, NotImplementedError) as e:
        if is_oom(e):
            raise
        try:
            with torch.no_grad():
                f(X[:1] if X.shape[0] > 0 else X)
        except Exception:
            pass
        else:
            raise RuntimeError("method='jvp' needs forward-mode AD through the model, which torch does not support "
                               f"for it here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); use method='vjp' "
                               "(the default), which gives the same trace") from e
        raise ValueError(f"the model failed on input of shape {tuple(X.shape)}: does x fit the model? "
                         f"({type(e).__name__}: {e})") from e


def _run(res: ResolvedModel, z: torch.Tensor, ids: torch.Tensor, t0s: Sequence[float], plan: _Plan,
         out_dtype: torch.dtype):
    """FLIPD [B, T] and standard errors [B, T] (float64), chunk by chunk of samples
    (halved on out-of-memory, the replicated rows per call with it)."""
    B = z.shape[0]
    d = z[0].numel()
    T = len(t0s)

    def chunk(s0: int, s1: int):
        rows = torch.arange(s0, s1, device=z.device)
        cid = ids.index_select(0, rows)
        n = s1 - s0
        max_rows = plan.rows if n >= plan.batch_size else max(n, plan.rows * n // plan.batch_size)
        out = torch.empty(n, T, dtype=torch.float64)
        se = torch.zeros(n, T, dtype=torch.float64)
        for j, t0 in enumerate(t0s):
            sigma = float(res.denoiser.schedule.psi_sigma(t0)[1])
            sq, tr, dots = _chunk_terms(res, z, rows, cid, B, t0, plan, max_rows)
            val = d - sigma * tr + sq
            # finite in float64 but not in the returned dtype (|eps|^2 of huge outputs) is an overflow too
            check_finite_output(val.to(out_dtype), what=f"FLIPD at t0={t0:g} (d - sigma tr J + |eps|^2, in "
                                f"{str(out_dtype).replace('torch.', '')})", offset=s0)
            out[:, j] = val.cpu()
            if plan.return_stderr and dots is not None:
                se[:, j] = (sigma * dots.std(0, unbiased=True) / math.sqrt(dots.shape[0])).cpu()
        return out, se

    parts = run_chunked(chunk, B, batch_size=plan.batch_size, what="flipd")
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def flipd(model, x, t0: float = 0.05, *, scheduler=None, cond=None, uncond=None, guidance_scale=None,
          n_probes: int = 1, probe: str = "rademacher", trace: str = "auto", method: str = "vjp", seed: int = 0,
          batch_size: int | None = None, sample_ids=None, return_stderr: bool = False,
          prediction_type: str | None = None, encode: bool = True, probe_batch: int | None = None):
    """FLIPD(x, t0) of a diffusion model (MMH paper Eq. 6; Eq. 26 with guidance).

    Args:
        model: a diffusers UNet2DModel / UNet2DConditionModel, any callable
            ``model(x_t, timestep, **kwargs)`` returning a tensor, ``.sample`` or a
            tuple, or a diffusers pipeline (DDPMPipeline, DDIMPipeline,
            StableDiffusionPipeline). With a latent pipeline x is encoded by its
            VAE (posterior mean * scaling_factor) and FLIPD is computed in latent space.
        x: [B, ...] float tensor (or numpy array): points in the network's space,
            or images in [-1, 1] [B, C, H, W] for a pipeline. NaN/inf rejected.
        t0: continuous time in (0, 1]; a discrete scheduler maps it to the
            fractional timestep t0 * num_train_timesteps (alphas_cumprod interpolated).
        scheduler: diffusers scheduler or :class:`~mmh_fast.models.Schedule`; default:
            the pipeline's, or DDPMScheduler() defaults (one-time warning) for a bare network.
        cond: pipeline: a caption or list of B captions ("" = unconditional, the default
            for text pipelines); bare network: a dict of model kwargs or an
            ``encoder_hidden_states`` / ``class_labels`` tensor with 1 or B rows.
        uncond: the unconditional branch for ``guidance_scale`` (pipelines: "" by default).
        guidance_scale: lambda of the CFG score s_u + lambda (s_c - s_u) (Eq. 26).
        n_probes: Hutchinson probes per sample (>= 1; the paper's memorization runs use 1).
        probe: "rademacher" or "gaussian".
        trace: "exact" (d Jacobian-vector products), "hutchinson", or "auto"
            (exact when d <= 64).
        method: "vjp" (default; reverse mode, works for every diffusers network)
            or "jvp" (forward mode; a RuntimeError says so where torch cannot do it).
        seed: probe key; with ``sample_ids`` it fixes every probe.
        batch_size: samples per chunk (default: the rows that fit the memory budget with a
            backward pass, :func:`~mmh_fast.models.batching.default_batch_size` of the
            network and the sample shape, x2 passes under guidance; at most B). On
            out-of-memory the chunk is halved and retried, with a warning. Results do not
            depend on it.
        sample_ids: [B] non-negative integer ids keying each sample's probes (default:
            the index in x). Give stable dataset ids to make values reproducible across runs
            that batch or order the data differently.
        return_stderr: also return the Hutchinson standard error of each value
            (needs n_probes >= 2; zeros for the exact trace).
        prediction_type: overrides the scheduler's "epsilon" / "v_prediction" / "sample".
        encode: for pipelines, False when x is already in latent space.
        probe_batch: probes (or basis vectors) per network call in the exact and jvp paths
            (default: as many as keep a call within max(batch_size, 256) rows).

    Returns:
        FLIPD values [B] (float32; float64 for float64 x), on x's device, and with
        ``return_stderr`` their standard errors [B]. Values need not be integers
        and can be negative; low values mean low LID (memorization, Sec. 4.1).

    Raises:
        NonFiniteOutputError: (a ValueError) the network's eps, or a FLIPD value in the
            returned dtype, is NaN / inf; ``.positions`` are the affected samples of x.
    """
    t0 = check_t(t0, "t0")
    out = _flipd_many(model, x, [t0], scheduler=scheduler, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                      n_probes=n_probes, probe=probe, trace=trace, method=method, seed=seed, batch_size=batch_size,
                      sample_ids=sample_ids, return_stderr=return_stderr, prediction_type=prediction_type,
                      encode=encode, probe_batch=probe_batch)
    if return_stderr:
        return out[0][:, 0], out[1][:, 0]
    return out[:, 0]


def flipd_curve(model, x, t0s: Sequence[float], **kw):
    """FLIPD at several times: [B, len(t0s)] (with ``return_stderr``, also the
    standard errors [B, len(t0s)]). Keyword arguments as :func:`flipd`.

    Work shared across t0: model resolution, VAE encoding of x, text encoding of
    the captions, and the probes (each t0 uses the same probes of each sample, so
    differences between times are not probe noise)."""
    if isinstance(t0s, (int, float)):
        t0s = [t0s]
    t0s = [check_t(t, "t0s") for t in t0s]
    if not t0s:
        raise ValueError("t0s must hold at least one time")
    return _flipd_many(model, x, t0s, **kw)


def _flipd_many(model, x, t0s, *, scheduler=None, cond=None, uncond=None, guidance_scale=None, n_probes=1,
                probe="rademacher", trace="auto", method="vjp", seed=0, batch_size=None, sample_ids=None,
                return_stderr=False, prediction_type=None, encode=True, probe_batch=None):
    if isinstance(n_probes, bool) or not isinstance(n_probes, numbers.Integral) or n_probes < 1:
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    res, z, ids, back, out_dev = _prepare(model, x, scheduler=scheduler, cond=cond, uncond=uncond,
                                          guidance_scale=guidance_scale, prediction_type=prediction_type,
                                          encode=encode, sample_ids=sample_ids)
    net = res.denoiser.model
    rows = default_batch_size(net, tuple(z.shape[1:]), passes=1 if res.guidance_scale is None else 2,
                              backward=True, device=z.device)
    plan = _plan(z[0].numel(), z.shape[0], trace=trace, method=method, n_probes=n_probes, probe=probe, seed=seed,
                 batch_size=batch_size, probe_batch=probe_batch, return_stderr=return_stderr, default_rows=rows)
    dt = torch.float64 if z.dtype == torch.float64 else torch.float32
    vals, se = _run(res, z, ids, t0s, plan, dt)
    vals = back(vals.to(dt).to(out_dev))
    if return_stderr:
        return vals, back(se.to(dt).to(out_dev))
    return vals
