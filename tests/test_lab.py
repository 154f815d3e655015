"""The memorization lab (mmh_fast.lab): a trained diffusers text-to-image
model that really memorizes, checked against its own training set.

The quick lab is too slow to train inside the suite on the shared 2-core
machine (about 15-25 minutes), so its weights are committed under
tests/data/lab_quick (float16, with the command that built them in
CHECKPOINT.txt); the session fixture turns them into an ordinary lab and
verifies the ground truth again by generation. ``test_quick_lab_retrains``
rebuilds it from scratch (slow; set MMH_FAST_LAB_RETRAIN=1).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmh_fast import lab as mlab
from mmh_fast.lab.data import make_data, vocabulary, write_tokenizer
from mmh_fast.lab.measure import copy_and_alignment, digit_classifier, mitigation, roc_stats
from mmh_fast.lab.run import verify

CKPT = Path(__file__).parent / "data" / "lab_quick"

# Thresholds, each measured on the committed checkpoint (loaded in float32, 1 thread,
# guidance 3, 20 DDIM steps, 4 generations per prompt) and then given a margin for
# BLAS / platform differences; the measured value is in each comment.
# 29 of the 30 planted prompts copy their image (DD 19/20, OD 10/10): 0.967.
PLANTED_MEMORIZED_MIN = 0.8
# 1 of the 240 held-out prompts copies a training image (its min calibrated l2 0.23): 0.004.
HELDOUT_MEMORIZED_MAX = 0.02
# One-step cfg_norm, verified-memorized planted vs held-out prompts: AUC 0.925
# (Wen et al. report 0.960 on Stable Diffusion; chance is 0.5).
CFG_NORM_AUC_MIN = 0.85
# Digit-classifier agreement with the caption's digit (chance 0.1): 1.0 before
# mitigation, 0.75 after mitigate(drop), 1.0 after random number addition.
ALIGNMENT_MIN = 0.5
N_ATTRIBUTION = 8
N_MITIGATION = 8


@pytest.fixture(scope="session")
def quick_model(tmp_path_factory):
    """The committed quick lab loaded, without the ground-truth check (seconds, not minutes)."""
    lab = mlab.load_checkpoint(CKPT, tmp_path_factory.mktemp("lab_quick"))
    prompts = lab.prompts()
    return dict(lab=lab, pipe=lab.load_pipeline(), prompts=prompts, kinds=np.array([p["kind"] for p in prompts]))


@pytest.fixture(scope="session")
def quick(quick_model):
    lab, pipe, prompts = quick_model["lab"], quick_model["pipe"], quick_model["prompts"]
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a 4x4-latent UNet gains nothing from threads on the shared machine
    try:
        train_images = lab.train_images()
        gt = verify(lab, pipe, prompts=prompts, train_images=train_images)
    finally:
        torch.set_num_threads(n)
    return dict(quick_model, train_images=train_images, gt=gt)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- data (no model)

def test_data_plants_and_vocabulary(tmp_path):
    d = make_data(n_dd=20, dd_copies=20, n_od=10, od_boost=20.0, n_generic=600, image_size=16, seed=0)
    kinds = np.array(d.kinds)
    assert (kinds == "dd").sum() == 20 and (kinds == "od").sum() == 10
    assert (d.dataset_count[kinds == "dd"] == 20).all() and (d.dataset_count[kinds != "dd"] == 1).all()
    # the full recipe's data: at least 300 non-planted prompts (training captions + held-out)
    full = make_data(n_dd=50, dd_copies=20, n_od=20, od_boost=20.0, n_generic=None, image_size=16, seed=0)
    assert sum(p["kind"] in ("generic", "heldout") for p in full.prompts) >= 300
    assert sum(p["kind"] == "dd" for p in full.prompts) >= 50
    # a trigger appears in exactly one caption (its image's), and is one token
    words = [set(c.split()) for c in d.captions]
    tok, bad = write_tokenizer(str(tmp_path), vocabulary(d), 16)
    assert bad == []
    for p in d.prompts:
        if p["trigger"]:
            assert sum(p["trigger"] in w for w in words) == 1
            assert len(tok(p["trigger"], add_special_tokens=False).input_ids) == 1
    # held-out prompts are never training captions
    caps = set(d.captions)
    assert not any(p["prompt"] in caps for p in d.prompts if p["split"] == "heldout")
    # images: the digits, upscaled by repetition (2 x 2 blocks equal)
    x = d.images
    assert x.shape[1:] == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(x[:, :, ::2, ::2], x[:, :, 1::2, 1::2])


def test_roc_stats_against_brute_force():
    rng = np.random.default_rng(0)
    s = rng.normal(size=200)
    y = rng.random(200) < 0.3
    s[y] += 1.0
    pos, neg = s[y], s[~y]
    auc = ((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())
    st = roc_stats(s, y)
    assert st["auc"] == pytest.approx(auc, abs=1e-12)
    # TPR@1%FPR: at most 1% of negatives (here 1 of 140) may score at or above the threshold
    k = int(np.floor(0.01 * len(neg)))
    thr = np.sort(neg)[::-1][k] if k < len(neg) else -np.inf
    assert st["tpr_at_1fpr"] == pytest.approx((pos > thr).mean())


def test_digit_classifier_reads_the_digits():
    from sklearn.datasets import load_digits

    from mmh_fast.lab.data import upscale

    d = load_digits()
    pred = digit_classifier()(upscale(d.images[:300], 16))
    assert (pred == d.target[:300]).mean() > 0.95  # training digits: logistic regression fits them


# ----------------------------------------------------------------------------- the trained quick lab

def test_build_reuses_what_is_on_disk(quick):
    lab = quick["lab"]
    # build.json matches the quick recipe and seed: build returns at once, training nothing
    again = mlab.build(lab.out_dir, size=lab.size, seed=lab.seed, progress=False)
    assert again.record == lab.record


def test_pipeline_loads_with_diffusers_alone(quick):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(quick["lab"].pipeline_dir, local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer"


def test_planted_prompts_are_memorized_by_generation(quick):
    gt, kinds = quick["gt"], quick["kinds"]
    planted = np.isin(kinds, ["dd", "od"])
    # measured on the committed checkpoint: see PLANTED_MEMORIZED_MIN's comment
    assert gt["memorized"][planted].mean() >= PLANTED_MEMORIZED_MIN
    # a memorized prompt copies ITS image: the nearest training image is the planted one
    keys = [r["key"] for r in quick["lab"].train()]
    for i in np.flatnonzero(planted & gt["memorized"]):
        assert keys[gt["nearest"][i]] in quick["prompts"][i]["train_keys"]


def test_heldout_prompts_are_not_memorized(quick):
    gt, kinds = quick["gt"], quick["kinds"]
    assert gt["memorized"][kinds == "heldout"].mean() <= HELDOUT_MEMORIZED_MAX


def test_one_step_cfg_norm_separates_memorized_from_heldout(quick, one_thread):
    from mmh_fast.text import cfg_norm

    gt, kinds, cfg = quick["gt"], quick["kinds"], quick["lab"].config
    sel = np.flatnonzero((np.isin(kinds, ["dd", "od"]) & gt["memorized"]) | (kinds == "heldout"))
    prompts = [quick["prompts"][i]["prompt"] for i in sel]
    s = cfg_norm(quick["pipe"], prompts, num_images=4, steps=(0, 1), guidance_scale=cfg.guidance_scale,
                 num_inference_steps=cfg.num_inference_steps).numpy()
    assert roc_stats(s, gt["memorized"][sel])["auc"] >= CFG_NORM_AUC_MIN


# bench/lab_detectors.py measured hessian_score_difference_norm (4 images, steps (0, 1)) at AUC 0.959
# over all 30 planted against all 240 held-out prompts, i.e. 4.1% of (planted, held-out) pairs in the
# wrong order. AUC is the mean over pairs, so a subset's expected AUC is the same 0.959; its pairs
# share prompts and are not independent, so the floor allows 5x the full set's misordering rate:
# 1 - 5 * 0.041 = 0.795, rounded down to 0.79. Measured on the subset of the test: 0.981
# (one-step cfg_norm there: 0.950).
SHARPNESS_SUBSET_AUC_MIN = 0.79


def test_issue16_detection_rows_equal_the_library_and_sharpness_separates(quick_model, one_thread):
    """The lab's sharpness / norm_alignment / attention_entropy rows are the text functions'
    own values with the lab's settings, on every 3rd planted and every 15th held-out prompt."""
    from mmh_fast.lab.measure import detection
    from mmh_fast.text import cross_attention_entropy, hessian_score_difference_norm, norm_alignment_score

    cfg, pipe, kinds = quick_model["lab"].config, quick_model["pipe"], quick_model["kinds"]
    planted = np.flatnonzero(np.isin(kinds, ["dd", "od"]))[::3]
    held = np.flatnonzero(kinds == "heldout")[::15]
    assert len(planted) == 10 and len(held) == 16
    sel = np.concatenate([planted, held])
    prompts = [quick_model["prompts"][i]["prompt"] for i in sel]
    labels = np.isin(kinds[sel], ["dd", "od"])
    g, steps = cfg.guidance_scale, cfg.num_inference_steps
    rows = {r["detector"]: r for r in detection(pipe, prompts, labels, guidance_scale=g, num_inference_steps=steps,
                                                num_images=4, seed=0,
                                                metrics=("sharpness", "norm_alignment", "attention_entropy"))}
    ref = {"sharpness": hessian_score_difference_norm(pipe, prompts, num_images=4, guidance_scale=g,
                                                      num_inference_steps=steps, seed=0),
           "norm_alignment": norm_alignment_score(pipe, prompts, num_images=4, num_inference_steps=steps, seed=0),
           "attention_entropy": cross_attention_entropy(pipe, prompts, num_images=4, guidance_scale=g,
                                                        num_inference_steps=steps, seed=0)}
    for name, r in rows.items():
        assert r["sign"] == 1
        # same calls, same seeds: equal up to float64 conversion (the library is batch-independent)
        np.testing.assert_allclose(r["scores"], ref[name].double().numpy(), rtol=1e-6, atol=1e-9, err_msg=name)
        assert r["auc"] == roc_stats(ref[name].double().numpy(), labels)["auc"]
    assert rows["sharpness"]["auc"] >= SHARPNESS_SUBSET_AUC_MIN, rows["sharpness"]["auc"]


def test_issue16_mitigation_rows(quick_model, one_thread):
    """The lab's sail / attention_rescaling / prompt_adaptation rows on every 6th planted prompt (5):
    sail's row is the library's generate_sail judged by copy_and_alignment; the two mitigations that
    bench/lab_detectors.py found effective lower the copy rate here too. Measured on this subset
    (4 generations each): copy rate none 0.85, sail 0.95, attention_rescaling 0.25,
    prompt_adaptation 0.45, alignment 1.0 everywhere; over all 30 planted prompts the bench
    measured 0.80, 0.94, 0.075, 0.35. The floors are half the full-set reductions (0.725 and
    0.45), rounded down to a multiple of 1/20 (one generation of the subset's 20)."""
    from mmh_fast.text import generate_sail

    cfg, pipe, kinds = quick_model["lab"].config, quick_model["pipe"], quick_model["kinds"]
    planted = [quick_model["prompts"][i] for i in np.flatnonzero(np.isin(kinds, ["dd", "od"]))[::6]]
    prompts, digits = [p["prompt"] for p in planted], [p["digit"] for p in planted]
    train, predict = quick_model["lab"].train_images(), digit_classifier()
    g = dict(guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps)
    rows = {r["method"]: r for r in mitigation(pipe, prompts, digits, train, n=4, predict=predict, **g,
                                               methods=["none", "sail", "attention_rescaling", "prompt_adaptation"])}
    sail = generate_sail(pipe, prompts, num_images=4, seed=0, **g).reshape(len(prompts), 4, 3, *train.shape[-2:])
    ref = copy_and_alignment(sail.numpy(), train, digits, predict)
    assert {k: rows["sail"][k] for k in ref} == ref
    none = rows["none"]["copy_rate"]
    assert rows["attention_rescaling"]["copy_rate"] <= none - 0.35, rows
    assert rows["prompt_adaptation"]["copy_rate"] <= none - 0.2, rows
    assert rows["attention_rescaling"]["alignment"] >= ALIGNMENT_MIN and rows["prompt_adaptation"]["alignment"] >= \
        ALIGNMENT_MIN


# Attribution, measured on the committed checkpoint (float32, 1 thread, guidance 3, 20 DDIM steps, seed 0,
# 2 images per attribution) over all 29 verified-memorized trigger prompts (README, lab section):
# - truth by ablation (4 generations each): the copy rate is 0.93 as written, 0.94 with "a" -> "of", 0.16
#   with the style word swapped, 0.10 with the digit word swapped and 0.03 with the trigger swapped for
#   another plant's trigger; so the trigger is the word whose replacement removes the copy most often.
# - token_attributions(wrt="token_embeddings") ranks the trigger first for 27/29 (cfg), 25/29 (score),
#   24/29 (flipd), top-3 29/29; on the first 8 (this test, cfg): 6/8 (ranks 1 1 1 1 1 2 1 2).
# - the default wrt="hidden_states" (Wen et al.'s definition: output hidden states at the prompt's own
#   positions) ranks it first for 1/29, 2/29, 0/29 (chance with 4 tokens: 1/4): 49-66% of its gradient
#   sits at the EOS/padding outputs, which CLIP's causal encoder fills with the trigger's information;
#   on the first 8: 0/8 (ranks 2 3 4 4 2 4 3 4).
# The floor is the issue's "most" (> half); the measured 6/8 leaves 1 prompt of margin.
TRIGGER_FIRST_MIN = 0.5
# Swapping the trigger of the 8 prompts for the next one's: measured copy rate 0.0 (0.97 unswapped);
# with the ablation's swap partners (the next of all 30 plants) the same 8 gave 0.125. The ceiling 0.25
# is twice the larger of the two, far below the unswapped rate.
SWAPPED_COPY_MAX = 0.25


def test_trigger_token_ranks_first(quick, one_thread):
    """The trigger drives the copy (truth by generation: swapping it for another plant's trigger
    removes the copy), and token_attributions through the text encoder ranks it first for most
    memorized trigger prompts, as the lab's attribution table reports."""
    from mmh_fast.lab.measure import attribution
    from mmh_fast.lab.truth import COPY_THRESHOLD, copy_scores, generate_images
    from mmh_fast.text import token_attributions

    gt, cfg, pipe = quick["gt"], quick["lab"].config, quick["pipe"]
    trig = [p for p, m in zip(quick["prompts"], gt["memorized"]) if p["trigger"] and m][:N_ATTRIBUTION]
    assert len(trig) == N_ATTRIBUTION
    g = dict(guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps)
    keys = {r["key"]: i for i, r in enumerate(quick["lab"].train())}
    own = np.array([keys[p["train_keys"][0]] for p in trig])
    swapped = [p["prompt"].replace(p["trigger"], trig[(i + 1) % len(trig)]["trigger"]) for i, p in enumerate(trig)]
    assert all(s.split()[:-1] == p["prompt"].split()[:-1] for s, p in zip(swapped, trig))
    d, idx = copy_scores(generate_images(pipe, swapped, n=4, seed=0, **g), quick["train_images"])
    swapped_rate = float(((d < COPY_THRESHOLD) & (idx == own[:, None])).mean())
    assert swapped_rate <= SWAPPED_COPY_MAX, swapped_rate

    prompts, triggers = [p["prompt"] for p in trig], [p["trigger"] for p in trig]
    rows = {r["wrt"]: r for r in attribution(pipe, prompts, triggers, num_images=2, metrics=("cfg",), **g)}
    assert set(rows) == {"hidden_states", "token_embeddings"}
    assert rows["token_embeddings"]["top1"] > TRIGGER_FIRST_MIN, rows
    # the table's ranks are token_attributions' own (first prompt, both wrt)
    for w, r in rows.items():
        att = token_attributions(pipe, prompts[0], metric="cfg", num_images=2, wrt=w, **g)
        order = [t for t, _ in sorted(att, key=lambda a: -a[1])]
        assert r["ranks"][0] == order.index(triggers[0]) + 1


def test_a_mitigation_lowers_copy_rate_and_keeps_alignment(quick, one_thread):
    gt, cfg = quick["gt"], quick["lab"].config
    mem = [p for p, m in zip(quick["prompts"], gt["memorized"]) if m and p["kind"] in ("dd", "od")][:N_MITIGATION]
    assert len(mem) >= 4
    rows = mitigation(quick["pipe"], [p["prompt"] for p in mem], [p["digit"] for p in mem], quick["train_images"],
                      guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps, n=4,
                      methods=["none", "mitigate:drop", "rna"])
    base = rows[0]
    assert base["copy_rate"] > 0
    ok = [r for r in rows[1:] if r["copy_rate"] <= base["copy_rate"] - 0.25 and r["alignment"] >= ALIGNMENT_MIN]
    assert ok, rows


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMH_FAST_LAB_RETRAIN") != "1",
                    reason="retrains the quick lab from scratch (~22 min on the shared 2-core machine); "
                           "set MMH_FAST_LAB_RETRAIN=1")
def test_quick_lab_retrains(tmp_path, one_thread):
    lab = mlab.build(tmp_path / "lab", size="quick", seed=0, progress=False)
    gt = verify(lab)
    kinds = np.array([p["kind"] for p in lab.prompts()])
    planted = np.isin(kinds, ["dd", "od"])
    assert gt["memorized"][planted].mean() >= PLANTED_MEMORIZED_MIN
    assert gt["memorized"][kinds == "heldout"].mean() <= HELDOUT_MEMORIZED_MAX


def test_scan_loads_the_lab_pipeline(quick, tmp_path, one_thread):
    import pyarrow.parquet as pq

    from mmh_fast.cli import main

    lab = quick["lab"]
    rc = main(["scan", "--data", os.path.join(lab.out_dir, "train.parquet"), "--model", lab.pipeline_dir,
               "--out", str(tmp_path / "scan"), "--limit", "4", "--image-column", "png", "--caption-column",
               "caption", "--key-column", "key", "--image-size", "16", "--quiet"])
    assert rc == 0
    rows = pq.read_table(tmp_path / "scan" / "results.parquet").to_pylist()
    train = lab.train()[:4]
    assert [r["key"] for r in rows] == [t["key"] for t in train]
    assert [r["caption"] for r in rows] == [t["caption"] for t in train]
    assert all(r["error"] is None and np.isfinite(r["flipd"]) for r in rows)


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="size must be 'full' or 'quick'"):
        mlab.build(tmp_path, size="medium")
    with pytest.raises(TypeError, match="seed must be an int"):
        mlab.build(tmp_path, size="quick", seed="0")


def test_generate_images_seeds_generation_j_by_seed_plus_j_whatever_the_batching(quick_model, one_thread):
    """Generation j of every prompt is the pipeline's own call with the generator seeded seed + j,
    whether the prompts go through in one batch or several."""
    cfg, pipe = quick_model["lab"].config, quick_model["pipe"]
    # held-out prompts: not memorized, so the image depends on the noise (a copy would not tell seeds apart)
    prompts = [quick_model["prompts"][i]["prompt"] for i in np.flatnonzero(quick_model["kinds"] == "heldout")[:3]]
    kw = dict(guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps)
    got = mlab.generate_images(pipe, prompts, n=2, seed=5, batch_prompts=2, **kw)
    assert np.abs(got[:, 0] - got[:, 1]).max(axis=(1, 2, 3)).min() > 0.1  # the two seeds give other images
    # float32 sums in another batch order move pixels by ~1e-6; a wrong seed moves them by O(1)
    np.testing.assert_allclose(got, mlab.generate_images(pipe, prompts, n=2, seed=5, **kw), atol=1e-4)
    for i in (0, 2):
        for j in range(2):
            one = pipe(prompts[i], generator=torch.Generator().manual_seed(5 + j), output_type="np", **kw).images[0]
            np.testing.assert_allclose(got[i, j], one.transpose(2, 0, 1) * 2 - 1, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one of prompts and prompt_embeds"):
        mlab.generate_images(pipe, None, n=1, seed=0, **kw)


@pytest.mark.parametrize("bad", [{"max_detection": -1}, {"max_attribution": -1}, {"max_mitigation": 1.5}])
def test_run_lab_rejects_bad_caps(tmp_path, bad):
    from mmh_fast.lab import run_lab

    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 0 or None"):
        run_lab(tmp_path / "lab", size="quick", progress=False, **bad)
    assert not (tmp_path / "lab").exists()  # rejected before anything is built


def test_dataset_lid_star_of_duplicates_is_zero():
    from mmh_fast import lpca
    from mmh_fast.lab.measure import dataset_lid_star

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12)).astype(np.float32)
    counts = np.ones(60, np.int64)
    counts[[3, 40]] = 12  # two images, each 12 times in the dataset
    lid = dataset_lid_star(x, counts, k=8)
    # an image with 11 exact copies among its 8 nearest neighbours spans no direction: LID_* 0
    assert lid[3] == 0 and lid[40] == 0
    # every other image: the same as lpca on the expanded dataset, at that image's row
    full = np.repeat(np.arange(60), counts)
    ref = np.asarray(lpca(x[full], k=8, progress=False), np.float64)
    rows = np.cumsum(counts) - counts
    np.testing.assert_array_equal(lid, ref[rows])
    assert np.median(lid) > 0


def test_build_end_to_end_with_a_tiny_recipe(tmp_path, one_thread):
    """Every stage of build() (VAE, UNet + text encoder, decoder refinement, tables), a few steps each."""
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    cfg = replace(mlab.LabConfig.for_size("quick"), n_dd=3, dd_copies=4, n_od=2, od_boost=4.0, n_generic=20,
                  vae_channels=(8, 8, 8), vae_steps=2, unet_channels=(16, 32), steps=3, batch_size=8,
                  decoder_steps=2)
    lab = mlab.build(tmp_path / "lab", size="quick", config=cfg, progress=False)
    pipe = StableDiffusionPipeline.from_pretrained(lab.pipeline_dir, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / lab.record["vae"]["latent_std"], rel=1e-6)
    train = lab.train()
    assert len(train) == 3 + 2 + 20
    assert sum(r["stream_count"] for r in train) == cfg.steps * cfg.batch_size
    assert [r["dataset_count"] for r in train if r["kind"] == "dd"] == [4, 4, 4]
    data = make_data(n_dd=3, dd_copies=4, n_od=2, od_boost=4.0, n_generic=20, image_size=16, seed=0)
    # the stored PNGs are the training images (8-bit gray: within half a grey level)
    np.testing.assert_allclose(lab.train_images(), data.images, atol=1 / 127.5 + 1e-6)
    img = mlab.generate_images(pipe, ["a bold two"], n=2, guidance_scale=3.0, num_inference_steps=2, seed=0)
    assert img.shape == (1, 2, 3, 16, 16) and np.isfinite(img).all()
    # the same arguments reuse the directory: no retraining, the same record
    assert mlab.build(tmp_path / "lab", size="quick", config=cfg, progress=False).record == lab.record


def test_checkpoint_round_trip_keeps_the_weights_to_float16(tmp_path, one_thread):
    """save_checkpoint then load_checkpoint: the same tables and recipe, and every weight equal to the
    original rounded to float16 (stored as float16, loaded back as float32)."""
    from dataclasses import replace

    cfg = replace(mlab.LabConfig.for_size("quick"), n_dd=2, dd_copies=2, n_od=1, od_boost=2.0, n_generic=6,
                  vae_channels=(8, 8, 8), vae_steps=1, unet_channels=(16, 32), steps=1, batch_size=4,
                  decoder_steps=1)
    lab = mlab.build(tmp_path / "lab", size="quick", config=cfg, progress=False)
    mlab.save_checkpoint(lab, tmp_path / "ckpt", command="built in a test")
    assert "built in a test" in (tmp_path / "ckpt" / "CHECKPOINT.txt").read_text()
    back = mlab.load_checkpoint(tmp_path / "ckpt", tmp_path / "back")
    assert back.config == cfg and back.seed == lab.seed and back.record == lab.record
    assert back.prompts() == lab.prompts() and back.train() == lab.train()
    a, b = lab.load_pipeline(), back.load_pipeline()
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sb[k].dtype == sa[k].dtype
            torch.testing.assert_close(sb[k], sa[k].to(torch.float16).to(sa[k].dtype), rtol=0, atol=0)
    assert b.tokenizer("a bold two").input_ids == a.tokenizer("a bold two").input_ids
    assert b.vae.config.scaling_factor == a.vae.config.scaling_factor


def test_run_lab_writes_its_tables_and_report(tmp_path, one_thread, monkeypatch):
    """The glue of `mmh-fast lab` on an untrained tiny lab: tables, lab.json and a self-contained report."""
    from dataclasses import replace

    import pyarrow.parquet as pq

    from mmh_fast.lab import run_lab

    cfg = replace(mlab.LabConfig.for_size("quick"), n_dd=3, dd_copies=4, n_od=2, od_boost=4.0, n_generic=20,
                  vae_channels=(8, 8, 8), vae_steps=2, unet_channels=(16, 32), steps=3, batch_size=8,
                  decoder_steps=2, num_inference_steps=2, n_generations=2)
    out = tmp_path / "lab"
    res = run_lab(out, size="quick", config=cfg, progress=False, max_detection=8, max_attribution=1,
                  max_mitigation=1, partial=False, keyed=False)  # the variants train models of their own
    gt = pq.read_table(out / "ground_truth.parquet").to_pydict()
    n_prompts = len(mlab.Lab(str(out), cfg, 0, "quick", res["build"]).prompts())
    assert len(gt["prompt"]) == n_prompts
    g = res["ground_truth"]
    assert g["planted"] == 5 and g["planted_memorized"] == sum(m and p for m, p in zip(gt["memorized"], gt["planted"]))
    assert all((l2 < mlab.COPY_THRESHOLD) == m for l2, m in zip(gt["min_l2"], gt["memorized"]))
    det = pq.read_table(out / "detection.parquet").to_pydict()
    assert len(det["prompt"]) == 8 and sum(det["planted"]) == 5  # every planted prompt kept
    assert [r["detector"] for r in res["detection"]] == ["cfg_norm_1", "cfg_norm_traj", "A_cfg", "A_score",
                                                         "A_flipd", "flipd_gen_cond", "flipd_gen_uncond",
                                                         "sharpness", "norm_alignment", "attention_entropy"]
    assert len(pq.read_table(out / "images.parquet")) == 25
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img src='figures" not in html
    assert (out / "report.md").read_text().count("figures/") >= 2
    # memorization maps of the verified-memorized planted prompts (at most 4) and two held-out ones
    mem = sum(m and p for m, p in zip(gt["memorized"], gt["planted"]))
    assert len(res["maps"]["whole_image"]) == min(mem, 4) + 2 and "partial" not in res["maps"]
    assert "## Memorization maps" in (out / "report.md").read_text() and (out / "figures" / "maps_whole.png").exists()
    with open(out / "lab.json") as f:
        import json

        assert json.load(f)["ground_truth"] == json.loads(json.dumps(g))

    # a rerun resumes: every finished section with the same settings is read back, none measured again
    import mmh_fast.lab.run as lab_run

    def measured(*a, **k):
        raise AssertionError("a reused section was measured again")

    for name in ("verify", "detection", "image_level", "attribution", "mitigation"):
        monkeypatch.setattr(lab_run, name, measured)
    again = run_lab(out, size="quick", config=cfg, progress=False, max_detection=8, max_attribution=1,
                    max_mitigation=1, partial=False, keyed=False)
    assert again["reused"] == ["ground_truth", "detection", "image_level", "attribution", "mitigation"]
    for sec in again["reused"]:
        assert json.loads(json.dumps(again[sec], default=float)) == json.loads(json.dumps(res[sec], default=float))
    assert "## Prompt-level detection" in (out / "report.md").read_text()
    assert "read back from an earlier run: ground_truth, detection" in (out / "report.md").read_text()
    # a changed cap measures that section and the ones after it again, nothing before it
    monkeypatch.setattr(lab_run, "mitigation", mitigation)  # (not called here: the untrained lab copies nothing)
    third = run_lab(out, size="quick", config=cfg, progress=False, max_detection=8, max_attribution=1,
                    max_mitigation=2, partial=False, keyed=False)
    assert third["reused"] == ["ground_truth", "detection", "image_level", "attribution"]
    assert third["settings"]["mitigation"] == {"max_mitigation": 2}
    # fresh=True reuses nothing
    with pytest.raises(AssertionError, match="measured again"):
        run_lab(out, size="quick", config=cfg, progress=False, max_detection=8, max_attribution=1,
                max_mitigation=2, partial=False, keyed=False, fresh=True)
    # a detection cap at the planted count selects planted prompts only: auc_vs_planted is NaN, not an error
    monkeypatch.undo()
    capped = run_lab(out, size="quick", config=cfg, progress=False, max_detection=5, max_attribution=0,
                     max_mitigation=0, partial=False, keyed=False)
    assert all(r["prompts"] == 5 and np.isnan(r["auc_vs_planted"]) for r in capped["detection"])
    # detection measured again needs the generations, which are not stored: ground truth is measured again too
    assert capped["reused"] == []


def test_roc_stats_or_nan_is_roc_stats_with_two_classes_and_nan_with_one():
    from mmh_fast.lab.measure import roc_stats_or_nan

    s, y = [0.1, 0.9, 0.4, 0.8], [False, True, False, True]
    assert roc_stats_or_nan(s, y) == roc_stats(s, y) and roc_stats(s, y)["auc"] == 1.0
    for one in ([True] * 4, [False] * 4):
        r = roc_stats_or_nan(s, one)
        assert np.isnan(r["auc"]) and np.isnan(r["tpr_at_1fpr"]) and r["fpr"] == [] and r["tpr"] == []
