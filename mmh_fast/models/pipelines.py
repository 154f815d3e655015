"""diffusers pipelines as inputs of the estimators.

A pipeline bundles a denoising network with its scheduler and, for latent
diffusion (Stable Diffusion), a VAE and a text encoder. The estimators work in
the network's own space, so a pipeline is reduced to:

- :func:`encode_images`: images in [-1, 1] [B, C, H, W] -> the network's space:
  the VAE posterior mean times ``scaling_factor`` (minus ``shift_factor`` where
  the VAE has one) for latent pipelines, the images themselves for pixel
  pipelines (DDPMPipeline, DDIMPipeline). This is where FLIPD is computed for
  Stable Diffusion (MMH paper, App. C.1).
- :func:`encode_prompts`: captions -> text-encoder hidden states [N, L, D]
  (the ``encoder_hidden_states`` the UNet cross-attends to); "" is the
  unconditional embedding of classifier-free guidance. Over-long captions are
  truncated to the tokenizer's ``model_max_length`` with a warning, as the
  pipeline does.
- :func:`decode_latents`: the inverse of :func:`encode_images` (VAE decoder).
- :func:`resolve_model`: model-or-pipeline -> :class:`ResolvedModel` (a
  :class:`~mmh_fast.models.denoiser.Denoiser`, the encoder, and the network
  keyword arguments of the conditional / unconditional branches), which every
  estimator that accepts "a UNet or a pipeline" starts from.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .batching import default_batch_size, run_chunked
from .denoiser import Denoiser, model_device, model_dtype
from .schedules import Schedule, make_schedule

__all__ = [
    "is_pipeline",
    "is_latent_pipeline",
    "encode_images",
    "decode_latents",
    "tokenize_prompts",
    "encode_prompts",
    "ResolvedModel",
    "resolve_model",
    "select_rows",
]


def is_pipeline(obj: Any) -> bool:
    """True for a diffusers pipeline (anything with a ``unet`` or ``transformer``
    network and a ``scheduler``)."""
    return (getattr(obj, "unet", None) is not None or getattr(obj, "transformer", None) is not None) and \
        getattr(obj, "scheduler", None) is not None


def is_latent_pipeline(pipe: Any) -> bool:
    """True when the pipeline's network works in a VAE latent space."""
    return getattr(pipe, "vae", None) is not None


def _network(pipe):
    net = getattr(pipe, "unet", None)
    return net if net is not None else pipe.transformer


def _chunks(n: int, size: int | None):
    size = n if not size else max(1, int(size))
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def encode_images(pipe, images: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Map images in [-1, 1] to the pipeline network's space.

    Args:
        pipe: a diffusers pipeline. With a VAE (Stable Diffusion): latents =
            (vae.encode(x).latent_dist.mean - shift_factor) * scaling_factor — the
            posterior mean, no sampling, so the map is deterministic. Without one
            (DDPM/DDIM pixel pipelines): the images unchanged.
        images: [B, C, H, W] float tensor in [-1, 1] (C = the VAE's / UNet's in_channels).
        batch_size: images per VAE call (default: the VAE's own estimate on one
            image, :func:`mmh_fast.models.batching.default_batch_size`; its
            activations are at image resolution). Halved on out-of-memory
            (:func:`~mmh_fast.models.batching.run_chunked`, one warning).

    Returns:
        float32 tensor [B, c, h, w] on the network's device (float64 input stays float64).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    out_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    net = _network(pipe)
    if not is_latent_pipeline(pipe):
        c = getattr(net.config, "in_channels", None)
        if c is not None and images.shape[1] != c:
            raise ValueError(f"images have {images.shape[1]} channels, the pipeline's network expects {c}")
        return images.to(model_device(net), out_dtype)
    vae = pipe.vae
    c = getattr(vae.config, "in_channels", None)
    if c is not None and images.shape[1] != c:
        raise ValueError(f"images have {images.shape[1]} channels, the pipeline's VAE expects {c}")
    factor = 2 ** (len(getattr(vae.config, "block_out_channels", (0,))) - 1)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image height and width must be multiples of {factor} (the VAE's downsampling "
                         f"factor), got {tuple(images.shape[-2:])}")
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    dev, dt = model_device(vae), model_dtype(vae)

    @torch.no_grad()
    def chunk(a, b):
        enc = vae.encode(images[a:b].to(dev, dt))
        dist = getattr(enc, "latent_dist", None)
        if dist is None:  # return_dict=False style tuple
            dist = enc[0]
        return ((dist.mean - shift) * scale).to(out_dtype)

    bs = _vae_batch(vae, tuple(images.shape[1:]), batch_size)
    return torch.cat(run_chunked(chunk, images.shape[0], batch_size=bs, what="encode_images (VAE encoder)")
                     ).to(model_device(net))


def _vae_batch(vae, image_shape: tuple, batch_size) -> int:
    """``batch_size`` checked, or the VAE's estimate for one image of ``image_shape`` (C, H, W)."""
    if batch_size is None:
        return default_batch_size(vae, image_shape, device=model_device(vae))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
    return batch_size


def decode_latents(pipe, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """Inverse of :func:`encode_images`: latents -> images in [-1, 1] (clamped),
    float32 [B, C, H, W]. Pixel pipelines return the input clamped.

    ``batch_size``: latents per VAE call (default: the VAE's estimate on one
    decoded image); halved on out-of-memory, as in :func:`encode_images`."""
    if not is_latent_pipeline(pipe):
        return latents.float().clamp(-1, 1)
    vae = pipe.vae
    scale = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    dev, dt = model_device(vae), model_dtype(vae)

    @torch.no_grad()
    def chunk(a, b):
        z = (latents[a:b].to(dev, torch.float32) / scale + shift).to(dt)
        return vae.decode(z).sample.float().clamp(-1, 1)

    f = 2 ** (len(getattr(vae.config, "block_out_channels", (0,))) - 1)
    c_img = getattr(vae.config, "out_channels", None) or 3
    bs = _vae_batch(vae, (c_img, latents.shape[-2] * f, latents.shape[-1] * f), batch_size)
    return torch.cat(run_chunked(chunk, latents.shape[0], batch_size=bs, what="decode_latents (VAE decoder)"))


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        if not prompts:
            raise ValueError("prompts must not be empty")
        return list(prompts)
    raise TypeError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")


def tokenize_prompts(pipe, prompts, *, warn: bool = True):
    """Token ids the way the pipeline feeds its text encoder.

    Pads to ``tokenizer.model_max_length`` and truncates longer captions (with a
    ``UserWarning`` naming how many were cut and what was dropped).

    Returns:
        (input_ids [N, L] int64, attention_mask [N, L] int64, truncated [N] bool).
    """
    prompts = _as_prompt_list(prompts)
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        raise TypeError(f"{type(pipe).__name__} has no tokenizer: text conditions need a text-conditioned "
                        "pipeline such as StableDiffusionPipeline")
    L = int(tok.model_max_length)
    enc = tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    full = tok(prompts, padding=False, truncation=False, verbose=False)["input_ids"]
    truncated = torch.tensor([len(ids) > L for ids in full], dtype=torch.bool)
    if warn and bool(truncated.any()):
        i = int(truncated.nonzero()[0])
        dropped = tok.decode(full[i][L - 1:-1])
        warnings.warn(f"{int(truncated.sum())} prompt(s) longer than the tokenizer's {L} tokens were truncated "
                      f"(e.g. prompt {i} lost: {dropped!r})", stacklevel=3)
    return enc["input_ids"], enc["attention_mask"], truncated


def encode_prompts(pipe, prompts, *, batch_size: int | None = None, dtype: torch.dtype | None = None,
                   device=None) -> torch.Tensor:
    """Text-encoder hidden states of captions, as the pipeline conditions its UNet.

    Each distinct caption is encoded once (scans repeat captions); "" gives the
    unconditional embedding used by classifier-free guidance and by the
    unconditional LID (MMH paper, Sec. 4.1).

    Args:
        pipe: a text-conditioned pipeline (``tokenizer`` + ``text_encoder``).
        prompts: a string or a list of N strings.
        batch_size: distinct captions per text-encoder call (default all).
        dtype: output dtype (default: the UNet's dtype).
        device: output device (default: the UNet's device).

    Returns:
        [N, L, D] tensor (L = tokenizer.model_max_length, D = the encoder's hidden size).
    """
    prompts = _as_prompt_list(prompts)
    uniq = list(dict.fromkeys(prompts))
    ids, mask, _ = tokenize_prompts(pipe, uniq)
    te = pipe.text_encoder
    dev = model_device(te)
    use_mask = bool(getattr(te.config, "use_attention_mask", False))
    outs = []
    with torch.no_grad():
        for sl in _chunks(len(uniq), batch_size):
            kw = {"attention_mask": mask[sl].to(dev)} if use_mask else {}
            out = te(ids[sl].to(dev), **kw)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state)
    emb = torch.cat(outs)
    net = _network(pipe)
    emb = emb.to(device if device is not None else model_device(net), dtype or model_dtype(net))
    where = {p: i for i, p in enumerate(uniq)}
    idx = torch.tensor([where[p] for p in prompts], device=emb.device)
    return emb.index_select(0, idx)


def select_rows(kwargs: dict | None, rows: torch.Tensor, n_total: int) -> dict:
    """Network keyword arguments for a subset of a batch.

    Tensors whose leading dimension is ``n_total`` are indexed with ``rows``;
    tensors with a leading dimension of 1 are broadcast to ``len(rows)``; other
    values pass unchanged (shared across the batch)."""
    if not kwargs:
        return {}
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_total and n_total != 1:
            out[k] = v.index_select(0, rows.to(v.device))
        elif isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1:
            out[k] = v.expand(len(rows), *v.shape[1:])
        else:
            out[k] = v
    return out


@dataclass
class ResolvedModel:
    """What an estimator needs from a model or pipeline.

    Attributes:
        denoiser: eps / score in the network's space.
        encode: images -> network space (identity for bare networks).
        cond: network kwargs of the conditional branch (tensors with 1 or N rows), or {}.
        uncond: network kwargs of the unconditional branch (CFG), or None.
        guidance_scale: CFG weight lambda (Eq. 2, 16, 26), or None.
        pipeline: the pipeline, when one was given.
        n_cond: rows of the conditions (1 = shared by all samples).
    """

    denoiser: Denoiser
    encode: Callable[[torch.Tensor], torch.Tensor]
    cond: dict = field(default_factory=dict)
    uncond: dict | None = None
    guidance_scale: float | None = None
    pipeline: Any = None
    n_cond: int = 1

    @property
    def schedule(self) -> Schedule:
        return self.denoiser.schedule

    @property
    def device(self) -> torch.device:
        return model_device(self.denoiser.model)

    def kwargs_for(self, rows: torch.Tensor, n_total: int) -> tuple[dict, dict | None]:
        """(cond, uncond) network kwargs for the given sample rows of a batch of n_total."""
        cond = select_rows(self.cond, rows, n_total)
        uncond = None if self.uncond is None else select_rows(self.uncond, rows, n_total)
        return cond, uncond


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn.forward if isinstance(fn, torch.nn.Module) else fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _net_kwargs(net, c, what: str) -> dict:
    """A user condition for a bare network -> network kwargs."""
    if c is None:
        return {}
    if isinstance(c, dict):
        return dict(c)
    if isinstance(c, torch.Tensor):
        for name in ("encoder_hidden_states", "class_labels"):
            if _accepts(net, name):
                return {name: c}
        raise TypeError(f"{what} is a tensor but the model takes neither encoder_hidden_states nor class_labels; "
                        "pass a dict of model keyword arguments")
    if isinstance(c, (str, list, tuple)):
        raise TypeError(f"{what} given as text needs a text-conditioned pipeline (StableDiffusionPipeline); "
                        "for a bare network pass a dict of model keyword arguments or an embedding tensor")
    raise TypeError(f"{what} must be a dict of model keyword arguments or a tensor, got {type(c).__name__}")


def _rows(kwargs: dict | None) -> int:
    n = 1
    for v in (kwargs or {}).values():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] != 1:
            if n != 1 and v.shape[0] != n:
                raise ValueError(f"condition tensors disagree on the batch size: {n} vs {v.shape[0]}")
            n = int(v.shape[0])
    return n


def resolve_model(model, *, scheduler=None, cond=None, uncond=None, guidance_scale: float | None = None,
                  prediction_type: str | None = None, n: int | None = None) -> ResolvedModel:
    """Reduce a network or a pipeline to a :class:`ResolvedModel`.

    Args:
        model: a diffusers UNet2DModel / UNet2DConditionModel, any callable
            ``model(x_t, timestep, **kwargs)`` returning a tensor / ``.sample`` /
            tuple, or a diffusers pipeline (DDPMPipeline, DDIMPipeline,
            StableDiffusionPipeline, ...).
        scheduler: diffusers scheduler or :class:`Schedule`; default: the
            pipeline's own, or DDPMScheduler() defaults (with a one-time warning)
            for a bare network.
        cond: for a pipeline, a caption or a list of N captions ("" = unconditional;
            default "" for text-conditioned pipelines); for a bare network, a dict of
            network kwargs or a tensor (``encoder_hidden_states`` or ``class_labels``,
            whichever the network takes), with 1 or N rows.
        uncond: the unconditional branch for CFG: for a pipeline default "",
            for a bare network required with ``guidance_scale``.
        guidance_scale: lambda of s_u + lambda (s_c - s_u) (Eq. 16, 26).
        prediction_type: overrides the scheduler's ``config.prediction_type``.
        n: the batch size the conditions must match (1 or n rows), checked when given.
    """
    if guidance_scale is not None:
        try:
            guidance_scale = float(guidance_scale)
        except (TypeError, ValueError):
            raise TypeError(f"guidance_scale must be a number, got {guidance_scale!r}") from None
    pipe = None
    if is_pipeline(model):
        pipe = model
        net = _network(pipe)
        sched = make_schedule(scheduler if scheduler is not None else pipe.scheduler)
        text = getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
        if text:
            if cond is None:
                cond = ""
            ckw = {"encoder_hidden_states": encode_prompts(pipe, cond)} if isinstance(cond, (str, list, tuple)) \
                else _net_kwargs(net, cond, "cond")
            ukw = None
            if guidance_scale is not None:
                u = "" if uncond is None else uncond
                ukw = {"encoder_hidden_states": encode_prompts(pipe, u)} if isinstance(u, (str, list, tuple)) \
                    else _net_kwargs(net, u, "uncond")
        else:
            ckw = _net_kwargs(net, cond, "cond")
            ukw = _net_kwargs(net, uncond, "uncond") if uncond is not None else None

        def encode(x, _pipe=pipe):
            return encode_images(_pipe, x)
    else:
        if isinstance(model, (str, bytes)) or not callable(model):
            raise TypeError("model must be a diffusers UNet / pipeline or a callable model(x_t, timestep, **kwargs), "
                            f"got {type(model).__name__}")
        net = model
        sched = make_schedule(scheduler)
        ckw = _net_kwargs(net, cond, "cond")
        ukw = _net_kwargs(net, uncond, "uncond") if uncond is not None else None
        if not ckw and type(net).__name__ == "UNet2DConditionModel":
            raise ValueError("a UNet2DConditionModel needs cond (its encoder_hidden_states, [1 or B, L, D]); "
                             "pass the pipeline instead to condition on text")

        def encode(x):
            return x
    if guidance_scale is not None:
        if not ckw:
            raise ValueError("guidance_scale needs cond (the conditional branch)")
        if ukw is None:
            raise ValueError("guidance_scale with a bare network needs uncond (the unconditional branch's "
                             "model kwargs, e.g. the empty-prompt embedding)")
    n_cond = max(_rows(ckw), _rows(ukw))
    if n is not None and n_cond not in (1, n):
        raise ValueError(f"cond/uncond have {n_cond} rows but x has {n} samples; give 1 or {n} rows")
    den = Denoiser(net, sched, prediction_type=prediction_type)
    return ResolvedModel(den, encode, ckw, ukw, guidance_scale, pipe, n_cond)
