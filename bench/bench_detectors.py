"""The 2024-2026 detectors of issue 16 in units of one UNet forward pass.

Each detector runs on the same (prompt, image) rows as the anchor: ONE
conditional UNet forward pass on those rows (embeddings and latents prepared
beforehand). ``forward_passes`` = our CPU time / the anchor's, both on one
torch thread, best of ABBA-interleaved runs: the cost of a detector per
(prompt, image) in forward passes (one-step cfg_norm is one two-branch call,
so about 2). Process CPU time, not wall time: on a machine shared with other
jobs (load 10+ on 2 cores when this was written) wall-time ratios moved by
10x between runs, CPU time does not see the other processes.
``forward_passes_wall`` is the same ratio in wall time, and the plain
``ratio`` of :func:`_harness.compare` is stored too, for bench/check.py.

Tiny Stable Diffusion pipeline of mmh_fast.testing on the CPU (16 x 16 images,
4 x 8 x 8 latents), the papers' settings otherwise (maps at the last DDIM step
with 16 probes; k = 8 Ritz values; SAIL 10 Adam steps). quick: 2 prompts x
2 images, 20-step DDIM grid (the maps' trajectory is 20 steps long); full: 8
prompts x 2 images, 50 steps.

    python -m pytest bench/bench_detectors.py -q -o addopts= --benchmark-enable --benchmark-only
"""
import time

import pytest
import torch

from _harness import compare
from bench_text import PROMPTS, _tiny, interleaved_ratio
from mmh_fast.models.pipelines import encode_prompts
from mmh_fast.models.sampling import ddim_grid, sample_noise
from mmh_fast.text import (cfg_norm, cross_attention_entropy, curvature_difference_map, hessian_eigenvalues,
                           hessian_score_difference_norm, norm_alignment_score, optimize_initial_noise,
                           score_difference_map)

NUM_IMAGES = 2

DETECTORS = {  # name -> fn(pipe, prompts, num_inference_steps)
    "cfg_norm one step": lambda p, pr, n: cfg_norm(p, pr, num_images=NUM_IMAGES, num_inference_steps=n),
    "norm_alignment_score": lambda p, pr, n: norm_alignment_score(p, pr, num_images=NUM_IMAGES,
                                                                  num_inference_steps=n),
    "hessian_score_difference_norm": lambda p, pr, n: hessian_score_difference_norm(
        p, pr, num_images=NUM_IMAGES, num_inference_steps=n),
    "cross_attention_entropy": lambda p, pr, n: cross_attention_entropy(p, pr, num_images=NUM_IMAGES,
                                                                        num_inference_steps=n),
    "hessian_eigenvalues k=8": lambda p, pr, n: hessian_eigenvalues(p, pr, k=8, num_images=NUM_IMAGES,
                                                                    num_inference_steps=n),
    "score_difference_map": lambda p, pr, n: score_difference_map(p, pr, num_images=NUM_IMAGES,
                                                                  num_inference_steps=n),
    "curvature_difference_map": lambda p, pr, n: curvature_difference_map(p, pr, num_images=NUM_IMAGES,
                                                                          num_inference_steps=n),
    "SAIL optimize_initial_noise": lambda p, pr, n: optimize_initial_noise(p, pr, num_images=NUM_IMAGES,
                                                                           num_inference_steps=n),
}


def cpu_ratio(ours, anchor, rounds: int) -> float:
    """min CPU seconds of ours / min of anchor, one torch thread, ABBA order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    best = {"o": float("inf"), "a": float("inf")}
    try:
        for r in range(rounds):
            order = [("a", anchor), ("o", ours)]
            for which, fn in (order if r % 2 == 0 else order[::-1]):
                t0 = time.process_time()
                fn()
                best[which] = min(best[which], time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    return best["o"] / best["a"]


@pytest.fixture(scope="module")
def pipe():
    return _tiny()


def _one_forward(pipe, prompts, num_images):
    """The unit: one conditional UNet forward on every (prompt, image) row."""
    e = encode_prompts(pipe, list(prompts))
    rows = len(prompts) * num_images
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    x = sample_noise((rows, c, s, s), seed=0, device=e.device, dtype=e.dtype)
    ehs = e.repeat_interleave(num_images, 0)
    t = torch.full((rows,), float(ddim_grid(pipe.scheduler, 50).timesteps[0]), device=e.device)

    @torch.no_grad()
    def call():
        return pipe.unet(x, t, encoder_hidden_states=ehs).sample

    return call


@pytest.mark.tier("quick", "full")
@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_cost_in_forward_passes(benchmark, pipe, tier, name):
    prompts = PROMPTS[:2] if tier != "full" else PROMPTS
    steps = 20 if tier != "full" else 50
    fn = DETECTORS[name]
    call = _one_forward(pipe, prompts, NUM_IMAGES)
    reps = 10  # sustained anchor calls: one call's best case alone would flatter the unit

    def anchor():
        for _ in range(reps):
            call()

    def ours():
        return fn(pipe, prompts, steps)

    rounds = 2 if tier == "full" else 1
    compare(benchmark, ours, anchor, anchor_name=f"{reps} one-branch UNet forwards on the same rows",
            rounds=rounds, warmup=0, prompts=len(prompts), num_images=NUM_IMAGES, num_inference_steps=steps)
    benchmark.extra_info["forward_passes"] = reps * cpu_ratio(ours, anchor, 2 * rounds)
    benchmark.extra_info["forward_passes_wall"] = reps * interleaved_ratio(ours, anchor, rounds)
    benchmark.extra_info["seconds_per_prompt"] = benchmark.extra_info["ours_s"] / len(prompts)
