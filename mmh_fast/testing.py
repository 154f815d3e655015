"""Closed-form diffusion models with known answers.

They have the diffusers call signature ``model(sample, timestep, **kwargs)``
and return the exact eps of their distribution under a schedule, so any
estimator (FLIPD, normal bundle, CFG norms, SolidMark inpainting) can be
checked against ground truth before it is trusted on a real network.

- :class:`GaussianMixtureEps`: a mixture of Gaussians on affine subspaces of
  chosen dimensions (dimension 0 = a point mass). Under the forward process
  x_t = psi x_0 + sigma e, component i is N(psi mu_i, psi^2 U_i diag(lam_i) U_i^T + sigma^2 I);
  its score follows from Woodbury's identity. LID of a point of component i is k_i,
  and at the component mean FLIPD(mu_i, t) = k_i lam / (lam + sigma^2) exactly
  (lam = psi^2 * variance, single component).
- :class:`EmpiricalEps`: the optimal denoiser of a finite training set — the
  score of the empirical distribution (convolved with N(0, h^2 I) when a
  smoothing ``bandwidth`` h > 0 is given). With h = 0 it is a perfect
  memorizer: every training point is a 0-dimensional point of its manifold.

All computation is in float64; outputs are cast to the input dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .models.schedules import Schedule, make_schedule

__all__ = ["GaussianMixtureEps", "EmpiricalEps", "DenoiserOutput", "GaussianEps", "ConditionalEmpiricalEps",
           "tiny_unet2d", "tiny_unet2d_condition", "tiny_ddpm_pipeline", "tiny_stable_diffusion_pipeline",
           "write_tiny_clip_tokenizer"]


@dataclass
class DenoiserOutput:
    """Mirror of diffusers' UNet2DOutput: the prediction in ``.sample``."""

    sample: torch.Tensor


class _ClosedForm(torch.nn.Module):
    def __init__(self, scheduler, prediction_type: str):
        super().__init__()
        self.schedule: Schedule = make_schedule(scheduler, warn_default=False)
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
        self.prediction_type = prediction_type
        # a dummy parameter so that dtype/device queries work like on a network
        self.register_buffer("_anchor", torch.zeros((), dtype=torch.float64))

    def _psi_sigma(self, timestep, batch: int, device):
        ts = torch.as_tensor(timestep, dtype=torch.float64, device=device)
        if ts.dim() == 0:
            ts = ts.expand(batch)
        psi, sigma = self.schedule.psi_sigma_from_timestep(ts.cpu())
        return psi.to(device).reshape(batch, 1), sigma.to(device).reshape(batch, 1)

    def eps_flat(self, x: torch.Tensor, psi: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _conditioning(self, kwargs: dict, batch: int) -> dict:
        """Keyword arguments of :meth:`eps_flat` taken from the network call
        (none for unconditional models: extra network arguments are ignored)."""
        return {}

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        B = sample.shape[0]
        x = sample.reshape(B, -1).to(torch.float64)
        if x.shape[1] != self.dim:
            raise ValueError(f"sample has {x.shape[1]} features per item, the model has {self.dim}")
        psi, sigma = self._psi_sigma(timestep, B, sample.device)
        eps = self.eps_flat(x, psi, sigma, **self._conditioning(kwargs, B))
        if self.prediction_type == "sample":
            out = (x - sigma * eps) / psi
        elif self.prediction_type == "v_prediction":
            x0 = (x - sigma * eps) / psi
            out = psi * eps - sigma * x0
        else:
            out = eps
        out = out.reshape(sample.shape).to(sample.dtype)
        return DenoiserOutput(out) if return_dict else (out,)

    def score(self, x_t: torch.Tensor, psi: float, sigma: float) -> torch.Tensor:
        """Exact score at noisy points x_t [B, ...] for the kernel (psi, sigma)."""
        B = x_t.shape[0]
        x = x_t.reshape(B, -1).to(torch.float64)
        p = torch.full((B, 1), float(psi), dtype=torch.float64, device=x.device)
        s = torch.full((B, 1), float(sigma), dtype=torch.float64, device=x.device)
        return (-self.eps_flat(x, p, s) / s).reshape(x_t.shape)


class GaussianMixtureEps(_ClosedForm):
    """Mixture of Gaussians on affine subspaces with its exact eps.

    Args:
        means: [K, *sample_shape] component means.
        bases: K orthonormal bases, each [d, k_i] (k_i = 0: a point mass), d = prod(sample_shape).
        variances: variance along the subspace, a float or K floats.
        weights: K mixture weights (default uniform).
        scheduler: diffusers scheduler or :class:`Schedule` mapping timesteps to
            (psi, sigma) (default: DDPMScheduler() defaults).
        prediction_type: what the network returns: "epsilon", "sample" or "v_prediction".

    Use :meth:`random` to build one from a list of dimensions.
    """

    def __init__(self, means: torch.Tensor, bases: Sequence[torch.Tensor], variances=1.0, weights=None, *,
                 scheduler=None, prediction_type: str = "epsilon"):
        super().__init__(scheduler, prediction_type)
        means = torch.as_tensor(means, dtype=torch.float64)
        K = means.shape[0]
        self.sample_shape = tuple(means.shape[1:])
        self.dim = int(math.prod(self.sample_shape))
        if len(bases) != K:
            raise ValueError(f"need one basis per component: {K} means, {len(bases)} bases")
        var = torch.as_tensor(variances, dtype=torch.float64).reshape(-1).expand(K).clone()
        if bool((var <= 0).any()):
            raise ValueError("variances must be positive")
        w = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (K,) or bool((w <= 0).any()):
            raise ValueError("weights must be K positive numbers")
        self.register_buffer("means", means.reshape(K, self.dim))
        self.register_buffer("variances", var)
        self.register_buffer("log_weights", torch.log(w / w.sum()))
        dims = []
        kmax = max([int(torch.as_tensor(b).shape[-1]) for b in bases] + [1])
        U = torch.zeros(K, self.dim, kmax, dtype=torch.float64)
        for i, b in enumerate(bases):
            b = torch.as_tensor(b, dtype=torch.float64).reshape(self.dim, -1)
            k = b.shape[1]
            if k and not torch.allclose(b.T @ b, torch.eye(k, dtype=torch.float64), atol=1e-8):
                raise ValueError(f"basis {i} must have orthonormal columns")
            U[i, :, :k] = b
            dims.append(k)
        self.register_buffer("bases", U)  # zero-padded to kmax columns
        self.dims = dims

    @classmethod
    def random(cls, dims: Sequence[int], sample_shape=(16,), *, separation: float = 10.0, variances=1.0,
               weights=None, seed: int = 0, scheduler=None, prediction_type: str = "epsilon"):
        """Components of the given dimensions with random orthonormal bases and
        means drawn with scale ``separation`` (well separated for the default)."""
        g = torch.Generator().manual_seed(seed)
        d = int(math.prod(sample_shape))
        if any(k < 0 or k > d for k in dims):
            raise ValueError(f"component dimensions must lie in [0, {d}], got {list(dims)}")
        means = separation * torch.randn(len(dims), d, generator=g, dtype=torch.float64) / math.sqrt(d)
        bases = [torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0] if k else
                 torch.zeros(d, 0, dtype=torch.float64) for k in dims]
        return cls(means.reshape(len(dims), *sample_shape), bases, variances, weights,
                   scheduler=scheduler, prediction_type=prediction_type)

    def eps_flat(self, x, psi, sigma):
        # x [B, d]; psi, sigma [B, 1]
        s2 = sigma**2  # [B,1]
        r = x[:, None, :] - psi[:, :, None] * self.means[None]  # [B,K,d]
        proj = torch.einsum("bkd,kdj->bkj", r, self.bases)  # [B,K,kmax]
        lam = (psi**2) * self.variances[None]  # [B,K]
        c = (lam / (lam + s2))[:, :, None]  # shrinkage along the subspace
        cproj = c * proj  # padded basis columns are zero, so they contribute nothing
        sinv_r = (r - torch.einsum("bkj,kdj->bkd", cproj, self.bases)) / s2[:, :, None]  # Sigma^-1 r
        quad = (r * sinv_r).sum(-1)  # [B,K]
        ks = torch.tensor(self.dims, dtype=torch.float64, device=x.device)
        logdet = self.dim * torch.log(s2) + ks[None] * torch.log1p(lam / s2)
        logp = self.log_weights[None] - 0.5 * quad - 0.5 * logdet
        resp = torch.softmax(logp, dim=1)  # [B,K]
        score = -(resp[:, :, None] * sinv_r).sum(1)
        return -sigma * score

    def sample_x0(self, n: int, *, generator: torch.Generator | None = None):
        """Draw n clean points; returns (x0 [n, *sample_shape], component labels [n])."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.bases.shape[-1], generator=generator, dtype=torch.float64)
        ks = torch.tensor(self.dims)[comp]
        z = z * (torch.arange(z.shape[1])[None] < ks[:, None]) * self.variances[comp, None].sqrt()
        x0 = self.means[comp] + torch.einsum("ndj,nj->nd", self.bases[comp], z)
        return x0.reshape(n, *self.sample_shape), comp

    def flipd_at_mean(self, component: int, t: float) -> float:
        """Exact FLIPD(mu_i, t) for an isolated component: k lam / (lam + sigma^2)."""
        psi, sigma = self.schedule.psi_sigma(t)
        lam = float(psi) ** 2 * float(self.variances[component])
        return self.dims[component] * lam / (lam + float(sigma) ** 2)


class EmpiricalEps(_ClosedForm):
    """Optimal denoiser of a finite training set.

    eps(x_t) = sigma (x_t - psi E[x_0 | x_t]) / (psi^2 h^2 + sigma^2) with
    E[x_0 | x_t] the softmax-weighted mean of the training points,
    weights proportional to exp(-|x_t - psi x_i|^2 / (2 (psi^2 h^2 + sigma^2))).

    Args:
        train: [N, *sample_shape] training points.
        bandwidth: smoothing h >= 0 (0: a perfect memorizer; larger values blur
            the point masses into full-dimensional Gaussians and turn memorization down).
        scheduler, prediction_type: as :class:`GaussianMixtureEps`.
        chunk_size: training points per chunk (bounds memory for large N).
    """

    def __init__(self, train, *, bandwidth: float = 0.0, scheduler=None, prediction_type: str = "epsilon",
                 chunk_size: int = 4096):
        super().__init__(scheduler, prediction_type)
        train = torch.as_tensor(train, dtype=torch.float64)
        if train.dim() < 2 or train.shape[0] == 0:
            raise ValueError(f"train must be [N, ...] with N >= 1, got shape {tuple(train.shape)}")
        if not bool(torch.isfinite(train).all()):
            raise ValueError("train contains NaN or inf")
        if bandwidth < 0:
            raise ValueError(f"bandwidth must be >= 0, got {bandwidth}")
        self.sample_shape = tuple(train.shape[1:])
        self.dim = int(math.prod(self.sample_shape))
        self.register_buffer("points", train.reshape(train.shape[0], self.dim))
        self.register_buffer("points_sq", (self.points**2).sum(1))
        self.bandwidth = float(bandwidth)
        self.chunk_size = int(chunk_size)

    def posterior_mean(self, x, psi, var, log_prior=None):
        """E[x_0 | x_t] [B, d] by a streaming log-sum-exp over training chunks;
        ``log_prior`` [B, N] adds log p(i | condition) to the weights."""
        B = x.shape[0]
        m = torch.full((B, 1), -math.inf, dtype=torch.float64, device=x.device)
        z = torch.zeros(B, 1, dtype=torch.float64, device=x.device)
        acc = torch.zeros(B, self.dim, dtype=torch.float64, device=x.device)
        xsq = (x**2).sum(1, keepdim=True)
        for i in range(0, self.points.shape[0], self.chunk_size):
            tr = self.points[i:i + self.chunk_size]
            d2 = xsq - 2 * psi * (x @ tr.T) + psi**2 * self.points_sq[i:i + self.chunk_size][None]
            logit = -d2.clamp_min(0) / (2 * var)
            if log_prior is not None:
                logit = logit + log_prior[:, i:i + self.chunk_size]
            m_new = torch.maximum(m, logit.max(1, keepdim=True).values)
            scale = torch.exp(m - m_new)
            w = torch.exp(logit - m_new)
            z = z * scale + w.sum(1, keepdim=True)
            acc = acc * scale + w @ tr
            m = m_new
        return acc / z

    def eps_flat(self, x, psi, sigma):
        var = psi**2 * self.bandwidth**2 + sigma**2
        x0 = self.posterior_mean(x, psi, var)
        return sigma * (x - psi * x0) / var


class GaussianEps(_ClosedForm):
    """A Gaussian N(mu, Sigma) with full (possibly singular) covariance and its
    exact eps: x_t ~ N(psi mu, psi^2 Sigma + sigma^2 I), so
    eps(x_t) = sigma (psi^2 Sigma + sigma^2 I)^-1 (x_t - psi mu), computed in
    the eigenbasis Sigma = V diag(lam) V^T. A generalising model: fitted to a
    data set (:meth:`fit`) it knows only the first two moments.

    Args:
        mean: [*sample_shape].
        covariance: [d, d] symmetric positive semi-definite (eigenvalues below
            zero from rounding are set to zero), d = prod(sample_shape).
        scheduler, prediction_type: as :class:`GaussianMixtureEps`.
    """

    def __init__(self, mean, covariance, *, scheduler=None, prediction_type: str = "epsilon"):
        super().__init__(scheduler, prediction_type)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        self.sample_shape = tuple(mean.shape)
        self.dim = int(math.prod(self.sample_shape))
        cov = torch.as_tensor(covariance, dtype=torch.float64)
        if cov.shape != (self.dim, self.dim):
            raise ValueError(f"covariance must be [{self.dim}, {self.dim}] for a mean of shape {self.sample_shape}, "
                             f"got {tuple(cov.shape)}")
        if not bool(torch.isfinite(cov).all()) or not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError("covariance must be finite and symmetric")
        lam, V = torch.linalg.eigh((cov + cov.T) / 2)
        tol = 1e-10 * max(float(lam.abs().max()), 1.0)
        if float(lam.min()) < -tol:
            raise ValueError(f"covariance must be positive semi-definite (smallest eigenvalue {float(lam.min()):.3g})")
        self.register_buffer("mean", mean.reshape(self.dim))
        self.register_buffer("eigenvalues", lam.clamp_min(0))
        self.register_buffer("eigenvectors", V)

    @classmethod
    def fit(cls, data, *, scheduler=None, prediction_type: str = "epsilon"):
        """The Gaussian with the sample mean and unbiased sample covariance
        (1 / (N - 1)) of data [N, *sample_shape], N >= 2."""
        x = torch.as_tensor(data, dtype=torch.float64)
        if x.dim() < 2 or x.shape[0] < 2:
            raise ValueError(f"data must be [N, ...] with N >= 2, got shape {tuple(x.shape)}")
        flat = x.reshape(x.shape[0], -1)
        mu = flat.mean(0)
        c = flat - mu
        return cls(mu.reshape(x.shape[1:]), c.T @ c / (x.shape[0] - 1), scheduler=scheduler,
                   prediction_type=prediction_type)

    def eps_flat(self, x, psi, sigma):
        r = x - psi * self.mean[None]
        p = (r @ self.eigenvectors) / (psi**2 * self.eigenvalues[None] + sigma**2)
        return sigma * (p @ self.eigenvectors.T)


class ConditionalEmpiricalEps(EmpiricalEps):
    """Optimal conditional denoiser of a finite training set whose items come
    with conditioning embeddings: a perfect memorizer of (image, embedding) pairs.

    The model: i ~ uniform, x_0 = x_i, and a condition c ~ N(e_i, tau^2 I).
    Then p(i | x_t, c) is proportional to exp(-|x_t - psi x_i|^2 / (2 (psi^2 h^2 +
    sigma^2)) - |c - e_i|^2 / (2 tau^2)) and eps follows as for
    :class:`EmpiricalEps` with these weights; without a condition (``None``)
    it is the unconditional :class:`EmpiricalEps`. Perturbing c (GNI) moves
    the weight to other training images, which is what the mitigation relies on.

    Args:
        train: [N, *sample_shape] training images.
        embeddings: [N, ...] one embedding per image (flattened to [N, E]).
        cond_scale: tau > 0; small values make the condition decisive.
        bandwidth, scheduler, prediction_type, chunk_size: as :class:`EmpiricalEps`.
        cond_key: the network keyword carrying c ([B, ...], flattened to [B, E]).
    """

    def __init__(self, train, embeddings, *, cond_scale: float = 1.0, bandwidth: float = 0.0, scheduler=None,
                 prediction_type: str = "epsilon", chunk_size: int = 4096, cond_key: str = "encoder_hidden_states"):
        super().__init__(train, bandwidth=bandwidth, scheduler=scheduler, prediction_type=prediction_type,
                         chunk_size=chunk_size)
        e = torch.as_tensor(embeddings, dtype=torch.float64)
        if e.dim() < 1 or e.shape[0] != self.points.shape[0]:
            raise ValueError(f"need one embedding per training image: {self.points.shape[0]} images, "
                             f"embeddings of shape {tuple(e.shape)}")
        if not float(cond_scale) > 0:
            raise ValueError(f"cond_scale must be > 0, got {cond_scale}")
        self.register_buffer("embeddings", e.reshape(e.shape[0], -1))
        self.cond_scale = float(cond_scale)
        self.cond_key = cond_key

    def _conditioning(self, kwargs, batch):
        c = kwargs.get(self.cond_key)
        if c is None:
            return {}
        c = torch.as_tensor(c).to(torch.float64).reshape(c.shape[0], -1)
        if c.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"{self.cond_key} has {c.shape[1]} features per item, the embeddings {self.embeddings.shape[1]}")
        if c.shape[0] == 1 and batch > 1:
            c = c.expand(batch, -1)
        return {"cond": c}

    def eps_flat(self, x, psi, sigma, cond=None):
        var = psi**2 * self.bandwidth**2 + sigma**2
        log_prior = None
        if cond is not None:
            d2 = torch.cdist(cond.to(x.device), self.embeddings.to(x.device)) ** 2
            log_prior = -d2 / (2 * self.cond_scale**2)
        x0 = self.posterior_mean(x, psi, var, log_prior)
        return sigma * (x - psi * x0) / var


# ---------------------------------------------------------------------------
# Tiny diffusers models and pipelines built from configs (random weights, no
# downloads): for tests of every adapter path and for examples.
# ---------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes: printable
    Latin-1 bytes stand for themselves, the others are shifted past 255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def write_tiny_clip_tokenizer(directory, merges: Sequence[str] = ("t h", "th e</w>", "a n", "o n</w>", "i n")) -> str:
    """Write vocab.json and merges.txt of a small byte-level CLIP BPE vocabulary
    (every byte alone and word-final, the given merges, the two CLIP specials)
    to ``directory``; returns the directory. Any text tokenizes (no unknowns)."""
    import json
    import os

    os.makedirs(directory, exist_ok=True)
    vocab: dict[str, int] = {}
    for ch in _byte_alphabet():
        vocab.setdefault(ch, len(vocab))
    for ch in _byte_alphabet():
        vocab.setdefault(ch + "</w>", len(vocab))
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return str(directory)


def tiny_unet2d(*, sample_size: int = 8, in_channels: int = 3, channels=(8, 16), attention: bool = True,
                class_embed: int | None = None, seed: int = 0, dtype=torch.float32):
    """A small diffusers UNet2DModel with random weights (an attention block
    included by default, so the attention path is exercised)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    down = ("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D")
    up = ("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D")
    kw = {"num_class_embeds": class_embed} if class_embed else {}
    m = UNet2DModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                    block_out_channels=tuple(channels), layers_per_block=1, down_block_types=down,
                    up_block_types=up, norm_num_groups=min(8, channels[0]), attention_head_dim=channels[-1] // 2,
                    **kw)
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def tiny_unet2d_condition(*, sample_size: int = 8, in_channels: int = 4, channels=(16, 32),
                          cross_attention_dim: int = 32, seed: int = 0, dtype=torch.float32):
    """A small diffusers UNet2DConditionModel (cross-attention to
    ``encoder_hidden_states`` [B, L, cross_attention_dim]) with random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                             block_out_channels=tuple(channels), layers_per_block=1,
                             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                             cross_attention_dim=cross_attention_dim, attention_head_dim=4,
                             norm_num_groups=min(8, channels[0]))
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def tiny_ddpm_pipeline(*, sample_size: int = 8, in_channels: int = 3, seed: int = 0, ddim: bool = False,
                       prediction_type: str = "epsilon"):
    """A DDPMPipeline (or DDIMPipeline) around :func:`tiny_unet2d` with the
    default linear-beta scheduler: pixel-space diffusion on images in [-1, 1]."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    unet = tiny_unet2d(sample_size=sample_size, in_channels=in_channels, seed=seed)
    if ddim:
        return DDIMPipeline(unet=unet, scheduler=DDIMScheduler(prediction_type=prediction_type))
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(prediction_type=prediction_type))


def tiny_stable_diffusion_pipeline(*, image_size: int = 16, seed: int = 0, prediction_type: str = "epsilon",
                                   max_length: int = 16, hidden_size: int = 32, tokenizer_dir: str | None = None):
    """A StableDiffusionPipeline small enough for CPU tests, built from configs.

    VAE: AutoencoderKL with one downsampling (latents [B, 4, image_size/2,
    image_size/2], scaling_factor 0.18215); text encoder: a 2-layer
    CLIPTextModel of width ``hidden_size``; tokenizer: a byte-level CLIP BPE
    written by :func:`write_tiny_clip_tokenizer` (to ``tokenizer_dir`` or a
    temporary directory), ``model_max_length = max_length``; UNet:
    :func:`tiny_unet2d_condition`; scheduler: DDIM with Stable Diffusion's
    scaled-linear betas. Random weights, nothing downloaded.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if image_size % 2:
        raise ValueError(f"image_size must be even, got {image_size}")
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=image_size).eval()
    tdir = tokenizer_dir or tempfile.mkdtemp(prefix="mmh_tiny_clip_")
    write_tiny_clip_tokenizer(tdir)
    tok = CLIPTokenizer.from_pretrained(tdir, model_max_length=max_length)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed + 1)
    text = CLIPTextModel(cfg).eval()
    unet = tiny_unet2d_condition(sample_size=image_size // 2, in_channels=4, cross_attention_dim=hidden_size,
                                 seed=seed + 2)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
