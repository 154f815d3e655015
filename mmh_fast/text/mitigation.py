"""Sample-time mitigation of memorization (MMH paper Sec. 4.2, App. D.3, D.4;
Wen et al. 2023; Somepalli et al. 2023).

- :func:`mitigate`: draw k tokens without replacement from softmax(attributions
  / temperature) and rewrite them with a rephraser, n times.
- :class:`OpenAIChatRephraser`: a rephraser calling an OpenAI-compatible chat
  endpoint with the paper's Box 1 instruction (urllib only; URL and key from
  the environment).
- :func:`optimize_prompt_embedding`: gradient steps on the prompt embedding
  (minimise A^CFG, Wen et al.; maximise A^FLIPD, App. D.3).
- :func:`generate`, :func:`evaluate_mitigation`: images from (new) prompts and
  their similarity to reference images and CLIP score, with offline loaders
  :func:`load_sscd_similarity` (a TorchScript SSCD file) and
  :func:`load_clip_score` (a transformers CLIP directory).
"""
from __future__ import annotations

import json
import os
import random
import re
import urllib.request
from typing import Callable, Sequence

import numpy as np
import torch

from .._hashing import sample_seed
from ..retrieval import load_torchscript_embedder
from ..models.batching import run_chunked
from ..models.pipelines import decode_latents
from ._core import as_prompts, check_batch_size, check_float, check_guidance, check_int, check_rows, text_pipeline
from .attribution import PromptTokens, prompt_tokens, token_attributions
from .metrics import check_metric, plan, run_metric

__all__ = ["mitigate", "REPHRASERS", "OpenAIChatRephraser", "BOX1_INSTRUCTION", "optimize_prompt_embedding",
           "generate", "evaluate_mitigation", "load_sscd_similarity", "load_clip_score"]

REPHRASERS = ("drop", "random_token", "caption_word", "random_number")


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def rewrite(pt: PromptTokens, replacements: dict) -> str:
    """The prompt with token i replaced by ``replacements[i]`` ("" drops it).

    With character offsets (fast tokenizers) the original text is edited in
    place (case and punctuation kept); without them the prompt is rebuilt from
    its tokens (CLIP lowercases, so the encoder sees the same text)."""
    if pt.spans is not None:
        text = pt.prompt
        for i in sorted(replacements, key=lambda i: pt.spans[i][0], reverse=True):
            a, b = pt.spans[i]
            new = replacements[i]
            text = text[:a] + (f" {new} " if new else " ") + text[b:]
        return _squash(text)
    out = []
    for i, t in enumerate(pt.raw):
        if i in replacements:
            if replacements[i]:
                out.append(" " + replacements[i] + " ")
        else:
            out.append(t.replace("</w>", " "))
    return _squash("".join(out))


def _builtin_items(kind: str, pt: PromptTokens, k: int, seed: int, tokenizer) -> list[str]:
    """k replacement items of a Somepalli et al. baseline (mmh_fast.mitigations)."""
    from .. import mitigations as M  # the shared prompt transforms (GNI/RT/CWR/RNA)

    rng = random.Random(seed)
    words = pt.prompt.split()
    if kind == "random_token":
        tr = M.RandomTokenAddition(k, tokenizer=tokenizer)
    elif kind == "caption_word":
        tr = M.CaptionWordRepeat(k)
    else:
        tr = M.RandomNumberAddition(k)
    return list(tr.insertions(words, rng))


def mitigate(pipe, prompt: str, *, k: int = 3, metric: str = "flipd", temperature: float = 0.1,
             rephraser="drop", n: int = 5, seed: int = 0, attributions=None,
             attribution_kwargs: dict | None = None) -> list[str]:
    """n new prompts with the tokens that drive memorization perturbed (Sec. 4.2, App. D.4).

    1. attributions a_j of the prompt's tokens (:func:`token_attributions` with
       ``metric``, or the ``attributions`` given), normalised to sum to 1;
    2. for repeat r < n: draw k distinct tokens with probabilities
       softmax(a / temperature) (sequentially without replacement), from a
       generator keyed by (seed, r);
    3. rewrite them with the rephraser:
       - "drop": remove them;
       - "random_token" / "caption_word" / "random_number": replace each by a
         random vocabulary token / a random word of the caption / a random
         integer, drawn by the Somepalli et al. transforms of
         :mod:`mmh_fast.mitigations` (RT / CWR / RNA);
       - a callable ``rephraser(prompt, tokens) -> str`` receiving the prompt and the
         readable strings of the k drawn tokens, in prompt order (e.g.
         :class:`OpenAIChatRephraser`).

    Args:
        k: tokens per new prompt, 1 <= k <= the number of the prompt's tokens
            (a ValueError names both otherwise).
        temperature: > 0; small values concentrate the draw on the top tokens.
        attribution_kwargs: options of :func:`token_attributions` (num_images,
            num_inference_steps, t_range, max_timesteps, guidance_scale, n_probes, seed).

    Returns:
        n strings. Edits are made on the original text when the tokenizer gives
        character offsets (case, punctuation kept), else on its tokens.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    k = check_int(k, "k", 1)
    n = check_int(n, "n", 1)
    seed = check_int(seed, "seed", 0)
    temperature = check_float(temperature, "temperature", positive=True)
    metric = check_metric(metric)
    if not (callable(rephraser) or rephraser in REPHRASERS):
        raise ValueError(f"rephraser must be one of {REPHRASERS} or a callable(prompt, tokens) -> str, "
                         f"got {rephraser!r}")
    tp = text_pipeline(pipe)
    pt = prompt_tokens(pipe, prompt)
    if len(pt) == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens to perturb")
    if k > len(pt):
        raise ValueError(f"k = {k} exceeds the prompt's {len(pt)} token(s) {pt.text}; use k <= {len(pt)}")
    if attribution_kwargs is not None and not isinstance(attribution_kwargs, dict):
        raise TypeError(f"attribution_kwargs must be a dict of token_attributions options, "
                        f"got {type(attribution_kwargs).__name__}")
    if attributions is None:
        attributions = token_attributions(pipe, prompt, metric=metric, **(attribution_kwargs or {}))
    scores = _attribution_scores(attributions, pt)
    probs = torch.softmax(scores / temperature, 0)
    out = []
    for r in range(n):
        g = torch.Generator().manual_seed(sample_seed(seed, r, "mitigate"))
        chosen = sorted(torch.multinomial(probs, k, replacement=False, generator=g).tolist())
        if callable(rephraser):
            new = rephraser(prompt, [pt.text[i] for i in chosen])
            if not isinstance(new, str):
                raise TypeError(f"the rephraser returned {type(new).__name__}, expected a str")
        elif rephraser == "drop":
            new = rewrite(pt, {i: "" for i in chosen})
        else:
            items = _builtin_items(rephraser, pt, k, sample_seed(seed, r, "rephrase"), tp.pipe.tokenizer)
            new = rewrite(pt, dict(zip(chosen, items)))
        out.append(new)
    return out


def _attribution_scores(attributions, pt: PromptTokens) -> torch.Tensor:
    try:
        toks = [str(t) for t, _ in attributions]
        vals = torch.tensor([float(v) for _, v in attributions], dtype=torch.float64)
    except (TypeError, ValueError):
        raise TypeError("attributions must be a list of (token, score) pairs, as token_attributions returns") from None
    if toks != pt.text:
        raise ValueError(f"attributions are for tokens {toks}, the prompt has {pt.text}")
    if not bool(torch.isfinite(vals).all()) or bool((vals < 0).any()):
        raise ValueError("attribution scores must be finite and >= 0")
    total = float(vals.sum())
    return vals / total if total > 0 else torch.full_like(vals, 1.0 / len(vals))


# ----------------------------------------------------------------------------- LLM rephraser

#: The MMH paper's Box 1 instruction (App. D.4); {original_tokens} and
#: {selected_tokens} are filled with JSON lists of token strings.
BOX1_INSTRUCTION = (
    "I have the following caption as a sequence of tokens: {original_tokens}\n\n"
    "I want to create a new caption based on this one, but I want to perturb the following tokens: "
    "{selected_tokens}\n\n"
    "These are the rules to follow for perturbing tokens:\n"
    "1. If the token is a special character or punctuation without significant semantics, you can remove it "
    "or change it to any special character\n"
    "2. If the token is a number, you can replace it with another number that is close to it\n"
    "3. If the token is a special name, such as the name of someone or some place or some culture, it should "
    "not be replaced\n"
    "4. If the token is any other word, you can replace and rephrase it with any synonym that makes sense in "
    "the context\n\n"
    "Given these requirements, please provide me with a new caption, not as a sequence of tokens, but as a "
    "natural language sentence that semantically matches closely with the original caption except for the "
    "perturbed tokens. Do not say anything else in response, only provide the new caption."
)


def _urllib_transport(url: str, headers: dict, body: bytes, timeout: float) -> bytes:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's configured endpoint
        return resp.read()


class OpenAIChatRephraser:
    """``rephraser(prompt, tokens) -> str`` through an OpenAI-compatible chat
    completions endpoint, with the paper's Box 1 instruction.

    The endpoint is ``$OPENAI_BASE_URL/chat/completions`` (default base
    https://api.openai.com/v1) and the key ``$OPENAI_API_KEY`` (names settable);
    both are read when called, never at construction or import. Uses urllib only.

    Args:
        model: the chat model name.
        tokenizer: a tokenizer (e.g. ``pipe.tokenizer``) to list the caption's
            tokens in the instruction, as the paper did; default: whitespace words.
        temperature: sampling temperature sent to the endpoint (None: the server's default).
        url_env, key_env: the environment variable names.
        timeout: seconds.
        transport: ``transport(url, headers, body_bytes, timeout) -> response bytes``
            (default: urllib POST); tests pass a fake.
    """

    def __init__(self, *, model: str = "gpt-4", tokenizer=None, temperature: float | None = None,
                 url_env: str = "OPENAI_BASE_URL", key_env: str = "OPENAI_API_KEY",
                 default_url: str = "https://api.openai.com/v1", timeout: float = 60.0,
                 transport: Callable | None = None):
        self.model, self.tokenizer, self.temperature = model, tokenizer, temperature
        self.url_env, self.key_env, self.default_url = url_env, key_env, default_url
        self.timeout = check_float(timeout, "timeout", positive=True)
        self.transport = transport or _urllib_transport

    def _original_tokens(self, prompt: str) -> list[str]:
        if self.tokenizer is None:
            return prompt.split()
        ids = self.tokenizer(prompt, truncation=True)["input_ids"]
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        raw = self.tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
        return [t.replace("</w>", "") for t in raw]

    def message(self, prompt: str, tokens: Sequence[str]) -> str:
        """The Box 1 instruction for this prompt and these tokens."""
        return BOX1_INSTRUCTION.format(original_tokens=json.dumps(self._original_tokens(prompt), ensure_ascii=False),
                                       selected_tokens=json.dumps(list(tokens), ensure_ascii=False))

    def request(self, prompt: str, tokens: Sequence[str]) -> tuple[str, dict, bytes]:
        """(url, headers, body) of the chat completions request."""
        key = os.environ.get(self.key_env)
        if not key:
            raise RuntimeError(f"set ${self.key_env} to the API key of the chat endpoint")
        base = (os.environ.get(self.url_env) or self.default_url).rstrip("/")
        payload = {"model": self.model, "messages": [{"role": "user", "content": self.message(prompt, tokens)}]}
        if self.temperature is not None:
            payload["temperature"] = float(self.temperature)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        return base + "/chat/completions", headers, json.dumps(payload).encode("utf-8")

    def __call__(self, prompt: str, tokens: Sequence[str]) -> str:
        url, headers, body = self.request(prompt, tokens)
        raw = self.transport(url, headers, body, self.timeout)
        try:
            reply = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
            text = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"unexpected reply from {url}: {str(raw)[:300]}") from e
        return _squash(str(text).strip().strip('"'))


# ----------------------------------------------------------------------------- embedding optimisation

def optimize_prompt_embedding(pipe, prompt, *, metric: str = "cfg", lr: float = 0.05, iters: int = 20,
                              target: float | None = None, num_images: int = 1, t_range=None, seed: int = 0,
                              num_inference_steps: int = 50, guidance_scale: float = 7.5, n_probes: int = 1,
                              max_timesteps: int | None = None, weight_decay: float = 0.01,
                              return_history: bool = False, batch_size: int | None = None):
    """Optimise the conditional prompt embedding against memorization.

    AdamW on the text-encoder output hidden states of ``prompt`` with the BOS
    position frozen (it is the same for every prompt): minimise A^CFG (Wen et
    al.'s inference-time mitigation; also "score", A^{s CFG}) or maximise
    A^FLIPD (MMH paper App. D.3). The objective is the metric of
    :func:`mmh_fast.text.memorization_score` on fixed latents and probes (same
    seed every iteration); its gradient is accumulated step by step, so memory
    stays at one evaluated step. Stops early once the metric reaches ``target``
    (<= for "cfg"/"score", >= for "flipd"). A NaN / inf UNet output, metric
    term or gradient raises NonFiniteOutputError.

    Args:
        prompt: a prompt, or its hidden states [L, D] / [1, L, D].
        metric: "cfg" (default), "score" or "flipd".
        lr, weight_decay: AdamW's.
        iters: at most this many optimiser steps (>= 0).
        target: early-stop value of the metric, or None.
        num_images, t_range, seed, num_inference_steps, guidance_scale, n_probes,
        max_timesteps, batch_size: as :func:`memorization_score` (one image by default).
        return_history: also return the metric before each step and at the end.

    Returns:
        the embedding [1, L, D] (UNet dtype, detached), to pass to the pipeline as
        ``prompt_embeds``; with ``return_history`` (embedding, [metric values]) whose
        last entry belongs to the returned embedding.
    """
    tp = text_pipeline(pipe)
    metric = check_metric(metric)
    iters = check_int(iters, "iters", 0)
    lr = check_float(lr, "lr", positive=True)
    if target is not None:
        target = check_float(target, "target")
    weight_decay = check_float(weight_decay, "weight_decay")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    batch_size = check_batch_size(batch_size)
    p, grid = plan(tp, metric, num_images=num_images, t_range=t_range, seed=seed,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, n_probes=n_probes,
                   max_timesteps=max_timesteps)
    base, _ = tp.as_embeddings(prompt, "prompt")
    if base.shape[0] != 1:
        raise ValueError(f"optimize_prompt_embedding takes one prompt, got {base.shape[0]}")
    base = base.detach().to(tp.work_dtype)  # optimised in float32 (float64 for a float64 pipeline)
    bos = base[:, :1]
    rest = base[:, 1:].clone().requires_grad_(True)
    opt = torch.optim.AdamW([rest], lr=lr, weight_decay=weight_decay)
    sign = -1.0 if metric == "flipd" else 1.0
    history: list[float] = []
    for it in range(iters + 1):
        last = it == iters
        vals, grads = [], []

        def on_step(i, t, value, g):
            vals.append(float(value.sum()))
            if g is not None:  # the step's gradient, summed as it comes (no graph kept)
                grads[:] = [g if not grads else grads[0] + g]

        run_metric(tp, torch.cat([bos, rest.detach()], 1), p, grid, on_step=on_step, grad=not last,
                   batch_size=batch_size)
        a = float(np.mean(vals))
        history.append(a)
        done = target is not None and (a >= target if metric == "flipd" else a <= target)
        if done or last:
            break
        opt.zero_grad(set_to_none=True)
        rest.grad = (sign * grads[0][:, 1:] / len(p.steps)).to(rest.dtype)  # BOS stays frozen
        opt.step()
    emb = torch.cat([bos, rest.detach()], 1).to(tp.dtype)
    return (emb, history) if return_history else emb


# ----------------------------------------------------------------------------- generation and evaluation

@torch.no_grad()
def generate(pipe, prompts, *, num_images: int = 1, seed: int = 0, num_inference_steps: int = 50,
             guidance_scale: float = 7.5, batch_size: int | None = None, output: str = "images") -> torch.Tensor:
    """CFG DDIM samples of prompts, the trajectories every function of
    mmh_fast.text uses (image n of every prompt starts from the latent keyed by (seed, n)).

    Args:
        prompts: a prompt, a list of N prompts, or hidden states [L, D] / [N, L, D].
        output: "images" (decoded by the VAE, float32 in [-1, 1] [N * num_images, 3, H, W])
            or "latents" ([N * num_images, C, h, w]).
        batch_size: (prompt, image) rows per UNet / VAE decoder call; default:
            sized from each network (:func:`mmh_fast.models.batching.default_batch_size`),
            halved and retried on out-of-memory errors. Rows do not depend on it.

    Returns:
        rows in prompt-major order: row = prompt_index * num_images + n.

    Raises:
        NonFiniteOutputError: a UNet output or decoded image is NaN or inf
            (``.positions``: prompt indices).
    """
    tp = text_pipeline(pipe)
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")
    num_images = check_int(num_images, "num_images", 1)
    seed = check_int(seed, "seed", 0)
    lam = check_guidance(guidance_scale)
    grid = tp.grid(num_inference_steps)
    cond, _ = tp.as_embeddings(prompts, "prompts")
    uncond = tp.uncond()
    R = cond.shape[0] * num_images
    bs = check_batch_size(batch_size)

    def chunk(a, b):
        r = torch.arange(a, b)
        x = tp.initial_latents((r % num_images).tolist(), seed)
        c = cond.index_select(0, (r // num_images).to(cond.device))
        return tp.sample(x, grid, c, uncond, lam, positions=r // num_images)

    # rows are independent (latents keyed by (seed, image)): chunks change only the peak memory
    x = torch.cat(run_chunked(chunk, R, batch_size=bs or tp.batch_size(passes=2), what="generate"))
    if output == "latents":
        return x.float()
    images = decode_latents(tp.pipe, x, batch_size=bs)  # chunked by the VAE's own estimate, halved on OOM
    check_rows(images, "the VAE decoder's image (positions are prompt indices)", (torch.arange(R) // num_images))
    return images


def _scores(fn, name: str, *args) -> list[float]:
    out = fn(*args)
    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().to(torch.float64).reshape(-1).tolist()
    else:
        out = np.asarray(out, dtype=np.float64).reshape(-1).tolist()
    n = args[0].shape[0]
    if len(out) != n:
        raise ValueError(f"{name} returned {len(out)} scores for {n} images")
    return out


def evaluate_mitigation(pipe, prompts, new_prompts, *, similarity: Callable | None = None,
                        clip_score: Callable | None = None, references=None, num_images: int = 1, seed: int = 0,
                        num_inference_steps: int = 50, guidance_scale: float = 7.5, batch_size: int | None = None,
                        include_original: bool = True, clip_against: str = "original") -> list[dict]:
    """Similarity to reference images and CLIP score of images generated from
    mitigated prompts (the MMH paper's Fig. 7a: SSCD similarity, lower is
    better; CLIP score, higher is better).

    Args:
        prompts: N original prompts.
        new_prompts: N entries, each a new prompt or a list of them (e.g.
            :func:`mitigate`'s output per prompt).
        similarity: ``similarity(images, references) -> [M]`` for images and
            references [M, 3, H, W] in [-1, 1] (e.g. :func:`load_sscd_similarity`);
            None skips the column.
        clip_score: ``clip_score(images, texts) -> [M]`` (e.g. :func:`load_clip_score`);
            None skips the column.
        references: [N, 3, H, W] in [-1, 1], the training image of each prompt;
            default: the images generated from the original prompts with the same
            seeds (similarity then measures how far the mitigation moved the sample).
        num_images, seed, num_inference_steps, guidance_scale, batch_size: as :func:`generate`.
        include_original: also score the original prompts (variant -1).
        clip_against: "original" (text alignment with the intended prompt, the
            default) or "new" (with the prompt the image was generated from).

    Returns:
        a list of dicts, one per generated image, with keys ``prompt_index``,
        ``variant`` (-1 for the original prompt, 0.. for its new prompts),
        ``prompt`` (the text generated from), ``image_index`` (n < num_images),
        ``similarity`` and ``clip_score`` (floats, or None when skipped).
    """
    prompts = as_prompts(prompts)
    if not isinstance(new_prompts, (list, tuple)) or len(new_prompts) != len(prompts):
        raise ValueError(f"new_prompts must hold one entry (a prompt or a list of prompts) per prompt: "
                         f"{len(prompts)} expected")
    variants = [as_prompts(v, f"new_prompts[{i}]") for i, v in enumerate(new_prompts)]
    if not isinstance(include_original, bool):
        raise TypeError(f"include_original must be True or False, got {include_original!r}")
    if clip_against not in ("original", "new"):
        raise ValueError(f"clip_against must be 'original' or 'new', got {clip_against!r}")
    for name, fn in (("similarity", similarity), ("clip_score", clip_score)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable or None, got {type(fn).__name__}")
    num_images = check_int(num_images, "num_images", 1)
    if references is not None:
        if not isinstance(references, torch.Tensor) or references.dim() != 4 or references.shape[0] != len(prompts):
            raise ValueError(f"references must be a tensor [N, 3, H, W] with N = {len(prompts)} (one image per prompt)")
        if not bool(torch.isfinite(references).all()) or float(references.min()) < -1.001 \
                or float(references.max()) > 1.001:
            raise ValueError("references must lie in [-1, 1]")
    texts, meta = [], []
    for i, p in enumerate(prompts):
        vs = ([(-1, p)] if include_original else []) + list(enumerate(variants[i]))
        for v, t in vs:
            texts.append(t)
            meta.append((i, v))
    kw = dict(num_images=num_images, seed=seed, num_inference_steps=num_inference_steps,
              guidance_scale=guidance_scale, batch_size=batch_size)
    images = generate(pipe, texts, **kw)
    if references is None:
        if include_original:  # the originals' samples are already there: rows of variant -1
            orig = {i: j for j, (i, v) in enumerate(meta) if v == -1}
            ref = images[[orig[i] * num_images + n for i in range(len(prompts)) for n in range(num_images)]]
        else:
            ref = generate(pipe, prompts, **kw)  # [N * num_images]: image n of prompt i
        ref_rows = [meta[j][0] * num_images + n for j in range(len(texts)) for n in range(num_images)]
        refs = ref[ref_rows]
    else:
        if references.shape[1:] != images.shape[1:]:
            raise ValueError(f"references have shape {tuple(references.shape[1:])} per image, the pipeline generates "
                             f"{tuple(images.shape[1:])}")
        refs = references.to(images.device, images.dtype)[[meta[j][0] for j in range(len(texts))
                                                            for _ in range(num_images)]]
    sims = _scores(similarity, "similarity", images, refs) if similarity is not None else None
    clip_texts = [prompts[meta[j][0]] if clip_against == "original" else texts[j]
                  for j in range(len(texts)) for _ in range(num_images)]
    clips = _scores(clip_score, "clip_score", images, clip_texts) if clip_score is not None else None
    rows = []
    for j, (i, v) in enumerate(meta):
        for n in range(num_images):
            r = j * num_images + n
            rows.append({"prompt_index": i, "variant": v, "prompt": texts[j], "image_index": n,
                         "similarity": None if sims is None else sims[r],
                         "clip_score": None if clips is None else clips[r]})
    return rows


# ----------------------------------------------------------------------------- offline loaders

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _to_unit(images: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be RGB images [M, 3, H, W] in [-1, 1], got {got}")
    if float(images.min()) < -1.001 or float(images.max()) > 1.001:
        raise ValueError(f"{name} must lie in [-1, 1]")
    return ((images.float() + 1) / 2).clamp(0, 1)


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - m) / s


def _resize_short(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False,
                                           antialias=True).clamp(0, 1)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def _device(device):
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_sscd_similarity(path, *, device=None, size: int = 288, batch_size: int = 32) -> Callable:
    """A ``similarity(images, references) -> [M]`` from a local SSCD TorchScript file
    (loaded by :func:`mmh_fast.retrieval.load_torchscript_embedder`).

    SSCD (Pizzi et al. 2022) descriptors: images in [-1, 1] -> [0, 1], the short
    side resized to ``size`` (bicubic, antialiased), ImageNet mean/std
    normalisation, the model's [M, E] output L2-normalised; the similarity is
    the cosine of the two descriptors (1 = copy). Nothing is downloaded.
    """
    size = check_int(size, "size", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    dev = _device(device)

    def prep(x):
        return _normalize(_resize_short(_to_unit(x, "images"), size), _IMAGENET_MEAN, _IMAGENET_STD)

    embedder = load_torchscript_embedder(path, device=dev, preprocess=prep)

    def embed(images):
        _to_unit(images, "images")  # checked on the whole batch
        outs = [torch.nn.functional.normalize(embedder(images[b:b + batch_size]), dim=1)
                for b in range(0, images.shape[0], batch_size)]
        return torch.cat(outs)

    def similarity(images, references):
        if images.shape[0] != references.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and references ({references.shape[0]}) must pair up")
        return (embed(images) * embed(references)).sum(1).cpu()

    similarity.embed = embed
    return similarity


def load_clip_score(path, *, device=None, batch_size: int = 32, scale: float = 100.0) -> Callable:
    """A ``clip_score(images, texts) -> [M]`` from a local transformers CLIP directory.

    CLIP score = scale * max(cos(image features, text features), 0) (scale 100,
    the torchmetrics convention). Images in [-1, 1] are resized (short side,
    bicubic) and centre-cropped to the vision tower's image_size and
    normalised with the directory's preprocessor mean/std (OpenAI CLIP's when
    absent); texts are truncated to the tokenizer's limit. Loaded with
    ``local_files_only=True``: nothing is downloaded.
    """
    from transformers import AutoTokenizer, CLIPModel

    batch_size = check_int(batch_size, "batch_size", 1)
    scale = check_float(scale, "scale", positive=True)
    dev = _device(device)
    if not os.path.isdir(str(path)):
        raise FileNotFoundError(f"no CLIP model directory at {path!s}")
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(dev).eval()
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!s} does not hold a transformers CLIP model and tokenizer: {e}") from e
    mean, std = _CLIP_MEAN, _CLIP_STD
    pre = os.path.join(str(path), "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre, encoding="utf-8") as f:
            cfg = json.load(f)
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    size = int(model.config.vision_config.image_size)
    max_len = int(min(getattr(tok, "model_max_length", 77) or 77, model.config.text_config.max_position_embeddings))

    def _features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def clip_score(images, texts):
        x = _to_unit(images, "images")
        texts = as_prompts(texts, "texts")
        if len(texts) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} images but {len(texts)} texts")
        out = []
        for b in range(0, x.shape[0], batch_size):
            xb = _normalize(_center_crop(_resize_short(x[b:b + batch_size], size), size), mean, std).to(dev)
            enc = tok(texts[b:b + batch_size], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            fi = _features(model.get_image_features(pixel_values=xb))
            ft = _features(model.get_text_features(**{k: v.to(dev) for k, v in enc.items()}))
            cos = torch.nn.functional.cosine_similarity(fi.float(), ft.float(), dim=1)
            out.append(scale * cos.clamp_min(0))
        return torch.cat(out).cpu()

    clip_score.model, clip_score.tokenizer = model, tok
    return clip_score
