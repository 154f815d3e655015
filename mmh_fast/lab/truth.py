"""Ground truth by generation: every prompt is sampled with the pipeline's own
``__call__`` and each generation is matched to the training set with Carlini
et al.'s calibrated l2 (:func:`mmh_fast.retrieval.calibrated_l2`); a prompt is
memorized when at least one of its generations copies (score < 1/3)."""
from __future__ import annotations

import numpy as np
import torch

from ..retrieval import calibrated_l2

COPY_THRESHOLD = 1.0 / 3.0  # Carlini et al. (2023): calibrated l2 below 1/3 is a copy


def generate_images(pipe, prompts, *, n: int, guidance_scale: float, num_inference_steps: int, seed: int,
                    batch_prompts: int = 32, prompt_embeds: torch.Tensor | None = None) -> np.ndarray:
    """[P, n, 3, H, W] float32 in [-1, 1] from ``pipe(...)`` (P prompts, or P rows of
    ``prompt_embeds`` [P, L, D] with ``prompts=None``); generation j of every prompt
    uses the generator seeded ``seed + j`` (independent of the batching)."""
    if (prompts is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompts and prompt_embeds")
    P = len(prompt_embeds) if prompts is None else len(list(prompts))
    prompts = None if prompts is None else list(prompts)
    out = []
    for s in range(0, P, batch_prompts):
        b = min(batch_prompts, P - s)
        gens = [torch.Generator().manual_seed(seed + j) for _ in range(b) for j in range(n)]
        # diffusers draws one latent per generator in order: prompt-major, n per prompt
        what = dict(prompt=prompts[s:s + b]) if prompts is not None else \
            dict(prompt_embeds=prompt_embeds[s:s + b], negative_prompt=[""] * b)
        with torch.no_grad():
            res = pipe(**what, num_images_per_prompt=n, guidance_scale=guidance_scale,
                       num_inference_steps=num_inference_steps, generator=gens, output_type="np")
        im = np.asarray(res.images, dtype=np.float32)  # [b*n, H, W, 3] in [0, 1]
        out.append(im.transpose(0, 3, 1, 2).reshape(b, n, 3, im.shape[1], im.shape[2]) * 2 - 1)
    return np.concatenate(out)


def copy_scores(generated: np.ndarray, train_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated l2 (n = 50, alpha = 0.5) of each generation [P, n, ...] against the
    distinct training images [N, ...] (a DD-Mem image once), and the index of its nearest."""
    P, n = generated.shape[:2]
    flat = generated.reshape(P * n, -1).astype(np.float32)
    tr = train_images.reshape(len(train_images), -1).astype(np.float32)
    d, idx = calibrated_l2(flat, tr, n=min(50, len(tr)), return_indices=True)
    return np.asarray(d).reshape(P, n), np.asarray(idx).reshape(P, n)


def ground_truth(pipe, prompts, train_images: np.ndarray, *, n: int = 4, guidance_scale: float,
                 num_inference_steps: int, seed: int = 0, return_images: bool = False) -> dict:
    """Per prompt: ``min_l2`` (smallest calibrated l2 over its n generations),
    ``copy_rate`` (fraction of generations below 1/3), ``memorized``
    (min_l2 < 1/3) and ``nearest`` (training index copied most closely)."""
    gen = generate_images(pipe, prompts, n=n, guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, seed=seed)
    d, idx = copy_scores(gen, train_images)
    best = d.argmin(1)
    out = {"scores": d, "min_l2": d.min(1), "copy_rate": (d < COPY_THRESHOLD).mean(1),
           "memorized": d.min(1) < COPY_THRESHOLD, "nearest": idx[np.arange(len(d)), best]}
    if return_images:
        out["images"] = gen
    return out
