"""Plumbing shared by the score-geometry detectors (sharpness, anisotropy,
memorization maps): (prompt, image) rows, the points of the CFG DDIM
trajectory they are evaluated at, Jacobian-vector products of both eps
branches, and the finite-score check."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..lid.flipd import _jvp
from ..models.batching import NonFiniteOutputError, run_chunked
from ._core import TextPipeline, as_prompts, check_guidance, check_int, text_pipeline

__all__ = ["Setup", "setup", "check_step", "Rows", "over_rows", "points_at", "jvp_of", "eps_pair_jvp", "check_scores"]


@dataclass
class Setup:
    """Checked common arguments of a detector: the wrapped pipeline, the prompts,
    images per prompt, CFG scale, seed, DDIM grid, prompt embeddings [N, L, D]
    and the empty-prompt embedding [1, L, D]."""

    tp: TextPipeline
    prompts: list
    num_images: int
    guidance_scale: float
    seed: int
    grid: object
    cond: torch.Tensor
    uncond: torch.Tensor


def setup(pipe, prompts, *, num_images, num_inference_steps, seed, guidance_scale=7.5) -> Setup:
    tp = text_pipeline(pipe)
    prompts = as_prompts(prompts)
    num_images = check_int(num_images, "num_images", 1)
    lam = check_guidance(guidance_scale)
    seed = check_int(seed, "seed", 0)
    grid = tp.grid(num_inference_steps)
    emb = tp.embed(prompts + [""])
    return Setup(tp, prompts, num_images, lam, seed, grid, emb[:-1], emb[-1:])


def check_step(step, n: int, name: str = "step") -> int:
    """An index of the n-step DDIM grid (negative from the end) as 0 <= i < n."""
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"{name} must be an integer index of the DDIM grid, got {step!r}")
    if not -n <= step < n:
        raise ValueError(f"{name} must index the {n}-step DDIM grid (-{n} <= {name} < {n}), got {step}")
    return step % n


class Rows:
    """Rows r of a (prompt, image) table in prompt-major order: prompt r // M, image r % M."""

    def __init__(self, r: torch.Tensor, num_images: int):
        self.r = r
        self.image = r % num_images
        self.prompt = r // num_images

    def __len__(self) -> int:
        return len(self.r)


def over_rows(tp: TextPipeline, n_prompts: int, num_images: int, batch_size, fn: Callable[[Rows], torch.Tensor],
              *, what: str, backward: bool = False):
    """``torch.cat`` of ``fn(rows)`` [len(rows), ...] (a tuple of such tensors: a tuple
    of their concatenations) over consecutive (prompt, image)
    row chunks of ``batch_size`` rows; by default the UNet's two-branch chunk size
    from the model and latent size (:meth:`TextPipeline.batch_size`, ``backward`` for
    forward-mode AD or an optimisation graph), never the whole user batch at once.
    On out-of-memory the chunk is halved and run again
    (:func:`mmh_fast.models.batching.run_chunked`, one warning naming ``what``), so
    ``fn`` must not keep state from a failed call; latents are keyed per row, so
    results do not depend on the chunking."""
    rows = n_prompts * num_images
    bs = (tp.batch_size(passes=2, backward=backward) if batch_size is None
          else check_int(batch_size, "batch_size", 1))
    parts = run_chunked(lambda a, b: fn(Rows(torch.arange(a, b), num_images)), rows, batch_size=bs, what=what)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def points_at(tp: TextPipeline, grid, rows: Rows, seed: int, cond: torch.Tensor, uncond: torch.Tensor,
              guidance_scale: float, steps: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """(i, x_i) for the sorted step indices ``steps`` along the CFG DDIM
    trajectories of ``rows`` (x_T keyed by (seed, image)); stops after the last."""
    x = tp.initial_latents(rows.image.tolist(), seed)
    want = sorted(set(steps))
    for i in range(want[-1] + 1):
        if i in want:
            yield i, x
        if i < want[-1]:
            with torch.no_grad():
                e_u, e_c = tp.pair(x, grid, i, cond, uncond)
            x = grid.step(i, x, e_u + guidance_scale * (e_c - e_u))


def jvp_of(tp: TextPipeline, f, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J_f(x) v by forward-mode AD through the pipeline's UNet (detached, x's dtype)."""
    _, jv = _jvp(tp.net, f, x.detach(), v.detach().to(x.dtype))
    return jv.detach().to(x.dtype)


def eps_pair_jvp(tp: TextPipeline, grid, i: int, x: torch.Tensor, v: torch.Tensor, cond: torch.Tensor,
                 uncond: torch.Tensor):
    """((eps_u, eps_c), (J_u v, J_c v)) at x [B, ...] and step i: both branches and
    their Jacobians d eps / d x applied to v, by forward-mode AD through one
    batched two-branch call."""
    def f(inp):
        return tp.pair(inp, grid, i, cond, uncond)

    (e_u, e_c), (j_u, j_c) = _jvp(tp.net, f, x.detach(), v.detach().to(x.dtype))
    return (e_u.detach(), e_c.detach()), (j_u.detach(), j_c.detach())


def check_scores(values: torch.Tensor, what: str, prompts: Sequence[str]) -> torch.Tensor:
    """The library's :class:`NonFiniteOutputError` (also a FloatingPointError)
    listing every prompt whose score is NaN or inf, the first one named."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        pos = torch.nonzero(bad.reshape(bad.shape[0], -1).any(1)).flatten().tolist()
        k = pos[0]
        raise NonFiniteOutputError(f"{what} (first: prompts[{k}] = {prompts[k]!r}; fp16 overflow, or NaN weights?)",
                                   pos)
    return values
