"""A generic DDIM sampler for any network + schedule (optionally with CFG).

The update (Song et al. 2021, in the psi/sigma form of Eq. 5) from time t to
t' < t, with x0 = (x_t - sigma eps) / psi:

    x_t' = psi' x0 + sqrt(sigma'^2 - c^2) eps + c z,
    c^2  = eta^2 sigma'^2 (sigma^2 - (psi / psi')^2 sigma'^2) / sigma^2,

so eta = 0 is the deterministic DDIM and eta = 1 the DDPM posterior; the last
step returns x0 predicted at the smallest time. Noise is keyed by (seed,
sample id, step) through the native counter-based generator (Gaussian probes
of :func:`mmh_fast.ops.hutchinson_probes`): a sample is the same whatever batch
it is drawn in, which is what diffusers gets from one torch.Generator per sample.

:func:`ddim_grid` / :func:`ddim_trajectory` are the deterministic DDIM of a
diffusers scheduler's own timestep grid, with per-step hooks (the trajectories
of Stable Diffusion that mmh_fast.text evaluates its metrics on):

- the grid follows ``DDIMScheduler.set_timesteps`` ("leading", "trailing" or
  "linspace" spacing, ``steps_offset``), and the last step lands on
  alphas_cumprod = 1 when ``set_alpha_to_one`` (diffusers' default) or on
  alphas_cumprod[0] otherwise (Stable Diffusion's configs), so with the
  pipeline's DDIMScheduler the trajectory is the pipeline's own (clip_sample and
  thresholding off, as in Stable Diffusion). Each step lands on the next grid
  timestep (for "linspace" spacing diffusers instead lands on tau - T // N).
- one step from tau_i to tau_{i+1} with eps the (guided) prediction at x_i is
  x_{i+1} = psi_{i+1} x0_hat + sigma_{i+1} eps, x0_hat = (x_i - sigma_i eps) / psi_i:
  in the coordinates x~ = x / psi of MMH App. D.1 (Eq. 11) the Euler step of the
  probability-flow ODE dx~ = eps d(sigma / psi).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..ops.hutchinson import hutchinson_probes
from .denoiser import Denoiser, model_device
from .pipelines import decode_latents, resolve_model
from .schedules import DiscreteSchedule, Schedule, make_schedule

__all__ = ["ddim_sample", "sample_noise", "DDIMGrid", "ddim_grid", "ddim_trajectory", "DDIM_SPACINGS"]

#: stream offset so the sampler's noise never coincides with FLIPD probes of the same seed
_NOISE_STREAM = 0x5A3D_1E00


def sample_noise(shape, *, seed: int = 0, sample_ids=None, index: int = 0, dtype=torch.float32,
                 device="cpu") -> torch.Tensor:
    """Standard normal noise [B, *shape[1:]] keyed by (seed, sample id, index):
    row b depends only on (seed, sample_ids[b], index), never on the batch."""
    z = hutchinson_probes(tuple(shape), 1, probe="gaussian", seed=int(seed), sample_ids=sample_ids,
                          probe_begin=_NOISE_STREAM + int(index), dtype=torch.float64, device=device)
    return z[0].to(dtype)


def _sample_shape(net, sample_shape):
    if sample_shape is not None:
        return tuple(int(s) for s in sample_shape)
    cfg = getattr(net, "config", None)
    if cfg is not None:
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        c, s = get("in_channels", None), get("sample_size", None)
        if c is not None and s is not None:
            s = (s, s) if isinstance(s, int) else tuple(s)
            return (int(c),) + s
    shape = getattr(net, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    raise ValueError("sample_shape is needed: the model does not say what shape its samples have")


def ddim_sample(model, n: int, *, sample_shape=None, scheduler=None, num_steps: int = 50, eta: float = 0.0,
                cond=None, uncond=None, guidance_scale: float | None = None, seed: int = 0, sample_ids=None,
                t_max: float = 1.0, t_min: float = 1e-3, clip_x0: float | None = None, batch_size: int | None = None,
                prediction_type: str | None = None, decode: bool = False, dtype=torch.float32,
                callback: Callable | None = None) -> torch.Tensor:
    """Draw n samples by DDIM.

    Args:
        model: network with the diffusers signature or a diffusers pipeline (its
            scheduler and, for Stable Diffusion, text conditioning are used).
        n: number of samples.
        sample_shape: shape of one sample in the network's space (default: from the
            network's config ``in_channels`` / ``sample_size`` or its ``sample_shape``).
        scheduler: diffusers scheduler or Schedule (default: the pipeline's, or DDPM defaults).
        num_steps: network evaluations; times uniform in [t_min, t_max].
        eta: 0 deterministic DDIM, 1 DDPM-like ancestral noise.
        cond, uncond, guidance_scale: as :func:`mmh_fast.flipd` (captions for pipelines);
            with guidance_scale the CFG eps_u + lambda (eps_c - eps_u) drives the sampler.
        seed, sample_ids: key the noise of each sample (default ids 0..n-1).
        clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] (DDPM pixel models use 1).
        batch_size: samples per network call (default all).
        decode: for latent pipelines, return VAE-decoded images in [-1, 1].
        dtype: working dtype (float32 or float64).
        callback: called as ``callback(step, t, x_t, eps, rows)`` after each network
            evaluation (rows: indices of the chunk's samples).

    Returns:
        [n, *sample_shape] samples (images [n, 3, H, W] with ``decode``), on the model's device.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (0.0 < t_min < t_max <= 1.0):
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    res = resolve_model(model, scheduler=scheduler, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                        prediction_type=prediction_type, n=n)
    den = res.denoiser
    shape = _sample_shape(den.model, sample_shape)
    dev = model_device(den.model)
    ids = torch.arange(n, dtype=torch.int64) if sample_ids is None else \
        torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() != n:
        raise ValueError(f"sample_ids has {ids.numel()} entries, n is {n}")
    times = torch.linspace(t_max, t_min, num_steps, dtype=torch.float64).tolist()
    bs = n if batch_size is None else max(1, int(batch_size))
    out = []
    for s0 in range(0, n, bs):
        rows = torch.arange(s0, min(n, s0 + bs))
        rid = ids[rows].to(dev)
        c, u = res.kwargs_for(rows.to(dev), n)
        psi0, sig0 = (float(v) for v in den.schedule.psi_sigma(times[0]))
        x = (psi0 ** 2 + sig0 ** 2) ** 0.5 * sample_noise((len(rows),) + shape, seed=seed, sample_ids=rid,
                                                          index=0, dtype=dtype, device=dev)
        with torch.no_grad():
            for i, t in enumerate(times):
                psi, sigma, ts = den.coefficients(t, dev)
                eps = den.eps_at(x, psi, sigma, ts, cond=c, uncond=u, guidance_scale=res.guidance_scale).to(dtype)
                if callback is not None:
                    callback(i, t, x, eps, rows)
                x0 = (x - sigma * eps) / psi
                if clip_x0 is not None:
                    x0 = x0.clamp(-clip_x0, clip_x0)
                    eps = (x - psi * x0) / sigma
                if i == num_steps - 1:
                    x = x0
                    break
                psi_n, sig_n = (float(v) for v in den.schedule.psi_sigma(times[i + 1]))
                c2 = 0.0
                if eta > 0:
                    c2 = eta ** 2 * sig_n ** 2 * max(sigma ** 2 - (psi / psi_n) ** 2 * sig_n ** 2, 0.0) / sigma ** 2
                x = psi_n * x0 + max(sig_n ** 2 - c2, 0.0) ** 0.5 * eps
                if c2 > 0:
                    x = x + c2 ** 0.5 * sample_noise(x.shape, seed=seed, sample_ids=rid, index=i + 1, dtype=dtype,
                                                     device=dev)
        out.append(x)
    x = torch.cat(out)
    if decode and res.pipeline is not None:
        x = decode_latents(res.pipeline, x)
    return x


# ----------------------------------------------------------------------------- the scheduler's DDIM grid

DDIM_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class DDIMGrid:
    """The timesteps of an N-step DDIM run and the kernel coefficients.

    Attributes:
        timesteps: N network timesteps, decreasing (integers of the train grid).
        times: N continuous times t = timestep / num_train_timesteps (the time
            used by :class:`~mmh_fast.models.schedules.Schedule` and the MMH paper).
        psi, sigma: N coefficients of p(x_t | x_0) = N(psi x_0, sigma^2 I) at each step.
        psi_next, sigma_next: N coefficients of the point each step lands on.
    """

    timesteps: tuple
    times: tuple
    psi: tuple
    sigma: tuple
    psi_next: tuple
    sigma_next: tuple

    def __len__(self) -> int:
        return len(self.timesteps)

    def timestep(self, i: int, device=None) -> torch.Tensor:
        """The network timestep of step i as a 0-d float32 tensor."""
        return torch.tensor(float(self.timesteps[i]), dtype=torch.float32, device=device)

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x at step i+1 from x at step i and the (guided) eps at step i."""
        x0_hat = (x - self.sigma[i] * eps) / self.psi[i]
        return self.psi_next[i] * x0_hat + self.sigma_next[i] * eps

    def indices_in(self, t_range: tuple[float, float]) -> list[int]:
        """Steps whose time lies in the half-open interval (lo, hi]."""
        lo, hi = t_range
        return [i for i, t in enumerate(self.times) if lo < t <= hi]


def _config_get(scheduler, key, default):
    cfg = getattr(scheduler, "config", None)
    if cfg is None:
        return default
    try:
        val = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except Exception:  # pragma: no cover - exotic configs
        return default
    return default if val is None else val


def ddim_grid(scheduler, num_inference_steps: int = 50, *, spacing: str | None = None,
              steps_offset: int | None = None, set_alpha_to_one: bool | None = None) -> DDIMGrid:
    """The DDIM grid of a scheduler.

    Args:
        scheduler: a diffusers scheduler with ``alphas_cumprod`` (its config gives
            ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` unless
            overridden) or a :class:`~mmh_fast.models.schedules.DiscreteSchedule`.
        num_inference_steps: N >= 1, at most the number of training timesteps.
        spacing, steps_offset, set_alpha_to_one: override the scheduler's config
            (defaults when absent: "leading", 0, True, as diffusers' DDIMScheduler).
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
    sched = scheduler if isinstance(scheduler, Schedule) else make_schedule(scheduler)
    if not isinstance(sched, DiscreteSchedule):
        raise TypeError(f"DDIM sampling needs a discrete schedule (a scheduler with alphas_cumprod), "
                        f"got {type(sched).__name__}")
    T = sched.num_train_timesteps
    N = int(num_inference_steps)
    if not 1 <= N <= T:
        raise ValueError(f"num_inference_steps must lie in [1, {T}], got {N}")
    spacing = spacing or _config_get(scheduler, "timestep_spacing", "leading")
    if spacing not in DDIM_SPACINGS:
        raise ValueError(f"spacing must be one of {DDIM_SPACINGS}, got {spacing!r}")
    offset = int(steps_offset if steps_offset is not None else _config_get(scheduler, "steps_offset", 0))
    to_one = bool(set_alpha_to_one if set_alpha_to_one is not None else _config_get(scheduler, "set_alpha_to_one",
                                                                                     True))
    if spacing == "leading":
        ts = (np.arange(N) * (T // N)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / N)) - 1
    else:
        ts = np.linspace(0, T - 1, N).round()[::-1]
    ts = [int(min(max(v, 0), T - 1)) for v in ts]
    ac = sched.alphas_cumprod
    final = 1.0 if to_one else float(ac[0])
    abar = [float(ac[t]) for t in ts]
    abar_next = abar[1:] + [final]
    return DDIMGrid(timesteps=tuple(ts), times=tuple(t / T for t in ts),
                    psi=tuple(a ** 0.5 for a in abar), sigma=tuple((1 - a) ** 0.5 for a in abar),
                    psi_next=tuple(a ** 0.5 for a in abar_next), sigma_next=tuple((1 - a) ** 0.5 for a in abar_next))


def ddim_trajectory(denoiser: Denoiser, x: torch.Tensor, grid: DDIMGrid, *, cond: dict | None = None,
                uncond: dict | None = None, guidance_scale: float | None = None, start: int = 0,
                stop: int | None = None, eps_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run DDIM steps [start, stop) from x (the state at step ``start``).

    Args:
        denoiser: the network and its schedule.
        x: [B, ...] latents at step ``start`` (x_T ~ N(0, I) for a full run, e.g.
            :func:`sample_noise`, keyed per sample).
        grid: from :func:`ddim_grid`.
        cond, uncond, guidance_scale: network kwargs of the two branches and
            lambda; the step uses eps_u + lambda (eps_c - eps_u) (Eq. 2, 16) from one
            batched call, or the conditional eps alone without guidance_scale.
        eps_fn: replaces the network call: ``eps_fn(i, x_i) -> eps`` (hooks that
            evaluate something at x_i and return the eps to step with).
        callback: ``callback(i, t_i, x_i)`` before each step.

    Returns:
        the state after the last step (x_0 for a full run). No gradients are
        tracked through the trajectory (run it under ``torch.no_grad`` or detach
        in eps_fn when eps carries a graph).
    """
    stop = len(grid) if stop is None else int(stop)
    if not 0 <= start <= stop <= len(grid):
        raise ValueError(f"need 0 <= start <= stop <= {len(grid)}, got start={start}, stop={stop}")
    for i in range(start, stop):
        if callback is not None:
            callback(i, grid.times[i], x)
        if eps_fn is not None:
            eps = eps_fn(i, x)
        else:
            eps = denoiser.eps_at(x, grid.psi[i], grid.sigma[i], grid.timestep(i, x.device), cond=cond,
                                  uncond=uncond, guidance_scale=guidance_scale)
        x = grid.step(i, x, eps.detach().to(x.dtype))
    return x
