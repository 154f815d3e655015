"""Deterministic DDIM sampling (eta = 0) with classifier-free guidance and
per-step hooks, on any :class:`~mmh_fast.models.denoiser.Denoiser` whose
schedule is discrete (any diffusers scheduler with ``alphas_cumprod``).

One DDIM step from timestep tau_i to tau_{i+1} (MMH paper App. D.1; Song et al.
2020) with eps the (guided) noise prediction at x_i:

    x0_hat  = (x_i - sigma_i eps) / psi_i
    x_{i+1} = psi_{i+1} x0_hat + sigma_{i+1} eps

(psi = sqrt(alphas_cumprod), sigma = sqrt(1 - alphas_cumprod)). In the rescaled
coordinates x~ = x / psi of Eq. 11 this is the Euler step of the probability
flow ODE dx~ = eps d sigma~ (sigma~ = sigma / psi), which is why the same
update serves :func:`mmh_fast.text.cfg_norm_train`'s Euler steps.

The grid follows diffusers' ``DDIMScheduler.set_timesteps`` ("leading",
"trailing" or "linspace" spacing, ``steps_offset``), and the last step lands on
alphas_cumprod = 1 when ``set_alpha_to_one`` (diffusers' default) or on
alphas_cumprod[0] otherwise (Stable Diffusion's configs), so with the
pipeline's DDIMScheduler the trajectory is the pipeline's own (clip_sample and
thresholding off, as in Stable Diffusion). Each step lands on the next grid
timestep (for "linspace" spacing diffusers instead lands on tau - T // N).

Initial noise comes from :func:`keyed_normal`: one generator per sample keyed
by (seed, sample id), so a sample's trajectory does not depend on the batch.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .denoiser import Denoiser
from .schedules import DiscreteSchedule, Schedule, make_schedule

__all__ = ["DDIMGrid", "ddim_grid", "ddim_sample", "keyed_normal", "keyed_seed", "DDIM_SPACINGS"]

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


def keyed_seed(seed: int, sample_id: int, stream: str) -> int:
    """A 63-bit generator seed from (seed, sample id, stream) by BLAKE2b (never
    Python's salted hash): stable across processes, runs and platforms."""
    h = hashlib.blake2b(f"{int(seed)}:{int(sample_id)}".encode(), digest_size=8, person=stream.encode()[:16])
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def keyed_normal(shape: Sequence[int], seed: int, sample_ids: Sequence[int], *, dtype=torch.float32,
                 device=None) -> torch.Tensor:
    """Standard normal draws [len(sample_ids), *shape]; row r depends only on
    (seed, sample_ids[r]) (:func:`keyed_seed` seeds a CPU generator), so it is
    the same in any batch, order, process or device."""
    shape = tuple(int(s) for s in shape)
    out = torch.empty((len(sample_ids),) + shape, dtype=torch.float32)
    for r, sid in enumerate(sample_ids):
        g = torch.Generator().manual_seed(keyed_seed(seed, sid, "mmh-ddim-noise"))
        out[r] = torch.randn(shape, generator=g)
    return out.to(device=device, dtype=dtype)


def ddim_sample(denoiser: Denoiser, x: torch.Tensor, grid: DDIMGrid, *, cond: dict | None = None,
                uncond: dict | None = None, guidance_scale: float | None = None, start: int = 0,
                stop: int | None = None, eps_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run DDIM steps [start, stop) from x (the state at step ``start``).

    Args:
        denoiser: the network and its schedule.
        x: [B, ...] latents at step ``start`` (x_T ~ N(0, I) for a full run).
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
