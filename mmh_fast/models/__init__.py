"""Adapters between diffusers models / schedulers and the continuous-time view
used by the estimators: schedules (psi, sigma, timestep) and eps/score."""
from .denoiser import PREDICTION_TYPES, Denoiser, output_tensor
from .pipelines import (ResolvedModel, decode_latents, encode_images, encode_prompts, is_pipeline, resolve_model,
                        tokenize_prompts)
from .sampling import ddim_sample, sample_noise
from .training import MLPDenoiser, train_denoiser
from .schedules import (DiscreteSchedule, EDMSchedule, Schedule, VESchedule, VPSDESchedule, check_t,
                        default_ddpm_schedule, make_schedule)

__all__ = ["Schedule", "DiscreteSchedule", "VPSDESchedule", "VESchedule", "EDMSchedule", "make_schedule",
           "default_ddpm_schedule", "check_t", "Denoiser", "output_tensor", "PREDICTION_TYPES",
           "ResolvedModel", "resolve_model", "is_pipeline", "encode_images", "decode_latents", "encode_prompts",
           "tokenize_prompts", "ddim_sample", "sample_noise", "MLPDenoiser", "train_denoiser"]
