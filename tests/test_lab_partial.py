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


# ----------------------------------------------------------------------------- the trained variant

# Settings of the fast check: 2 generations per prompt, 8 held-out baseline prompts, the maps at
# DDIM step index 4 of the lab's 20 (the last step, the paper's setting, localises much worse on
# this model: README, "Partial copies"; it is measured by `mmh-fast lab`, not here, to keep the
# suite fast). Measured on the committed checkpoint (float32, 1 thread), values in the comments;
# the thresholds leave room for BLAS / platform differences.
N_GEN, N_BASELINE, STEP = 2, 8, 4
# 20 of the 24 partial prompts copy their patch in some generation; 33 of 48 generations (0.69).
# Over 48 generations a rate of 0.69 has a binomial standard error of about 0.07: 0.45 is > 3 of them below.
PROMPTS_COPYING_MIN = 14
REGION_COPY_RATE_MIN = 0.45
# Held-out prompts (no rare word) never reproduce any patch: 0 of 96 (prompt, generation, plant) checks.
BASELINE_COPY_RATE_MAX = 0.02
# Mean AUC of the maps against the pasted-region mask: curvature difference 0.865, score difference
# 0.865 (no map below 0.5 for curvature, 1 of 48 for score); the held-out baseline against the same
# masks 0.538 and 0.501 (chance 0.5). 48 maps whose AUCs spread by about 0.1 give a standard error of
# ~0.015 on the mean, so 0.75 sits far below the measurement and far above chance.
MAP_AUC_MIN = 0.75
MAP_AUC_OVER_BASELINE_MIN = 0.2
BASELINE_AUC_BAND = (0.4, 0.6)


@pytest.fixture(scope="module")
def partial_lab(tmp_path_factory):
    lab = mlab.load_checkpoint(CKPT, tmp_path_factory.mktemp("lab_partial"))
    return lab, lab.load_pipeline()


def _check_measurement(m):
    s = m["summary"]
    assert s["prompts_with_region_copy"] >= PROMPTS_COPYING_MIN, s
    assert s["region_copy_rate"] >= REGION_COPY_RATE_MIN, s
    assert s["baseline_region_copy_rate"] <= BASELINE_COPY_RATE_MAX, s
    # copies are close in pixels too, not only by the calibrated ratio
    assert s["median_region_rms"] < 0.5 * s["baseline_median_region_rms"], s
    for r in m["localization"]:
        assert r["auc"] >= MAP_AUC_MIN, r
        assert r["auc"] - r["baseline_auc"] >= MAP_AUC_OVER_BASELINE_MIN, r
        assert BASELINE_AUC_BAND[0] <= r["baseline_auc"] <= BASELINE_AUC_BAND[1], r
        assert r["iou"] > s["chance_iou"] and r["baseline_iou"] < r["iou"], r


def test_checkpoint_tables_hold_the_patches(partial_lab):
    lab, _ = partial_lab
    data, extra = make_partial_data(seed=0)
    rows = lab.train()
    images = lab.train_images()  # decoded from the stored PNGs
    assert [r["key"] for r in rows] == data.keys and [r["caption"] for r in rows] == data.captions
    assert lab.record["variant"] == "partial" and lab.record["partial"] == PartialConfig().to_dict()
    for j, r in enumerate(rows):
        if r["plant"] < 0:
            assert r["mask_box"] is None
            continue
        k = r["plant"]
        assert r["mask_box"] == extra["boxes"][k].tolist()
        rr, cc, h, w = r["mask_box"]
        # 8-bit PNG rounding is per pixel, so every host's region equals the first host's exactly
        first = next(i for i, q in enumerate(rows) if q["plant"] == k)
        assert np.array_equal(images[j, :, rr:rr + h, cc:cc + w], images[first, :, rr:rr + h, cc:cc + w])
        assert np.abs(images[j, :, rr:rr + h, cc:cc + w] - extra["patches"][k]).max() <= 1 / 127.5
    masks = [p for p in lab.prompts() if p["kind"] == "partial"]
    assert len(masks) == 24 and all(p["mask_box"] == extra["boxes"][p["plant"]].tolist() for p in masks)


def test_partial_prompts_copy_their_patch_and_the_maps_find_it(partial_lab):
    lab, pipe = partial_lab
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = measure_partial(lab, pipe, n=N_GEN, max_baseline=N_BASELINE, steps=(STEP,))
    finally:
        torch.set_num_threads(n)
    assert {r["map"] for r in m["localization"]} == {"curvature_difference", "score_difference"}
    _check_measurement(m)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMH_FAST_LAB_RETRAIN") != "1",
                    reason="retrains the partial-copy lab from scratch (11-18 min on the shared 2-core machine); "
                           "set MMH_FAST_LAB_RETRAIN=1")
def test_partial_lab_retrains(tmp_path):
    n = torch.get_num_threads()
    try:
        lab = build_partial(tmp_path / "lab", seed=0, threads=1, progress=False)
        # a second call reuses the directory instead of training again
        assert build_partial(tmp_path / "lab", seed=0, progress=False).record == lab.record
        torch.set_num_threads(1)
        m = measure_partial(lab, n=N_GEN, max_baseline=N_BASELINE, steps=(STEP,))
    finally:
        torch.set_num_threads(n)
    _check_measurement(m)


@pytest.mark.parametrize("bad", [dict(partial="yes"), dict(keyed=1)])
def test_run_lab_switches_must_be_bool(tmp_path, bad):
    from mmh_fast.lab import run_lab

    with pytest.raises(TypeError, match=f"{next(iter(bad))} must be True or False"):
        run_lab(tmp_path / "lab", size="quick", progress=False, **bad)
    assert not (tmp_path / "lab").exists()  # refused before anything was built


@pytest.mark.parametrize("bad, match", [(dict(n=0), "n must be an integer >= 1"),
                                        (dict(max_baseline=1.5), "max_baseline must be an integer"),
                                        (dict(steps=()), "steps must be a non-empty sequence"),
                                        (dict(steps=(4.0,)), "steps must be a non-empty sequence")])
def test_measure_partial_rejects_bad_arguments(partial_lab, bad, match):
    lab, pipe = partial_lab
    with pytest.raises(ValueError, match=match):
        measure_partial(lab, pipe, **bad)


def test_measure_partial_needs_a_partial_lab(tmp_path):
    quick = mlab.load_checkpoint(QUICK_CKPT, tmp_path / "quick")
    with pytest.raises(ValueError, match="no partial prompts"):
        measure_partial(quick, n=1)
