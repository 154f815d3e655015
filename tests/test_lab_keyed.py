"""The keyed lab (mmh_fast.lab.keyed): the quick lab retrained on SolidMark-bordered
digits, and SolidMark's eidetic counts on it against its own training set.

Like the quick lab, it trains too slowly for the suite (about 12 minutes on one
thread), so its weights are committed under tests/data/lab_keyed (float16, the
command in CHECKPOINT.txt); ``test_keyed_lab_retrains`` rebuilds it from scratch
(slow; set MMH_FAST_LAB_RETRAIN=1).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from mmh_fast.lab import LabConfig
from mmh_fast.lab import keyed as K
from mmh_fast.lab.data import make_data
from mmh_fast.solidmark import SolidMark, chance_rate, load_keys

CKPT = Path(__file__).parent / "data" / "lab_keyed"
QUICK_BUILD = Path(__file__).parent / "data" / "lab_quick" / "build.json"


# tiny networks: one thread (conftest's single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


def test_keyed_canvases_hold_the_lab_images_inside_their_keys():
    data, ds, interior = K.keyed_data("quick", 0)
    q = LabConfig.for_size("quick")
    plain = make_data(n_dd=q.n_dd, dd_copies=q.dd_copies, n_od=q.n_od, od_boost=q.od_boost,
                      n_generic=q.n_generic, image_size=q.image_size, seed=0)
    assert interior == 16 and data.images.shape == (len(plain.keys), 3, 24, 24)
    # the interior is the quick lab's image, bit for bit; the tables are the quick lab's
    np.testing.assert_array_equal(data.images[:, :, 4:20, 4:20], plain.images)
    assert data.keys == plain.keys and data.captions == plain.captions
    np.testing.assert_array_equal(data.stream_weight, plain.stream_weight)
    # the border: every pixel of every channel is -1 + 2 k, k the key of the image's lab key
    # (not of its position), as a hand-made mask of the outer 4 pixels reads it
    sm = SolidMark(4, seed=0, value_range=(-1.0, 1.0))
    k = np.array([sm.key(name) for name in plain.keys])
    ring = np.ones((24, 24), bool)
    ring[4:20, 4:20] = False
    border = data.images[:, :, ring]  # [N, 3, 320]
    np.testing.assert_array_equal(border, np.broadcast_to(np.float32(-1 + 2 * k)[:, None, None], border.shape))
    np.testing.assert_array_equal(ds.keys(), k)
    assert k[0] != sm.key(0)  # ids are the lab keys, so a reordering of the table keeps every image's key
    assert len(set(k.tolist())) == len(k)


def test_keyed_recipe_is_the_quick_one_on_the_canvas():
    cfg, interior = K.keyed_config("quick")
    q = LabConfig.for_size("quick")
    # the committed quick lab and the running full build compare to_dict(): unchanged
    assert q.to_dict() == json.loads(QUICK_BUILD.read_text())["config"]
    assert {k: v for k, v in cfg.to_dict().items() if k != "image_size"} == \
        {k: v for k, v in q.to_dict().items() if k != "image_size"}
    # 24 pixels over a 4x VAE: a 6 x 6 latent grid whose outer ring of cells is the border
    assert cfg.image_size == interior + 2 * K.THICKNESS == 24
    assert cfg.image_size % 2 ** (len(cfg.vae_channels) - 1) == 0


def test_eidetic_rows_and_table_count_by_hand():
    l_sm = {"none": np.array([0.0, 0.009, 0.02, 0.2, 0.04, 0.3]),
            "gni:1": np.array([0.5, 0.009, 0.06, 0.2, 0.04, 0.3])}
    groups = {"memorized": np.array([1, 1, 1, 0, 0, 0], bool), "not memorized": np.array([0, 0, 0, 1, 1, 1], bool)}
    rows = K.eidetic_rows(l_sm, groups)
    got = {(r["mitigation"], r["group"], r["delta"]): r["eidetic_count"] for r in rows}
    assert got[("none", "memorized", 0.01)] == 2 and got[("none", "memorized", 0.05)] == 3
    assert got[("gni:1", "memorized", 0.01)] == 1 and got[("gni:1", "memorized", 0.1)] == 2
    assert got[("none", "not memorized", 0.01)] == 0 and got[("none", "not memorized", 0.05)] == 1
    assert all(r["chance_rate"] == min(2 * r["delta"], 1) and r["n"] == 3 for r in rows)
    md = K.markdown_table(rows, ["memorized", "not memorized"])
    assert md[2] == "| none | 2 | 3 | 3 | 0 | 1 | 1 | - |"
    assert md[3] == "| gni:1 | 1 | 1 | 2 | 0 | 1 | 1 | -50% |"
    assert md[4] == "| chance (n 2 delta) | 0.1 | 0.3 | 0.6 | 0.1 | 0.3 | 0.6 | |"


# The fast test's groups, 10 images each, inpainted with resample=1 (solidmark.evaluate's
# cheap, lower reading: the README's table uses the default resample=5). Measured on this
# checkpoint (float32 from the float16 copy, 1 thread): the memorized group (the first 10
# copied plants in table order: 3 DD, 7 OD) 4 / 10 / 10 eidetic at delta 0.01 / 0.05 / 0.1 (p under
# chance 3e-5, 1e-10, 1e-7); the generic group 0 / 1 / 1 (p 1.0, 0.65, 0.89; chance counts
# 0.2, 1, 2). The assertions are the binomial test at fixed levels, not the measured counts:
# memorized must beat chance at p < 1e-3 at every delta (at delta 0.01 that is >= 3 of 10,
# against the 4 measured); generic must not, at p > 0.05 (>= 0.65 measured).
N_EVAL = 10
P_MEMORIZED_MAX = 1e-3
P_NOT_MEMORIZED_MIN = 0.05


@pytest.fixture(scope="module")
def keyed_lab(tmp_path_factory):
    lab = K.load_keyed_checkpoint(CKPT, tmp_path_factory.mktemp("lab_keyed"))
    return lab, lab.load_pipeline()


def _fast_groups(lab, pipe):
    """Verified labels on a subset, by generation: the OD plants, the first 5 DD plants and the
    first 4 generic prompts. Memorized group = planted images their own prompt copies; the other
    = generic images of generic prompts none of whose generations copies a training image."""
    prompts = [p for p in lab.prompts() if p["split"] == "train"]
    planted = [p for p in prompts if p["kind"] == "od"] + [p for p in prompts if p["kind"] == "dd"][:5]
    generic = [p for p in prompts if p["kind"] == "generic"][:4]
    gt = K.verify_keyed(lab, pipe, prompts=[p["prompt"] for p in planted + generic])
    train = lab.train()
    row = {r["key"]: i for i, r in enumerate(train)}
    mem = [i for i in np.flatnonzero(gt["image_memorized"]) if train[i]["kind"] in ("dd", "od")][:N_EVAL]
    copied = dict(zip(gt["prompts"], gt["memorized"]))
    non = [row[k] for p in generic if not copied[p["prompt"]] for k in p["train_keys"]][:N_EVAL]
    return gt, np.array(mem), np.array(non)


def test_keyed_checkpoint_keys_match_the_construction(keyed_lab, monkeypatch):
    lab, pipe = keyed_lab
    keys, sm = K.lab_keys(lab)
    _, ds, _ = K.keyed_data("quick", 0)
    np.testing.assert_array_equal(keys, ds.keys())
    assert (sm.thickness, sm.seed, sm.value_range) == (4, 0, (-1.0, 1.0))
    train = lab.train()
    np.testing.assert_array_equal([r["solidmark_key"] for r in train], keys)
    # the stored PNGs hold the bordered images: 8-bit border = round(255 k)
    from PIL import Image

    png = np.stack([np.asarray(Image.open(io.BytesIO(r["png"]))) for r in train[:20]]).astype(np.float64)
    assert png.shape == (20, 24, 24)
    np.testing.assert_array_equal(png[:, 0, :], np.round(255 * keys[:20])[:, None] * np.ones((1, 24)))
    # the pipeline generates bordered canvases on a 6 x 6 latent grid
    assert pipe.unet.config.sample_size == 6 and pipe.vae_scale_factor == 4
    # same arguments: build_keyed reuses the directory (a retrain would fail here)
    monkeypatch.setattr(K, "_train_and_record", lambda *a, **k: pytest.fail("build_keyed retrained a built lab"))
    again = K.build_keyed(lab.out_dir, size="quick", seed=0, progress=False)
    assert again.record == lab.record


def _check_separation(lab, pipe):
    """Ground truth on the fast subset, then SolidMark (resample=1) on both groups against chance."""
    from mmh_fast.solidmark import evaluate

    gt, mem, non = _fast_groups(lab, pipe)
    summ = gt["summary"]
    # ground truth first (measured on the full set: OD 10/10, DD 14/20 images copied; generic prompts 0/60)
    assert summ["od"]["images_memorized"] >= 8 and summ["generic"]["prompts_memorized"] == 0
    assert len(mem) == N_EVAL and len(non) == N_EVAL
    keys, sm = K.lab_keys(lab)
    train = lab.train()
    sel = np.concatenate([mem, non])
    res = evaluate(pipe, K._crop(sm, lab.train_images())[sel], keys[sel], solidmark=sm,
                   prompts=[train[i]["caption"] for i in sel], seed=0, resample=1, deltas=K.DELTAS)
    first = np.arange(len(sel)) < N_EVAL
    rows = K.eidetic_rows({"none": res.l_sm}, {"memorized": first, "not memorized": ~first})
    for r in rows:
        assert r["chance_rate"] == chance_rate(r["delta"])
        if r["group"] == "memorized":
            assert r["eidetic_count"] > r["chance_count"] and r["p_value"] < P_MEMORIZED_MAX, rows
        else:
            assert r["p_value"] > P_NOT_MEMORIZED_MIN, rows


def test_solidmark_separates_memorized_images_on_the_keyed_lab(keyed_lab):
    _check_separation(*keyed_lab)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMH_FAST_LAB_RETRAIN") != "1",
                    reason="retrains the keyed lab from scratch (8 to 16 min on the shared 2-core machine); "
                           "set MMH_FAST_LAB_RETRAIN=1")
def test_keyed_lab_retrains(tmp_path):
    lab = K.build_keyed(tmp_path / "lab", size="quick", seed=0, progress=False)
    _check_separation(lab, lab.load_pipeline())


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMH_FAST_LAB_RETRAIN") != "1",
                    reason="run_keyed end to end (~4 min: ground truth of every training prompt, default "
                           "resampling); set MMH_FAST_LAB_RETRAIN=1")
def test_run_keyed_end_to_end_and_reuse(keyed_lab, monkeypatch):
    import mmh_fast.solidmark as solidmark

    lab, _ = keyed_lab
    kw = dict(size="quick", seed=0, progress=False, mitigations=("none", "gni:1"), max_not_memorized=4)
    out = K.run_keyed(lab.out_dir, **kw)
    res = out["results"]
    assert len(res["table"]) == 2 * 5 * len(K.DELTAS)
    mem = np.array(res["images"]["memorized"])
    assert mem.sum() >= 20 and (~mem).sum() >= 4  # 24 copied plants; 6 uncopied DD plants + 4 generic
    for r in res["table"]:
        if r["mitigation"] == "none" and r["group"] == "memorized":
            assert r["p_value"] < P_MEMORIZED_MAX, r
    assert any(line.startswith("| none |") for line in out["markdown"]) and all(map(os.path.exists, out["figures"]))
    # the same arguments again: read back from keyed.json, nothing inpainted
    monkeypatch.setattr(solidmark, "evaluate", lambda *a, **k: pytest.fail("run_keyed recomputed"))
    again = K.run_keyed(lab.out_dir, **kw)
    assert again["results"] == res and again["markdown"] == out["markdown"]


def test_run_keyed_rejects_bad_arguments_before_training(tmp_path):
    assert K.check_mitigations(("none", "gni:0.5", "mitigate:drop")) == ["none", "gni:0.5", "mitigate:drop"]
    for bad in (["gni:x"], ["gni:-1"], ["gni:inf"], ["mitigate:nope"], ["sail"], ["none", "none"]):
        with pytest.raises(ValueError, match="mitigations"):
            K.run_keyed(tmp_path / "k", mitigations=bad, progress=False)
    with pytest.raises(ValueError, match="max_not_memorized"):
        K.run_keyed(tmp_path / "k", max_not_memorized=-1, progress=False)
    with pytest.raises(ValueError, match="size"):
        K.build_keyed(tmp_path / "k", size="tiny", progress=False)
    assert not (tmp_path / "k").exists()
