"""Anisotropy of the log-probability (Asthana and Belagiannis, "Detecting and
Mitigating Memorization in Diffusion Models through Anisotropy of the
Log-Probability", ICLR 2026, arXiv 2601.20642).

The norm of the score difference |s_c - s_u| detects memorization where
log p_t is isotropic (high noise). At low noise the log-density is
anisotropic, and memorized prompts show instead a strong angular alignment
between the guidance vector eps_c - eps_u and the unconditional eps_u. The
detector adds both, measured on pure noise x_T ~ N(0, I) without a single
denoising step: one two-branch UNet call at the first DDIM timestep (norm)
and one at a low-noise timestep (alignment), 4 UNet rows per image.

- :func:`norm_alignment_score`: the detector.
- :func:`adapt_prompt_embedding`: the mitigation, adapting the prompt's
  text-encoder hidden states until the detector no longer flags them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._core import as_prompts, check_float, check_int, text_pipeline
from ._geometry import check_scores, check_step, over_rows

__all__ = ["norm_alignment_score", "NormAlignment", "adapt_prompt_embedding"]


@dataclass
class NormAlignment:
    """The detector's value and its two terms, each [N] on the CPU.

    Attributes:
        score: norm_weight * norm + alignment_weight * alignment (high = memorized).
        norm: mean over images of |eps_c(x_T, T) - eps_u(x_T, T)|_2 (eps units).
        alignment: mean over images and latent positions of the channel-wise cosine
            between eps_u(x_T, t_low) and eps_c(x_T, t_low) - eps_u(x_T, t_low), in [-1, 1].
    """

    score: torch.Tensor
    norm: torch.Tensor
    alignment: torch.Tensor


def _channel_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over positions of cos(a[:, :, p], b[:, :, p]) over channels, [B]
    (0 where either vector is 0, e.g. a prompt whose guidance vector vanishes)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    num = (a * b).sum(1)
    den = a.norm(dim=1) * b.norm(dim=1)
    # den == 0 only: a NaN must stay NaN (and be reported), not turn into 0
    cos = torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))
    return cos.reshape(a.shape[0], -1).mean(1)


def _terms(tp, grid, x, cond, uncond, i_low):
    """(norm [B], alignment [B]) at the pure noise x [B, C, h, w]; differentiable in cond."""
    B = x.shape[0]
    e_u, e_c = tp.pair(x, grid, 0, cond, uncond)
    norm = (e_c - e_u).reshape(B, -1).to(torch.float64).norm(dim=1)
    # the same pure noise presented to the UNet as if it were at the low-noise level t_low
    l_u, l_c = tp.pair(x, grid, i_low, cond, uncond)
    return norm, _channel_cosine(l_u, l_c - l_u)


def norm_alignment_score(pipe, prompts, *, num_images: int = 1, norm_weight: float = 1.0,
                         alignment_weight: float = 2.0, alignment_step: int = -3, num_inference_steps: int = 50,
                         seed: int = 0, batch_size: int | None = None, return_components: bool = False):
    """Asthana and Belagiannis's memorization score: isotropic norm + anisotropic alignment,

        score(c) = gamma_1 |eps(x_T, T, c) - eps(x_T, T, "")|_2
                 + gamma_2 cos(eps(x_T, t_low, ""), eps(x_T, t_low, c) - eps(x_T, t_low, "")),

    on pure noise x_T ~ N(0, I) (no denoising step): T the first timestep of the
    DDIM grid, t_low = timesteps[alignment_step] (the third-to-last, as in the
    authors' code), the cosine taken over channels at each latent position and
    averaged over positions, both terms averaged over images. High values flag
    memorization. Defaults: gamma_1 = 1, gamma_2 = 2 (the authors' SD 1.4
    weights; 1 and 0.1 for SD 2).

    Cost per (prompt, image): two two-branch UNet calls (4 rows), no JVP.

    Args:
        pipe: a StableDiffusionPipeline-like pipeline (see :func:`mmh_fast.text.cfg_norm`).
        prompts: a string or a list of N strings.
        num_images: pure-noise latents per prompt (the paper's n: 1).
        norm_weight, alignment_weight: gamma_1, gamma_2.
        alignment_step: index of t_low in the DDIM grid (negative from the end).
        num_inference_steps: the DDIM grid (the scheduler's timestep spacing).
        seed: image n of every prompt is the latent keyed by (seed, n): scores do
            not depend on the batch or on the other prompts.
        batch_size: (prompt, image) rows per call (default: all).
        return_components: return a :class:`NormAlignment` (score, norm, alignment).

    Returns:
        float32 [N] (float64 for a float64 pipeline) on the CPU, or a :class:`NormAlignment`.
    """
    tp = text_pipeline(pipe)
    prompts = as_prompts(prompts)
    num_images = check_int(num_images, "num_images", 1)
    w_n = check_float(norm_weight, "norm_weight")
    w_a = check_float(alignment_weight, "alignment_weight")
    seed = check_int(seed, "seed", 0)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be True or False, got {return_components!r}")
    grid = tp.grid(num_inference_steps)
    i_low = check_step(alignment_step, len(grid), "alignment_step")
    emb = tp.embed(prompts + [""])
    cond_all, uncond = emb[:-1], emb[-1:]

    @torch.no_grad()
    def chunk(rows):
        x = tp.initial_latents(rows.image.tolist(), seed)
        n_, a_ = _terms(tp, grid, x, cond_all.index_select(0, rows.prompt.to(cond_all.device)), uncond, i_low)
        return n_.cpu().to(torch.float64), a_.cpu().to(torch.float64)

    norm, align = over_rows(tp, len(prompts), num_images, batch_size, chunk, what="norm_alignment_score")
    norm = check_scores(norm.reshape(-1, num_images).mean(1), "norm_alignment_score (norm)", prompts)
    align = check_scores(align.reshape(-1, num_images).mean(1), "norm_alignment_score (alignment)", prompts)
    dt = tp.work_dtype
    score = (w_n * norm + w_a * align).to(dt)
    return NormAlignment(score, norm.to(dt), align.to(dt)) if return_components else score


def adapt_prompt_embedding(pipe, prompt, *, lr: float = 0.05, iters: int = 20, target: float | None = None,
                           num_images: int = 1, norm_weight: float = 1.0, alignment_weight: float = 2.0,
                           alignment_step: int = -3, num_inference_steps: int = 50, seed: int = 0,
                           weight_decay: float = 0.0, return_history: bool = False):
    """Prompt adaptation against memorization (Asthana and Belagiannis, Sec. 6):
    gradient descent (AdamW) on the text-encoder hidden states of ``prompt``
    (BOS position frozen: it is the same for every prompt) to lower
    :func:`norm_alignment_score` on fixed pure-noise latents, stopping once the
    score is <= ``target`` (a threshold separating memorized from
    non-memorized prompts on the model at hand, e.g. from the lab) or after
    ``iters`` steps. Generate from the result with ``prompt_embeds=`` or
    :func:`mmh_fast.text.generate`.

    Args:
        prompt: a prompt, or its hidden states [L, D] / [1, L, D].
        lr, weight_decay: AdamW's.
        iters: at most this many optimiser steps (>= 0).
        target: early-stop value of the score, or None.
        num_images, norm_weight, alignment_weight, alignment_step,
        num_inference_steps, seed: as :func:`norm_alignment_score`.
        return_history: also return the score before each step and at the end.

    Returns:
        the embedding [1, L, D] (UNet dtype, detached); with ``return_history``
        (embedding, [scores]) whose last entry belongs to the returned embedding.
    """
    tp = text_pipeline(pipe)
    iters = check_int(iters, "iters", 0)
    lr = check_float(lr, "lr", positive=True)
    num_images = check_int(num_images, "num_images", 1)
    w_n = check_float(norm_weight, "norm_weight")
    w_a = check_float(alignment_weight, "alignment_weight")
    wd = check_float(weight_decay, "weight_decay")
    seed = check_int(seed, "seed", 0)
    if target is not None:
        target = check_float(target, "target")
    grid = tp.grid(num_inference_steps)
    i_low = check_step(alignment_step, len(grid), "alignment_step")
    base, _ = tp.as_embeddings(prompt, "prompt")
    if base.shape[0] != 1:
        raise ValueError(f"adapt_prompt_embedding takes one prompt, got {base.shape[0]}")
    base = base.detach().to(tp.work_dtype)
    bos, rest = base[:, :1], base[:, 1:].clone().requires_grad_(True)
    opt = torch.optim.AdamW([rest], lr=lr, weight_decay=wd)
    uncond = tp.uncond()
    x = tp.initial_latents(list(range(num_images)), seed)
    history: list[float] = []
    for it in range(iters + 1):
        last = it == iters
        with torch.set_grad_enabled(not last):
            full = torch.cat([bos, rest], 1).to(tp.dtype)
            n_, a_ = _terms(tp, grid, x, full.expand(num_images, -1, -1), uncond, i_low)
            score = (w_n * n_ + w_a * a_).mean()
        val = float(score.detach())
        if val != val or val in (float("inf"), float("-inf")):
            raise FloatingPointError(f"the norm-alignment score of prompt {prompt!r} is NaN or inf at step {it}")
        history.append(val)
        if last or (target is not None and val <= target):
            break
        opt.zero_grad(set_to_none=True)
        score.backward()
        opt.step()
    emb = torch.cat([bos, rest.detach()], 1).to(tp.dtype)
    return (emb, history) if return_history else emb
