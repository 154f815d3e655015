"""Adapter from a network with the diffusers call signature to eps and the
score in the continuous-time view: s(x_t, t) = -eps(x_t, t) / sigma(t) (Eq. 10).

A network is anything callable as ``model(x_t, timestep, **kwargs)`` that
returns a tensor, an object with ``.sample`` (diffusers' output dataclasses)
or a tuple whose first entry is the tensor. Prediction types follow
``scheduler.config.prediction_type``: "epsilon", "v_prediction", "sample"
(x0) and "score" (score-SDE VE networks); EDM schedules add the EDM
preconditioning. Classifier-free guidance combines eps_u + lambda (eps_c - eps_u)
(Eq. 2, 16) from one batched call of both branches.
"""
from __future__ import annotations

from typing import Any

import torch

from .schedules import EDMSchedule, Schedule

__all__ = ["Denoiser", "output_tensor", "PREDICTION_TYPES", "model_dtype", "model_device"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score")


def output_tensor(out: Any) -> torch.Tensor:
    """The tensor inside a model output (tensor, ``.sample``, or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, an object with .sample "
                    "or a tuple whose first entry is a tensor")


def _first_param(model):
    """First parameter (or, for parameter-free modules, buffer) of a module."""
    for attr in ("parameters", "buffers"):
        fn = getattr(model, attr, None)
        if fn is None:
            continue
        try:
            return next(iter(fn()))
        except (StopIteration, TypeError):
            continue
    return None


def model_dtype(model, default=torch.float32) -> torch.dtype:
    p = _first_param(model)
    return p.dtype if p is not None and p.is_floating_point() else default


def model_device(model, default="cpu") -> torch.device:
    p = _first_param(model)
    return p.device if p is not None else torch.device(default)


class Denoiser:
    """eps(x_t, t) and score(x_t, t) of a network under a :class:`Schedule`.

    Args:
        model: network with the diffusers signature (see module docstring).
        schedule: the :class:`~mmh_fast.models.schedules.Schedule` it was trained with.
        prediction_type: overrides ``schedule.prediction_type``.
    """

    def __init__(self, model, schedule: Schedule, *, prediction_type: str | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, timestep, **kwargs), got {type(model).__name__}")
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        self.dtype = model_dtype(model)

    def coefficients(self, t: float, device) -> tuple[float, float, torch.Tensor]:
        """(psi, sigma, network timestep) at continuous time t, as python floats
        (psi, sigma) and a float32 tensor (timestep)."""
        psi, sigma = self.schedule.psi_sigma(t)
        ts = self.schedule.timestep(t)
        return float(psi), float(sigma), torch.as_tensor(ts, dtype=torch.float32, device=device)

    def _call(self, x_t: torch.Tensor, psi: float, sigma: float, timestep: torch.Tensor,
              kwargs: dict) -> torch.Tensor:
        B = x_t.shape[0]
        x_in = self.schedule.precondition_inputs(x_t, torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device))
        ts = timestep.to(x_t.device).expand(B) if timestep.dim() == 0 else timestep.to(x_t.device)
        # floating condition tensors (embeddings) follow the network's precision, as x does
        kwargs = {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != self.dtype
                  else v for k, v in kwargs.items()}
        out = output_tensor(self.model(x_in.to(self.dtype), ts, **kwargs))
        if out.shape != x_t.shape:
            raise ValueError(f"model returned shape {tuple(out.shape)} for input shape {tuple(x_t.shape)}; "
                             "a denoiser must return a tensor shaped like its input")
        out = out.to(x_t.dtype if x_t.dtype in (torch.float32, torch.float64) else torch.float32)
        x = x_t.to(out.dtype)
        if isinstance(self.schedule, EDMSchedule):
            denoised = self.schedule.denoised(x, out, torch.as_tensor(sigma, dtype=out.dtype))
            return (x - denoised) / sigma
        p = self.prediction_type
        if p == "epsilon":
            return out
        if p == "sample":
            return (x - psi * out) / sigma
        if p == "v_prediction":
            return (sigma * x + psi * out) / (psi * psi + sigma * sigma)
        return -sigma * out  # "score"

    def eps(self, x_t: torch.Tensor, t: float, *, cond: dict | None = None, uncond: dict | None = None,
            guidance_scale: float | None = None) -> torch.Tensor:
        """eps at the noisy point x_t [B, ...] and continuous time t.

        ``cond``/``uncond`` are keyword arguments of the network for the
        conditional / unconditional branch (e.g. ``{"encoder_hidden_states": e}``).
        With ``guidance_scale`` both branches run in one batched call and
        combine as eps_u + guidance_scale (eps_c - eps_u). Returns float32 (or
        float64 for float64 input)."""
        psi, sigma, ts = self.coefficients(t, x_t.device)
        return self.eps_at(x_t, psi, sigma, ts, cond=cond, uncond=uncond, guidance_scale=guidance_scale)

    def eps_at(self, x_t, psi, sigma, timestep, *, cond=None, uncond=None, guidance_scale=None):
        cond = cond or {}
        if guidance_scale is None:
            return self._call(x_t, psi, sigma, timestep, cond)
        if uncond is None:
            raise ValueError("guidance_scale needs both cond and uncond model arguments")
        e_u, e_c = self.eps_pair(x_t, psi, sigma, timestep, cond=cond, uncond=uncond)
        return e_u + guidance_scale * (e_c - e_u)

    def eps_pair(self, x_t, psi, sigma, timestep, *, cond: dict, uncond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_u, eps_c): the unconditional and conditional eps at x_t [B, ...],
        from ONE batched network call on [x_t; x_t] (unconditional rows first).
        The CFG vector is eps_c - eps_u; gradients flow to x_t and to tensors in
        ``cond`` / ``uncond``."""
        both = {k: _cat_pair(uncond.get(k), v, x_t.shape[0]) for k, v in (cond or {}).items()}
        out = self._call(torch.cat([x_t, x_t]), psi, sigma,
                         timestep if timestep.dim() == 0 else torch.cat([timestep, timestep]), both)
        e_u, e_c = out.chunk(2)
        return e_u, e_c

    def score(self, x_t: torch.Tensor, t: float, **kw) -> torch.Tensor:
        """s(x_t, t) = -eps / sigma(t)."""
        _, sigma, _ = self.coefficients(t, x_t.device)
        return -self.eps(x_t, t, **kw) / sigma


def _cat_pair(u, c, batch: int | None = None):
    if isinstance(c, torch.Tensor):
        if not isinstance(u, torch.Tensor):
            raise ValueError("cond and uncond must provide the same model arguments")
        if c.dim() > 0 and batch is not None and c.shape[0] == 1 and batch > 1:
            c = c.expand(batch, *c.shape[1:])  # a shared condition (1 row) for every sample
        if u.shape[0] != c.shape[0]:
            u = u.expand(c.shape[0], *u.shape[1:])
        return torch.cat([u, c])
    return c
