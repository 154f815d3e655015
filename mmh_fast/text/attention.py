"""Cross-attention and memorization (Ren et al., "Unveiling and Mitigating
Memorization in Text-to-image Diffusion Models through Cross Attention",
ECCV 2024).

A non-memorized prompt's cross-attention rests mostly on the beginning
token; a memorized prompt's trigger tokens draw attention away from it, so
the distribution of attention over the prompt's tokens is spread out (higher
entropy) from the first sampling step on.

The attention probabilities are read through diffusers' public attention
processor interface: :func:`cross_attention_probabilities` installs, with
``unet.set_attn_processor``, a processor that computes cross-attention
explicitly (softmax(Q K^T * scale + mask) V, the computation of diffusers'
``AttnProcessor``) and reports the probabilities, and restores the UNet's own
processors afterwards. Nothing inside diffusers is patched.

- :func:`cross_attention_entropy`: the detector.
- :func:`generate_attention_rescaled`: the inference-time mitigation
  (rescaled beginning-token logit, summary tokens masked out).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch

from ..models.pipelines import decode_latents, tokenize_prompts
from ._core import check_float
from ._geometry import check_scores, over_rows, setup
from .detection import _check_steps

__all__ = ["cross_attention_entropy", "cross_attention_probabilities", "cross_attention_layers",
           "generate_attention_rescaled"]


class _CrossAttentionProcessor:
    """A diffusers attention processor (the ``AttnProcessor`` computation) that
    hands each cross-attention's probabilities [batch, heads, queries, tokens]
    to ``sink(layer, probs)`` and can change the logits first with
    ``logits(layer, scores [batch, heads, queries, tokens]) -> scores``."""

    def __init__(self, layer: int, sink: Callable | None, logits: Callable | None):
        self.layer, self.sink, self.logits = layer, sink, logits

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, keys, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, keys, batch)
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif getattr(attn, "norm_cross", None):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        q, k, v = (attn.head_to_batch_dim(t) for t in (query, key, value))
        dtype = q.dtype
        if getattr(attn, "upcast_attention", False):
            q, k = q.float(), k.float()
        scores = torch.bmm(q, k.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if getattr(attn, "upcast_softmax", False):
            scores = scores.float()
        H = attn.heads
        scores = scores.reshape(batch, H, scores.shape[1], scores.shape[2])
        if self.logits is not None:
            scores = self.logits(self.layer, scores)
        probs = scores.softmax(-1).to(dtype)
        if self.sink is not None:
            self.sink(self.layer, probs)
        out = attn.batch_to_head_dim(torch.bmm(probs.reshape(batch * H, probs.shape[2], probs.shape[3]), v))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if getattr(attn, "residual_connection", False):
            out = out + residual
        return out / getattr(attn, "rescale_output_factor", 1.0)


def cross_attention_layers(unet, name: str = "pipe.unet") -> list[str]:
    """Names of the cross-attention processors of a diffusers UNet, in the order of
    ``unet.attn_processors`` (the layer indices of :func:`cross_attention_entropy`;
    diffusers lists the mid block last)."""
    procs = getattr(unet, "attn_processors", None)
    if not isinstance(procs, dict) or not callable(getattr(unet, "set_attn_processor", None)):
        raise TypeError(f"{name} ({type(unet).__name__}) has no diffusers attention processors "
                        "(attn_processors / set_attn_processor): the cross-attention detectors need a diffusers "
                        "UNet2DConditionModel-like network")
    out = []
    for key in procs:
        mod = unet.get_submodule(key.rsplit(".processor", 1)[0])
        if getattr(mod, "is_cross_attention", False):
            out.append(key)
    if not out:
        raise ValueError(f"{name} ({type(unet).__name__}) has no cross-attention layers to read")
    return out


@contextlib.contextmanager
def cross_attention_probabilities(unet, sink: Callable | None = None, *, logits: Callable | None = None):
    """Context in which every cross-attention layer of ``unet`` (index l in
    :func:`cross_attention_layers` order) calls ``sink(l, probs)`` with its
    probabilities [batch, heads, queries, tokens], after ``logits(l, scores)``
    if given may change the pre-softmax scores. Self-attention keeps its
    processors; all processors are restored on exit."""
    names = cross_attention_layers(unet)
    original = dict(unet.attn_processors)
    mine = {n: _CrossAttentionProcessor(names.index(n), sink, logits) if n in names else p
            for n, p in original.items()}
    unet.set_attn_processor(mine)
    try:
        yield names
    finally:
        unet.set_attn_processor(original)


def _check_layers(layers, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be None or a non-empty sequence of cross-attention layer indices, got {layers!r}")
    out = []
    for v in layers:
        if isinstance(v, bool) or not isinstance(v, int) or not -n <= v < n:
            raise ValueError(f"layers must hold indices in [-{n}, {n}) (the UNet has {n} cross-attention layers), "
                             f"got {v!r}")
        out.append(v % n)
    return sorted(set(out))


def cross_attention_entropy(pipe, prompts, *, num_images: int = 1, steps=(0, 1), layers: Sequence[int] | None = None,
                            num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
                            batch_size: int | None = None) -> torch.Tensor:
    """Ren et al.'s attention-entropy memorization score (ECCV 2024, Sec. 4, the
    one-step detector "E"):

        a_l(c) = mean over heads and image queries of softmax(Q K_c^T / sqrt(d))  in Delta^L,
        a(c) = mean over the selected layers l of a_l(c),
        score(c) = mean over images n and DDIM steps i in [steps) of -sum_j a_j log a_j,

    the conditional branch's cross-attention distribution over the L token
    positions (BOS, prompt, EOS and padding) along the CFG DDIM trajectory from
    x_T^n ~ N(0, I). Memorized prompts spread attention away from the
    beginning token: high values flag memorization. The authors' SD 1.4
    setting reads step 0 of one layer (index 3 of the 16); the default here
    averages all cross-attention layers, which exist in every UNet.

    Cost per (prompt, image) and step: one two-branch UNet call with explicit
    (non-fused) attention in the cross-attention layers.

    Args:
        pipe: a StableDiffusionPipeline-like pipeline whose UNet has diffusers
            attention processors (``attn_processors`` / ``set_attn_processor``).
        prompts: a string or a list of N strings.
        num_images: trajectories per prompt (image n from the latent keyed by (seed, n)).
        steps: (first, stop) DDIM step indices (default (0, 1): the first step).
        layers: indices into :func:`cross_attention_layers` (None: all).
        num_inference_steps, guidance_scale: the DDIM grid and the trajectory's CFG scale.
        seed: scores do not depend on the batch or on the other prompts.
        batch_size: (prompt, image) rows per call (default: all).

    Returns:
        float64 [N] on the CPU, in nats, in [0, log L].
    """
    S = setup(pipe, prompts, num_images=num_images, num_inference_steps=num_inference_steps, seed=seed,
              guidance_scale=guidance_scale)
    tp, grid = S.tp, S.grid
    names = cross_attention_layers(tp.net)
    sel = _check_layers(layers, len(names))
    s0, s1 = _check_steps(steps, len(grid))
    record: dict[int, torch.Tensor] = {}
    active = [False]

    def sink(layer, probs):
        if active[0] and layer in sel:
            half = probs.shape[0] // 2  # rows [uncond; cond] of the two-branch call
            record[layer] = probs[half:].to(torch.float64).mean((1, 2)).detach()

    def chunk(rows):
        x = tp.initial_latents(rows.image.tolist(), S.seed)
        cond = S.cond.index_select(0, rows.prompt.to(S.cond.device))
        acc = torch.zeros(len(rows), dtype=torch.float64)
        for i in range(s1):
            record.clear()
            active[0] = i >= s0
            e_u, e_c = tp.pair(x, grid, i, cond, S.uncond)
            if i >= s0:
                a = torch.stack([record[l_] for l_ in sel]).mean(0)  # [rows, L]
                acc += (-(a * torch.where(a > 0, a.log(), torch.zeros_like(a))).sum(1)).cpu()
            if i + 1 < s1:
                x = grid.step(i, x, e_u + S.guidance_scale * (e_c - e_u))
        return acc

    with torch.no_grad(), cross_attention_probabilities(tp.net, sink):
        total = over_rows(S.tp, len(S.prompts), S.num_images, batch_size, chunk, what="cross_attention_entropy")
    out = total.reshape(len(S.prompts), S.num_images).mean(1) / (s1 - s0)
    return check_scores(out, "cross_attention_entropy", S.prompts)


@torch.no_grad()
def generate_attention_rescaled(pipe, prompts, *, bos_scale: float = 1.25, mask_summary: bool = True,
                                num_images: int = 1, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                                seed: int = 0, output: str = "images", batch_size: int | None = None) -> torch.Tensor:
    """Inference-time mitigation by attention rescaling (Ren et al., ECCV 2024,
    Sec. 5; C = 1.25 with summary tokens masked is our reading of the options
    of the authors' released mitigation command): in every cross-attention
    layer of the conditional branch the beginning-token logit is multiplied by C,

        s_{q, BOS} <- C s_{q, BOS},  and with ``mask_summary`` s_{q, j} <- -inf for the
        EOS and padding positions j >= len(prompt tokens) - 1,

    so attention returns to the beginning token and the summary tokens that
    carry the memorized content are not read; then the CFG DDIM sampler of
    :func:`mmh_fast.text.generate` runs unchanged. C = 1 without masking is the
    plain sampler.

    Returns:
        rows in prompt-major order: "images" float32 [N * num_images, 3, H, W] in [-1, 1]
        or "latents" [N * num_images, C, h, w].
    """
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    c_bos = check_float(bos_scale, "bos_scale", positive=True)
    if not isinstance(mask_summary, bool):
        raise TypeError(f"mask_summary must be True or False, got {mask_summary!r}")
    S = setup(pipe, prompts, num_images=num_images, num_inference_steps=num_inference_steps, seed=seed,
              guidance_scale=guidance_scale)
    tp, grid = S.tp, S.grid
    _, attn_mask, _ = tokenize_prompts(tp.pipe, S.prompts, warn=False)
    lengths = attn_mask.sum(1)  # BOS + prompt tokens + EOS
    state: dict = {}

    def logits(layer, scores):
        B = scores.shape[0] // 2
        cond = scores[B:]
        keep = torch.ones(cond.shape[-1], dtype=torch.bool, device=cond.device)[None].repeat(B, 1)
        if mask_summary:
            pos = torch.arange(cond.shape[-1], device=cond.device)[None]
            keep = pos < (state["len"].to(cond.device)[:, None] - 1)
        cond = cond.clone()
        cond[..., 0] = cond[..., 0] * c_bos
        cond = cond.masked_fill(~keep[:, None, None, :], -math.inf)
        return torch.cat([scores[:B], cond])

    def chunk(rows):
        state["len"] = lengths.index_select(0, rows.prompt)
        x = tp.initial_latents(rows.image.tolist(), S.seed)
        x = tp.sample(x, grid, S.cond.index_select(0, rows.prompt.to(S.cond.device)), S.uncond,
                      S.guidance_scale, positions=rows.prompt)
        return decode_latents(tp.pipe, x) if output == "images" else x.float()

    with cross_attention_probabilities(tp.net, None, logits=logits):
        return over_rows(S.tp, len(S.prompts), S.num_images, batch_size, chunk, what="generate_attention_rescaled")
