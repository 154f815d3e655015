"""The differentiable memorization metrics of the MMH paper, App. D.2.

For a prompt embedding c (text-encoder output hidden states) and the CFG DDIM
trajectories x_t^n (n < num_images, from x_T^n ~ N(0, I)), each metric is the
mean over the DDIM steps whose time t lies in t_range and over the images of a
per-point term. With DDIM's rescaled coordinates x~ = x / psi,
sigma~ = sigma / psi and s~(x~) = psi s(psi x~) (Eq. 11-13) one has
sigma~ s~ = sigma s = -eps, the network's own eps, so:

- "cfg"   A^CFG (Eq. 24):      sigma~^2 |s~^CFG - s~_0|^2 = lambda^2 |eps_c - eps_u|^2
          (Eq. 24 drops Eq. 23's 1 / lambda^2; divide by lambda^2 for Wen et al.'s
          Eq. 15, the squared CFG-vector norm).
- "score" A^{s CFG} (Eq. 25):  sigma~^2 |s~^CFG|^2 = |eps^CFG|^2,
          eps^CFG = eps_u + lambda (eps_c - eps_u).
- "flipd" A^FLIPD (Eq. 26-28): FLIPD~^CFG(x~; t, c) = d + sigma~^2 (tr grad s~^CFG + |s~^CFG|^2).
          Since grad_x~ s~(x~) = -(psi / sigma~) J(x_t) with J = d eps^CFG / d x_t
          at x_t = psi x~, sigma~^2 tr grad s~ = -sigma~ psi tr J = -sigma tr J, so
          FLIPD~^CFG = d - sigma tr(d eps^CFG / d x_t) + |eps^CFG|^2,
          the same number as :func:`mmh_fast.flipd` (Eq. 6) at x = x_t / psi with the
          CFG score. The trace is a Hutchinson estimate with probes from
          :func:`mmh_fast.ops.hutchinson_probes` (one VJP per probe, taken with
          create_graph so the estimate stays differentiable in c).

Low A^FLIPD and high A^CFG / A^{s CFG} flag memorization (Sec. 4.2).

What the gradient flows through: the trajectory is sampled without gradients
(x_t is treated as a fixed sample of p_t^CFG(. | c)); at each evaluated step
the metric term is differentiated through the UNet's conditional branch
eps_c(x_t, c) (and, for "flipd", through the probe VJPs). The unconditional
branch uses the empty-prompt embedding and gets no gradient. This is the
pathwise gradient of the integrand, as in Wen et al. and the MMH paper; the
dependence of the sampling distribution on c is not differentiated.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..models.forward_ad import math_attention
from ..ops.hutchinson import hutchinson_probes
from ._core import (Chunks, TextPipeline, check_batch_size, check_guidance, check_int, check_rows, step_name,
                    text_pipeline)

__all__ = ["memorization_score", "METRICS", "DEFAULT_T_RANGES"]

METRICS = ("cfg", "score", "flipd")
#: the MMH paper's scheduling distributions T(0, 1) (App. D.2)
DEFAULT_T_RANGES = {"cfg": (0.0, 1.0), "score": (0.0, 1.0), "flipd": (0.0, 0.2)}


def check_metric(metric) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def check_t_range(t_range, metric: str) -> tuple[float, float]:
    if t_range is None:
        return DEFAULT_T_RANGES[metric]
    try:
        lo, hi = (float(v) for v in t_range)
    except (TypeError, ValueError):
        raise TypeError(f"t_range must be a pair (lo, hi) of times, got {t_range!r}") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1 (the half-open interval (lo, hi]), got {t_range!r}")
    return lo, hi


@dataclass
class _Plan:
    metric: str
    guidance_scale: float
    num_images: int
    seed: int
    n_probes: int
    steps: list  # evaluated grid indices, increasing


def plan(tp: TextPipeline, metric, *, num_images, t_range, seed, num_inference_steps, guidance_scale, n_probes,
         max_timesteps):
    """Validate the options; returns (_Plan, grid)."""
    metric = check_metric(metric)
    num_images = check_int(num_images, "num_images", 1)
    seed = check_int(seed, "seed", 0)
    n_probes = check_int(n_probes, "n_probes", 1)
    guidance_scale = check_guidance(guidance_scale)
    lo, hi = check_t_range(t_range, metric)
    grid = tp.grid(num_inference_steps)
    steps = grid.indices_in((lo, hi))
    if not steps:
        raise ValueError(f"no step of the {len(grid)}-step DDIM grid (times {grid.times[-1]:.3g}..{grid.times[0]:.3g}) "
                         f"lies in t_range ({lo}, {hi}]; widen t_range or raise num_inference_steps")
    if max_timesteps is not None:
        m = check_int(max_timesteps, "max_timesteps", 1)
        if m < len(steps):  # evenly spread over the interval, both ends kept
            pick = np.unique(np.round(np.linspace(0, len(steps) - 1, m)).astype(int))
            steps = [steps[k] for k in pick]
    return _Plan(metric, guidance_scale, num_images, seed, n_probes, steps), grid


METRIC_NAMES = {"cfg": "A^CFG (Eq. 24)", "score": "A^{s CFG} (Eq. 25)", "flipd": "A^FLIPD (Eq. 28)"}


def run_metric(tp: TextPipeline, cond: torch.Tensor, p: _Plan, grid, *,
               on_step: Callable[[int, float, torch.Tensor, torch.Tensor | None], None],
               callback: Callable | None = None, grad: bool = False, batch_size: int | None = None) -> None:
    """Walk the CFG DDIM trajectories of N prompts x num_images and call
    ``on_step(i, t_i, value, g)`` at each evaluated step: value [N] (float64,
    detached) is the metric term averaged over the prompt's images and, with
    ``grad``, g [N, L, D] (tp.work_dtype) is d value.sum() / d cond, i.e. row n
    holds d value[n] / d cond[n] (rows never mix: one prompt's images see only its
    embedding); g is None otherwise. Stops after the last evaluated step.

    The gradient is taken step by step and, for "flipd", probe by probe: each
    probe's double-backward graph is freed before the next, and each step's
    forward graph before the next step, so memory does not grow with the
    number of evaluated steps or probes (the sum of the pieces is the gradient
    of the whole sum: differentiation is linear).

    Image n of every prompt starts from the latent keyed by (seed, n); the
    Hutchinson probes of image n at step i are keyed by (seed, n * len(grid) + i),
    so a prompt's values do not depend on the other prompts or on the chunking.
    Each step's UNet calls run in chunks of (prompt, image) rows (``batch_size``,
    default sized from the UNet: :meth:`TextPipeline.batch_size`), halved on OOM.
    """
    cond = cond.detach().to(tp.device, tp.work_dtype)
    N = cond.shape[0]
    K = p.num_images
    R = N * K
    img = torch.arange(R) % K
    pidx = torch.arange(R) // K
    x = tp.initial_latents(img.tolist(), p.seed)
    uncond = tp.uncond()
    lam = p.guidance_scale
    evaluated = set(p.steps)
    last = p.steps[-1]
    d = x[0].numel()
    flipd = p.metric == "flipd"
    name = METRIC_NAMES[p.metric]
    if batch_size is None:
        plain = Chunks(tp.batch_size(passes=2), f"{name} (sampling steps)")
        # a kept graph for a gradient or a Hutchinson VJP; with both, the VJP's own graph
        # (create_graph) sits beside the forward graph it differentiates
        evals = Chunks(tp.batch_size(passes=2, backward=grad or flipd, graphs=2 if grad and flipd else 1),
                       f"{name} (evaluated steps)")
    else:
        plain = evals = Chunks(batch_size, name)

    def rows_grad(out, c_leaf, retain):
        if not out.requires_grad:  # the network ignores the prompt here
            return torch.zeros_like(c_leaf)
        (g,) = torch.autograd.grad(out, c_leaf, retain_graph=retain, allow_unused=True)
        return torch.zeros_like(c_leaf) if g is None else g

    def evaluate(i, xi, a, b):
        n, rows = b - a, pidx[a:b]
        c_leaf = cond.index_select(0, rows.to(cond.device))
        if grad:
            c_leaf.requires_grad_(True)
        at = step_name(grid, i)
        g = None
        with torch.set_grad_enabled(grad or flipd), \
                (math_attention() if grad and flipd else contextlib.nullcontext()):
            # a differentiable Hutchinson term needs double backward: attention on the math backend
            xin = xi[a:b].detach().requires_grad_(flipd)
            e_u, e_c, e_cfg = tp.guided_pair(xin, grid, i, c_leaf, uncond, lam, rows)
            sq = e_cfg.reshape(n, -1).to(torch.float64).pow(2).sum(1)
            if p.metric == "cfg":
                term = (lam ** 2) * (e_c - e_u).reshape(n, -1).to(torch.float64).pow(2).sum(1)
            elif p.metric == "score":
                term = sq
            else:
                probes = hutchinson_probes(tuple(xin.shape), p.n_probes, seed=p.seed,
                                           sample_ids=img[a:b] * len(grid) + i, dtype=e_cfg.dtype, device=xin.device)
                tr = torch.zeros(n, dtype=torch.float64, device=xin.device)
                for k in range(p.n_probes):
                    (vjp,) = torch.autograd.grad(e_cfg, xin, probes[k], create_graph=grad, retain_graph=True)
                    check_rows(vjp, f"the UNet's vector-Jacobian product (Hutchinson probe {k}) {at}", rows)
                    tr_k = (vjp * probes[k]).reshape(n, -1).to(torch.float64).sum(1)
                    if grad:  # this probe's part of the gradient, then its graph is dropped
                        gk = rows_grad(tr_k.sum() * (-grid.sigma[i] / (p.n_probes * K)), c_leaf, True)
                        g = gk if g is None else g + gk
                    tr += tr_k.detach()
                    del vjp, tr_k
                term = d - grid.sigma[i] * tr / p.n_probes + sq
            if grad:
                rest = sq if flipd else term  # the |eps^CFG|^2 part of A^FLIPD, or the whole cfg/score term
                gr = rows_grad(rest.sum() / K, c_leaf, False)
                g = gr if g is None else g + gr
                check_rows(g, f"the gradient of {name} w.r.t. the prompt embedding {at}", rows)
        term = term.detach()
        check_rows(term, f"the {name} term {at}", rows)
        return e_cfg.detach(), term, g

    def eps_fn(i, xi):
        if i not in evaluated:
            def plain_chunk(a, b):
                c = cond.index_select(0, pidx[a:b].to(cond.device))
                with torch.no_grad():
                    return tp.guided_pair(xi[a:b], grid, i, c, uncond, lam, pidx[a:b])[2]
            return torch.cat(plain(plain_chunk, R))
        parts = evals(lambda a, b: evaluate(i, xi, a, b), R)
        term = torch.cat([t for _, t, _ in parts])
        g = None
        if grad:  # rows of a prompt summed into its embedding's gradient
            g = torch.zeros_like(cond)
            g.index_add_(0, pidx.to(cond.device), torch.cat([gr for _, _, gr in parts]))
        on_step(i, grid.times[i], term.reshape(N, K).mean(1), g)
        return torch.cat([e for e, _, _ in parts])

    tp.sample(x, grid, cond, uncond, lam, stop=last + 1, eps_fn=eps_fn, callback=callback)


class _StepwiseGradient(torch.autograd.Function):
    """``value`` [N] presented as a function of ``emb`` [N, L, D] whose gradient was
    accumulated step by step: d value[n] / d emb[n] = ``grad[n]`` (and 0 across
    rows). Backward returns grad_output[n] * grad[n]; first-order only."""

    @staticmethod
    def forward(ctx, emb, value, grad):
        ctx.save_for_backward(grad)
        ctx.emb_dtype = emb.dtype
        ctx.emb_device = emb.device
        return value.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = grad_out.to(grad.device, grad.dtype).reshape(-1, *[1] * (grad.dim() - 1)) * grad
        return g.to(ctx.emb_device, ctx.emb_dtype), None, None


def memorization_score(pipe, prompt_or_embeds, *, metric: str = "cfg", num_images: int = 4, t_range=None,
                       seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       n_probes: int = 1, max_timesteps: int | None = None,
                       callback: Callable | None = None, batch_size: int | None = None) -> torch.Tensor:
    """A^CFG, A^{s CFG} or A^FLIPD of prompts (MMH paper Eq. 24, 25, 28).

    The expectation over t ~ U(t_range) and x_t ~ p_t^CFG(. | c) is taken over
    the DDIM grid steps with t in (lo, hi] and ``num_images`` CFG DDIM
    trajectories (see the module docstring for the per-point terms, the
    DDIM-coordinate identities and what the gradient flows through).

    Args:
        pipe: a Stable Diffusion-like pipeline (fp16/fp32, CPU/CUDA).
        prompt_or_embeds: a prompt, a list of N prompts, or text-encoder output
            hidden states [L, D] / [N, L, D] (gradients flow to a tensor that
            requires grad: they are accumulated step by step and probe by probe
            during the call, so memory stays at one evaluated step's graph
            whatever the number of steps; the result supports first-order
            backward only).
        metric: "cfg" (A^CFG), "score" (A^{s CFG}) or "flipd" (A^FLIPD).
        num_images: trajectories per prompt (image n starts from the latent keyed by (seed, n)).
        t_range: (lo, hi), 0 <= lo < hi <= 1; default (0, 1] for "cfg"/"score" and
            (0, 0.2] for "flipd", the paper's choices.
        seed: latents and Hutchinson probes.
        num_inference_steps: the DDIM grid; the trajectory stops after the last
            evaluated step.
        guidance_scale: lambda (Eq. 16).
        n_probes: Hutchinson probes per point for "flipd".
        max_timesteps: evaluate at most this many of the grid steps in t_range
            (evenly spread), to bound the cost.
        callback: ``callback(i, t_i, x_i)`` before each DDIM step (x_i [N * num_images, C, h, w]).
        batch_size: (prompt, image) rows per two-branch UNet call; default: sized
            from the UNet and the latent size (:func:`mmh_fast.models.batching.default_batch_size`;
            3x smaller at evaluated steps, which keep a graph, and 2x smaller again
            for a differentiable "flipd"). Halved and retried on out-of-memory errors;
            values and gradients do not depend on the chunking.

    Returns:
        float32 tensor [N] (float64 for a float64 pipeline; a 0-d tensor for
        one prompt given as a string or an [L, D] tensor) on the UNet's device;
        differentiable w.r.t. a hidden-state tensor that requires grad. "cfg"/"score" are in squared
        eps units; "flipd" in dimensions (d = latent size; values can be negative).

    Raises:
        NonFiniteOutputError: a UNet output, a probe's vector-Jacobian product,
            a metric term, its gradient or the result is NaN or inf; ``.positions``
            are the affected prompts' indices.
    """
    tp = text_pipeline(pipe)
    p, grid = plan(tp, metric, num_images=num_images, t_range=t_range, seed=seed,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, n_probes=n_probes,
                   max_timesteps=max_timesteps)
    batch_size = check_batch_size(batch_size)
    check_callback(callback)
    cond, single = tp.as_embeddings(prompt_or_embeds)
    src = None
    if isinstance(prompt_or_embeds, torch.Tensor) and prompt_or_embeds.requires_grad and torch.is_grad_enabled():
        src = prompt_or_embeds[None] if single else prompt_or_embeds
        cond = src.detach()  # the gradient is taken in tp.work_dtype, whatever the UNet's dtype
    vals, grads = [], []

    def on_step(i, t, value, g):
        vals.append(value)
        if g is not None:  # summed as they come: one [N, L, D] buffer, no graph kept
            grads[:] = [g if not grads else grads[0] + g]

    run_metric(tp, cond, p, grid, on_step=on_step, callback=callback, grad=src is not None, batch_size=batch_size)
    out = torch.stack(vals).mean(0).to(tp.work_dtype)
    check_rows(out, f"{METRIC_NAMES[p.metric]} in {tp.work_dtype} (beyond its range)", range(out.shape[0]))
    if src is not None:
        out = _StepwiseGradient.apply(src, out, grads[0] / len(p.steps))
    return out[0] if single else out


def check_callback(callback) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a callable(i, t_i, x_i) or None, got {type(callback).__name__}")
