"""The RePaint-style inpainting loop (Lugmayr et al. 2022) over mmh_fast's
:class:`Schedule` / :class:`Denoiser`: noise levels, the resampling path,
batch-invariant noise, and the loop itself (pixel and paste modes)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .._hashing import sample_seed
from ..models.batching import check_finite, run_chunked
from ..models.denoiser import Denoiser, model_device
from ..models.schedules import DiscreteSchedule, Schedule


def _time_levels(schedule: Schedule, n: int) -> list[float]:
    """Continuous times of the n noise levels, ascending (level 0 = least noisy).

    Discrete schedules use diffusers' "leading" spacing tau_i = i * (T // n)
    (DDPMScheduler.set_timesteps), other schedules t_i = (i + 1) / n."""
    if isinstance(schedule, DiscreteSchedule):
        T = schedule.num_train_timesteps
        if n > T:
            raise ValueError(f"num_inference_steps={n} exceeds the schedule's {T} training steps")
        step = T // n
        return [i * step / T for i in range(n)]
    return [(i + 1) / n for i in range(n)]


def _level_path(n_levels: int, jump_length: int, resample: int) -> list[int]:
    """Sequence of noise levels the RePaint loop visits, from the top level
    n_levels - 1 down to 0. With ``resample`` r > 1, at every level that is a
    multiple of ``jump_length`` j the loop goes back up j levels (one forward
    noising jump) and down again, r - 1 times, so each j-segment is traversed
    r times (RePaint's resampling schedule)."""
    top = n_levels - 1
    left = {lvl: resample - 1 for lvl in range(0, top - jump_length + 1, jump_length)} if resample > 1 else {}
    path, lvl = [top], top
    while lvl > 0:
        lvl -= 1
        path.append(lvl)
        if left.get(lvl, 0) > 0:
            left[lvl] -= 1
            lvl += jump_length
            path.append(lvl)
    return path


class _Noise:
    """Batch-invariant Gaussian noise: draw j of image i is the counter-based
    (Philox) normal of mmh_fast.ops.hutchinson_probes keyed by (seed, stream),
    sample id i and counter j, so an image's noise depends on (seed, i) only,
    never on the batch it is evaluated in, and is generated on the device."""

    def __init__(self, seed: int, rows: Sequence[int], stream: str):
        self.key = sample_seed(seed, 0, stream)
        self.ids = torch.as_tensor(list(rows), dtype=torch.int64)
        self.counter = 0

    def __call__(self, shape, device, dtype) -> torch.Tensor:
        from ..ops import hutchinson_probes

        z = hutchinson_probes((len(self.ids), *shape), 1, probe="gaussian", seed=self.key, sample_ids=self.ids,
                              probe_begin=self.counter, dtype=dtype, device=device)[0]
        self.counter += 1
        return z


def _repaint(den: Denoiser, known: torch.Tensor | None, keep: torch.Tensor | None, times: list[float],
             path: list[int], noise: _Noise, model_kwargs: Callable[[int], dict], guidance_scale,
             paste: Callable | None = None, shape=None):
    """RePaint-style inpainting (Lugmayr et al. 2022) in the continuous-time view.

    Pixel mode (``paste`` None): ``known`` [B, ...] clean known pixels (values
    outside ``keep`` ignored), ``keep`` [...] bool (True = known). Each reverse
    step t -> s (s < t) samples the unknown part from the Gaussian posterior
    q(x_s | x_t, x0_hat), with a = psi_t / psi_s, v = sigma_t^2 - a^2 sigma_s^2:
        mean = a sigma_s^2 / sigma_t^2 x_t + psi_s v / sigma_t^2 x0_hat,
        var  = v sigma_s^2 / sigma_t^2,
    and the known part from the forward kernel psi_s x_known + sigma_s z
    (re-noised to the new level and pasted). Forward jumps t -> t' > t
    (resampling) draw q(x_t' | x_t) = N(a x_t, (sigma_t'^2 - a^2 sigma_t^2) I),
    a = psi_t' / psi_t. Returns x0_hat at the lowest level with the known
    pixels pasted.

    Paste mode (latent inpainting): ``paste(x0_hat) -> x0`` puts the known
    content into every x0 prediction (decode, paste pixels, re-encode), and
    the posterior step then re-noises it to the next level; ``shape`` gives
    the per-sample latent shape. Returns the raw x0_hat of the last level.
    """
    dev, dt = model_device(den.model), torch.float32
    if paste is None:
        known = known.to(device=dev, dtype=dt)
        keepf = keep.to(device=dev, dtype=dt)
        shape = known.shape[1:]
    coeff = [den.coefficients(t, dev) for t in times]
    top = path[0]
    psi, sigma, _ = coeff[top]
    x = sigma * noise(shape, dev, dt)
    if paste is None:
        x = keepf * (psi * known + sigma * noise(shape, dev, dt)) + (1 - keepf) * x

    def x0_of(x, lvl):
        psi, sigma, ts = coeff[lvl]
        eps = den.eps_at(x, psi, sigma, ts, guidance_scale=guidance_scale, **model_kwargs(lvl))
        return (x - sigma * eps.to(dt)) / psi

    for cur, nxt in zip(path[:-1], path[1:]):
        psi_t, sig_t, _ = coeff[cur]
        psi_s, sig_s, _ = coeff[nxt]
        if nxt < cur:
            x0 = x0_of(x, cur)
            if paste is not None:
                x0 = paste(x0)
            a = psi_t / psi_s
            v = max(sig_t**2 - a * a * sig_s**2, 0.0)
            mean = (a * sig_s**2 / sig_t**2) * x + (psi_s * v / sig_t**2) * x0
            x_new = mean + math.sqrt(v * sig_s**2 / sig_t**2) * noise(shape, dev, dt)
            if paste is None:
                x_known = psi_s * known + sig_s * noise(shape, dev, dt)
                x_new = keepf * x_known + (1 - keepf) * x_new
            x = x_new
        else:
            a = psi_s / psi_t
            x = a * x + math.sqrt(max(sig_s**2 - a * a * sig_t**2, 0.0)) * noise(shape, dev, dt)
    x0 = x0_of(x, path[-1])
    if paste is None:
        x0 = keepf * known + (1 - keepf) * x0
    return x0


def _run_chunks(fn: Callable[[int, int], torch.Tensor], n: int, *, batch_size: int, progress: bool,
                what: str = "SolidMark inpainting") -> torch.Tensor:
    """Inpaint images [0, n) in chunks: ``fn(start, stop)`` returns the
    inpainted canvases [stop - start, ...] of those images. A chunk that runs
    out of memory is halved and retried
    (:func:`mmh_fast.models.batching.run_chunked`); the noise is keyed by
    image index (:class:`_Noise`), so the result does not depend on the
    chunking. A non-finite canvas raises
    :class:`~mmh_fast.models.batching.NonFiniteOutputError` naming the images.
    Returns all canvases [n, ...] on the CPU."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="SolidMark")

    def one(start, stop):
        out = fn(start, stop)
        check_finite(out, what=f"the {what} output (inpainted canvas)", offset=start)
        if bar is not None:
            bar.update(stop - start)
        return out.detach().cpu()

    try:
        return torch.cat(run_chunked(one, n, batch_size=batch_size, what=what))
    finally:
        if bar is not None:
            bar.close()
