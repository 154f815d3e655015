"""Memorization detection with the classifier-free-guidance vector.

- :func:`cfg_norm`: Wen et al. (2023) on generations: the mean over DDIM
  sampling steps and images of |eps(x_t, c) - eps(x_t, "")|_2.
- :func:`cfg_norm_train`: the MMH paper's App. C variant on training images:
  a few Euler steps of the conditional probability-flow ODE from the clean
  latent to t0, then |s(x_t0; t0, c) - s(x_t0; t0, "")| with BOTH scores at the
  point x_t0 reached (the paper's text writes the second at x; the CFG vector of
  Eq. 2 is taken at one point).
"""
from __future__ import annotations

import torch

from ..models.pipelines import encode_images
from ..models.schedules import check_t
from ._core import as_prompts, check_guidance, check_int, text_pipeline

__all__ = ["cfg_norm", "cfg_norm_train"]


def _check_seed(seed) -> int:
    return check_int(seed, "seed", 0)


def _check_steps(steps, n: int) -> tuple[int, int]:
    try:
        s0, s1 = steps
    except (TypeError, ValueError):
        raise TypeError(f"steps must be a pair (first, stop) of step indices, got {steps!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, int) for s in (s0, s1)):
        raise TypeError(f"steps must be two integers, got {steps!r}")
    if not 0 <= s0 < s1 <= n:
        raise ValueError(f"steps must satisfy 0 <= first < stop <= num_inference_steps ({n}), got {steps!r}")
    return s0, s1


@torch.no_grad()
def cfg_norm(pipe, prompts, *, num_images: int = 4, steps=(0, 1), num_inference_steps: int = 50,
             guidance_scale: float = 7.5, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Wen et al.'s memorization score of prompts: the mean CFG-vector norm.

    score(c) = mean over images n < num_images and DDIM steps i in [steps[0], steps[1])
    of |eps(x_i^n, c) - eps(x_i^n, "")|_2, along the CFG DDIM trajectory that
    starts from x_T^n ~ N(0, I) and steps with eps_u + lambda (eps_c - eps_u)
    (not multiplied by lambda). High values flag memorization. steps=(0, 1) is
    the one-step detector: a single two-branch UNet call per image, no sampling
    loop; (0, 10) the ten-step one. The loop never runs past the last step needed.

    Args:
        pipe: a StableDiffusionPipeline-like pipeline (tokenizer, text_encoder,
            unet, scheduler with alphas_cumprod), fp16 or fp32, CPU or CUDA.
        prompts: a string or a list of N strings (over-long ones are truncated to
            the tokenizer's limit with a warning).
        num_images: images (initial latents) per prompt, >= 1.
        steps: (first, stop), 0 <= first < stop <= num_inference_steps.
        num_inference_steps: the DDIM grid (the scheduler's timestep spacing).
        guidance_scale: lambda of the trajectory's CFG.
        seed: image n of EVERY prompt starts from the latent keyed by (seed, n), so
            a prompt's score depends on nothing but (prompt, seed, settings): not
            on the batch, the order or the other prompts.
        batch_size: (prompt, image) rows per two-branch UNet call (default: all).

    Returns:
        float32 tensor [N] (float64 for a float64 pipeline) on the CPU (eps units,
        per-coordinate scale ~1).
    """
    tp = text_pipeline(pipe)
    prompts = as_prompts(prompts)
    num_images = check_int(num_images, "num_images", 1)
    guidance_scale = check_guidance(guidance_scale)
    seed = _check_seed(seed)
    grid = tp.grid(num_inference_steps)
    s0, s1 = _check_steps(steps, len(grid))
    emb = tp.embed(prompts + [""])
    cond_all, uncond = emb[:-1], emb[-1:]
    N = len(prompts)
    rows = N * num_images
    bs = rows if batch_size is None else check_int(batch_size, "batch_size", 1)
    total = torch.zeros(rows, dtype=torch.float64)
    for r0 in range(0, rows, bs):
        r = torch.arange(r0, min(rows, r0 + bs))
        x = tp.initial_latents((r % num_images).tolist(), seed)
        cond = cond_all.index_select(0, (r // num_images).to(cond_all.device))
        for i in range(s1):
            e_u, e_c = tp.pair(x, grid, i, cond, uncond)
            if i >= s0:
                total[r] += (e_c - e_u).reshape(len(r), -1).to(torch.float64).norm(dim=1).cpu()
            if i + 1 < s1:  # the last step needed: no update
                x = grid.step(i, x, e_u + guidance_scale * (e_c - e_u))
    return (total.reshape(N, num_images).sum(1) / (num_images * (s1 - s0))).to(tp.work_dtype)


def _check_images(images, B_name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{B_name} must be a torch.Tensor [B, C, H, W] in [-1, 1], got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{B_name} must hold floating-point values in [-1, 1], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"{B_name} must be a non-empty batch [B, C, H, W], got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{B_name} contains NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"{B_name} must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] "
                         "(map [0, 1] images with 2 x - 1, uint8 with x / 127.5 - 1)")
    return images


@torch.no_grad()
def cfg_norm_train(pipe, images, captions, *, t0: float = 0.01, n_euler: int = 3,
                   batch_size: int | None = None) -> torch.Tensor:
    """CFG-vector norm of training images with their captions (MMH paper App. C, Fig. 6).

    1. x = VAE posterior mean of the image times scaling_factor (the latent the
       UNet was trained on), the state at t = 0 (psi = 1, sigma = 0).
    2. ``n_euler`` Euler steps of the CONDITIONAL probability-flow ODE on the
       uniform grid t_k = k t0 / n_euler. In DDIM coordinates x~ = x / psi the ODE is
       dx~ = eps d(sigma / psi), so one step from a to b reads
       x_b = psi_b x0_hat + sigma_b eps(x_a, t_a, c),  x0_hat = (x_a - sigma_a eps) / psi_a
       (the first step queries the UNet at timestep 0, its least noisy level).
    3. score = |s(x_t0; t0, c) - s(x_t0; t0, "")|_2 = |eps_c - eps_u|_2 / sigma(t0),
       both branches at the point x_t0 reached (one two-branch call).

    Cost per image: n_euler conditional UNet rows + one two-branch call (and the VAE encoder).

    Args:
        pipe: a Stable Diffusion-like pipeline with a VAE (or a pixel-space text pipeline).
        images: [B, 3, H, W] float in [-1, 1]; H, W such that the latents fit the UNet.
        captions: a string (shared) or B strings ("" gives a score of 0).
        t0: continuous time in (0, 1] (t0 * num_train_timesteps is the UNet timestep).
        n_euler: Euler steps >= 1.
        batch_size: images per VAE / UNet call (default: all).

    Returns:
        float32 tensor [B] (float64 for a float64 pipeline) on the CPU, in score units (1 / latent units): the eps
        difference divided by sigma(t0). High values flag memorized images.
    """
    tp = text_pipeline(pipe)
    t0 = check_t(t0, "t0")
    n_euler = check_int(n_euler, "n_euler", 1)
    images = _check_images(images)
    B = images.shape[0]
    caps = as_prompts(captions, "captions")
    if isinstance(captions, str):
        caps = caps * B
    if len(caps) != B:
        raise ValueError(f"captions has {len(caps)} entries but images has {B}; give one caption per image")
    bs = B if batch_size is None else check_int(batch_size, "batch_size", 1)
    z = encode_images(tp.pipe, images.to(torch.float64 if tp.work_dtype == torch.float64 else torch.float32),
                      batch_size=bs)
    C, f = tp.latent_shape()[0], tp.down_factor()
    if z.shape[1] != C or z.shape[-1] % f or z.shape[-2] % f:
        raise ValueError(f"images of size {tuple(images.shape[-2:])} give latents {tuple(z.shape[1:])}; the UNet "
                         f"takes {C} channels with height and width multiples of {f}")
    uniq = list(dict.fromkeys(caps))
    emb = tp.embed(uniq + [""])
    where = {c: k for k, c in enumerate(uniq)}
    cidx = torch.tensor([where[c] for c in caps], device=emb.device)
    uncond = emb[-1:]
    den = tp.denoiser
    times = [k * t0 / n_euler for k in range(n_euler + 1)]
    coef = [(1.0, 0.0)] + [tuple(float(v) for v in den.schedule.psi_sigma(t)) for t in times[1:]]
    out = torch.empty(B, dtype=torch.float64)
    for b0 in range(0, B, bs):
        sl = slice(b0, min(B, b0 + bs))
        x = z[sl].to(tp.device, tp.work_dtype)
        kw = {"encoder_hidden_states": emb.index_select(0, cidx[sl])}
        for k in range(n_euler):
            (psi_a, sig_a), (psi_b, sig_b) = coef[k], coef[k + 1]
            # the network's own (psi, sigma) at t_k convert its prediction type to eps
            psi_n, sig_n, ts = den.coefficients(times[k], x.device)
            eps = den.eps_at(x, psi_n, sig_n, ts, cond=kw)
            x0_hat = (x - sig_a * eps) / psi_a
            x = psi_b * x0_hat + sig_b * eps
        psi, sigma, ts = den.coefficients(t0, x.device)
        e_u, e_c = den.eps_pair(x, psi, sigma, ts, cond=kw, uncond={"encoder_hidden_states": uncond})
        out[sl] = ((e_c - e_u).reshape(x.shape[0], -1).to(torch.float64).norm(dim=1) / sigma).cpu()
    if not bool(torch.isfinite(out).all()):  # pragma: no cover - a diverging network
        raise FloatingPointError("cfg_norm_train produced non-finite values (fp16 overflow in the UNet?)")
    return out.to(tp.work_dtype)

