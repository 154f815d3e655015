"""A minimal denoiser trainer and a small MLP network (CPU-friendly).

Denoising score matching in the eps / x0 / v parametrisation: draw t ~ U(t_min, 1),
x_t = psi(t) x0 + sigma(t) e, and regress the network output on e (epsilon),
x0 (sample) or psi e - sigma x0 (v_prediction). Small enough to train the
paper's von Mises example or an 8 x 8 digits model on a CPU in minutes; the
network has the diffusers call signature, so every estimator accepts it.
:func:`small_unet` builds the diffusers ``UNet2DModel`` that ``mmh-fast train``
trains with the same loop and saves as a pipeline.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .schedules import EDMSchedule, make_schedule

__all__ = ["MLPDenoiser", "train_denoiser", "timestep_embedding", "small_unet"]


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (fractional) timesteps [B], as diffusers'
    UNets embed them (frequencies max_period^(-k / (dim/2)))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    a = timestep.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=1)
    return emb if dim % 2 == 0 else torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)


class _Out:
    __slots__ = ("sample",)

    def __init__(self, sample):
        self.sample = sample


class MLPDenoiser(nn.Module):
    """A residual MLP eps-network on flattened samples, diffusers signature
    ``forward(sample, timestep, return_dict=True)`` -> ``.sample`` shaped like ``sample``.

    Args:
        sample_shape: shape of one sample (e.g. (2,) or (1, 8, 8)).
        hidden: width; depth: residual blocks; time_dim: timestep embedding size.
        fourier: number of random Fourier features sin/cos(2 pi b.x), b ~ N(0, fourier_scale^2 I),
            appended to the input (0: none). They let a small MLP learn sharp, low-dimensional
            structure (point masses) in few steps; the frequencies are a fixed buffer seeded by ``seed``.
    Forward-mode AD works through it (plain Linear / SiLU / LayerNorm).
    """

    def __init__(self, sample_shape: Sequence[int], hidden: int = 128, depth: int = 3, time_dim: int = 32,
                 fourier: int = 0, fourier_scale: float = 1.0, seed: int = 0):
        super().__init__()
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.dim = int(math.prod(self.sample_shape))
        self.time_dim = int(time_dim)
        g = torch.Generator().manual_seed(int(seed))
        self.register_buffer("freqs", fourier_scale * torch.randn(self.dim, int(fourier), generator=g))
        self.inp = nn.Linear(self.dim + 2 * int(fourier), hidden)
        self.temb = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                                  nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, self.dim))

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True, **kwargs):
        B = sample.shape[0]
        if sample[0].numel() != self.dim:
            raise ValueError(f"sample has {sample[0].numel()} features per item, the network takes {self.dim}")
        ts = torch.as_tensor(timestep, device=sample.device)
        ts = ts.expand(B) if ts.dim() == 0 else ts.reshape(B)
        x = sample.reshape(B, self.dim)
        if self.freqs.shape[1]:
            a = 2 * math.pi * x @ self.freqs.to(x.dtype)
            x = torch.cat([x, torch.sin(a), torch.cos(a)], dim=1)
        h = self.inp(x) + self.temb(timestep_embedding(ts, self.time_dim).to(sample.dtype))
        for blk in self.blocks:
            h = h + blk(h)
        out = self.out(h).reshape(sample.shape)
        return _Out(out) if return_dict else (out,)


def train_denoiser(model: nn.Module, data: torch.Tensor, *, scheduler=None, steps: int = 2000,
                   batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0, t_min: float = 1e-3,
                   t_power: float = 1.0, prediction_type: str | None = None, seed: int = 0,
                   grad_clip: float | None = 1.0, lr_warmup: int = 0, cosine: bool = True,
                   callback: Callable | None = None, weights=None) -> list[float]:
    """Train ``model`` in place by denoising score matching on ``data``.

    Args:
        model: network with the diffusers signature (e.g. :class:`MLPDenoiser`, a UNet2DModel).
        data: [N, *sample_shape] training points (on the model's device or CPU).
        scheduler: diffusers scheduler or Schedule (default DDPM defaults, with a warning).
            EDM schedules are not supported here (their preconditioning is not an eps target).
        steps, batch_size, lr, weight_decay: AdamW settings; minibatches drawn with replacement.
        t_min, t_power: training times t = t_min + (1 - t_min) u^t_power, u ~ U(0, 1): uniform
            for t_power = 1, more weight on small times (where LID is read off) for t_power > 1.
        prediction_type: "epsilon" (default: the scheduler's), "sample" or "v_prediction".
        seed: seeds minibatches, times and noise (a torch.Generator; the global RNG is untouched).
        grad_clip: max gradient norm (None: no clipping).
        lr_warmup, cosine: linear warm-up steps, then cosine decay to 0 when ``cosine``.
        callback: called as ``callback(step, loss)``.
        weights: [N] non-negative sampling weights of the training points (None:
            uniform). Minibatch rows are drawn with probability weights / sum: a
            point of weight w is seen as often as w copies of it would be, without
            the copies being part of ``data`` (oversampling, as a curated
            training stream repeats some images).

    Returns:
        the loss of every step (list of floats). The model is left in eval mode.
    """
    schedule = make_schedule(scheduler)
    if isinstance(schedule, EDMSchedule):
        raise ValueError("train_denoiser does not support EDM schedules")
    pred = prediction_type or schedule.prediction_type
    if pred not in ("epsilon", "sample", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {pred!r}")
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError("data must be a tensor [N, ...] with N >= 1")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("data contains NaN or inf")
    if not t_power > 0:
        raise ValueError(f"t_power must be > 0, got {t_power}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape[0] != data.shape[0]:
            raise ValueError(f"weights must have one value per training point ({data.shape[0]}), "
                             f"got {weights.shape[0]}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise ValueError("weights must be finite, >= 0 and not all 0")
    p = next(model.parameters())
    dev, dt = p.device, p.dtype
    data = data.to(dev, dt)
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step):
        w = min(1.0, (step + 1) / lr_warmup) if lr_warmup else 1.0
        return w * (0.5 * (1 + math.cos(math.pi * step / steps)) if cosine else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    N = data.shape[0]
    view = (-1,) + (1,) * (data.dim() - 1)
    for step in range(steps):
        if weights is None:
            idx = torch.randint(0, N, (batch_size,), generator=g)
        else:
            idx = torch.multinomial(weights, batch_size, replacement=True, generator=g)
        x0 = data[idx.to(dev)]
        t = t_min + (1 - t_min) * torch.rand(batch_size, generator=g, dtype=torch.float64) ** t_power
        psi, sigma = schedule.psi_sigma(t)
        ts = schedule.timestep(t).to(dev, torch.float32)
        psi, sigma = psi.to(dev, dt).reshape(view), sigma.to(dev, dt).reshape(view)
        e = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(dev, dt)
        x_t = psi * x0 + sigma * e
        out = model(x_t, ts)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)
        target = e if pred == "epsilon" else x0 if pred == "sample" else psi * e - sigma * x0
        loss = ((out - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses


def small_unet(image_size: int, *, channels: int = 3, width: int = 32, layers_per_block: int = 1,
               attention: bool = False):
    """A small diffusers ``UNet2DModel`` for ``image_size`` x ``image_size`` images.

    Resolution levels halve the image down to 4 x 4 (at most 4 levels), with
    ``width`` channels at the top and twice that below; ``attention`` adds a
    self-attention block at the lowest level. Weights come from torch's global
    RNG (seed it first). ``image_size`` must be a multiple of 2^(levels - 1).
    """
    from diffusers import UNet2DModel

    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    if width < 8 or width % 8:
        raise ValueError(f"width must be a multiple of 8 (GroupNorm groups of 8 channels), got {width}")
    levels = 1
    while levels < 4 and image_size % (2 ** levels) == 0 and image_size // (2 ** levels) >= 4:
        levels += 1
    widths = tuple([width] + [2 * width] * (levels - 1))
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       layers_per_block=layers_per_block, block_out_channels=widths, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=8)

