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

from ..models.batching import run_chunked
from ..models.pipelines import encode_images
from ..models.schedules import check_t
from ._core import as_prompts, check_batch_size, check_guidance, check_int, check_rows, text_pipeline

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
        batch_size: (prompt, image) rows per two-branch UNet call; default: sized
            from the UNet and the latent size (:meth:`TextPipeline.batch_size`, i.e.
            :func:`mmh_fast.models.batching.default_batch_size` with 2 passes). On an
            out-of-memory error the chunk is halved and retried (with a warning);
            chunking does not change the result.

    Returns:
        float32 tensor [N] (float64 for a float64 pipeline) on the CPU (eps units,
        per-coordinate scale ~1).

    Raises:
        NonFiniteOutputError: a UNet output (or the guided eps, or the score) is NaN
            or inf; ``.positions`` are the affected prompts' indices.
    """
    tp = text_pipeline(pipe)
    prompts = as_prompts(prompts)
    num_images = check_int(num_images, "num_images", 1)
    guidance_scale = check_guidance(guidance_scale)
    seed = _check_seed(seed)
    grid = tp.grid(num_inference_steps)
    s0, s1 = _check_steps(steps, len(grid))
    bs = check_batch_size(batch_size) or tp.batch_size(passes=2)
    emb = tp.embed(prompts + [""])
    cond_all, uncond = emb[:-1], emb[-1:]
    N = len(prompts)

    def chunk(a, b):
        r = torch.arange(a, b)
        prompt_of = r // num_images
        x = tp.initial_latents((r % num_images).tolist(), seed)
        cond = cond_all.index_select(0, prompt_of.to(cond_all.device))
        total = torch.zeros(b - a, dtype=torch.float64)
        for i in range(s1):
            e_u, e_c, eps = tp.guided_pair(x, grid, i, cond, uncond, guidance_scale, prompt_of)
            if i >= s0:
                total += (e_c - e_u).reshape(b - a, -1).to(torch.float64).norm(dim=1).cpu()
            if i + 1 < s1:  # the last step needed: no update
                x = grid.step(i, x, eps)
        return total

    # rows are independent (latents keyed by (seed, image)), so chunks only change the peak memory
    total = torch.cat(run_chunked(chunk, N * num_images, batch_size=bs, what="cfg_norm"))
    out = (total.reshape(N, num_images).sum(1) / (num_images * (s1 - s0))).to(tp.work_dtype)
    check_rows(out, f"cfg_norm's score in {tp.work_dtype} (beyond its range)", range(N))
    return out


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
        batch_size: images per VAE / UNet call; default: the VAE's and the UNet's
            own estimates (:func:`mmh_fast.models.batching.default_batch_size`).
            Halved and retried on out-of-memory errors; chunking does not change
            the result.

    Returns:
        float32 tensor [B] (float64 for a float64 pipeline) on the CPU, in score units (1 / latent units): the eps
        difference divided by sigma(t0). High values flag memorized images.

    Raises:
        NonFiniteOutputError: a VAE latent or UNet output is NaN or inf;
            ``.positions`` are the affected images' indices.
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
    bs = check_batch_size(batch_size)
    z = _encode(tp.pipe, images.to(torch.float64 if tp.work_dtype == torch.float64 else torch.float32), bs)
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
    psi, sigma, ts0 = den.coefficients(t0, z.device)

    def chunk(a, b):
        x = z[a:b].to(tp.device, tp.work_dtype)
        pos = range(a, b)
        kw = {"encoder_hidden_states": emb.index_select(0, cidx[a:b])}
        for k in range(n_euler):
            (psi_a, sig_a), (psi_b, sig_b) = coef[k], coef[k + 1]
            # the network's own (psi, sigma) at t_k convert its prediction type to eps
            psi_n, sig_n, ts = den.coefficients(times[k], x.device)
            eps = den.eps_at(x, psi_n, sig_n, ts, cond=kw)
            check_rows(eps, f"the UNet's conditional noise prediction at Euler step {k} (t={times[k]:.3g}; "
                       "positions are image indices)", pos)
            x0_hat = (x - sig_a * eps) / psi_a
            x = psi_b * x0_hat + sig_b * eps
        e_u, e_c = den.eps_pair(x, psi, sigma, ts0, cond=kw, uncond={"encoder_hidden_states": uncond})
        for name, e in (("unconditional", e_u), ("conditional", e_c)):
            check_rows(e, f"the UNet's {name} noise prediction at t0={t0:.3g} (positions are image indices)", pos)
        return ((e_c - e_u).reshape(x.shape[0], -1).to(torch.float64).norm(dim=1) / sigma).cpu()

    out = torch.cat(run_chunked(chunk, B, batch_size=bs or tp.batch_size(passes=2, latent_shape=z.shape[1:]),
                                what="cfg_norm_train"))
    out = out.to(tp.work_dtype)
    check_rows(out, f"cfg_norm_train's score in {tp.work_dtype} (beyond its range)", range(B))
    return out


def _encode(pipe, images: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """VAE latents of images (:func:`encode_images` chunks them, halving on OOM), checked finite."""
    z = encode_images(pipe, images, batch_size=batch_size)
    check_rows(z, "the VAE encoder's latent (positions are image indices)", range(images.shape[0]))
    return z

