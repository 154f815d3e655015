"""`mmh-fast scan` overhead: a scan of a small image folder with the toy model
against the metric's model time alone on the same images, pre-decoded in memory
(issue 7: the scan's wall time within 15% of the model time alone).

The scan includes everything a user waits for once the process is up: listing
the folder, loading the model, DataLoader workers decoding PNGs, the metric,
Parquet parts, the merge. The anchor loads the same model and calls the metric
on ready tensors in the same batches, with the same number of model threads:
the difference is what I/O, decoding and bookkeeping add. The metric is flipd (one probe)
when the library has it, else a stand-in of the same cost class: one forward
and one VJP through the toy UNet per image.

    python -m pytest bench/bench_scan.py -o addopts= --benchmark-enable --benchmark-only
"""
import itertools
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

from _harness import compare
from mmh_fast.cli.loader import load_model
from mmh_fast.cli.metrics import MetricBatch, MetricContext, available_metrics, get_metric, register_metric
from mmh_fast.cli.scan import ScanConfig, _cpus, run_scan
from mmh_fast.cli.sources import decode_image, sample_id

if "bench_vjp" not in available_metrics():
    @register_metric("bench_vjp", needs_model=True)
    def bench_vjp(batch, ctx):
        """One forward and one VJP of the UNet per image: flipd's cost with one probe."""
        unet = ctx.model.pipeline.unet
        x = batch.images.detach().requires_grad_(True)
        t = torch.full((len(batch),), round(ctx.t0 * 1000), device=x.device)
        eps = unet(x, t).sample
        v = torch.ones_like(eps)
        (g,) = torch.autograd.grad(eps, x, v)
        return (g * v).flatten(1).sum(1).double() + eps.detach().flatten(1).pow(2).sum(1).double()

SIZES = {"quick": 128, "full": 1024, "gpu": 1024}
BATCH = 16


@pytest.fixture(scope="module")
def folder(tier):
    d = tempfile.mkdtemp(prefix="bench_scan_")
    rng = np.random.default_rng(0)
    for i in range(SIZES[tier]):
        base = rng.normal(size=(4, 4, 3))
        img = np.kron(base, np.ones((8, 8, 1))) + 0.3 * rng.normal(size=(32, 32, 3))
        Image.fromarray(np.clip(127.5 + 40 * img, 0, 255).astype(np.uint8)).save(f"{d}/{i:05d}.png")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_scan_vs_model_alone(benchmark, folder, tier):
    metric = "flipd" if "flipd" in available_metrics() else "bench_vjp"
    device = "cuda" if tier == "gpu" else "cpu"
    workers = 1 if device == "cpu" else 4
    threads = max(1, _cpus() - workers) if device == "cpu" else torch.get_num_threads()
    out_root = tempfile.mkdtemp(prefix="bench_scan_out_")
    counter = itertools.count()

    def scan():
        cfg = ScanConfig(data=folder, out=os.path.join(out_root, str(next(counter))), model="toy-ddpm",
                         metrics=[metric], batch_size=BATCH, device=device, workers=workers, quiet=True)
        stats = run_scan(cfg)
        assert stats.rows == SIZES[tier] and stats.errors == 0

    # the anchor: the model loaded and the metric run on the decoded images, same batches, same threads
    names = sorted(os.listdir(folder))
    pixels = torch.from_numpy(np.stack([decode_image(os.path.join(folder, n), 32)[0] for n in names]))
    ids = torch.tensor([sample_id(n) for n in names])
    fn = get_metric(metric).fn

    def model_alone():
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model = load_model("toy-ddpm", device=torch.device(device), dtype=torch.float32)
            ctx = MetricContext(model=model, device=torch.device(device))
            for s in range(0, len(names), BATCH):
                mb = MetricBatch(pixels[s:s + BATCH], names[s:s + BATCH], [None] * len(names[s:s + BATCH]),
                                 ids[s:s + BATCH], torch.device(device))
                fn(mb, ctx).detach().cpu()
        finally:
            torch.set_num_threads(saved)

    try:
        compare(benchmark, scan, model_alone, anchor_name=f"{metric} alone on decoded images", rounds=3,
                target="scan wall time <= 1.15 x model time alone (ratio <= 1.15)", images=SIZES[tier],
                metric=metric, batch_size=BATCH, workers=workers, model_threads=threads)
    finally:
        shutil.rmtree(out_root, ignore_errors=True)
