"""The partial-copy lab (mmh_fast.lab.partial): memorized regions pasted into
varied images, the ground truth for the memorization maps' localisation.

Data tests need no model. The trained-variant tests load the committed
float16 checkpoint tests/data/lab_partial (rebuild command in its
CHECKPOINT.txt) and check, by generation, that the partial prompts reproduce
their patch and that the maps find it. ``test_partial_lab_retrains`` trains it
from scratch (slow; set MMH_FAST_LAB_RETRAIN=1).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmh_fast import lab as mlab
from mmh_fast.lab.data import make_data, png_bytes, upscale
from mmh_fast.lab.partial import (PartialConfig, box_mask, build_partial, make_partial_data, measure_partial,
                                  region_copy_scores)
from mmh_fast.lab.training import LabConfig

CKPT = Path(__file__).parent / "data" / "lab_partial"
QUICK_CKPT = Path(__file__).parent / "data" / "lab_quick"


@pytest.fixture(scope="module")
def pdata():
    return make_partial_data(seed=0)


# ----------------------------------------------------------------------------- data (no model)

def test_pasted_region_equals_the_patch_and_nothing_else_changes(pdata):
    from sklearn.datasets import load_digits

    data, extra = pdata
    x8 = load_digits().images
    pc = PartialConfig()
    kinds = np.array(data.kinds)
    assert (kinds == "partial").sum() == pc.n_plants * pc.hosts
    for j in np.flatnonzero(kinds == "partial"):
        k = extra["train_plant"][j]
        r, c, h, w = extra["boxes"][k]
        img = data.images[j]
        assert np.array_equal(img[:, r:r + h, c:c + w], extra["patches"][k])
        # outside the box the host digit is untouched: the image is otherwise varied
        host = upscale(x8[[int(data.keys[j].split("digit")[1])]], 16)[0]
        out = ~extra["masks"][k]
        assert np.array_equal(img[:, out], host[:, out])
        assert data.captions[j].split()[-1] == data.words[-pc.n_plants + k]
    # the PNG written to train.parquet keeps the region exactly (8-bit rounding is per pixel)
    j = int(np.flatnonzero(kinds == "partial")[0])
    from PIL import Image
    import io

    a = np.asarray(Image.open(io.BytesIO(png_bytes(data.images[j]))), np.float32) / 127.5 - 1
    p = np.asarray(Image.open(io.BytesIO(png_bytes(np.repeat(extra["patches"][0][:1], 3, 0)))), np.float32) / 127.5 - 1
    assert np.array_equal(a[:8, :8], p)


def test_masks_are_the_latent_aligned_boxes(pdata):
    data, extra = pdata
    pc = PartialConfig()
    for k, (r, c, h, w) in enumerate(extra["boxes"]):
        m = extra["masks"][k]
        assert m.sum() == h * w == pc.patch ** 2
        assert m[r:r + h, c:c + w].all()
        assert np.array_equal(m, box_mask((r, c, h, w), 16))
        # the lab's VAE down-samples by 4: the box is whole latent cells
        assert r % 4 == 0 and c % 4 == 0 and h % 4 == 0 and w % 4 == 0
    # four plants in four different quadrants
    assert len({tuple(b[:2]) for b in extra["boxes"][:4]}) == 4
    # patches hold strokes, not background (> 25% of the window inked above mid-gray)
    assert all((p[0] > 0).mean() > 0.25 for p in extra["patches"])


def test_partial_prompts_triggers_and_quick_data_unchanged(pdata):
    data, extra = pdata
    cfg = LabConfig.for_size("quick")
    quick = make_data(n_dd=cfg.n_dd, dd_copies=cfg.dd_copies, n_od=cfg.n_od, od_boost=cfg.od_boost,
                      n_generic=cfg.n_generic, image_size=cfg.image_size, seed=0)
    n0 = len(quick.keys)
    assert data.keys[:n0] == quick.keys and data.captions[:n0] == quick.captions
    assert np.array_equal(data.images[:n0], quick.images)
    assert data.prompts[:len(quick.prompts)] == quick.prompts
    part = [(p, k) for p, k in zip(data.prompts, extra["prompt_plant"]) if p["kind"] == "partial"]
    pc = PartialConfig()
    assert len(part) == pc.n_plants * pc.prompts_per_plant
    host_caps = {}
    for cap, k in zip(data.captions, extra["train_plant"]):
        host_caps.setdefault(int(k), set()).add(cap)
    for p, k in part:
        # the trigger word is in this plant's hosts' captions and in no other caption
        assert all(p["trigger"] in c.split() for c in host_caps[k])
        assert not any(p["trigger"] in c.split() for kk, cs in host_caps.items() if kk != k for c in cs)
        assert (p["prompt"] in host_caps[k]) == (p["split"] == "train")
        assert set(p["train_keys"]) == {key for key, t in zip(data.keys, extra["train_plant"]) if t == k}
    # the recipe is the quick lab's, as stored with the committed quick checkpoint
    with open(QUICK_CKPT / "build.json") as f:
        assert json.load(f)["config"] == cfg.to_dict()


def test_region_copy_scores_against_brute_force():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (80, 3, 16, 16)).astype(np.float32)
    box = (8, 0, 8, 8)
    patch = train[3, :, 8:16, 0:8].copy()
    train[10:20, :, 8:16, 0:8] = patch  # ten hosts share the patch: it counts once
    gen = rng.uniform(-1, 1, (3, 3, 16, 16)).astype(np.float32)
    gen[0, :, 8:16, 0:8] = patch  # an exact copy
    gen[1, :, 8:16, 0:8] = patch + 0.05 * rng.standard_normal(patch.shape).astype(np.float32)
    s = region_copy_scores(gen, train, box, patch)
    regions = np.unique(train[:, :, 8:16, 0:8].reshape(80, -1), axis=0)
    assert len(regions) == 70  # rows 3 and 10..19 share one region
    for i in range(3):
        d = np.sqrt(((regions - gen[i, :, 8:16, 0:8].reshape(-1)) ** 2).sum(1))
        srt = np.sort(d)
        want = 0.0 if srt[0] == 0 else srt[0] / (0.5 * srt[:50].mean())
        assert s["cal_l2"][i] == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert s["rms"][i] == pytest.approx(np.sqrt(((gen[i, :, 8:16, 0:8] - patch) ** 2).mean()), rel=1e-5)
    assert s["copied"].tolist() == [True, True, False]
    assert s["nearest_is_patch"].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="patch is not one of"):
        region_copy_scores(gen, train, box, patch + 3)


def test_build_partial_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="seed must be an int"):
        build_partial(tmp_path, seed="0")
    with pytest.raises(ValueError, match="partial.patch"):
        make_partial_data(seed=0, partial=PartialConfig(patch=9))
