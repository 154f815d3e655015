"""Where in the image: memorization maps (Kim and Lee, "Localizing Memorized
Regions in Diffusion Models via Coordinate-Wise Curvature Differences",
ICML 2026, arXiv 2605.26756).

A memorized region is one where the conditional density is sharper than the
unconditional one, coordinate by coordinate. With eps_Delta = eps_c - eps_u
and the Hessian difference H_Delta = H_c - H_u = -J_Delta / sigma
(J_Delta = d eps_Delta / d x):

- :func:`curvature_difference_map`: Delta h(p) = relu(sum over channels k of
  diag(J_Delta)[k, p]) = relu(-sigma sum_k diag(H_Delta)[k, p]), the
  coordinate-wise curvature difference, by Hutchinson's diagonal estimator
  diag(A) = E[v * (A v)] (Bekas, Kokiopoulou and Saad 2007; Rademacher v)
  on Jacobian-vector products;
- :func:`score_difference_map`: Delta s(p) = sum_k (s_c - s_u)[k, p]^2, its
  first-order surrogate (no Jacobian);
- :func:`map_localization`: ROC AUC and IoU of a map against a known region;
- :func:`map_overlay`: maps drawn over their images (red), for reports.

Both maps are taken at a late step of the CFG DDIM trajectory (the last, by
default, as in the authors' code), per latent position, and for latent
pipelines upsampled bilinearly to image resolution (one latent position
covers vae_scale_factor^2 pixels).
"""
from __future__ import annotations

import torch

from ..models.pipelines import is_latent_pipeline
from ..ops.hutchinson import hutchinson_probes
from ._core import check_int
from ._geometry import check_scores, check_step, eps_pair_jvp, over_rows, points_at, setup

__all__ = ["curvature_difference_map", "score_difference_map", "map_localization", "map_overlay"]


def _upsample(maps: torch.Tensor, tp, upsample: bool) -> torch.Tensor:
    """[R, h, w] -> [R, H, W] at image resolution for latent pipelines (bilinear)."""
    if not upsample or not is_latent_pipeline(tp.pipe):
        return maps
    blocks = getattr(getattr(tp.pipe.vae, "config", None), "block_out_channels", None)
    f = 2 ** (len(blocks) - 1) if blocks else 8
    if f == 1:
        return maps
    up = torch.nn.functional.interpolate(maps[:, None].to(torch.float64), scale_factor=f, mode="bilinear",
                                         align_corners=False)
    return up[:, 0]


def curvature_difference_map(pipe, prompts, *, num_images: int = 1, step: int = -1, n_probes: int = 16,
                             num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                             upsample: bool = True, batch_size: int | None = None) -> torch.Tensor:
    """Coordinate-wise curvature difference between the conditional and the
    unconditional model (Kim and Lee, ICML 2026, Eq. "Delta h_empty"):

        Delta h(p) = relu( sum_k [diag J_Delta(x_i)]_{k, p} ),
        J_Delta = d (eps_c - eps_u) / d x = -sigma_i (H_c - H_u),
        diag J_Delta ~= (1 / P) sum_{q < P} v_q * (J_Delta v_q),  v_q Rademacher,

    at x_i, step ``step`` of the CFG DDIM trajectory from x_T^n ~ N(0, I): where
    the conditional log-density curves more sharply than the unconditional
    one (memorized content), diag H_Delta < 0 and the map is positive. Like the
    authors, the map is in eps units (sigma_i times the curvature), which keeps
    its scale at low noise. High values mark memorized pixels.

    Cost per (prompt, image): ``n_probes`` two-branch Jacobian-vector products.

    Args:
        pipe: a StableDiffusionPipeline-like pipeline (see :func:`mmh_fast.text.cfg_norm`).
        prompts: a string or a list of N strings.
        num_images: trajectories per prompt (image n from the latent keyed by (seed, n)).
        step: DDIM step index of the point (-1: the last, the paper's setting).
        n_probes: Rademacher probes P (paper: 16), keyed by (seed, image n, probe).
        num_inference_steps, guidance_scale: the CFG DDIM trajectory (50, 7.5).
        seed: latents and probes do not depend on the batch or on the other prompts.
        upsample: latent pipelines: maps at image resolution (bilinear); False:
            at latent resolution.
        batch_size: (prompt, image) rows per call (default: all).

    Returns:
        float64 [N, num_images, H, W] on the CPU (>= 0).
    """
    n_probes = check_int(n_probes, "n_probes", 1)

    def diagonal(S, rows, step, x, cond):
        diag = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for q in range(n_probes):
            v = hutchinson_probes(tuple(x.shape), 1, seed=S.seed, sample_ids=rows.image, probe_begin=q,
                                  dtype=x.dtype, device=x.device)[0]
            _, (j_u, j_c) = eps_pair_jvp(S.tp, S.grid, step, x, v, cond, S.uncond)
            diag += (v * (j_c - j_u)).to(torch.float64)
        return (diag.sum(1) / n_probes).clamp_min(0)

    return _maps(pipe, prompts, diagonal, "curvature_difference_map", num_images=num_images, step=step,
                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                 upsample=upsample, batch_size=batch_size)


@torch.no_grad()
def score_difference_map(pipe, prompts, *, num_images: int = 1, step: int = -1, num_inference_steps: int = 50,
                         guidance_scale: float = 7.5, seed: int = 0, upsample: bool = True,
                         batch_size: int | None = None) -> torch.Tensor:
    """The score-difference surrogate of the memorization map (Kim and Lee,
    ICML 2026, "Delta s_empty"):

        Delta s(p) = sum_k (s_c(x_i) - s_u(x_i))_{k, p}^2 = sum_k (eps_c - eps_u)_{k, p}^2 / sigma_i^2

    at step ``step`` of the CFG DDIM trajectory (as :func:`curvature_difference_map`).
    One two-branch UNet call per (prompt, image); high values mark memorized pixels.

    Returns:
        float64 [N, num_images, H, W] on the CPU, in score^2 units (>= 0).
    """
    def squared_difference(S, rows, step, x, cond):
        e_u, e_c = S.tp.pair(x, S.grid, step, cond, S.uncond)
        return ((e_c - e_u).to(torch.float64) ** 2).sum(1) / S.grid.sigma[step] ** 2

    return _maps(pipe, prompts, squared_difference, "score_difference_map", num_images=num_images, step=step,
                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed,
                 upsample=upsample, batch_size=batch_size)


def _maps(pipe, prompts, point_map, name: str, *, num_images, step, num_inference_steps, guidance_scale, seed,
          upsample, batch_size) -> torch.Tensor:
    """[N, num_images, H, W]: ``point_map(S, rows, step, x_step, cond)`` [rows, h, w] at
    step ``step`` of each row's CFG DDIM trajectory, checked finite, upsampled."""
    if not isinstance(upsample, bool):  # checked before the UNet runs
        raise TypeError(f"upsample must be True or False, got {upsample!r}")
    S = setup(pipe, prompts, num_images=num_images, num_inference_steps=num_inference_steps, seed=seed,
              guidance_scale=guidance_scale)
    step = check_step(step, len(S.grid))

    def chunk(rows):
        cond = S.cond.index_select(0, rows.prompt.to(S.cond.device))
        (_, x), = points_at(S.tp, S.grid, rows, S.seed, cond, S.uncond, S.guidance_scale, [step])
        return point_map(S, rows, step, x, cond).cpu()

    maps = over_rows(S.tp, len(S.prompts), S.num_images, batch_size, chunk, what=name, backward=True)
    maps = check_scores(maps.reshape(len(S.prompts), -1), name, S.prompts).reshape(maps.shape)
    maps = _upsample(maps, S.tp, upsample)
    return maps.reshape(len(S.prompts), S.num_images, *maps.shape[1:])


def map_localization(maps: torch.Tensor, masks: torch.Tensor) -> dict:
    """How well maps localise known memorized regions.

    - ``auc``: ROC AUC of the map's values as a pixel classifier of the mask
      (ties counted one half; threshold-free);
    - ``iou``: IoU between the mask and the map's top-|mask| pixels (the
      threshold that marks as many pixels as the mask holds, so no threshold is tuned).

    Args:
        maps: [..., H, W] real.
        masks: bool (or 0/1) tensor broadcastable to ``maps`` ([H, W] or [..., H, W]).

    Returns:
        {"auc": float64 [...], "iou": float64 [...]}, one value per map (NaN-free:
        masks that are empty or full raise ValueError).
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() < 2 or not maps.is_floating_point():
        raise TypeError("maps must be a floating-point tensor [..., H, W]")
    if not isinstance(masks, torch.Tensor) or masks.dim() < 2:
        raise TypeError("masks must be a tensor [..., H, W] of 0 / 1 or bool")
    try:
        m = torch.broadcast_to(masks.to(torch.bool), maps.shape)
    except RuntimeError:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not broadcast to maps {tuple(maps.shape)}") from None
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or inf")
    lead = maps.shape[:-2]
    v = maps.reshape(-1, maps.shape[-2] * maps.shape[-1]).to(torch.float64)
    m = m.reshape(v.shape)
    pos = m.sum(1)
    if bool((pos == 0).any()) or bool((pos == m.shape[1]).any()):
        raise ValueError("every mask must hold some but not all pixels (AUC and IoU are undefined otherwise)")
    auc = torch.empty(v.shape[0], dtype=torch.float64)
    iou = torch.empty(v.shape[0], dtype=torch.float64)
    for b in range(v.shape[0]):
        vb, mb = v[b], m[b]
        # Mann-Whitney: P(value at a mask pixel > value outside) + 1/2 P(tie), via mid-ranks
        order = vb.argsort()
        ranks = torch.empty_like(vb)
        ranks[order] = torch.arange(1, len(vb) + 1, dtype=torch.float64)
        uniq, inv = torch.unique(vb, return_inverse=True)
        mid = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks) / \
            torch.bincount(inv, minlength=len(uniq)).to(torch.float64)
        r = mid[inv]
        n1, n0 = float(mb.sum()), float((~mb).sum())
        auc[b] = (float(r[mb].sum()) - n1 * (n1 + 1) / 2) / (n1 * n0)
        top = torch.zeros_like(mb)
        top[vb.argsort(descending=True, stable=True)[:int(n1)]] = True
        iou[b] = float((top & mb).sum()) / float((top | mb).sum())
    return {"auc": auc.reshape(lead), "iou": iou.reshape(lead)}


def map_overlay(images: torch.Tensor, maps: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """Memorization maps drawn over their images, for reports: each map is
    scaled to [0, 1] by its own maximum (m / max m; an all-zero map draws
    nothing) and blended into the red channel,

        out = (1 - alpha m) * image + alpha m * red,   red = (1, -1, -1),

    so unmarked pixels keep the image and the most memorized ones turn red.

    Args:
        images: [B, 3, H, W] in [-1, 1] (e.g. :func:`mmh_fast.text.generate` output).
        maps: [B, H, W] or [B, 1, H, W] non-negative (the maps' image resolution).
        alpha: opacity at the map's maximum, in [0, 1].

    Returns:
        float32 [B, 3, H, W] in [-1, 1].
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor [B, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be a tensor [B, H, W], got {type(maps).__name__}")
    m = maps[:, 0] if maps.dim() == 4 and maps.shape[1] == 1 else maps
    if m.shape != (images.shape[0],) + tuple(images.shape[2:]):
        raise ValueError(f"maps of shape {tuple(maps.shape)} do not match images {tuple(images.shape)} "
                         "(pass maps at image resolution, upsample=True)")
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError("maps must be finite and non-negative")
    a = float(alpha)
    if not 0 <= a <= 1:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    m = m.to(torch.float64)
    top = m.reshape(m.shape[0], -1).amax(1)
    w = (a * m / torch.where(top > 0, top, torch.ones_like(top))[:, None, None])[:, None]
    red = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)[None, :, None, None]
    return ((1 - w) * images.to(torch.float64) + w * red).clamp(-1, 1).float()
