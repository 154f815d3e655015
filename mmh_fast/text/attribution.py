"""Token attributions for memorization (Wen et al. 2023; MMH paper Sec. 4.2,
Fig. 7, 11): which prompt tokens drive a memorization metric."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.denoiser import model_device
from ..models.pipelines import tokenize_prompts
from ._core import TextPipeline, check_batch_size, text_pipeline
from .metrics import check_callback, plan, run_metric

__all__ = ["token_attributions", "prompt_tokens", "PromptTokens", "ATTRIBUTION_WRT"]

# what the metric is differentiated with respect to (token_attributions' ``wrt``)
ATTRIBUTION_WRT = ("hidden_states", "token_embeddings")


def _readable(tokenizer, tok: str) -> str:
    """A token as text: CLIP's end-of-word marker dropped, byte-level symbols decoded."""
    try:
        s = tokenizer.convert_tokens_to_string([tok])
    except Exception:  # pragma: no cover - tokenizers without the method
        s = tok
    s = s.replace("</w>", "").strip()
    return s if s else tok.replace("</w>", "")


@dataclass
class PromptTokens:
    """A prompt's own tokens as the pipeline's text encoder sees them (BOS, EOS
    and padding dropped; an over-long prompt truncated to what is kept).

    Attributes:
        prompt: the prompt.
        positions: their indices in the padded token sequence (1..n).
        raw: the tokenizer's token strings (e.g. "mona</w>").
        text: readable strings (end-of-word marker dropped).
        spans: (start, end) character offsets of each token in ``prompt``, or None
            when the tokenizer gives no offsets (slow tokenizers).
    """

    prompt: str
    positions: list
    raw: list
    text: list
    spans: list | None

    def __len__(self) -> int:
        return len(self.positions)


def prompt_tokens(pipe, prompt: str, *, warn: bool = True) -> PromptTokens:
    """The prompt's own tokens (see :class:`PromptTokens`); over-long prompts
    are truncated (with a warning unless ``warn=False``)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    ids, mask, _ = tokenize_prompts(pipe, [prompt], warn=warn)
    ids, mask = ids[0].tolist(), mask[0].tolist()
    tok = pipe.tokenizer
    n = int(sum(mask))  # BOS + tokens + EOS under the attention mask (CLIP tokenizers)
    positions = list(range(1, n - 1))
    raw = tok.convert_ids_to_tokens([ids[j] for j in positions])
    spans = None
    try:
        enc = tok([prompt], padding="max_length", max_length=len(ids), truncation=True,
                  return_offsets_mapping=True)
        off = enc["offset_mapping"][0]
        if len(off) == len(ids):
            spans = [tuple(int(v) for v in off[j]) for j in positions]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        spans = None  # slow tokenizers: no offsets
    return PromptTokens(prompt, positions, raw, [_readable(tok, t) for t in raw], spans)


def encode_with_token_embeddings(tp: TextPipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [1, L, D], leaf [1, L, E]): the prompt's text-encoder output hidden states
    in the UNet's dtype and device, still attached to the graph of the encoder, and the
    encoder's input token embeddings as the leaf they were computed from (read from the
    encoder's ``get_input_embeddings()`` module by a forward hook, so position
    embeddings and everything after them stay inside the graph). Encoded as
    :meth:`TextPipeline.embed` encodes (same ids, attention mask when the encoder
    uses one), so ``hidden`` equals it."""
    te = tp.pipe.text_encoder
    get = getattr(te, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if not isinstance(table, torch.nn.Module):
        raise TypeError(f"wrt='token_embeddings' needs a text encoder with get_input_embeddings() "
                        f"(a transformers model); {type(te).__name__} has none")
    ids, mask, _ = tokenize_prompts(tp.pipe, [prompt])
    dev = model_device(te)
    kw = {"attention_mask": mask.to(dev)} if bool(getattr(te.config, "use_attention_mask", False)) else {}
    seen = {}

    def hook(_module, _inputs, out):
        leaf = out.detach().requires_grad_(True)
        seen["leaf"] = leaf
        return leaf

    handle = table.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            out = te(ids.to(dev), **kw)
    finally:
        handle.remove()
    if "leaf" not in seen:
        raise TypeError(f"wrt='token_embeddings': {type(te).__name__} did not call its input-embedding module")
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    return hidden.to(tp.device, tp.dtype), seen["leaf"]


def _attribute(tp: TextPipeline, prompt: str, p, grid, callback, batch_size, wrt: str = "hidden_states"
               ) -> tuple[list[str], list[str], torch.Tensor]:
    pt = prompt_tokens(tp.pipe, prompt, warn=False)  # the encode below warns about truncation
    positions, raw, readable = pt.positions, pt.raw, pt.text
    if not positions:
        raise ValueError(f"prompt {prompt!r} has no tokens to attribute")
    if wrt == "hidden_states":
        base, hidden, leaf = tp.embed([prompt]).detach(), None, None
    else:
        hidden, leaf = encode_with_token_embeddings(tp, prompt)
        base = hidden.detach()
    acc = torch.zeros(base.shape[1], dtype=torch.float64)

    def on_step(i, t, value, g):
        # g: the step's gradient w.r.t. the hidden states in float32 (float64 for float64
        # pipelines) whatever the UNet's dtype, so fp16 gradients are read in float32
        if leaf is not None:
            # chain rule through the encoder: one vector-Jacobian product per evaluated step
            # (the norm is taken per step, then averaged, as for the hidden states)
            (g,) = torch.autograd.grad(hidden, leaf, g.to(hidden.dtype), retain_graph=True)
        acc.add_(g[0].to(torch.float64).norm(dim=-1).cpu())

    run_metric(tp, base, p, grid, on_step=on_step, callback=callback, grad=True, batch_size=batch_size)
    scores = acc[positions] / len(p.steps)
    return raw, readable, scores


def token_attributions(pipe, prompt: str, *, metric: str = "flipd", num_images: int = 4, t_range=None,
                       seed: int = 0, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                       n_probes: int = 1, max_timesteps: int | None = None,
                       callback: Callable | None = None, batch_size: int | None = None,
                       wrt: str = "hidden_states") -> list[tuple[str, float]]:
    """Per-token attributions of a memorization metric (Wen et al. 2024's token-wise
    significance score, SS_j = mean_t |d A_t / d e_j|_2; MMH paper Sec. 4.2).

    For each evaluated DDIM step i (grid steps with t in t_range, see
    :func:`mmh_fast.text.memorization_score`), the gradient of the step's metric
    term A_i (averaged over the images) w.r.t. e is taken; its L2 norm over
    features gives one number per position; these are averaged over the steps,
    restricted to the prompt's own tokens (BOS, EOS and padding dropped) and
    normalised to sum to 1. What e is depends on ``wrt``:

    - ``"hidden_states"`` (default; Wen et al.'s definition and their code's): the
      text-encoder OUTPUT hidden states [L, D], the UNet's conditioning.
    - ``"token_embeddings"``: the encoder's INPUT token embeddings [L, E] (before
      position embeddings), the same metric differentiated through the encoder:
      grad_in = J_enc^T grad_hidden. Token j is then credited for its effect on every
      position it reaches, EOS and padding included. With a causal encoder (CLIP)
      those later positions carry the prompt's information too and the UNet attends
      to them, so the hidden-state score at a token's own position can miss what the
      token does (measured on the lab: see the README's lab section).

    Guidance is never reversed: the trajectories step with eps_u + lambda (eps_c - eps_u)
    (the conditional branch gets the prompt, the unconditional one ""), so they
    move toward the prompt as in generation.

    Args:
        pipe: a Stable Diffusion-like pipeline.
        prompt: one prompt (over-long prompts are truncated with a warning and only
            the kept tokens are attributed).
        metric: "flipd" (A^FLIPD, default), "cfg" (A^CFG) or "score" (A^{s CFG}).
        num_images, t_range, seed, num_inference_steps, guidance_scale, n_probes,
        max_timesteps, callback, batch_size: as :func:`mmh_fast.text.memorization_score`.
        wrt: ``"hidden_states"`` or ``"token_embeddings"`` (above).

    Returns:
        [(token, score)] in prompt order: readable token strings (CLIP's "</w>"
        stripped) and float scores >= 0 summing to 1. If the metric does not
        depend on the prompt at all (every gradient exactly 0) the scores are
        uniform and a RuntimeWarning says so.

    Cost: the CFG DDIM trajectory up to the last evaluated step (one two-branch
    UNet call per step) plus, per evaluated step, one backward pass ("cfg",
    "score") or n_probes VJPs with create_graph and as many double backwards
    ("flipd"); ``"token_embeddings"`` adds one text-encoder forward (its graph kept)
    and one encoder backward per evaluated step. Memory: one evaluated step's graph and one probe's
    double-backward graph at a time, whatever the number of steps and probes.

    Raises:
        NonFiniteOutputError: a UNet output, metric term or gradient is NaN or
            inf (``.positions`` == [0], the prompt).
    """
    tp = text_pipeline(pipe)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if not isinstance(wrt, str) or wrt not in ATTRIBUTION_WRT:
        raise ValueError(f"wrt must be one of {ATTRIBUTION_WRT}, got {wrt!r}")
    p, grid = plan(tp, metric, num_images=num_images, t_range=t_range, seed=seed,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, n_probes=n_probes,
                   max_timesteps=max_timesteps)
    check_callback(callback)
    _, readable, scores = _attribute(tp, prompt, p, grid, callback, check_batch_size(batch_size), wrt)
    if not bool(torch.isfinite(scores).all()):
        raise FloatingPointError("token attributions are not finite (fp16 overflow in the UNet?)")
    total = float(scores.sum())
    if total <= 0:
        warnings.warn(f"the {metric!r} metric does not depend on the prompt's tokens here (zero gradient): "
                      "returning uniform attributions", RuntimeWarning, stacklevel=2)
        scores = torch.full_like(scores, 1.0 / len(scores))
    else:
        scores = scores / total
    return [(s, float(v)) for s, v in zip(readable, scores.tolist())]
