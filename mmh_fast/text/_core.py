"""Shared plumbing of mmh_fast.text: pipeline checks, prompt embeddings,
seeded initial latents and the CFG DDIM trajectory with per-step hooks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..models.batching import NonFiniteOutputError, check_finite, default_batch_size, run_chunked
from ..models.denoiser import Denoiser, model_device, model_dtype
from ..models.pipelines import encode_prompts, is_pipeline
from ..models.sampling import DDIMGrid, ddim_grid, ddim_trajectory, sample_noise
from ..models.schedules import DiscreteSchedule, make_schedule

__all__ = ["TextPipeline", "text_pipeline", "as_prompts", "check_guidance", "check_int", "check_float",
           "check_batch_size", "check_rows", "Chunks"]


def check_int(v, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer >= {lo}, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def check_float(v, name: str, *, positive: bool = False) -> float:
    """A finite number (> 0 with ``positive``) as float; TypeError / ValueError naming ``name``."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {v!r}")
    try:
        val = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(val) or (positive and not val > 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {v!r}")
    return val


def check_batch_size(v) -> int | None:
    """None (sized from the model) or an integer >= 1."""
    return None if v is None else check_int(v, "batch_size", 1)


def check_rows(t: torch.Tensor, what: str, positions) -> None:
    """Raise NonFiniteOutputError if a row of ``t`` (dim 0) is not finite,
    reporting ``positions[row]`` (the prompt or image the row belongs to in the
    caller's input); no cost beyond one reduction when all is finite."""
    try:
        check_finite(t, what=what)
    except NonFiniteOutputError as e:
        pos = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
        raise NonFiniteOutputError(what, sorted({int(pos[r]) for r in e.positions})) from None


class Chunks:
    """:func:`~mmh_fast.models.batching.run_chunked` over repeated calls (one per
    DDIM step) that remembers a size an out-of-memory error halved it to, so
    the next steps start from the size that fitted instead of failing again."""

    def __init__(self, size: int, what: str):
        self.size, self.what = int(size), what

    def __call__(self, fn: Callable[[int, int], object], n: int) -> list:
        ran = []

        def sized(a, b):
            out = fn(a, b)
            ran.append(b - a)
            return out

        out = run_chunked(sized, n, batch_size=self.size, what=self.what)
        if ran and max(ran) < min(self.size, n):  # halved: keep the size that ran
            self.size = max(ran)
        return out


def check_guidance(g) -> float:
    return check_float(g, "guidance_scale")


def as_prompts(prompts, name: str = "prompts") -> list[str]:
    """A string or a non-empty list/tuple of strings -> list of strings."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError(f"{name} is empty: give at least one prompt")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{name} must be strings, got {bad[0]}")
        return list(prompts)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(prompts).__name__}")


def _cfg(net, key):
    cfg = getattr(net, "config", None)
    if cfg is None:
        return None
    try:
        return cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
    except Exception:  # pragma: no cover
        return None


@dataclass
class TextPipeline:
    """A text-conditioned diffusers pipeline reduced to what mmh_fast.text uses.

    Attributes:
        pipe: the pipeline (tokenizer, text_encoder, unet, scheduler[, vae]).
        denoiser: eps of the UNet under the scheduler's discrete schedule.
        device, dtype: the UNet's.
    """

    pipe: object
    denoiser: Denoiser

    @property
    def net(self):
        return self.denoiser.model

    @property
    def device(self) -> torch.device:
        return model_device(self.net)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.net)

    @property
    def work_dtype(self) -> torch.dtype:
        """Latents and eps: float64 for a float64 UNet, else float32 (fp16/bf16
        UNets run in their dtype; their outputs are read in float32)."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def grid(self, num_inference_steps: int) -> DDIMGrid:
        check_int(num_inference_steps, "num_inference_steps", 1)
        return ddim_grid(self.pipe.scheduler, num_inference_steps)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the UNet's latents (config in_channels, sample_size)."""
        c, s = _cfg(self.net, "in_channels"), _cfg(self.net, "sample_size")
        if c is None or s is None:
            raise ValueError("the pipeline's UNet config gives no in_channels / sample_size to size latents")
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return int(c), int(h), int(w)

    def down_factor(self) -> int:
        """The factor latents' height and width must be multiples of."""
        blocks = _cfg(self.net, "block_out_channels")
        return 2 ** (len(blocks) - 1) if blocks else 1

    def batch_size(self, *, passes: int = 2, backward: bool = False, graphs: int = 1, latent_shape=None) -> int:
        """Default (prompt, image) rows per UNet call: :func:`default_batch_size`
        of the UNet on one latent (``latent_shape``, default the config's;
        ``passes`` = 2 for the two CFG branches of one row; ``backward`` when a
        graph is kept), divided by ``graphs``, the number of graphs of that size
        alive at once (2 for a Hutchinson VJP taken with create_graph beside the
        forward graph it differentiates)."""
        shape = self.latent_shape() if latent_shape is None else tuple(latent_shape)
        bs = default_batch_size(self.net, shape, passes=passes, backward=backward, device=self.device)
        return max(1, bs // max(1, int(graphs)))

    def embed(self, prompts: Sequence[str], *, batch_size: int | None = None) -> torch.Tensor:
        """Text-encoder output hidden states [N, L, D] in the UNet's dtype
        (over-long prompts truncated with a warning)."""
        return encode_prompts(self.pipe, list(prompts), batch_size=batch_size)

    def as_embeddings(self, prompt_or_embeds, name: str = "prompt_or_embeds") -> tuple[torch.Tensor, bool]:
        """(cond [N, L, D], single): prompts are encoded (no gradient); a tensor
        [L, D] or [N, L, D] is used as it is (gradients flow to it), cast to the
        UNet's dtype and device. ``single``: one prompt given as str / [L, D]."""
        if isinstance(prompt_or_embeds, torch.Tensor):
            e = prompt_or_embeds
            if not e.is_floating_point():
                raise TypeError(f"{name} as a tensor must hold floating-point hidden states, got {e.dtype}")
            single = e.dim() == 2
            e = e[None] if single else e
            if e.dim() != 3 or e.shape[0] == 0:
                raise ValueError(f"{name} must be text-encoder hidden states [L, D] or [N, L, D], "
                                 f"got shape {tuple(prompt_or_embeds.shape)}")
            D = _cfg(self.net, "cross_attention_dim")
            if isinstance(D, int) and e.shape[-1] != D:
                raise ValueError(f"{name} has hidden size {e.shape[-1]}, the UNet cross-attends to {D}")
            if not bool(torch.isfinite(e.detach()).all()):
                raise ValueError(f"{name} contains NaN or inf")
            return e.to(self.device, self.dtype), single
        prompts = as_prompts(prompt_or_embeds, name)
        return self.embed(prompts), isinstance(prompt_or_embeds, str)

    def uncond(self) -> torch.Tensor:
        """The empty-prompt embedding [1, L, D] (the unconditional branch of CFG)."""
        return self.embed([""])

    def initial_latents(self, image_ids: Sequence[int], seed: int) -> torch.Tensor:
        """x_T [len(image_ids), C, h, w] ~ N(0, I), row r keyed by (seed, image_ids[r])."""
        ids = torch.as_tensor(list(image_ids), dtype=torch.int64, device=self.device)
        return sample_noise((len(ids),) + self.latent_shape(), seed=seed, sample_ids=ids, dtype=self.work_dtype,
                            device=self.device)

    def pair(self, x: torch.Tensor, grid: DDIMGrid, i: int, cond: torch.Tensor, uncond: torch.Tensor):
        """(eps_u, eps_c) at step i from one batched two-branch UNet call."""
        return self.denoiser.eps_pair(x, grid.psi[i], grid.sigma[i], grid.timestep(i, x.device),
                                      cond={"encoder_hidden_states": cond},
                                      uncond={"encoder_hidden_states": uncond})

    def guided_pair(self, x: torch.Tensor, grid: DDIMGrid, i: int, cond: torch.Tensor, uncond: torch.Tensor,
                    guidance_scale: float, positions, *, unit: str = "prompt"):
        """(eps_u, eps_c, eps_u + lambda (eps_c - eps_u)) at step i, each checked
        finite: a NaN / inf row raises NonFiniteOutputError naming the output, the
        step and ``positions[row]`` (the caller's ``unit`` index of each row)."""
        e_u, e_c = self.pair(x, grid, i, cond, uncond)
        at = step_name(grid, i, unit)
        check_rows(e_u, f"the UNet's unconditional noise prediction {at}", positions)
        check_rows(e_c, f"the UNet's conditional noise prediction {at}", positions)
        eps = e_u + guidance_scale * (e_c - e_u)
        check_rows(eps, f"the guided noise prediction eps_u + lambda (eps_c - eps_u) {at}", positions)
        return e_u, e_c, eps

    def sample(self, x: torch.Tensor, grid: DDIMGrid, cond: torch.Tensor, uncond: torch.Tensor,
               guidance_scale: float, *, start: int = 0, stop: int | None = None,
               eps_fn: Callable | None = None, callback: Callable | None = None, positions=None) -> torch.Tensor:
        """CFG DDIM steps [start, stop) (eps_u + lambda (eps_c - eps_u); see
        :func:`mmh_fast.models.sampling.ddim_trajectory`); without ``eps_fn`` every
        step's outputs are checked finite (``positions``: the caller's prompt index
        of each row; default: the row itself)."""
        if eps_fn is None:
            pos, unit = (range(x.shape[0]), "batch row") if positions is None else (positions, "prompt")

            def eps_fn(i, xi):
                with torch.no_grad():
                    return self.guided_pair(xi, grid, i, cond, uncond, guidance_scale, pos, unit=unit)[2]
        return ddim_trajectory(self.denoiser, x, grid, start=start, stop=stop, eps_fn=eps_fn, callback=callback)


def step_name(grid: DDIMGrid, i: int, unit: str = "prompt") -> str:
    return f"at DDIM step {i} (t={grid.times[i]:.3g}; positions are {unit} indices)"


def text_pipeline(pipe, name: str = "pipe") -> TextPipeline:
    """Check that ``pipe`` is a text-conditioned diffusers pipeline with a
    discrete scheduler and wrap it; clear TypeErrors otherwise."""
    if not is_pipeline(pipe):
        raise TypeError(f"{name} must be a diffusers text-to-image pipeline (e.g. StableDiffusionPipeline), "
                        f"got {type(pipe).__name__}")
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise TypeError(f"{name} ({type(pipe).__name__}) has no text encoder / tokenizer: mmh_fast.text needs a "
                        "text-conditioned pipeline such as StableDiffusionPipeline")
    net = getattr(pipe, "unet", None)
    if net is None:
        raise TypeError(f"{name} ({type(pipe).__name__}) has no UNet")
    sched = make_schedule(pipe.scheduler)
    if not isinstance(sched, DiscreteSchedule):
        raise TypeError(f"{name}'s scheduler {type(pipe.scheduler).__name__} has no alphas_cumprod: DDIM sampling "
                        "needs a discrete (DDPM-family) scheduler")
    return TextPipeline(pipe, Denoiser(net, sched))
