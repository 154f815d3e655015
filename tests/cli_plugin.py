"""Test metrics for the CLI tests, registered through the public registry API.

Loaded with ``mmh-fast scan --plugin tests/cli_plugin.py`` (subprocess tests) or
imported (in-process tests). The library's own metrics (flipd, png, ...) are
tested with their estimators; these exercise the scan machinery with values a
test can recompute independently.
"""
import os
import time

import torch

from mmh_fast.cli.metrics import register_metric


@register_metric("mean_px", lower_is_memorized=False)
def mean_px(batch, ctx):
    """Mean of the decoded uint8 pixels."""
    return batch.pixels.double().mean(dim=(1, 2, 3))


@register_metric("eps_norm", needs_model=True)
def eps_norm(batch, ctx):
    """|eps(x, t)| of the model's UNet at the clean image, timestep round(t0 * 1000)."""
    unet = ctx.model.pipeline.unet
    x = batch.images
    t = torch.full((len(batch),), round(ctx.t0 * 1000), device=x.device)
    return unet(x, t).sample.double().flatten(1).norm(dim=1)


@register_metric("slow_px", lower_is_memorized=False, options=("sleep",))
def slow_px(batch, ctx):
    """mean_px after a pause (seconds from the option `sleep`), to kill a scan mid-way."""
    time.sleep(float(ctx.options.get("sleep", 0.2)))
    return batch.pixels.double().mean(dim=(1, 2, 3))


@register_metric("caption_len", needs_captions=True)
def caption_len(batch, ctx):
    """Length of the caption in characters."""
    return [len(c) for c in batch.captions]


@register_metric("oom_above_2")
def oom_above_2(batch, ctx):
    """Raises CUDA-style out-of-memory for batches above 2 images, else mean_px."""
    if len(batch) > 2:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return batch.pixels.double().mean(dim=(1, 2, 3))


@register_metric("fails_on_3")
def fails_on_3(batch, ctx):
    """Raises ValueError when the batch holds the key named by $MMH_TEST_BAD_KEY (default img003.png)."""
    bad = os.environ.get("MMH_TEST_BAD_KEY", "img003.png")
    if bad in batch.keys:
        raise ValueError(f"cannot handle {bad}")
    return batch.pixels.double().mean(dim=(1, 2, 3))


@register_metric("always_fails")
def always_fails(batch, ctx):
    """Raises on every batch."""
    raise RuntimeError("this metric is broken")


@register_metric("lid_table")
def lid_table(batch, ctx):
    """LID_theta read from the JSON file $MMH_TEST_LIDS ({key: value}): a model LID the test controls."""
    import json

    with open(os.environ["MMH_TEST_LIDS"]) as f:
        table = json.load(f)
    return [table[k] for k in batch.keys]


@register_metric("nan_for_key")
def nan_for_key(batch, ctx):
    """mean_px, but NaN for the key $MMH_TEST_BAD_KEY (default img003.png): a metric that returns a
    non-finite value without raising."""
    bad = os.environ.get("MMH_TEST_BAD_KEY", "img003.png")
    v = batch.pixels.double().mean(dim=(1, 2, 3))
    return torch.where(torch.tensor([k == bad for k in batch.keys]), torch.full_like(v, float("nan")), v)


@register_metric("nonfinite_error")
def nonfinite_error(batch, ctx):
    """Raises NonFiniteOutputError naming the position of key $MMH_TEST_BAD_KEY in the batch (as the
    library's estimators do for a NaN network output), else mean_px."""
    from mmh_fast.models.batching import NonFiniteOutputError

    bad = os.environ.get("MMH_TEST_BAD_KEY", "img003.png")
    if bad in batch.keys:
        raise NonFiniteOutputError("the test network's output", [batch.keys.index(bad)])
    return batch.pixels.double().mean(dim=(1, 2, 3))


@register_metric("per_image_px", lower_is_memorized=False, per_image=True)
def per_image_px(batch, ctx):
    """mean_px, run one image per call (as a slow metric like nb): progress after each image."""
    assert len(batch) == 1
    return batch.pixels.double().mean(dim=(1, 2, 3))
