"""Noise schedules in the continuous-time view of the MMH paper (App. B.1, D.1).

Every schedule maps a continuous time t in (0, 1] to the transition kernel
p_{t|0}(x_t | x_0) = N(psi(t) x_0, sigma(t)^2 I) (Eq. 5) and to the
``timestep`` value the network expects, and back from a timestep to
(psi, sigma) (closed-form test models need that direction).

- :class:`DiscreteSchedule`: any diffusers scheduler with ``alphas_cumprod``
  (DDPM, DDIM, PNDM, Euler, ...). t maps to the fractional timestep
  tau = t * num_train_timesteps; alphas_cumprod is interpolated linearly
  between integer steps; psi = sqrt(abar), sigma = sqrt(1 - abar) (Eq. 9-10).
- :class:`VPSDESchedule`: the continuous VP-SDE of the reference FLIPD code,
  B(t) = b_min t + (b_max - b_min) t^2 / 2, psi = exp(-B/2), sigma^2 = 1 - exp(-B).
- :class:`VESchedule`: sigma(t) = sigma_min (sigma_max / sigma_min)^t, psi = 1
  (score-SDE VE; the network takes sigma as its timestep).
- :class:`EDMSchedule`: Karras et al. sigma(t) = (sigma_min^(1/rho) + t
  (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, psi = 1, with EDM preconditioning.
"""
from __future__ import annotations

import math
import warnings

import torch

__all__ = [
    "Schedule",
    "DiscreteSchedule",
    "VPSDESchedule",
    "VESchedule",
    "EDMSchedule",
    "make_schedule",
    "default_ddpm_schedule",
    "check_t",
]


def check_t(t, name: str = "t0") -> float:
    """Validate a continuous time in (0, 1] and return it as float."""
    try:
        val = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in (0, 1], got {t!r}") from None
    if not math.isfinite(val) or not (0.0 < val <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {t!r}")
    return val


class Schedule:
    """Base class. Subclasses define :meth:`psi_sigma` (t -> psi, sigma),
    :meth:`timestep` (t -> network timestep) and :meth:`psi_sigma_from_timestep`."""

    #: default prediction type of networks trained with this schedule
    prediction_type: str = "epsilon"

    def psi_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def psi_sigma_from_timestep(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # EDM-style preconditioning; identity for the other schedules.
    def precondition_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x

    def _as_t(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64)


class DiscreteSchedule(Schedule):
    """A diffusers-style discrete schedule given by ``alphas_cumprod`` [T]."""

    def __init__(self, alphas_cumprod, num_train_timesteps: int | None = None,
                 prediction_type: str = "epsilon"):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if ac.numel() < 2:
            raise ValueError("alphas_cumprod must hold at least 2 steps")
        if not bool(torch.isfinite(ac).all()) or bool((ac <= 0).any()) or bool((ac > 1).any()):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        self.alphas_cumprod = ac
        self.num_train_timesteps = int(num_train_timesteps or ac.numel())
        self.prediction_type = prediction_type

    def _abar(self, tau: torch.Tensor) -> torch.Tensor:
        T = self.alphas_cumprod.numel()
        tau = tau.to(torch.float64).clamp(0, T - 1)
        lo = tau.floor().long().clamp(0, T - 1)
        hi = (lo + 1).clamp(max=T - 1)
        w = tau - lo.to(torch.float64)
        ac = self.alphas_cumprod.to(tau.device)
        return ac[lo] * (1 - w) + ac[hi] * w

    def timestep(self, t):
        return self._as_t(t) * self.num_train_timesteps

    def psi_sigma(self, t):
        return self.psi_sigma_from_timestep(self.timestep(t))

    def psi_sigma_from_timestep(self, timestep):
        abar = self._abar(torch.as_tensor(timestep, dtype=torch.float64))
        return abar.sqrt(), (1 - abar).sqrt()

    def __repr__(self):
        return f"DiscreteSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r})"


class VPSDESchedule(Schedule):
    """Continuous VP-SDE; the network timestep is ``t * timestep_scale``
    (1000 by default, the usual discretisation of such models)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, timestep_scale: float = 1000.0,
                 prediction_type: str = "epsilon"):
        if not (beta_min > 0 and beta_max > beta_min):
            raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.timestep_scale = float(timestep_scale)
        self.prediction_type = prediction_type

    def _B(self, t):
        return self.beta_min * t + (self.beta_max - self.beta_min) * t * t / 2

    def psi_sigma(self, t):
        B = self._B(self._as_t(t))
        return torch.exp(-B / 2), (-torch.expm1(-B)).sqrt()

    def timestep(self, t):
        return self._as_t(t) * self.timestep_scale

    def psi_sigma_from_timestep(self, timestep):
        return self.psi_sigma(torch.as_tensor(timestep, dtype=torch.float64) / self.timestep_scale)

    def __repr__(self):
        return f"VPSDESchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"


class VESchedule(Schedule):
    """Variance-exploding: psi = 1, sigma geometric in t; the network takes
    sigma as timestep and (score-SDE convention) predicts the score."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, prediction_type: str = "score"):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prediction_type = prediction_type

    def psi_sigma(self, t):
        t = self._as_t(t)
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return torch.ones_like(sigma), sigma

    def timestep(self, t):
        return self.psi_sigma(t)[1]

    def psi_sigma_from_timestep(self, timestep):
        sigma = torch.as_tensor(timestep, dtype=torch.float64)
        return torch.ones_like(sigma), sigma


class EDMSchedule(Schedule):
    """EDM (Karras et al. 2022): psi = 1, rho-warped sigma(t); the network sees
    c_in(sigma) x and c_noise = log(sigma) / 4 and its output is combined as
    D = c_skip x + c_out F (prediction types epsilon / v_prediction, as diffusers' EDM schedulers)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.rho, self.sigma_data = float(rho), float(sigma_data)
        self.prediction_type = prediction_type

    def psi_sigma(self, t):
        t = self._as_t(t)
        a, b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigma = (a + t * (b - a)) ** self.rho
        return torch.ones_like(sigma), sigma

    def timestep(self, t):
        return 0.25 * torch.log(self.psi_sigma(t)[1])

    def psi_sigma_from_timestep(self, timestep):
        sigma = torch.exp(4 * torch.as_tensor(timestep, dtype=torch.float64))
        return torch.ones_like(sigma), sigma

    def precondition_inputs(self, x, sigma):
        return x / torch.sqrt(sigma**2 + self.sigma_data**2)

    def denoised(self, x, out, sigma):
        """EDM output preconditioning: D(x) = c_skip x + c_out F(x)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / torch.sqrt(sigma**2 + sd2)
        if self.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * x + c_out * out


def default_ddpm_schedule() -> DiscreteSchedule:
    """diffusers' DDPMScheduler() defaults: linear betas 1e-4..0.02, 1000 steps."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return DiscreteSchedule(torch.cumprod(1 - betas, 0), 1000, "epsilon")


_warned_default = False


def make_schedule(scheduler=None, *, warn_default: bool = True) -> Schedule:
    """Turn a diffusers scheduler (or a :class:`Schedule`) into a :class:`Schedule`.

    ``None`` gives diffusers' DDPMScheduler() defaults and warns once. A
    scheduler with ``alphas_cumprod`` gives a :class:`DiscreteSchedule`; an EDM
    scheduler (``precondition_inputs``) an :class:`EDMSchedule`; a score-SDE VE
    scheduler a :class:`VESchedule`. The prediction type comes from
    ``scheduler.config.prediction_type``."""
    global _warned_default
    if isinstance(scheduler, Schedule):
        return scheduler
    if scheduler is None:
        if warn_default and not _warned_default:
            warnings.warn("no scheduler given: using diffusers' DDPMScheduler() defaults "
                          "(linear betas 1e-4..0.02, 1000 steps, epsilon prediction)", stacklevel=3)
            _warned_default = True
        return default_ddpm_schedule()
    config = getattr(scheduler, "config", None)
    get = (lambda k, d=None: config.get(k, d)) if config is not None else (lambda k, d=None: d)
    pred = get("prediction_type", None)
    if hasattr(scheduler, "precondition_inputs") and get("sigma_min") is not None:
        return EDMSchedule(get("sigma_min"), get("sigma_max"), get("rho", 7.0), get("sigma_data", 0.5),
                           pred or "epsilon")
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is not None:
        return DiscreteSchedule(ac, get("num_train_timesteps", None), pred or "epsilon")
    if get("sigma_min") is not None and get("sigma_max") is not None:
        return VESchedule(get("sigma_min"), get("sigma_max"), pred or "score")
    raise TypeError(
        f"scheduler {type(scheduler).__name__} has no usable schedule: expected a diffusers scheduler "
        "with alphas_cumprod, an EDM/VE scheduler with sigma_min/sigma_max, or an mmh_fast Schedule"
    )
