"""The SolidMark evaluation: inpaint the keyed border of training images
and score the keys (pixel models here, latent pipelines in :mod:`.latent`)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from ..models.batching import default_batch_size
from ..models.pipelines import is_latent_pipeline, is_pipeline, resolve_model
from .keys import SolidMark, _as_tensor, _check_keys
from .latent import _evaluate_latent
from .repaint import _level_path, _Noise, _repaint, _run_chunks, _time_levels
from .results import DEFAULT_DELTAS, SolidMarkResult, _result

#: RePaint resampling of :func:`evaluate` by default (see its docstring for the measurements)
DEFAULT_RESAMPLE = 5
DEFAULT_JUMP_LENGTH = 5


def evaluate(model, images, keys, *, solidmark: SolidMark | None = None, scheduler=None, prompts=None,
             num_inference_steps: int = 50, seed: int = 0, batch_size: int | None = None,
             augmented: bool = False, resample: int = DEFAULT_RESAMPLE, jump_length: int | None = None,
             guidance_scale: float | None = None, model_kwargs: dict | None = None,
             uncond_kwargs: dict | None = None, embedding_key: str = "encoder_hidden_states",
             embedding_transform: Callable | None = None, prompt_transform: Callable | None = None,
             negative_prompt: str = "", deltas: Sequence[float] = DEFAULT_DELTAS, return_images: bool = False,
             progress: bool = False) -> SolidMarkResult:
    """Inpaint the SolidMark border of training images and score the keys.

    For each image x with key k: build the augmented canvas (interior = x,
    border unknown), inpaint the border from the interior, and return
    l_SM = |k - mean(inpainted border)| in key units (SolidMark Sec. 4),
    with the (l_SM, delta)-eidetic counts at ``deltas`` beside the chance
    level of a constant guess (:func:`chance_rate`: exactly 2 delta).

    Models:
      * a pixel network with the diffusers signature ``model(x_t, timestep,
        **kwargs)`` (a ``UNet2DModel``, a closed-form model of
        :mod:`mmh_fast.testing`), or a pipeline with ``.unet`` and
        ``.scheduler`` (``DDPMPipeline``): RePaint-style inpainting over
        mmh_fast's :class:`Schedule` / :class:`Denoiser` (known interior
        re-noised to the current level and pasted every step; resampling
        jumps with ``resample`` r > 1 and ``jump_length``). The network's
        pixel range must be ``solidmark.value_range``.
      * a ``StableDiffusionPipeline``: latent inpainting with the caption as
        prompt: at every step the x0 prediction is decoded by the VAE, the
        known interior pasted in pixel space, re-encoded, and the ancestral
        step taken from that latent (the pasted interior re-noised to the next
        level). Pixels are mapped between ``value_range`` and the VAE's
        [-1, 1] on the way in and out. A latent pipeline without a text
        encoder is inpainted unconditionally (no prompts).

    Default resampling (resample=5, jump_length=5). SolidMark gives a lower
    bound on memorization, so the default should not undercount. Measured on
    the closed-form perfect memorizer (:class:`mmh_fast.testing.EmpiricalEps`
    of the keyed training set: sklearn digits 4x upsampled to 32 x 32, 1-pixel
    border, DDPMScheduler, 50 steps; recovery = fraction with l_SM <= 0.01,
    the same at 0.1 and 0.001; calls = network evaluations per image;
    seconds for 300 images on the 2-core CPU of the project, shared with
    other jobs, so only roughly comparable; two disjoint sets of 300 digits
    where two values are given)::

        resample  jump_length  calls  recovery        seconds
        1         -            50     0.833 / 0.847   5.9
        2         1            148    0.897           14.6
        2         5            104    0.900 / 0.880   10.8
        3         1            246    0.910           40.7
        3         3            178    0.910           26.6
        3         5            158    0.920 / 0.920   14.9
        5         5            266    0.953 / 0.957   48.6
        5         10           226    0.937           54.2
        10        5            536    0.960           109.6

    Without resampling 16% of the memorized keys are missed (the border is
    committed before it agrees with the interior, and the chain locks onto
    another training image); resample=5, jump_length=5 recovers all but 4.5%
    for 5.3x the calls, and doubling that (10, 5) gains 0.5 points more.
    Pass ``resample=1`` for the cheap, lower reading.

    Mitigations (Somepalli et al.'s GNI, RT, CWR, RNA) live in
    :mod:`mmh_fast.mitigations` as seeded transforms, so the text module and
    user pipeline calls reuse them; pass them as ``embedding_transform`` /
    ``prompt_transform``.

    Args:
        model: see above.
        images: training images [N, C, H, W] in ``solidmark.value_range``,
            without border (or with it when ``augmented=True``: the border is
            then cropped off; its values are never shown to the model).
        keys: [N] true keys in [0, 1].
        solidmark: the :class:`SolidMark` the model was trained with
            (thickness, value range; default ``SolidMark()``).
        scheduler: diffusers scheduler or :class:`Schedule` of the model
            (default: the pipeline's own, else DDPMScheduler() defaults).
        prompts: N captions (Stable Diffusion; required there).
        num_inference_steps: noise levels of the reverse chain.
        seed: the noise of image i depends on (seed, i) only (not on batching).
        resample, jump_length: RePaint resampling: every ``jump_length``
            levels the chain jumps back up ``jump_length`` levels and comes
            down again, so each segment is traversed ``resample`` times (1 =
            no resampling). Default resample=5, jump_length=min(5,
            num_inference_steps - 1) (none with one step): about 5.3x the
            network calls of no resampling, measured below.
        batch_size: images per chunk (all steps of a chunk run before the
            next); default from :func:`mmh_fast.models.batching.default_batch_size`
            for the network at the canvas size (and the VAE for latent
            pipelines), x2 under guidance. A chunk that runs out of memory is
            halved and retried; results do not depend on the chunking.
        guidance_scale: classifier-free guidance scale (None: the
            conditional branch only, no guidance).
        model_kwargs: extra per-image network arguments for pixel models, e.g.
            ``{"class_labels": labels}`` or ``{"encoder_hidden_states": emb}``
            (tensors with leading dimension N are sliced per batch).
        uncond_kwargs: the unconditional branch's arguments for guidance.
        embedding_key: the entry of ``model_kwargs`` that
            ``embedding_transform`` perturbs (pixel models).
        embedding_transform: ``f(embeds, sample_ids) -> embeds`` applied to the
            conditional embeddings, e.g. :class:`mmh_fast.mitigations.GaussianNoiseInjection` (GNI).
        prompt_transform: ``f(prompt, sample_id) -> prompt`` applied to the
            captions (RT / CWR / RNA of :mod:`mmh_fast.mitigations`).
        negative_prompt: the unconditional prompt for SD guidance.
        deltas: eidetic thresholds.
        return_images: keep the inpainted images in the result.

    Returns:
        :class:`SolidMarkResult` (l_sm [N], predicted_keys, keys, table).
    """
    sm = solidmark if solidmark is not None else SolidMark()
    if not isinstance(sm, SolidMark):
        raise TypeError(f"solidmark must be a SolidMark, got {type(sm).__name__}")
    x, _ = _as_tensor(images, "images")
    if augmented:
        x = sm.crop(x)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    k = _check_keys(keys)
    if k.ndim != 1 or k.shape[0] != x.shape[0]:
        raise ValueError(f"need one key per image: {x.shape[0]} images, keys of shape {k.shape}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    sm._check_values(x, "images")
    N = x.shape[0]
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    if jump_length is None:
        jump_length = min(DEFAULT_JUMP_LENGTH, num_inference_steps - 1)
        if jump_length < 1:  # one level: nothing to resample
            jump_length, resample = 1, 1
    for name, v in (("resample", resample), ("jump_length", jump_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if jump_length >= num_inference_steps and resample > 1:
        raise ValueError(f"jump_length={jump_length} must be smaller than num_inference_steps={num_inference_steps}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")

    if is_latent_pipeline(model) and is_pipeline(model):
        return _evaluate_latent(model, x, k, sm, scheduler=scheduler, prompts=prompts,
                                num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
                                resample=resample,
                                jump_length=jump_length, guidance_scale=guidance_scale,
                                embedding_transform=embedding_transform, prompt_transform=prompt_transform,
                                negative_prompt=negative_prompt, deltas=deltas, return_images=return_images,
                                progress=progress)
    if prompts is not None or prompt_transform is not None:
        raise ValueError("prompts / prompt_transform need a text-conditioned pipeline (StableDiffusionPipeline); "
                         "for a pixel network pass its conditioning in model_kwargs")
    if embedding_transform is not None and embedding_key not in (model_kwargs or {}):
        raise ValueError(f"embedding_transform perturbs model_kwargs[{embedding_key!r}], which is not given")
    if guidance_scale is not None and uncond_kwargs is None:
        raise ValueError("guidance_scale needs uncond_kwargs (the unconditional branch) for a pixel network")
    res = resolve_model(model, scheduler=scheduler, cond=model_kwargs, uncond=uncond_kwargs,
                        guidance_scale=guidance_scale, n=N)
    den, dev = res.denoiser, res.device
    times = _time_levels(res.schedule, num_inference_steps)
    path = _level_path(len(times), jump_length, resample)
    canvas_shape = (x.shape[1], x.shape[2] + 2 * sm.thickness, x.shape[3] + 2 * sm.thickness)
    keep = ~sm.border_mask(canvas_shape)

    if batch_size is None:
        batch_size = default_batch_size(den.model, canvas_shape, passes=1 if res.guidance_scale is None else 2,
                                        device=dev)
    keep_dev = keep.to(dev)

    def chunk(start, stop):
        ids = list(range(start, stop))
        known = sm.augment(x[start:stop], np.full(len(ids), 0.5)).to(dev)  # border never kept
        kw, ukw = res.kwargs_for(torch.tensor(ids), N)
        if embedding_transform is not None:
            kw[embedding_key] = embedding_transform(kw[embedding_key], ids)

        def mkw(_lvl):
            return {"cond": kw, "uncond": ukw}

        with torch.no_grad():
            return _repaint(den, known, keep_dev, times, path, _Noise(seed, ids, "solidmark"), mkw,
                            res.guidance_scale)

    canvas = _run_chunks(chunk, N, batch_size=batch_size, progress=progress)
    return _result(k, sm.border_values(canvas).numpy(), deltas, canvas if return_images else None)
