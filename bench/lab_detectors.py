#!/usr/bin/env python
"""The issue-16 detectors and mitigations on the quick memorization lab
(tests/data/lab_quick), through the public API: detection AUC / TPR at 1% FPR
of the planted DD/OD-Mem prompts against the held-out ones, and copy rate /
digit alignment of the planted prompts' generations before and after each
mitigation. Prints the tables the README reports (about 6 minutes on 1 thread).

    .venv/bin/python bench/lab_detectors.py
"""
import tempfile
import time

import numpy as np
import torch

from mmh_fast import lab as mlab
from mmh_fast import text
from mmh_fast.lab.measure import copy_and_alignment, digit_classifier, roc_stats

KW = dict(num_inference_steps=20, seed=0)  # the quick lab's grid
GUIDANCE = 3.0  # the guidance at which the quick lab's ground truth was verified
N = 4


def main():
    torch.set_num_threads(1)
    lab = mlab.load_checkpoint("tests/data/lab_quick", tempfile.mkdtemp(prefix="lab_detectors_"))
    pipe = lab.load_pipeline()
    rows = lab.prompts()
    planted = [p for p in rows if p["kind"] in ("dd", "od")]
    pos = [p["prompt"] for p in planted]
    neg = [p["prompt"] for p in rows if p["kind"] == "heldout"]
    prompts, labels = pos + neg, np.array([1] * len(pos) + [0] * len(neg))
    g = dict(guidance_scale=GUIDANCE, **KW)
    detectors = {
        "cfg_norm steps (0, 1), 4 images": lambda: text.cfg_norm(pipe, prompts, num_images=N, **g),
        "hessian_score_difference_norm, 4 images": lambda: text.hessian_score_difference_norm(
            pipe, prompts, num_images=N, **g),
        "cross_attention_entropy, 1 image": lambda: text.cross_attention_entropy(pipe, prompts, **g),
        "cross_attention_entropy, 4 images": lambda: text.cross_attention_entropy(pipe, prompts, num_images=N, **g),
        "norm_alignment_score, 1 image": lambda: text.norm_alignment_score(pipe, prompts, **KW),
        "norm_alignment_score, 4 images": lambda: text.norm_alignment_score(pipe, prompts, num_images=N, **KW),
        "alignment term alone, 4 images": lambda: text.norm_alignment_score(
            pipe, prompts, num_images=N, norm_weight=0.0, alignment_weight=1.0, **KW),
    }
    print("| detector | AUC | TPR at 1% FPR | ms per prompt |")
    for name, fn in detectors.items():
        t = time.perf_counter()
        s = torch.as_tensor(fn()).double().numpy()
        sec = time.perf_counter() - t
        st = roc_stats(s, labels)
        print(f"| {name} | {st['auc']:.3f} | {st['tpr_at_1fpr']:.3f} | {1000 * sec / len(prompts):.0f} |", flush=True)

    digits = [int(p["digit"]) for p in planted]
    train, predict = lab.train_images(), digit_classifier()

    def adapted():
        embs = torch.cat([text.adapt_prompt_embedding(pipe, p, iters=10, **KW) for p in pos])
        return text.generate(pipe, embs, num_images=N, **g)

    mitigations = {
        "none (text.generate)": lambda: text.generate(pipe, pos, num_images=N, **g),
        "generate_sail (paper settings)": lambda: text.generate_sail(pipe, pos, num_images=N, **g),
        "generate_attention_rescaled (C 1.25, summary masked)": lambda: text.generate_attention_rescaled(
            pipe, pos, num_images=N, **g),
        "adapt_prompt_embedding (10 steps) + generate": adapted,
    }
    print("| mitigation | copy rate | alignment | s per prompt |")
    for name, fn in mitigations.items():
        t = time.perf_counter()
        imgs = fn()
        sec = time.perf_counter() - t
        r = copy_and_alignment(imgs.reshape(len(pos), N, *imgs.shape[1:]).numpy(), train, digits, predict)
        print(f"| {name} | {r['copy_rate']:.3f} | {r['alignment']:.3f} | {sec / len(pos):.2f} |", flush=True)


if __name__ == "__main__":
    main()
