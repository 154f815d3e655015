"""Adapters between diffusers models / schedulers and the continuous-time view
used by the estimators: schedules (psi, sigma, timestep) and eps/score."""
from .denoiser import PREDICTION_TYPES, Denoiser, output_tensor
from .schedules import (DiscreteSchedule, EDMSchedule, Schedule, VESchedule, VPSDESchedule, check_t,
                        default_ddpm_schedule, make_schedule)

__all__ = ["Schedule", "DiscreteSchedule", "VPSDESchedule", "VESchedule", "EDMSchedule", "make_schedule",
           "default_ddpm_schedule", "check_t", "Denoiser", "output_tensor", "PREDICTION_TYPES"]
