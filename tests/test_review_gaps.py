"""Review gaps of issues 14/16: clear errors instead of silent NaN or silent rounding,
and the nb metric's determined mask."""
import os

import numpy as np
import pytest
import torch

from mmh_fast.lab.measure import roc_stats


@pytest.mark.parametrize("labels, empty", [([True] * 5, "negative"), ([False] * 5, "positive")])
def test_roc_stats_refuses_an_empty_class(labels, empty):
    # AUC and TPR@1%FPR are undefined without both classes: an error naming the labels, never NaN
    with pytest.raises(ValueError, match=rf"labels.*no {empty}"):
        roc_stats(np.arange(5.0), labels)


def test_roc_stats_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="labels"):
        roc_stats(np.arange(5.0), [True, False])


@pytest.mark.parametrize("kw, name", [({"probe_begin": 1.5}, "probe_begin"), ({"probe_begin": 2.0}, "probe_begin"),
                                      ({"seed": 0.5}, "seed"), ({"n_probes": 1.5}, "n_probes"),
                                      ({"probe_begin": True}, "probe_begin")])
def test_hutchinson_probes_refuses_non_integer_counters(kw, name):
    from mmh_fast.ops import hutchinson_probes

    # probe_begin=1.5 used to run as int(1.5) = 1: another probe stream, silently
    with pytest.raises(TypeError, match=name):
        hutchinson_probes((2, 3), **kw)


def test_hutchinson_trace_refuses_non_integer_probe_begin():
    from mmh_fast.ops import hutchinson_trace

    with pytest.raises(TypeError, match="probe_begin"):
        hutchinson_trace(lambda v: v, torch.zeros(2, 3), 2, probe_begin=1.5)


def test_hutchinson_probes_accepts_integer_types():
    from mmh_fast.ops import hutchinson_probes

    # numpy and 0-d torch integers are integers: same stream as the Python int
    ref = hutchinson_probes((2, 3), 2, probe_begin=3, seed=7)
    assert torch.equal(hutchinson_probes((2, 3), np.int64(2), probe_begin=np.int64(3), seed=torch.tensor(7)), ref)


def _classify_inputs(tmp_path, theta, star):
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = [f"k{i}.png" for i in range(len(theta))]
    pq.write_table(pa.table({"key": keys, "flipd": pa.array(theta, pa.float64())}), tmp_path / "results.parquet")
    pq.write_table(pa.table({"key": keys, "lid_data": pa.array(star, pa.float64())}), tmp_path / "lid.parquet")
    return str(tmp_path / "results.parquet"), str(tmp_path / "lid.parquet")


def test_classify_median_ratio_with_zero_median_lid_data_says_what_to_pass(tmp_path, capsys):
    from mmh_fast.cli import main

    # 6 of 10 images duplicated: their LID_* is 0, so the median LID_* is 0 and the ratio undefined
    scan, lid = _classify_inputs(tmp_path, [5.0] * 10, [0.0] * 6 + [4.0] * 4)
    rc = main(["classify", scan, "--lid-data", lid, "--scale", "median_ratio"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--scale median_ratio" in err and "median LID_* (lid-data) is 0" in err
    assert "--scale FACTOR" in err and "6 of 10" in err


def test_classify_median_ratio_with_zero_median_lid_theta(tmp_path, capsys):
    from mmh_fast.cli import main

    scan, lid = _classify_inputs(tmp_path, [0.0] * 6 + [3.0] * 4, [4.0] * 10)
    rc = main(["classify", scan, "--lid-data", lid, "--scale", "median_ratio"])
    err = capsys.readouterr().err
    assert rc == 2 and "--scale median_ratio" in err and "median flipd" in err and "--scale FACTOR" in err


def test_nb_metric_records_the_determined_mask_of_normal_bundle():
    # a mixture with point masses: the "gap" rule's answers there are undetermined, the rest
    # determined (tests/test_normal_bundle.py), so the mask holds both values
    from diffusers import DDPMScheduler

    import mmh_fast
    from mmh_fast.cli.metrics import MetricBatch, MetricContext, NB_DETERMINED, get_metric, split_values
    from mmh_fast.testing import GaussianMixtureEps

    m = GaussianMixtureEps.random([0, 1, 4, 9], (3, 2, 2), separation=20.0, seed=4,
                                  scheduler=DDPMScheduler(num_train_timesteps=1000))
    x, _ = m.sample_x0(8, generator=torch.Generator().manual_seed(2))
    ids = torch.arange(8, dtype=torch.int64) + 100
    ref = mmh_fast.normal_bundle(m, x, 0.1, rule="gap", seed=3, sample_ids=ids, return_details=True,
                                 undetermined="ignore")
    assert ref.determined.any() and not ref.determined.all()

    class Loaded:
        pipeline, conditional = m, False

    nb = get_metric("nb")
    batch = MetricBatch(torch.zeros(8, 3, 2, 2, dtype=torch.uint8), [f"k{i}" for i in range(8)], [None] * 8, ids,
                        _images=x)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "undetermined" warning from the metric itself
        warnings.filterwarnings("ignore", message="no scheduler given")
        vals, cols = split_values(nb.fn(batch, MetricContext(model=Loaded(), t0=0.1, seed=3,
                                                              options={"rule": "gap"})), 8, nb)
    assert vals.tolist() == ref.lid.double().tolist()
    assert cols[NB_DETERMINED].tolist() == ref.determined.tolist()
    assert nb.columns[NB_DETERMINED][0] == "bool"


def test_scan_nb_writes_nb_determined_and_one_summary_line(tmp_path, capsys):
    import pyarrow.parquet as pq

    from cli_data import make_folder
    from mmh_fast import normal_bundle
    from mmh_fast.cli import main
    from mmh_fast.cli.loader import load_model
    from mmh_fast.cli.sources import sample_id

    # toy-ddpm has random weights and n_samples 48 < d = 3072 caps the rank: every point undetermined
    good = make_folder(tmp_path / "imgs", n=3)
    rc = main(["scan", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--metrics", "nb",
               "--model", "toy-ddpm", "--option", "n_samples=48", "--seed", "2", "--workers", "0",
               "--batch-size", "2"])
    err = capsys.readouterr().err
    assert rc == 0, err
    t = pq.read_table(tmp_path / "out" / "results.parquet")
    assert str(t.schema.field("nb_determined").type) == "bool"
    rows = t.to_pylist()
    pipe = load_model("toy-ddpm", device=torch.device("cpu"), dtype=torch.float32).pipeline
    x = torch.from_numpy(np.stack([good[r["key"]] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    ref = normal_bundle(pipe, x, 0.1, n_samples=48, seed=2, return_details=True, undetermined="ignore",
                        sample_ids=torch.tensor([sample_id(r["key"]) for r in rows]))
    assert [r["nb"] for r in rows] == ref.lid.tolist()
    assert [r["nb_determined"] for r in rows] == ref.determined.tolist() == [False] * 3
    # one summary line instead of a warning per image
    assert "point(s) undetermined" not in err
    lines = [ln for ln in err.splitlines() if "nb_determined is False" in ln]
    assert len(lines) == 1 and "for 3 of the 3 images" in lines[0], err


def test_report_generations_stream_the_training_images(tmp_path, capsys, monkeypatch):
    """report --generations reads the training images in chunks of TRAIN_CHUNK (memory
    bounded) and finds the same pairs as the former all-at-once search."""
    import shutil

    import mmh_fast.retrieval as retrieval
    from cli_data import make_folder
    from mmh_fast.cli import main, report
    from mmh_fast.cli.sources import decode_image

    good = make_folder(tmp_path / "train", n=13, corrupt=(7,), captions=False)
    assert main(["scan", "--data", str(tmp_path / "train"), "--out", str(tmp_path / "scan"), "--metrics", "png",
                 "--workers", "0", "--quiet"]) == 0
    make_folder(tmp_path / "gen", n=5, captions=False, seed=9)
    for k in ("img002.png", "img011.png"):  # two copies of training images among the generations
        shutil.copy(tmp_path / "train" / k, tmp_path / "gen" / f"copy_{k}")
    table, meta = report.load_results(str(tmp_path / "scan"))
    keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
    rpath = str(tmp_path / "scan" / "results.parquet")

    # the former search: every readable training image in memory at once
    gen = {k: decode_image(str(tmp_path / "gen" / k), 32)[0] for k in sorted(os.listdir(tmp_path / "gen"))}
    tk = sorted(good)
    t = np.stack([decode_image(str(tmp_path / "train" / k), 32)[0] for k in tk]).reshape(len(tk), -1)
    g = np.stack(list(gen.values())).reshape(len(gen), -1).astype(np.float32) / 255.0
    cl2, idx = retrieval.calibrated_l2(g, t.astype(np.float32) / 255.0, n=len(tk), return_indices=True)
    ref = sorted((float(c), gk, tk[i]) for c, gk, i in zip(cl2, gen, idx))

    chunks = []
    real = retrieval.calibrated_l2

    def spy(generated, train, **kw):
        def counted():
            for c in train:
                chunks.append(len(c))
                yield c
        return real(generated, counted(), **kw)

    monkeypatch.setattr(retrieval, "calibrated_l2", spy)
    monkeypatch.setattr(report, "TRAIN_CHUNK", 4)
    notes = []
    pairs = report._generation_pairs(str(tmp_path / "gen"), sources, keys, rpath, None, meta, None, 100,
                                     notes.append)
    got = sorted((c, gk, tkey) for _, _, gk, tkey, c, _ in pairs)
    assert [(gk, tkey) for _, gk, tkey in got] == [(gk, tkey) for _, gk, tkey in ref]
    np.testing.assert_allclose([c for c, _, _ in got], [c for c, _, _ in ref], rtol=1e-12, atol=0)
    for gimg, timg, gk, tkey, c, l2 in pairs:
        assert np.array_equal(timg, good[tkey])  # the shown training image is the nearest one
        assert l2 == pytest.approx(np.linalg.norm(gen[gk].astype(np.float64) / 255 - good[tkey].transpose(2, 0, 1)
                                                  / 255), rel=1e-6)
    assert {gk: tkey for _, gk, tkey in got}["copy_img002.png"] == "img002.png"
    # 12 readable images of 13 (n = min(50, 13) = 13 > 12: a second pass calibrates on the 12)
    assert max(chunks) <= 4 and sum(chunks) == 2 * 12
    assert any("1 training images could not be read" in n for n in notes)


def test_lab_detection_marks_a_one_class_lab_undefined_instead_of_failing():
    # roc_stats refuses one class; the lab's detection table (an untrained lab has no memorized
    # prompt) keeps NaN there, by an explicit check at the call site, and the real AUC otherwise
    from mmh_fast.cli.loader import load_model
    from mmh_fast.lab.measure import detection

    pipe = load_model("toy-sd", device=torch.device("cpu"), dtype=torch.float32).pipeline
    prompts = ["a cat", "a dog", "a red car", "blue sky"]
    kw = dict(guidance_scale=3.0, num_inference_steps=2, num_images=1, metrics=("cfg_norm_1",))
    (row,) = detection(pipe, prompts, np.zeros(4, bool), **kw)
    assert np.isnan(row["auc"]) and np.isnan(row["tpr_at_1fpr"])
    labels = np.array([True, False, False, True])
    (row,) = detection(pipe, prompts, labels, **kw)
    assert row["auc"] == roc_stats(np.array(row["scores"]), labels)["auc"]
