"""Latent inpainting of the SolidMark border for Stable Diffusion pipelines
(see :func:`mmh_fast.solidmark.evaluate`)."""
from __future__ import annotations

import numpy as np
import torch

from ..models.batching import default_batch_size
from ..models.denoiser import Denoiser, model_device
from ..models.pipelines import decode_latents, encode_images, encode_prompts
from ..models.schedules import make_schedule
from .keys import SolidMark
from .repaint import _level_path, _Noise, _repaint, _run_chunks, _time_levels
from .results import SolidMarkResult, _result


def _evaluate_latent(pipe, x: torch.Tensor, k: np.ndarray, sm: SolidMark, *, scheduler, prompts,
                     num_inference_steps, seed, batch_size, resample, jump_length, guidance_scale, embedding_transform,
                     prompt_transform, negative_prompt, deltas, return_images, progress) -> SolidMarkResult:
    """Latent inpainting for a Stable Diffusion pipeline (see :func:`evaluate`).

    At each reverse step the x0 prediction z0_hat is decoded by the VAE, the
    known interior (the clean training image, mapped from ``value_range`` to
    the VAE's [-1, 1]) is pasted in pixel space, the canvas re-encoded
    (posterior mean times scaling_factor) and the ancestral step taken towards
    that latent, which re-noises the pasted interior to the next level. (The
    VAE only maps clean images, so the paste is done on the x0 prediction;
    noising then happens in latent space.) The last x0 prediction is decoded
    and its border mean, mapped back from [-1, 1], is the predicted key."""
    N = x.shape[0]
    text = getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
    if text:
        if prompts is None:
            raise ValueError("a text-conditioned pipeline needs prompts: the training captions, one per image")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != N or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be {N} strings (one caption per image), got {len(prompts)} entries")
        if prompt_transform is not None:
            prompts = [prompt_transform(p, i) for i, p in enumerate(prompts)]
    elif prompts is not None or prompt_transform is not None or embedding_transform is not None \
            or guidance_scale is not None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder: prompts, prompt/embedding transforms and "
                         "guidance need a text-conditioned pipeline")
    schedule = make_schedule(scheduler if scheduler is not None else pipe.scheduler)
    den = Denoiser(pipe.unet, schedule)
    dev = model_device(pipe.unet)
    times = _time_levels(schedule, num_inference_steps)
    path = _level_path(len(times), jump_length, resample)
    lo, hi = sm.value_range
    t = sm.thickness
    canvas_shape = (x.shape[1], x.shape[2] + 2 * t, x.shape[3] + 2 * t)
    keep = (~sm.border_mask(canvas_shape)).to(dev, torch.float32)
    uncond = None
    if guidance_scale is not None:
        uncond = {"encoder_hidden_states": encode_prompts(pipe, [negative_prompt])}

    # the latent shape of a canvas: one VAE encode of the first image
    canvas0 = sm.augment(x[:1], np.full(1, 0.5)).to(dev, torch.float32)
    with torch.no_grad():
        latent_shape = encode_images(pipe, 2 * (canvas0 - lo) / (hi - lo) - 1).shape[1:]
    if batch_size is None:
        # every step runs the UNet on latents and the VAE both ways on the canvas
        batch_size = min(default_batch_size(pipe.unet, latent_shape, passes=1 if guidance_scale is None else 2,
                                            device=dev),
                         default_batch_size(pipe.vae, canvas_shape, device=dev))

    def chunk(start, stop):
        rows = slice(start, stop)
        ids = list(range(start, stop))
        # the canvas in the VAE's [-1, 1]; its border is never used (replaced by the model's)
        canvas = 2 * (sm.augment(x[rows], np.full(len(ids), 0.5)).to(dev, torch.float32) - lo) / (hi - lo) - 1
        cond = {}
        if text:
            emb = encode_prompts(pipe, prompts[rows])
            if embedding_transform is not None:
                emb = embedding_transform(emb, ids)
            cond = {"encoder_hidden_states": emb}

        def paste(z0):
            img = decode_latents(pipe, z0).to(dev)
            return encode_images(pipe, keep * canvas + (1 - keep) * img).to(torch.float32)

        def mkw(_lvl):
            return {"cond": cond, "uncond": uncond}

        with torch.no_grad():
            z0 = _repaint(den, None, None, times, path, _Noise(seed, ids, "solidmark"), mkw, guidance_scale,
                          paste=paste, shape=latent_shape)
            img = decode_latents(pipe, z0).to(dev)
        img = keep * canvas + (1 - keep) * img  # in [-1, 1]
        return (img.double() + 1) / 2 * (hi - lo) + lo

    canvas = _run_chunks(chunk, N, batch_size=batch_size, progress=progress)
    return _result(k, sm.border_values(canvas).numpy(), deltas, canvas.float() if return_images else None)
