"""Sharpness of the log-density at the start of generation (Jeon, Kim and No,
"Understanding and Mitigating Memorization in Generative Models via Sharpness
of Probability Landscapes", ICML 2025, arXiv 2412.04140).

With the score s(x; t, c) = grad_x log p_t(x | c) = -eps(x, t, c) / sigma(t),
the Hessian of the log-density is H(x; t, c) = d s / d x = -J_eps(x) / sigma.
Memorized prompts make log p_t(. | c) sharp (large negative eigenvalues of H)
already at the initial noise x_T. Three tools:

- :func:`hessian_score_difference_norm`: the initial-stage sharpness metric
  |H_Delta(x_T) s_Delta(x_T)|_2 with H_Delta = H_c - H_u, s_Delta = s_c - s_u
  (one two-branch UNet call + one two-branch Jacobian-vector product).
- :func:`hessian_eigenvalues`: the leading eigenvalues of H at a point of the
  sampling trajectory, by Arnoldi / Lanczos on Jacobian-vector products
  (the paper's spectrum diagnostic; the authors did not release theirs).
- :func:`optimize_initial_noise` and :func:`generate_sail`: SAIL, the
  mitigation that moves x_T to a flatter region before sampling.

Jacobian-vector products run in forward mode (torch.func.jvp), with attention
on the math backend and contiguous GroupNorm inputs
(:func:`mmh_fast.models.forward_ad.forward_ad_safe`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.pipelines import decode_latents
from ..ops.krylov import krylov_eigenvalues
from ._core import as_prompts, check_float, check_guidance, check_int, text_pipeline
from ._geometry import check_scores, eps_pair_jvp, jvp_of, over_rows, points_at, setup
from .detection import _check_steps

__all__ = ["hessian_score_difference_norm", "hessian_eigenvalues", "optimize_initial_noise", "generate_sail",
           "SAILResult", "HESSIAN_BRANCHES"]

HESSIAN_BRANCHES = ("cond", "uncond", "difference")


def hessian_score_difference_norm(pipe, prompts, *, num_images: int = 4, steps=(0, 1),
                                  num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                                  batch_size: int | None = None) -> torch.Tensor:
    """The initial-stage sharpness metric of Jeon et al. (ICML 2025, Sec. 4.2):

        score(c) = mean over images n and DDIM steps i in [steps[0], steps[1]) of
                   | (H_c(x_i) - H_u(x_i)) (s_c(x_i) - s_u(x_i)) |_2
                 = | (J_c - J_u) (eps_c - eps_u) |_2 / sigma_i^2,

    H = d s / d x = -J / sigma the Hessian of log p_t(x | c) (c = "" for the
    unconditional branch), J = d eps / d x the UNet's Jacobian, evaluated along
    the CFG DDIM trajectory from x_T^n ~ N(0, I). The product H_Delta s_Delta
    amplifies the score difference along the directions of strongest
    curvature, which separates memorized prompts from the first step
    (steps=(0, 1), the default: "initial stage"). High values flag memorization.

    Cost per (prompt, image) and step: one two-branch UNet call (2 rows) and
    one two-branch Jacobian-vector product (forward-mode AD, ~2-3 rows each).

    Args:
        pipe: a StableDiffusionPipeline-like pipeline (see :func:`mmh_fast.text.cfg_norm`).
        prompts: a string or a list of N strings.
        num_images: initial latents per prompt (the paper's n; 4 by default).
        steps: (first, stop) DDIM step indices, 0 <= first < stop <= num_inference_steps.
        num_inference_steps, guidance_scale: the DDIM grid and the trajectory's CFG scale.
        seed: image n of every prompt starts from the latent keyed by (seed, n):
            scores do not depend on the batch or on the other prompts.
        batch_size: (prompt, image) rows per call (default: all).

    Returns:
        float32 [N] (float64 for a float64 pipeline) on the CPU, in score^2 units
        (1 / latent units^2).
    """
    S = setup(pipe, prompts, num_images=num_images, num_inference_steps=num_inference_steps, seed=seed,
              guidance_scale=guidance_scale)
    tp, prompts, num_images, grid = S.tp, S.prompts, S.num_images, S.grid
    s0, s1 = _check_steps(steps, len(grid))

    def chunk(rows):
        cond = S.cond.index_select(0, rows.prompt.to(S.cond.device))
        x = tp.initial_latents(rows.image.tolist(), S.seed)
        acc = torch.zeros(len(rows), dtype=torch.float64)
        for i in range(s1):
            with torch.no_grad():
                e_u, e_c = tp.pair(x, grid, i, cond, S.uncond)
            if i >= s0:
                _, (j_u, j_c) = eps_pair_jvp(tp, grid, i, x, e_c - e_u, cond, S.uncond)
                acc += ((j_c - j_u).reshape(len(rows), -1).to(torch.float64).norm(dim=1) / grid.sigma[i] ** 2).cpu()
            if i + 1 < s1:  # the step's own eps moves x on: no second UNet call at evaluated steps
                x = grid.step(i, x, e_u + S.guidance_scale * (e_c - e_u))
        return acc

    total = over_rows(tp, len(prompts), num_images, batch_size, chunk, what="hessian_score_difference_norm",
                      backward=True)
    out = total.reshape(len(prompts), num_images).mean(1) / (s1 - s0)
    return check_scores(out, "hessian_score_difference_norm", prompts).to(tp.work_dtype)


def _branch_fn(tp, grid, i, branch, cond, uncond):
    """x -> eps of the branch at step i (cond / uncond / cond - uncond)."""
    psi, sigma, ts = grid.psi[i], grid.sigma[i], grid.timestep(i, tp.device)
    den = tp.denoiser
    if branch == "difference":
        def f(x):
            e_u, e_c = tp.pair(x, grid, i, cond, uncond)
            return e_c - e_u
        return f
    c = cond if branch == "cond" else uncond

    def g(x):
        return den.eps_at(x, psi, sigma, ts, cond={"encoder_hidden_states": c.expand(x.shape[0], *c.shape[1:])})
    return g


def hessian_eigenvalues(pipe, prompts, *, k: int = 8, num_images: int = 1, step: int = 0, branch: str = "cond",
                        symmetric: bool = True, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """Leading eigenvalues of the Hessian of the log-density at a point of
    generation, the spectrum diagnostic of Jeon et al. (ICML 2025, Sec. 3, Fig. 2-4):

        H(x_i; t_i, c) = d^2 log p_{t_i}(x | c) / d x^2 |_{x_i} = -J_eps(x_i; t_i, c) / sigma_i,

    its k Ritz values after k Arnoldi steps on Jacobian-vector products (forward
    mode, one UNet JVP per step), largest magnitude first. Memorization shows as
    large negative eigenvalues (a sharp peak of the density). x_i is step ``step``
    of the CFG DDIM trajectory from x_T^n ~ N(0, I) (step 0: x_T itself).

    Args:
        pipe, prompts: as :func:`hessian_score_difference_norm`.
        k: Krylov dimension (eigenvalues returned per point), 1 <= k <= latent size;
            k = latent size gives the whole spectrum.
        num_images: points per prompt (image n from the latent keyed by (seed, n)).
        step: DDIM step index of the point, 0 <= step < num_inference_steps.
        branch: "cond" (H_c), "uncond" (H_u) or "difference" (H_c - H_u).
        symmetric: Lanczos-style real Rayleigh-Ritz values of (H + H^T) / 2 (exact for
            a true Hessian; a network's Jacobian is only nearly symmetric);
            False: Arnoldi Ritz values of H itself, complex128.
        num_inference_steps, guidance_scale, seed, batch_size: as
            :func:`hessian_score_difference_norm`; the Arnoldi start vectors are keyed
            by (seed, image), so the result does not depend on the batch.

    Returns:
        [N, num_images, k] float64 (complex128 when ``symmetric=False``) on the CPU,
        in 1 / latent units^2.
    """
    k = check_int(k, "k", 1)
    if branch not in HESSIAN_BRANCHES:
        raise ValueError(f"branch must be one of {HESSIAN_BRANCHES}, got {branch!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be True or False, got {symmetric!r}")
    S = setup(pipe, prompts, num_images=num_images, num_inference_steps=num_inference_steps, seed=seed,
              guidance_scale=guidance_scale)
    tp, prompts, num_images, grid, seed = S.tp, S.prompts, S.num_images, S.grid, S.seed
    step = check_int(step, "step", 0)
    if step >= len(grid):
        raise ValueError(f"step must be < num_inference_steps ({len(grid)}), got {step}")
    d = 1
    for s in tp.latent_shape():
        d *= s
    if k > d:
        raise ValueError(f"k must be <= the latent size {d}, got {k}")

    def chunk(rows):
        cond = S.cond.index_select(0, rows.prompt.to(S.cond.device))
        (_, x), = points_at(tp, grid, rows, seed, cond, S.uncond, S.guidance_scale, [step])
        f = _branch_fn(tp, grid, step, branch, cond, S.uncond)
        sigma = grid.sigma[step]

        def matvec(v):
            return jvp_of(tp, f, x, v) / (-sigma)

        return krylov_eigenvalues(matvec, x, k, symmetric=symmetric, seed=seed, sample_ids=rows.image).cpu()

    ev = over_rows(tp, len(prompts), num_images, batch_size, chunk, what="hessian_eigenvalues",
                   backward=True).reshape(len(prompts), num_images, k)
    return check_scores(ev, "hessian_eigenvalues", prompts)


# ----------------------------------------------------------------------------- SAIL

@dataclass
class SAILResult:
    """Output of :func:`optimize_initial_noise`, rows in prompt-major order
    (row = prompt_index * num_images + n).

    Attributes:
        latents: [N * num_images, C, h, w] the chosen initial noise x_T.
        loss: [N * num_images] the SAIL objective at ``latents``.
        initial_loss: [N * num_images] the objective at the seeded x_T before optimisation.
        iterations: [N * num_images] Adam steps taken to reach ``latents``.
    """

    latents: torch.Tensor
    loss: torch.Tensor
    initial_loss: torch.Tensor
    iterations: torch.Tensor


def _sail_loss(tp, grid, x, cond, uncond, delta, gamma):
    """l(x) = |eps_Delta(x + delta u(x))|_2 + gamma |x|_2, u = eps_Delta(x) / |eps_Delta(x)|, per row."""
    B = x.shape[0]
    e_u, e_c = tp.pair(x, grid, 0, cond, uncond)
    diff = e_c - e_u
    u = diff / diff.reshape(B, -1).norm(dim=1).clamp_min(1e-30).reshape(B, *([1] * (x.dim() - 1)))
    e_u2, e_c2 = tp.pair(x + delta * u, grid, 0, cond, uncond)
    return (e_c2 - e_u2).reshape(B, -1).norm(dim=1) + gamma * x.reshape(B, -1).norm(dim=1)


def optimize_initial_noise(pipe, prompts, *, num_images: int = 4, lr: float = 0.05, max_steps: int = 10,
                           gamma: float = 0.05, delta: float = 1.0, threshold: float | None = None,
                           num_inference_steps: int = 50, seed: int = 0,
                           batch_size: int | None = None) -> SAILResult:
    """SAIL, sharpness-aware initialisation (Jeon et al., ICML 2025, Sec. 5, Alg. 2):
    move each initial latent x_T to a flat region of the conditional density
    before sampling, by Adam on

        l(x_T) = |eps_Delta(x_T + delta u)|_2 + gamma |x_T|_2,
        eps_Delta = eps(., T, c) - eps(., T, ""),  u = eps_Delta(x_T) / |eps_Delta(x_T)|_2

    (gradients through u as well). By Taylor, eps_Delta(x + delta u) =
    eps_Delta(x) + delta J_Delta u + O(delta^2): the first term is Wen et al.'s
    norm, the second the sharpness along the guidance direction (the H_Delta s_Delta
    of :func:`hessian_score_difference_norm`); gamma |x_T| keeps x_T typical of
    N(0, I). Each row is optimised on its own (Adam is element-wise and the
    UNet rows are independent), so results do not depend on the batch.

    Selection: the first iterate with l <= ``threshold`` (the paper's l_thres), or
    with no threshold (or none reached) the iterate with the lowest l. The authors'
    re-draws of fresh seeds when no candidate passes are not reproduced: the
    result is deterministic in (prompt, seed, settings).

    Args:
        pipe, prompts: as :func:`hessian_score_difference_norm`.
        num_images: latents per prompt (image n starts from the latent keyed by (seed, n)).
        lr: Adam's step (paper: 0.05).
        max_steps: Adam steps (paper: at most 10; more may hurt Gaussianity).
        gamma: weight of |x_T| (paper: 0.05 for SD 1.4, 0.01 for SD 2).
        delta: the step along u (1 in eps units, the authors' setting).
        threshold: l_thres, or None (model-specific: 8.2 for SD 1.4 at 512 px).
        num_inference_steps: the DDIM grid whose first timestep T is used.
        batch_size: rows per optimisation batch (default: the UNet's chunk size; halved on out-of-memory).

    Returns:
        :class:`SAILResult` (CPU tensors; latents in the pipeline's working dtype).
    """
    tp = text_pipeline(pipe)
    prompts = as_prompts(prompts)
    num_images = check_int(num_images, "num_images", 1)
    lr = check_float(lr, "lr", positive=True)
    max_steps = check_int(max_steps, "max_steps", 0)
    gamma = check_float(gamma, "gamma")
    delta = check_float(delta, "delta", positive=True)
    if threshold is not None:
        threshold = check_float(threshold, "threshold")
    seed = check_int(seed, "seed", 0)
    grid = tp.grid(num_inference_steps)
    emb = tp.embed(prompts + [""])
    cond_all, uncond = emb[:-1].detach(), emb[-1:].detach()

    def chunk(rows):
        cond = cond_all.index_select(0, rows.prompt.to(cond_all.device))
        x = tp.initial_latents(rows.image.tolist(), seed).clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        best_x = x.detach().clone()
        best_l = torch.full((len(rows),), float("inf"), dtype=torch.float64)
        best_it = torch.zeros(len(rows), dtype=torch.int64)
        done = torch.zeros(len(rows), dtype=torch.bool)
        for it in range(max_steps + 1):
            with torch.enable_grad():
                lo = _sail_loss(tp, grid, x, cond, uncond, delta, gamma)
            lv = lo.detach().to(torch.float64).cpu()
            if not bool(torch.isfinite(lv).all()):
                k = int(rows.prompt[int(torch.nonzero(~torch.isfinite(lv))[0])])
                raise FloatingPointError(f"the SAIL objective is NaN or inf for prompts[{k}] = {prompts[k]!r}")
            if it == 0:
                first = lv
            passed = lv <= threshold if threshold is not None else torch.zeros_like(done)
            take = ~done & (passed | (lv < best_l))
            best_l = torch.where(take, lv, best_l)
            best_it = torch.where(take, torch.full_like(best_it, it), best_it)
            best_x[take.to(x.device)] = x.detach()[take.to(x.device)]
            done |= passed
            if it == max_steps or bool(done.all()):
                break
            opt.zero_grad(set_to_none=True)
            lo.sum().backward()
            opt.step()
        return best_x.cpu(), best_l, first, best_it

    lat, loss, loss0, its = over_rows(tp, len(prompts), num_images, batch_size, chunk, what="optimize_initial_noise",
                                      backward=True)
    return SAILResult(lat, loss.to(tp.work_dtype), loss0.to(tp.work_dtype), its)


@torch.no_grad()
def generate_sail(pipe, prompts, *, num_images: int = 1, guidance_scale: float = 7.5, num_inference_steps: int = 50,
                  seed: int = 0, output: str = "images", batch_size: int | None = None, **sail) -> torch.Tensor:
    """CFG DDIM samples from SAIL-optimised initial noise (:func:`optimize_initial_noise`
    with the options ``sail``: lr, max_steps, gamma, delta, threshold); the same
    trajectories as :func:`mmh_fast.text.generate` otherwise, so
    ``generate(pipe, prompts, seed=s)`` is the unmitigated baseline.

    Returns:
        rows in prompt-major order: "images" float32 [N * num_images, 3, H, W] in [-1, 1],
        or "latents" [N * num_images, C, h, w].
    """
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    unknown = sorted(set(sail) - {"lr", "max_steps", "gamma", "delta", "threshold"})
    if unknown:
        raise TypeError(f"generate_sail got unknown option(s) {unknown}; SAIL takes lr, max_steps, gamma, delta, "
                        "threshold")
    tp = text_pipeline(pipe)
    prompts = as_prompts(prompts)
    lam = check_guidance(guidance_scale)
    with torch.enable_grad():
        res = optimize_initial_noise(pipe, prompts, num_images=num_images, num_inference_steps=num_inference_steps,
                                     seed=seed, batch_size=batch_size, **sail)
    grid = tp.grid(num_inference_steps)
    emb = tp.embed(prompts + [""])
    cond_all, uncond = emb[:-1], emb[-1:]

    def chunk(rows):
        x = res.latents[rows.r].to(tp.device, tp.work_dtype)
        x = tp.sample(x, grid, cond_all.index_select(0, rows.prompt.to(cond_all.device)), uncond, lam,
                      positions=rows.prompt)
        return decode_latents(tp.pipe, x) if output == "images" else x.float()

    return over_rows(tp, len(prompts), num_images, batch_size, chunk, what="generate_sail")
