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

from ..models.forward_ad import math_attention
from ..ops.hutchinson import hutchinson_probes
from ._core import TextPipeline, check_guidance, check_int, text_pipeline

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


def run_metric(tp: TextPipeline, cond: torch.Tensor, p: _Plan, grid, *,
               on_step: Callable[[int, float, torch.Tensor], None],
               callback: Callable | None = None, differentiable: bool = True) -> None:
    """Walk the CFG DDIM trajectories of N prompts x num_images and call
    ``on_step(i, t_i, value)`` at each evaluated step, value [N] = the metric
    term averaged over the prompt's images (float64, carrying the graph to
    ``cond`` when ``differentiable``). Stops after the last evaluated step.

    Image n of every prompt starts from the latent keyed by (seed, n); the
    Hutchinson probes of image n at step i are keyed by (seed, n * len(grid) + i).
    """
    cond = cond.to(tp.device, tp.dtype)  # differentiable cast (a float32 leaf for an fp16 UNet)
    N = cond.shape[0]
    R = N * p.num_images
    img = torch.arange(R) % p.num_images
    pidx = (torch.arange(R) // p.num_images).to(cond.device)
    x = tp.initial_latents(img.tolist(), p.seed)
    uncond = tp.uncond()
    cond_rows = cond.detach().index_select(0, pidx)
    lam = p.guidance_scale
    evaluated = set(p.steps)
    last = p.steps[-1]
    d = x[0].numel()

    def eps_fn(i, xi):
        if i not in evaluated:
            with torch.no_grad():
                e_u, e_c = tp.pair(xi, grid, i, cond_rows, uncond)
            return e_u + lam * (e_c - e_u)
        # a differentiable Hutchinson term needs double backward: attention on the math backend
        second = differentiable and p.metric == "flipd"
        with torch.set_grad_enabled(differentiable or p.metric == "flipd"), \
                (math_attention() if second else contextlib.nullcontext()):
            xin = xi.detach().requires_grad_(p.metric == "flipd")
            # re-indexed at every step: each step's graph to cond is its own (freed by its backward)
            c_in = cond.index_select(0, pidx) if differentiable else cond_rows
            e_u, e_c = tp.pair(xin, grid, i, c_in, uncond)
            e_cfg = e_u + lam * (e_c - e_u)
            flat = e_cfg.reshape(R, -1).to(torch.float64)
            if p.metric == "cfg":
                term = (lam ** 2) * (e_c - e_u).reshape(R, -1).to(torch.float64).pow(2).sum(1)
            elif p.metric == "score":
                term = flat.pow(2).sum(1)
            else:
                ids = img * len(grid) + i
                probes = hutchinson_probes(tuple(xin.shape), p.n_probes, seed=p.seed, sample_ids=ids,
                                           dtype=e_cfg.dtype, device=xin.device)
                tr = 0
                for k in range(p.n_probes):
                    (g,) = torch.autograd.grad(e_cfg, xin, probes[k], create_graph=differentiable,
                                               retain_graph=True)
                    tr = tr + (g * probes[k]).reshape(R, -1).to(torch.float64).sum(1)
                term = d - grid.sigma[i] * tr / p.n_probes + flat.pow(2).sum(1)
            value = term.reshape(N, p.num_images).mean(1)
            if not differentiable:
                value = value.detach()
        on_step(i, grid.times[i], value)
        return e_cfg.detach()

    tp.sample(x, grid, cond_rows, uncond, lam, stop=last + 1, eps_fn=eps_fn, callback=callback)


def memorization_score(pipe, prompt_or_embeds, *, metric: str = "cfg", num_images: int = 4, t_range=None,
                       seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       n_probes: int = 1, max_timesteps: int | None = None,
                       callback: Callable | None = None) -> torch.Tensor:
    """A^CFG, A^{s CFG} or A^FLIPD of prompts (MMH paper Eq. 24, 25, 28).

    The expectation over t ~ U(t_range) and x_t ~ p_t^CFG(. | c) is taken over
    the DDIM grid steps with t in (lo, hi] and ``num_images`` CFG DDIM
    trajectories (see the module docstring for the per-point terms, the
    DDIM-coordinate identities and what the gradient flows through).

    Args:
        pipe: a Stable Diffusion-like pipeline (fp16/fp32, CPU/CUDA).
        prompt_or_embeds: a prompt, a list of N prompts, or text-encoder output
            hidden states [L, D] / [N, L, D] (gradients flow to a tensor that
            requires grad; the whole graph over the evaluated steps is kept until
            backward, so memory grows with their number: see ``max_timesteps``).
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
            (evenly spread), to bound cost and memory.
        callback: ``callback(i, t_i, x_i)`` before each DDIM step (x_i [N * num_images, C, h, w]).

    Returns:
        float32 tensor [N] (float64 for a float64 pipeline; a 0-d tensor for
        one prompt given as a string or an [L, D] tensor) on the UNet's device;
        differentiable w.r.t. a hidden-state tensor that requires grad. "cfg"/"score" are in squared
        eps units; "flipd" in dimensions (d = latent size; values can be negative).
    """
    tp = text_pipeline(pipe)
    p, grid = plan(tp, metric, num_images=num_images, t_range=t_range, seed=seed,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, n_probes=n_probes,
                   max_timesteps=max_timesteps)
    cond, single = tp.as_embeddings(prompt_or_embeds)
    differentiable = cond.requires_grad and torch.is_grad_enabled()
    acc = []
    run_metric(tp, cond, p, grid, on_step=lambda i, t, v: acc.append(v), callback=callback,
               differentiable=differentiable)
    out = torch.stack(acc).mean(0).to(tp.work_dtype)
    return out[0] if single else out
