"""Side-by-side timing: ours under pytest-benchmark, the anchor with the same
rounds in the same process, the ratio recorded for the regression checker."""
from __future__ import annotations

import gc
import time
from typing import Any, Callable

__all__ = ["best_time", "compare", "manifold_data", "peak_rss_delta_mib", "sd15_scheduler", "sd15_text_encoder",
           "sd15_unet"]


def best_time(fn: Callable[[], Any], rounds: int = 3, warmup: int = 1) -> float:
    """Minimum wall time of ``rounds`` calls after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def compare(benchmark, ours: Callable[[], Any], anchor: Callable[[], Any] | None, *, anchor_name: str,
            rounds: int = 3, warmup: int = 1, target: str | None = None, **extra) -> Any:
    """Time ``ours`` with pytest-benchmark and ``anchor`` with :func:`best_time`.

    Stores in ``benchmark.extra_info``: ``anchor`` (name), ``anchor_s`` and
    ``ours_s`` (minimum seconds), ``ratio`` = ours_s / anchor_s (lower is
    better: the quantity bench/check.py tracks), ``speedup`` = 1 / ratio, the
    issue's ``target`` as text, and any ``extra`` values. Returns ours' result.
    """
    result = benchmark.pedantic(ours, rounds=rounds, warmup_rounds=warmup, iterations=1)
    ours_s = float(benchmark.stats.stats.min)
    info = {"anchor": anchor_name, "ours_s": ours_s}
    if anchor is not None:
        anchor_s = best_time(anchor, rounds=rounds, warmup=warmup)
        info.update(anchor_s=anchor_s, ratio=ours_s / anchor_s, speedup=anchor_s / ours_s)
    if target:
        info["target"] = target
    info.update(extra)
    benchmark.extra_info.update(info)
    return result


def peak_rss_delta_mib(fn: Callable[[], Any]) -> float:
    """Growth of the process's peak resident set while running ``fn`` (MiB).

    Linux ru_maxrss is a high-water mark, so this measures how far ``fn``
    pushes the peak above what the process had already reached."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0


def manifold_data(n, D, seed=0, noise=0.01):
    """Half the points on a 5-sphere, half on a 10-dim linear patch, both in
    random subspaces of R^D, plus isotropic noise (float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n // 2, 6))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = rng.uniform(-1, 1, size=(n - n // 2, 10))
    ra = np.linalg.qr(rng.normal(size=(D, 6)))[0]
    rb = np.linalg.qr(rng.normal(size=(D, 10)))[0]
    x = np.concatenate([a @ ra.T, b @ rb.T + 5.0]) + noise * rng.normal(size=(n, D))
    return x.astype(np.float32)


def sd15_unet(seed: int = 0):
    """A UNet2DConditionModel with Stable Diffusion 1.5's shapes (860M
    parameters), random weights after ``torch.manual_seed(seed)``, float32 on
    the CPU (nothing downloaded). The global torch generator is left where the
    UNet's initialisation put it, so models built after it are seeded too."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sd15_text_encoder():
    """(tokenizer, text encoder): a small byte-level CLIP tokenizer (77 tokens)
    and a CLIPTextModel with SD-1.5's shapes (12 layers, width 768, 123M
    parameters), random weights from the global torch generator, float32 on
    the CPU (nothing downloaded)."""
    import tempfile

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mmh_fast.testing import write_tiny_clip_tokenizer

    tdir = tempfile.mkdtemp(prefix="mmh_sd15_tok_")
    write_tiny_clip_tokenizer(tdir)
    tok = CLIPTokenizer.from_pretrained(tdir, model_max_length=77)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok, CLIPTextModel(cfg)


def sd15_scheduler():
    """SD-1.5's DDIM scheduler configuration."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
