"""The score-geometry detectors (issue 16) on a UNet that runs out of memory
above a batch size: each halves its chunk, warns once, and returns what the
unchunked call returns (the latents are keyed per row, so chunking must not
change a value)."""
import pytest
import torch

from mmh_fast.text import (cross_attention_entropy, curvature_difference_map, generate_attention_rescaled,
                           generate_sail, hessian_eigenvalues, hessian_score_difference_norm, norm_alignment_score,
                           optimize_initial_noise, score_difference_map)
from text_fixtures import tiny_sd

PROMPTS = ["a red car", "a dog", "the blue sky"]
KW = dict(num_images=2, num_inference_steps=4, seed=3)

CALLS = {
    "hessian_score_difference_norm": lambda p: hessian_score_difference_norm(p, PROMPTS, steps=(0, 2), **KW),
    "hessian_eigenvalues": lambda p: hessian_eigenvalues(p, PROMPTS, k=2, **KW),
    "norm_alignment_score": lambda p: norm_alignment_score(p, PROMPTS, alignment_step=1, **KW),
    "cross_attention_entropy": lambda p: cross_attention_entropy(p, PROMPTS, steps=(0, 2), **KW),
    "curvature_difference_map": lambda p: curvature_difference_map(p, PROMPTS, step=1, n_probes=2, **KW),
    "score_difference_map": lambda p: score_difference_map(p, PROMPTS, step=1, **KW),
    "optimize_initial_noise": lambda p: optimize_initial_noise(p, PROMPTS, max_steps=2, **KW).latents,
    "generate_sail": lambda p: generate_sail(p, PROMPTS, max_steps=1, output="latents", **KW),
    "generate_attention_rescaled": lambda p: generate_attention_rescaled(p, PROMPTS, output="latents", **KW),
}


def _oom_above(pipe, limit: int) -> list:
    """A forward pre-hook on the pipeline's own UNet (its attention processors stay visible to the
    cross-attention detectors): out of memory, as CUDA raises it, on more than ``limit`` rows.
    Returns the list of row counts it let through."""
    calls = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows (fake)")
        calls.append(int(x.shape[0]))

    pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize("name", sorted(CALLS))
def test_geometry_detectors_halve_on_oom_and_equal_the_unchunked_call(name):
    ref = CALLS[name](tiny_sd(dtype=torch.float64))
    pipe = tiny_sd(dtype=torch.float64)  # a new pipeline per call (same weights)
    calls = _oom_above(pipe, 4)  # 6 rows x 2 branches = 12 UNet rows unchunked
    with pytest.warns(UserWarning, match="out of memory"):
        got = CALLS[name](pipe)
    assert calls and max(calls) <= 4
    # float64 sums in another order per chunk: ~1e-16 per op (as in test_text_batching)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
