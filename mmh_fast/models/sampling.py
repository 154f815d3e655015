"""A generic DDIM sampler for any network + schedule (optionally with CFG).

The update (Song et al. 2021, in the psi/sigma form of Eq. 5) from time t to
t' < t, with x0 = (x_t - sigma eps) / psi:

    x_t' = psi' x0 + sqrt(sigma'^2 - c^2) eps + c z,
    c^2  = eta^2 sigma'^2 (sigma^2 - (psi / psi')^2 sigma'^2) / sigma^2,

so eta = 0 is the deterministic DDIM and eta = 1 the DDPM posterior; the last
step returns x0 predicted at the smallest time. Noise is keyed by (seed,
sample id, step) through the native counter-based generator (Gaussian probes
of :func:`mmh_fast.ops.hutchinson_probes`): a sample is the same whatever batch
it is drawn in, which is what diffusers gets from one torch.Generator per sample.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ops.hutchinson import hutchinson_probes
from .denoiser import model_device
from .pipelines import decode_latents, resolve_model

__all__ = ["ddim_sample", "sample_noise"]

#: stream offset so the sampler's noise never coincides with FLIPD probes of the same seed
_NOISE_STREAM = 0x5A3D_1E00


def sample_noise(shape, *, seed: int = 0, sample_ids=None, index: int = 0, dtype=torch.float32,
                 device="cpu") -> torch.Tensor:
    """Standard normal noise [B, *shape[1:]] keyed by (seed, sample id, index):
    row b depends only on (seed, sample_ids[b], index), never on the batch."""
    z = hutchinson_probes(tuple(shape), 1, probe="gaussian", seed=int(seed), sample_ids=sample_ids,
                          probe_begin=_NOISE_STREAM + int(index), dtype=torch.float64, device=device)
    return z[0].to(dtype)


def _sample_shape(net, sample_shape):
    if sample_shape is not None:
        return tuple(int(s) for s in sample_shape)
    cfg = getattr(net, "config", None)
    if cfg is not None:
        get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
        c, s = get("in_channels", None), get("sample_size", None)
        if c is not None and s is not None:
            s = (s, s) if isinstance(s, int) else tuple(s)
            return (int(c),) + s
    shape = getattr(net, "sample_shape", None)
    if shape is not None:
        return tuple(shape)
    raise ValueError("sample_shape is needed: the model does not say what shape its samples have")


def ddim_sample(model, n: int, *, sample_shape=None, scheduler=None, num_steps: int = 50, eta: float = 0.0,
                cond=None, uncond=None, guidance_scale: float | None = None, seed: int = 0, sample_ids=None,
                t_max: float = 1.0, t_min: float = 1e-3, clip_x0: float | None = None, batch_size: int | None = None,
                prediction_type: str | None = None, decode: bool = False, dtype=torch.float32,
                callback: Callable | None = None) -> torch.Tensor:
    """Draw n samples by DDIM.

    Args:
        model: network with the diffusers signature or a diffusers pipeline (its
            scheduler and, for Stable Diffusion, text conditioning are used).
        n: number of samples.
        sample_shape: shape of one sample in the network's space (default: from the
            network's config ``in_channels`` / ``sample_size`` or its ``sample_shape``).
        scheduler: diffusers scheduler or Schedule (default: the pipeline's, or DDPM defaults).
        num_steps: network evaluations; times uniform in [t_min, t_max].
        eta: 0 deterministic DDIM, 1 DDPM-like ancestral noise.
        cond, uncond, guidance_scale: as :func:`mmh_fast.flipd` (captions for pipelines);
            with guidance_scale the CFG eps_u + lambda (eps_c - eps_u) drives the sampler.
        seed, sample_ids: key the noise of each sample (default ids 0..n-1).
        clip_x0: clamp the predicted x0 to [-clip_x0, clip_x0] (DDPM pixel models use 1).
        batch_size: samples per network call (default all).
        decode: for latent pipelines, return VAE-decoded images in [-1, 1].
        dtype: working dtype (float32 or float64).
        callback: called as ``callback(step, t, x_t, eps, rows)`` after each network
            evaluation (rows: indices of the chunk's samples).

    Returns:
        [n, *sample_shape] samples (images [n, 3, H, W] with ``decode``), on the model's device.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (0.0 < t_min < t_max <= 1.0):
        raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    res = resolve_model(model, scheduler=scheduler, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                        prediction_type=prediction_type, n=n)
    den = res.denoiser
    shape = _sample_shape(den.model, sample_shape)
    dev = model_device(den.model)
    ids = torch.arange(n, dtype=torch.int64) if sample_ids is None else \
        torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
    if ids.numel() != n:
        raise ValueError(f"sample_ids has {ids.numel()} entries, n is {n}")
    times = torch.linspace(t_max, t_min, num_steps, dtype=torch.float64).tolist()
    bs = n if batch_size is None else max(1, int(batch_size))
    out = []
    for s0 in range(0, n, bs):
        rows = torch.arange(s0, min(n, s0 + bs))
        rid = ids[rows].to(dev)
        c, u = res.kwargs_for(rows.to(dev), n)
        psi0, sig0 = (float(v) for v in den.schedule.psi_sigma(times[0]))
        x = (psi0 ** 2 + sig0 ** 2) ** 0.5 * sample_noise((len(rows),) + shape, seed=seed, sample_ids=rid,
                                                          index=0, dtype=dtype, device=dev)
        with torch.no_grad():
            for i, t in enumerate(times):
                psi, sigma, ts = den.coefficients(t, dev)
                eps = den.eps_at(x, psi, sigma, ts, cond=c, uncond=u, guidance_scale=res.guidance_scale).to(dtype)
                if callback is not None:
                    callback(i, t, x, eps, rows)
                x0 = (x - sigma * eps) / psi
                if clip_x0 is not None:
                    x0 = x0.clamp(-clip_x0, clip_x0)
                    eps = (x - psi * x0) / sigma
                if i == num_steps - 1:
                    x = x0
                    break
                psi_n, sig_n = (float(v) for v in den.schedule.psi_sigma(times[i + 1]))
                c2 = 0.0
                if eta > 0:
                    c2 = eta ** 2 * sig_n ** 2 * max(sigma ** 2 - (psi / psi_n) ** 2 * sig_n ** 2, 0.0) / sigma ** 2
                x = psi_n * x0 + max(sig_n ** 2 - c2, 0.0) ** 0.5 * eps
                if c2 > 0:
                    x = x + c2 ** 0.5 * sample_noise(x.shape, seed=seed, sample_ids=rid, index=i + 1, dtype=dtype,
                                                     device=dev)
        out.append(x)
    x = torch.cat(out)
    if decode and res.pipeline is not None:
        x = decode_latents(res.pipeline, x)
    return x
