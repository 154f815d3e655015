"""The lab's measurements, each through the library's public API only.

Every detector is scored so that HIGH means "memorized": quantities the paper
reads the other way (A^FLIPD, FLIPD: low LID flags memorization) are negated
before the ROC is computed, and the table says so in its ``sign`` column.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from .truth import COPY_THRESHOLD, copy_scores, generate_images


def roc_stats(scores, labels) -> dict:
    """ROC AUC and TPR at 1% FPR of ``scores`` (high = positive) against boolean ``labels``.

    TPR@1%FPR is the largest TPR among ROC points with FPR <= 0.01 (with fewer than
    100 negatives this is the TPR at FPR = 0: no negative may score above the
    threshold). ValueError when ``labels`` hold only one class (both statistics are
    undefined then) or differ in length from ``scores``."""
    from sklearn.metrics import roc_auc_score, roc_curve

    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"labels must give one bool per score: {y.size} labels for {s.size} scores")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        missing = "positive (True)" if n_pos == 0 else "negative (False)"
        raise ValueError(f"labels hold no {missing} sample ({n_pos} positives, {y.size - n_pos} negatives): "
                         "ROC AUC and TPR@1%FPR need both classes")
    if not np.isfinite(s).all():
        raise ValueError("detector scores contain NaN or inf")
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_1fpr": float(tpr[fpr <= 0.01].max()),
            "fpr": fpr.tolist(), "tpr": tpr.tolist()}


def roc_stats_or_nan(scores, labels) -> dict:
    """:func:`roc_stats`, or NaN statistics and no ROC points when ``labels`` hold one
    class only: a lab table row where the AUC is undefined (e.g. an untrained lab with
    nothing memorized, or a cap that selects planted prompts only) says so with NaN."""
    y = np.asarray(labels, bool).reshape(-1)
    if 0 < int(y.sum()) < y.size:
        return roc_stats(scores, y)
    return {"auc": float("nan"), "tpr_at_1fpr": float("nan"), "fpr": [], "tpr": []}


def _alignment_step(num_inference_steps: int) -> int:
    """t_low of norm_alignment_score: the paper's third-to-last step (the first on grids of fewer than 3 steps,
    as in the test labs)."""
    return -min(3, num_inference_steps)


def _timed(fn: Callable):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# the rows of the lab's detection table, in order
DETECTORS = ("cfg_norm_1", "cfg_norm_traj", "A_cfg", "A_score", "A_flipd", "flipd_gen_cond", "flipd_gen_uncond",
             "sharpness", "norm_alignment", "attention_entropy")


def detection(pipe, prompts: Sequence[str], labels, *, guidance_scale: float, num_inference_steps: int,
              num_images: int = 4, seed: int = 0, t0: float = 0.05, generations: np.ndarray | None = None,
              metrics: Sequence[str] = DETECTORS) -> list[dict]:
    """The prompt-level detection table: one row per detector with ``auc``,
    ``tpr_at_1fpr``, ``seconds_per_prompt`` (wall time of the detector alone)
    and the per-prompt ``scores`` (high = memorized).

    - cfg_norm_1: :func:`mmh_fast.text.cfg_norm`, steps (0, 1) (Wen et al.'s one-step detector);
    - cfg_norm_traj: the same over the whole DDIM trajectory;
    - A_cfg, A_score, A_flipd: :func:`mmh_fast.text.memorization_score` (Eq. 24, 25, 28),
      A_flipd negated;
    - flipd_gen_cond / flipd_gen_uncond: :func:`mmh_fast.flipd` (t0) of the prompt's
      generations (``generations`` [P, n, 3, H, W] if given, else generated here and timed)
      with the prompt as condition / with "" , negated, averaged over the generations;
    - sharpness: :func:`mmh_fast.text.hessian_score_difference_norm`, steps (0, 1)
      (Jeon et al.'s initial-stage sharpness);
    - norm_alignment: :func:`mmh_fast.text.norm_alignment_score` with its paper
      weights and t_low the third-to-last step (the first on grids of fewer than 3
      steps) (Asthana and Belagiannis; on pure noise, so ``guidance_scale`` is unused);
    - attention_entropy: :func:`mmh_fast.text.cross_attention_entropy`, steps (0, 1)
      (Ren et al.'s one-step entropy).

    All text detectors use ``num_images`` latents per prompt and the same ``seed``;
    the three issue-16 rows are high = memorized as the functions return them (sign +1).
    """
    from .. import flipd
    from ..text import (cfg_norm, cross_attention_entropy, hessian_score_difference_norm, memorization_score,
                        norm_alignment_score)

    prompts = list(prompts)
    P = len(prompts)
    kw = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    rows = []
    gen_seconds = 0.0
    if generations is None and any(m.startswith("flipd_gen") for m in metrics):
        generations, gen_seconds = _timed(lambda: generate_images(
            pipe, prompts, n=num_images, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
            seed=seed))
    for m in metrics:
        if m == "cfg_norm_1":
            s, sec = _timed(lambda: cfg_norm(pipe, prompts, num_images=num_images, steps=(0, 1), **kw))
            sign, what = 1, "cfg_norm, steps (0, 1)"
        elif m == "cfg_norm_traj":
            s, sec = _timed(lambda: cfg_norm(pipe, prompts, num_images=num_images,
                                             steps=(0, num_inference_steps), **kw))
            sign, what = 1, f"cfg_norm, steps (0, {num_inference_steps})"
        elif m in ("A_cfg", "A_score", "A_flipd"):
            name = m[2:]
            s, sec = _timed(lambda: memorization_score(pipe, prompts, metric=name, num_images=num_images, **kw))
            sign, what = (-1 if name == "flipd" else 1), f"memorization_score(metric={name!r})"
        elif m in ("flipd_gen_cond", "flipd_gen_uncond"):
            n = generations.shape[1]
            x = torch.from_numpy(np.ascontiguousarray(generations.reshape(P * n, *generations.shape[2:])))
            x = x.clamp(-1, 1)
            cond = [p for p in prompts for _ in range(n)] if m.endswith("_cond") else ""
            f, sec = _timed(lambda: flipd(pipe, x, t0, cond=cond))
            s = f.reshape(P, n).mean(1)
            sec += gen_seconds
            sign, what = -1, f"flipd(t0={t0}) of generations, " + ("with caption" if m.endswith("_cond") else
                                                                     "without caption")
        elif m == "sharpness":
            s, sec = _timed(lambda: hessian_score_difference_norm(pipe, prompts, num_images=num_images,
                                                                  steps=(0, 1), **kw))
            sign, what = 1, "hessian_score_difference_norm, steps (0, 1)"
        elif m == "norm_alignment":
            low = _alignment_step(num_inference_steps)
            s, sec = _timed(lambda: norm_alignment_score(pipe, prompts, num_images=num_images, alignment_step=low,
                                                         num_inference_steps=num_inference_steps, seed=seed))
            sign, what = 1, f"norm_alignment_score (weights 1, 2; alignment_step {low}; pure noise)"
        elif m == "attention_entropy":
            s, sec = _timed(lambda: cross_attention_entropy(pipe, prompts, num_images=num_images, steps=(0, 1),
                                                            **kw))
            sign, what = 1, "cross_attention_entropy, steps (0, 1)"
        else:
            raise ValueError(f"unknown detector {m!r}")
        s = sign * np.asarray(torch.as_tensor(s, dtype=torch.float64).cpu().numpy(), np.float64).reshape(P)
        st = roc_stats_or_nan(s, labels)
        rows.append({"detector": m, "what": what, "sign": sign, "auc": st["auc"], "tpr_at_1fpr": st["tpr_at_1fpr"],
                     "seconds_per_prompt": sec / P, "scores": s.tolist(), "fpr": st["fpr"], "tpr": st["tpr"]})
    return rows


def attribution(pipe, prompts: Sequence[str], triggers: Sequence[str], *, guidance_scale: float,
                num_inference_steps: int, num_images: int = 2, seed: int = 0,
                metrics: Sequence[str] = ("cfg", "score", "flipd"),
                wrt: Sequence[str] = ("hidden_states", "token_embeddings")) -> list[dict]:
    """Rank of the trigger token in :func:`mmh_fast.text.token_attributions` for
    each prompt, metric and ``wrt`` (the output hidden states, Wen et al.'s
    definition, and the input token embeddings, through the text encoder): rows
    (metric, wrt, top1, top3, seconds_per_prompt, ranks). A trigger absent from
    the attributed tokens (truncated) ranks last + 1."""
    from ..text import token_attributions

    out = []
    for m in metrics:
        for w in wrt:
            ranks = []
            t = time.perf_counter()
            for p, trig in zip(prompts, triggers):
                att = token_attributions(pipe, p, metric=m, num_images=num_images, seed=seed,
                                         guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                                         wrt=w)
                order = sorted(range(len(att)), key=lambda j: -att[j][1])
                toks = [att[j][0].strip().lower() for j in order]
                ranks.append(toks.index(trig) + 1 if trig in toks else len(toks) + 1)
            sec = time.perf_counter() - t
            r = np.asarray(ranks)
            out.append({"metric": m, "wrt": w, "top1": float((r == 1).mean()), "top3": float((r <= 3).mean()),
                        "seconds_per_prompt": sec / max(1, len(ranks)), "ranks": r.tolist()})
    return out


def digit_classifier(seed: int = 0):
    """A scikit-learn logistic-regression digit classifier on the 8x8 digits
    (the lab's stand-in for CLIP score); ``predict(images [B, 3, H, W] in [-1, 1])``
    average-pools the images back to 8x8."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    d = load_digits()
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(d.data / 16.0, d.target)

    def predict(images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, np.float32)
        g = (x.mean(1) + 1) / 2  # [B, H, W] in [0, 1]
        B, H, W = g.shape
        r = H // 8
        g8 = g.reshape(B, 8, r, 8, r).mean((2, 4))
        return clf.predict(g8.reshape(B, 64))

    return predict


def copy_and_alignment(images: np.ndarray, train_images: np.ndarray, digits: Sequence[int], predict) -> dict:
    """Copy rate (fraction of generations with calibrated l2 < 1/3) and alignment
    (fraction whose predicted digit is the caption's) of generations [P, n, ...]."""
    d, _ = copy_scores(images, train_images)
    P, n = images.shape[:2]
    pred = predict(images.reshape(P * n, *images.shape[2:])).reshape(P, n)
    return {"copy_rate": float((d < COPY_THRESHOLD).mean()),
            "alignment": float((pred == np.asarray(digits)[:, None]).mean()),
            "median_l2": float(np.median(d))}


def _embeds(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder output hidden states [N, L, D] of prompts, through diffusers' own encode_prompt."""
    e = pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]
    return e.detach()


def mitigation(pipe, prompts: Sequence[str], digits: Sequence[int], train_images: np.ndarray, *,
               guidance_scale: float, num_inference_steps: int, n: int = 4, seed: int = 0,
               attribution_metric: str = "cfg", gni_scales: Sequence[float] = (0.5, 1.0),
               opt_iters: int = 10, predict=None, methods: Sequence[str] | None = None) -> list[dict]:
    """Copy rate and alignment of the generations of ``prompts`` before and after each mitigation.

    Rows: ``none`` (the prompts as they are); ``mitigate:<rephraser>`` for each of
    :data:`mmh_fast.text.REPHRASERS` (k = 1 token, attributions by
    ``attribution_metric``, one new prompt per prompt); ``optimize_prompt_embedding``
    (A^CFG minimised, ``opt_iters`` AdamW steps); ``gni:<scale>``
    (:class:`mmh_fast.mitigations.GaussianNoiseInjection` on the prompt
    embeddings); ``rta``, ``cwr``, ``rna`` (the Somepalli et al. prompt transforms
    of :mod:`mmh_fast.mitigations`); ``sail`` (:func:`mmh_fast.text.generate_sail`,
    the paper's SAIL settings); ``attention_rescaling``
    (:func:`mmh_fast.text.generate_attention_rescaled`, C = 1.25, summary tokens
    masked); ``prompt_adaptation`` (:func:`mmh_fast.text.adapt_prompt_embedding`,
    ``opt_iters`` steps, t_low as the norm_alignment detector's, then the pipeline).
    Each row: copy_rate, alignment (digit classifier, the CLIP-score stand-in),
    median calibrated l2, seconds_per_prompt
    (the mitigation alone, generation excluded), and the new prompts where text.

    ``sail`` and ``attention_rescaling`` change the sampler itself, so their
    seconds include their own generation, and their images come from the
    library's DDIM sampler (latent n keyed by (seed, n), as :func:`mmh_fast.text.generate`)
    rather than from ``pipe(...)`` with generators ``seed + j`` as the other rows."""
    from ..mitigations import (CaptionWordRepeat, GaussianNoiseInjection, RandomNumberAddition,
                               RandomTokenAddition)
    from ..text import (REPHRASERS, adapt_prompt_embedding, generate_attention_rescaled, generate_sail, mitigate,
                        optimize_prompt_embedding)

    prompts = list(prompts)
    predict = predict or digit_classifier()
    gen = dict(n=n, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    rows = []

    def row(name, images, secs, new_prompts=None):
        r = {"method": name, **copy_and_alignment(images, train_images, digits, predict),
             "seconds_per_prompt": secs / max(1, len(prompts))}
        if new_prompts is not None:
            r["new_prompts"] = list(new_prompts)
        rows.append(r)

    want = methods or (["none"] + [f"mitigate:{r}" for r in REPHRASERS] + ["optimize_prompt_embedding"]
                       + [f"gni:{s:g}" for s in gni_scales] + ["rta", "cwr", "rna", "sail", "attention_rescaling",
                                                                 "prompt_adaptation"])
    sampler = dict(num_images=n, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, seed=seed)
    for name in want:
        if name == "none":
            row(name, generate_images(pipe, prompts, **gen), 0.0, prompts)
        elif name.startswith("mitigate:"):
            reph = name.split(":", 1)[1]
            new, sec = _timed(lambda: [mitigate(pipe, p, k=1, metric=attribution_metric, rephraser=reph, n=1,
                                                seed=seed, attribution_kwargs=dict(
                                                    num_images=2, guidance_scale=guidance_scale,
                                                    num_inference_steps=num_inference_steps))[0]
                                       for p in prompts])
            row(name, generate_images(pipe, new, **gen), sec, new)
        elif name == "optimize_prompt_embedding":
            emb, sec = _timed(lambda: torch.cat([optimize_prompt_embedding(
                pipe, p, metric="cfg", iters=opt_iters, num_images=1, seed=seed, guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps) for p in prompts]))
            row(name, generate_images(pipe, None, prompt_embeds=emb, **gen), sec)
        elif name.startswith("gni:"):
            scale = float(name.split(":", 1)[1])
            gni = GaussianNoiseInjection(scale, seed=seed, skip_first_token=True)
            emb, sec = _timed(lambda: gni(_embeds(pipe, prompts)))
            row(name, generate_images(pipe, None, prompt_embeds=emb, **gen), sec)
        elif name in ("rta", "cwr", "rna"):
            tf = {"rta": lambda: RandomTokenAddition(1, seed=seed, tokenizer=pipe.tokenizer),
                  "cwr": lambda: CaptionWordRepeat(1, seed=seed),
                  "rna": lambda: RandomNumberAddition(1, seed=seed)}[name]()
            new, sec = _timed(lambda: tf.apply(prompts))
            row(name, generate_images(pipe, new, **gen), sec, new)
        elif name in ("sail", "attention_rescaling"):
            fn = generate_sail if name == "sail" else generate_attention_rescaled
            imgs, sec = _timed(lambda: fn(pipe, prompts, **sampler))
            row(name, imgs.reshape(len(prompts), n, *imgs.shape[1:]).float().cpu().numpy(), sec)
        elif name == "prompt_adaptation":
            emb, sec = _timed(lambda: torch.cat([adapt_prompt_embedding(
                pipe, p, iters=opt_iters, num_images=1, seed=seed, num_inference_steps=num_inference_steps,
                alignment_step=_alignment_step(num_inference_steps))
                for p in prompts]))
            row(name, generate_images(pipe, None, prompt_embeds=emb, **gen), sec)
        else:
            raise ValueError(f"unknown mitigation {name!r}")
    return rows


def dataset_lid_star(images: np.ndarray, dataset_count, *, k: int) -> np.ndarray:
    """LID_* (:func:`mmh_fast.lpca`, rule "fo") of each distinct image [N, ...] in
    the dataset as it is, image i repeated ``dataset_count[i]`` times: [N] float64,
    the value at the first copy of each image."""
    from .. import lpca

    counts = np.asarray(dataset_count, np.int64)
    if counts.shape != (len(images),) or (counts < 1).any():
        raise ValueError(f"dataset_count must hold one count >= 1 per image ({len(images)}), got shape {counts.shape}")
    full = np.repeat(np.arange(len(images)), counts)
    flat = np.asarray(images, np.float32).reshape(len(images), -1)[full]
    lid = np.asarray(lpca(flat, k=k, progress=False), np.float64)
    starts = np.cumsum(counts) - counts  # row of each image's first copy in the expanded dataset
    return lid[starts]


def image_level(pipe, train_images: np.ndarray, captions: Sequence[str], kinds: Sequence[str],
                dataset_count: Sequence[int], *, t0: float = 0.05, lpca_k: int | None = None, seed: int = 0) -> dict:
    """Per training image (MMH paper Fig. 5, 6 at small scale): FLIPD with and
    without its caption (:func:`mmh_fast.flipd`), :func:`mmh_fast.text.cfg_norm_train`,
    LID_* by :func:`mmh_fast.lpca` on the dataset WITH its duplicates (a DD-Mem image's
    copies are its nearest neighbours, so with ``lpca_k`` below the copy count its
    LID_* is 0), :func:`mmh_fast.png_complexity`, and the
    :func:`mmh_fast.classify_memorization` class (LID_theta = FLIPD with the caption).

    Returns the columns and ``auc``: per signal, planted (dd/od) against generic,
    oriented so that high = memorized (FLIPD and LID_* negated)."""
    from .. import classify_memorization, flipd, png_complexity
    from ..text import cfg_norm_train

    x = torch.from_numpy(np.ascontiguousarray(train_images, dtype=np.float32))
    caps = list(captions)
    out = {}
    t = time.perf_counter()
    out["flipd_cond"] = flipd(pipe, x, t0, cond=caps).double().numpy()
    out["flipd_uncond"] = flipd(pipe, x, t0, cond="").double().numpy()
    out["cfg_norm_train"] = cfg_norm_train(pipe, x, caps).double().numpy()
    counts = np.asarray(dataset_count, np.int64)
    k = lpca_k or max(2, int(counts.max()) // 2)
    out["lid_star"] = dataset_lid_star(train_images, counts, k=k)
    out["png"] = png_complexity(x).astype(np.float64)
    try:
        cls = classify_memorization(torch.from_numpy(out["flipd_cond"]), torch.from_numpy(out["lid_star"]),
                                    scale="median_ratio", margin="mad")
        out["class"] = [str(c) for c in cls.labels]
        out["class_error"] = None
    except ValueError as exc:  # e.g. a zero median LID_*: reported, not hidden
        out["class"] = ["unclassified"] * len(x)
        out["class_error"] = str(exc)
    out["seconds"] = time.perf_counter() - t
    kinds = np.asarray(kinds)
    planted = np.isin(kinds, ["dd", "od"])
    out["auc"] = {name: roc_stats(sign * out[name], planted)["auc"]
                  for name, sign in (("flipd_cond", -1), ("flipd_uncond", -1), ("cfg_norm_train", 1),
                                     ("lid_star", -1), ("png", -1))}
    out["lpca_k"] = k
    return out
