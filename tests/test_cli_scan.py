"""`mmh-fast scan` end to end on small data with the toy model: every source kind,
corrupt images, out-of-memory halving, failing metrics, resume, merge."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmh_fast.cli import main
from mmh_fast.cli.writer import part_files

from cli_data import PLUGIN, make_folder, make_shards, make_table


def _scan(capsys, data, out, *extra, metrics="mean_px,eps_norm", model="toy-ddpm"):
    argv = ["scan", "--data", str(data), "--out", str(out), "--metrics", metrics, "--plugin", PLUGIN,
            "--batch-size", "3", "--unit-size", "4", "--workers", "1", *extra]
    if model:
        argv += ["--model", model]
    rc = main(argv)
    return rc, capsys.readouterr().err


def _rows(out):
    return pq.read_table(os.path.join(out, "results.parquet")).to_pylist()


@pytest.fixture(scope="module")
def toy_unet():
    from mmh_fast.cli.loader import load_model

    return load_model("toy-ddpm", device=torch.device("cpu"), dtype=torch.float32).pipeline.unet


def _eps_norm(unet, arr, t0=0.01):
    """The toy UNet's |eps| at one clean image, computed directly (one image per call)."""
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only contend on a shared CPU
    try:
        with torch.no_grad():
            return float(unet(x, torch.tensor([round(t0 * 1000)])).sample.double().norm())
    finally:
        torch.set_num_threads(threads)


def test_scan_folder_with_corrupt_images(tmp_path, capsys, toy_unet):
    good = make_folder(tmp_path / "imgs", n=10, corrupt=(4,), truncated=(7,))
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="mean_px,eps_norm,caption_len")
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    assert [r["key"] for r in rows] == [f"img{i:03d}.png" for i in range(10)]
    for i, r in enumerate(rows):
        assert r["caption"] == f"caption {i}"
        assert r["source"] == str(tmp_path / "imgs" / r["key"])
        if i in (4, 7):  # the bad images get a row with their error, and the scan goes on
            assert r["error"].startswith("decode: ") and r["mean_px"] is None and r["width"] is None
            continue
        arr = good[r["key"]]
        assert r["error"] is None and (r["width"], r["height"]) == (32, 32)
        assert r["mean_px"] == pytest.approx(arr.mean(), abs=1e-9)
        assert r["eps_norm"] == pytest.approx(_eps_norm(toy_unet, arr), rel=1e-4)
        assert r["caption_len"] == len(f"caption {i}")
    meta = json.loads(pq.read_schema(tmp_path / "out" / "results.parquet").metadata[b"mmh_fast"])
    # a plugin metric names no t0 of its own: the fallback 0.01, recorded per metric
    assert meta["model"]["name"] == "toy-ddpm" and meta["settings"]["t0"] is None
    assert meta["settings"]["metric_settings"] == {"mean_px": {}, "eps_norm": {"t0": 0.01}, "caption_len": {}}
    assert meta["settings"]["metrics"] == ["mean_px", "eps_norm", "caption_len"]
    assert meta["metrics"]["mean_px"]["lower_is_memorized"] is False and meta["merge"]["complete"]
    assert "eps_norm:" in err and "images/s" in err  # throughput per metric at the end
    assert len(part_files(str(tmp_path / "out"))) == 3  # 10 images in units of 4


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "csv"])
def test_scan_each_source_kind(tmp_path, capsys, toy_unet, kind):
    if kind == "webdataset":
        good = make_shards(tmp_path / "shards", n_shards=2, per_shard=4)
        data = tmp_path / "shards" / "{00000..00001}.tar"
    elif kind == "parquet":
        good = make_table(str(tmp_path / "t.parquet"), n=7, mode="bytes")
        data = tmp_path / "t.parquet"
    else:
        good = make_table(str(tmp_path / "c" / "t.csv"), n=7, mode="path")
        data = tmp_path / "c" / "t.csv"
    rc, err = _scan(capsys, data, tmp_path / "out")
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    assert [r["key"] for r in rows] == list(good)
    for r in rows:
        assert r["error"] is None and r["caption"].startswith("caption ")
        assert r["mean_px"] == pytest.approx(good[r["key"]].mean(), abs=1e-9)
        assert r["eps_norm"] == pytest.approx(_eps_norm(toy_unet, good[r["key"]]), rel=1e-4)


def test_model_free_scan_keeps_original_sizes(tmp_path, capsys):
    from PIL import Image

    os.makedirs(tmp_path / "mixed")
    arrs = {"a.png": np.full((10, 20, 3), 7, np.uint8), "b.png": np.full((16, 16, 3), 9, np.uint8),
            "c.png": np.full((10, 20, 3), 11, np.uint8)}
    for k, a in arrs.items():
        Image.fromarray(a).save(tmp_path / "mixed" / k)
    rc, err = _scan(capsys, tmp_path / "mixed", tmp_path / "out", metrics="mean_px", model=None)
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    assert [(r["key"], r["width"], r["height"], r["mean_px"]) for r in rows] == [
        ("a.png", 20, 10, 7.0), ("b.png", 16, 16, 9.0), ("c.png", 20, 10, 11.0)]


def test_out_of_memory_halves_the_batch(tmp_path, capsys):
    good = make_folder(tmp_path / "imgs", n=9)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", "--batch-size", "8", "--unit-size", "9",
                    metrics="oom_above_2", model=None)
    assert rc == 0, err
    assert "batch size halved to 4" in err and "batch size halved to 2" in err
    rows = _rows(tmp_path / "out")
    assert all(r["error"] is None for r in rows)
    assert [r["oom_above_2"] for r in rows] == pytest.approx([good[r["key"]].mean() for r in rows])


def test_a_failing_sample_gets_its_error_and_the_rest_their_values(tmp_path, capsys):
    good = make_folder(tmp_path / "imgs", n=6)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="fails_on_3,mean_px", model=None)
    assert rc == 0, err
    rows = {r["key"]: r for r in _rows(tmp_path / "out")}
    bad = rows.pop("img003.png")
    assert bad["error"] == "fails_on_3: ValueError: cannot handle img003.png" and bad["fails_on_3"] is None
    assert bad["mean_px"] == pytest.approx(good["img003.png"].mean())
    assert all(r["error"] is None and r["fails_on_3"] == pytest.approx(good[k].mean()) for k, r in rows.items())


def test_a_metric_failing_everywhere_stops_the_scan(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=20)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="always_fails", model=None)
    assert rc == 1 and "always_fails failed on the first" in err and "this metric is broken" in err
    assert "Traceback" not in err


def test_samples_without_caption_get_an_error_for_caption_metrics(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=3, captions=False)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="caption_len,mean_px", model=None)
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    assert all(r["error"] == "caption_len: no caption" and r["mean_px"] is not None for r in rows)


def test_rerun_resumes_and_changed_settings_are_refused(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=8)
    out = tmp_path / "out"
    rc, _ = _scan(capsys, tmp_path / "imgs", out, metrics="mean_px", model=None)
    first = _rows(out)
    mtimes = {p: os.path.getmtime(p) for _, _, p in part_files(str(out))}
    rc, err = _scan(capsys, tmp_path / "imgs", out, metrics="mean_px", model=None)
    assert rc == 0 and "resuming: 8 rows" in err and "scanned 0 images" in err
    assert {p: os.path.getmtime(p) for _, _, p in part_files(str(out))} == mtimes  # nothing rewritten
    assert _rows(out) == first
    rc, err = _scan(capsys, tmp_path / "imgs", out, "--t0", "0.02", "--seed", "4", metrics="mean_px", model=None)
    # only what differs is printed, not both whole dictionaries
    assert rc == 2 and "holds a scan with other settings" in err
    assert "settings.t0: was null, now 0.02" in err and "settings.seed: was 0, now 4" in err
    assert "n_probes" not in err and "unit_size" not in err


def test_resume_after_a_lost_part_rescans_only_that_part(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=10)
    out = tmp_path / "out"
    rc, _ = _scan(capsys, tmp_path / "imgs", out, "--part-rows", "2", metrics="mean_px", model=None)
    first = _rows(out)
    parts = part_files(str(out))
    assert len(parts) == 6  # units of 4, 4, 2 rows in parts of at most 2 (batches of 3 split them 3+1)
    os.unlink(parts[1][2])  # as if the process had died before writing this part
    os.unlink(out / "results.parquet")
    rc, err = _scan(capsys, tmp_path / "imgs", out, "--part-rows", "2", metrics="mean_px", model=None)
    assert rc == 0 and "scanned 1 images" in err
    assert _rows(out) == first


def test_progress_log_lines_when_not_a_terminal(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=6)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", "--log-every", "0", metrics="mean_px",
                    model=None)
    assert rc == 0
    lines = [x for x in err.splitlines() if x.startswith("scan: ") and "images/s" in x]
    assert lines and "6/6 images (100.0%)" in lines[-1] and "ETA" in lines[-1]
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out2", "--quiet", metrics="mean_px", model=None)
    assert rc == 0 and err == ""


def test_merge_command_dedups_and_reports_incomplete(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=10)
    out = tmp_path / "out"
    rc, _ = _scan(capsys, tmp_path / "imgs", out, "--no-merge", metrics="mean_px", model=None)
    assert rc == 0 and not (out / "results.parquet").exists()
    parts = part_files(str(out))
    # a part present twice (e.g. copied by hand) must not duplicate rows
    shutil.copy(parts[0][2], out / "part-u0000000-s0007.parquet")
    assert main(["merge", str(out)]) == 0
    rows = _rows(out)
    assert [r["key"] for r in rows] == [f"img{i:03d}.png" for i in range(10)]
    err = capsys.readouterr().err
    assert "10 rows" in err and "note: 4 rows were present twice" in err
    os.unlink(parts[-1][2])  # the last unit is missing now
    for extra in out.glob("part-u0000000-s0007.parquet"):
        os.unlink(extra)
    assert main(["merge", str(out)]) == 0
    assert "INCOMPLETE: 2/3 units" in capsys.readouterr().err and len(_rows(out)) == 8
    meta = json.loads(pq.read_schema(out / "results.parquet").metadata[b"mmh_fast"])
    assert meta["merge"]["complete"] is False
    os.makedirs(tmp_path / "nothing")
    assert main(["merge", str(tmp_path / "nothing")]) == 2
    assert "holds no result parts" in capsys.readouterr().err


def test_progress_bar_and_metrics_listing(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=4)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", "--progress", "bar", metrics="mean_px", model=None)
    assert rc == 0 and "4/4" in err and "img/s" in err  # tqdm's bar with the count and rate
    assert main(["metrics", "--plugin", PLUGIN]) == 0
    listing = capsys.readouterr().out
    line = next(x for x in listing.splitlines() if x.startswith("eps_norm"))
    assert "needs: model" in line and "low = memorized" in line


def test_removed_manifest_is_recovered_from_the_parts(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=4)
    out = tmp_path / "out"
    assert _scan(capsys, tmp_path / "imgs", out, metrics="mean_px", model=None)[0] == 0
    os.unlink(out / "scan.json")
    rc, err = _scan(capsys, tmp_path / "imgs", out, "--seed", "3", metrics="mean_px", model=None)
    assert rc == 2 and "other settings" in err


def test_local_pipeline_directory_loads_offline(tmp_path, capsys, toy_unet):
    from mmh_fast.cli.loader import load_model, native_image_size

    pipe = load_model("toy-ddpm", device=torch.device("cpu"), dtype=torch.float32).pipeline
    pipe.save_pretrained(tmp_path / "pipe")
    assert native_image_size(str(tmp_path / "pipe")) == 32
    good = make_folder(tmp_path / "imgs", n=3)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="eps_norm", model=str(tmp_path / "pipe"))
    assert rc == 0, err
    for r in _rows(tmp_path / "out"):
        assert r["eps_norm"] == pytest.approx(_eps_norm(toy_unet, good[r["key"]]), rel=1e-4)
    meta = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert meta["model"]["class"] == "DDPMPipeline" and meta["model"]["kind"] == "pipeline"
    # the same weights give the same fingerprint, whichever way they were loaded
    assert meta["model"]["fingerprint"] == load_model("toy-ddpm", device=torch.device("cpu"),
                                                      dtype=torch.float32).fingerprint


def _library_flipd(model_name, good, keys, **kw):
    from mmh_fast import flipd
    from mmh_fast.cli.loader import load_model
    from mmh_fast.cli.sources import sample_id

    pipe = load_model(model_name, device=torch.device("cpu"), dtype=torch.float32).pipeline
    x = torch.from_numpy(np.stack([good[k] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = torch.tensor([sample_id(k) for k in keys])
    # the library's defaults (t0 = 0.05 among them) except what the call names; the scan keys
    # each sample's probes by its key (sample_ids), whatever batch it falls in
    return flipd(pipe, x, sample_ids=ids, **kw).double().numpy()


@pytest.mark.parametrize("model", ["toy-ddpm", "toy-sd"])
def test_flipd_metrics_equal_the_library_on_the_same_images(tmp_path, capsys, model):
    good = make_folder(tmp_path / "imgs", n=5)
    metrics = "flipd" if model == "toy-ddpm" else "flipd,flipd_cond"
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", "--batch-size", "2", "--n-probes", "2",
                    "--seed", "5", metrics=metrics, model=model)
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    keys = [r["key"] for r in rows]
    # the library on all images at once: per-sample probe keys make batching irrelevant
    ref = _library_flipd(model, good, keys, cond="" if model == "toy-sd" else None, n_probes=2, seed=5)
    np.testing.assert_allclose([r["flipd"] for r in rows], ref, rtol=1e-4, atol=1e-3)
    if model == "toy-sd":
        ref_c = _library_flipd(model, good, keys, cond=[r["caption"] for r in rows], n_probes=2, seed=5)
        np.testing.assert_allclose([r["flipd_cond"] for r in rows], ref_c, rtol=1e-4, atol=1e-3)
        assert not np.allclose(ref, ref_c)  # the caption matters


def test_scan_flipd_with_its_defaults_equals_the_library_with_its_defaults(tmp_path, capsys):
    """One image, one FLIPD: `mmh-fast scan --metrics flipd` and `mmh_fast.flipd(unet, x)` agree
    without any option on either side (t0 0.05, one probe, seed 0: the paper's t0)."""
    good = make_folder(tmp_path / "imgs", n=3)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="flipd")
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    keys = [r["key"] for r in rows]
    ref = _library_flipd("toy-ddpm", good, keys)
    np.testing.assert_allclose([r["flipd"] for r in rows], ref, rtol=1e-4, atol=1e-3)
    # the effective settings, every one with its value, in scan.json and the Parquet metadata
    from mmh_fast import flipd

    want = {"t0": 0.05, "trace": "auto", "method": "vjp", "probe": "rademacher"}
    import inspect
    sig = inspect.signature(flipd).parameters
    assert {k: sig[k].default for k in want} == want  # the library's own defaults
    meta = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert meta["settings"]["metric_settings"] == {"flipd": want}
    pmeta = json.loads(pq.read_schema(tmp_path / "out" / "results.parquet").metadata[b"mmh_fast"])
    assert pmeta["settings"]["metric_settings"] == {"flipd": want}
    # --t0 overrides every metric; --option flipd.t0 this one (and wins over --t0)
    ref02 = _library_flipd("toy-ddpm", good, keys, t0=0.2)
    for extra in (["--t0", "0.2"], ["--t0", "0.7", "--option", "flipd.t0=0.2"]):
        out = tmp_path / f"out{len(extra)}"
        rc, err = _scan(capsys, tmp_path / "imgs", out, *extra, metrics="flipd,eps_norm", model="toy-ddpm")
        assert rc == 0, err
        np.testing.assert_allclose([r["flipd"] for r in _rows(out)], ref02, rtol=1e-4, atol=1e-3)
        ms = json.loads((out / "scan.json").read_text())["settings"]["metric_settings"]
        assert ms["flipd"]["t0"] == 0.2 and ms["eps_norm"]["t0"] == float(extra[1])
    assert not np.allclose(ref, ref02)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "bad", "--option", "png.t0=0.1", metrics="flipd,png")
    assert rc == 2 and "png.t0: not an option of the selected metrics" in err


def test_paper_defaults_of_the_built_in_metrics():
    from mmh_fast.cli.metrics import get_metric

    # MMH App. C: FLIPD t0 = 0.05, NB t0 = 0.1, the training-set CFG norm t0 = 0.01 after 3 Euler steps
    assert get_metric("flipd").defaults["t0"] == get_metric("flipd_cond").defaults["t0"] == 0.05
    assert get_metric("nb").defaults["t0"] == 0.1 and get_metric("nb").per_image
    assert get_metric("cfg_norm_train").defaults == {"t0": 0.01, "n_euler": 3}
    # issue 16's caption-level detectors: Jeon et al. n = 4 latents, Asthana and Belagiannis gamma 1 and 2
    # at the third-to-last step, Ren et al. one latent; all on the 50-step DDIM grid
    assert get_metric("sharpness").defaults["num_images"] == 4
    assert get_metric("norm_alignment").defaults == {"num_images": 1, "norm_weight": 1.0, "alignment_weight": 2.0,
                                                     "alignment_step": -3, "num_inference_steps": 50}
    assert get_metric("attention_entropy").defaults == {"num_images": 1, "num_inference_steps": 50,
                                                        "guidance_scale": 7.5}


def _scan_with_inputs(tmp_path, capsys, n, model, metrics, *args):
    """Scan n images; return (rows, the model's pipeline, the images as the library takes them [n, 3, H, W])."""
    from mmh_fast.cli.loader import load_model

    good = make_folder(tmp_path / "imgs", n=n)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", *args, metrics=metrics, model=model)
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    pipe = load_model(model, device=torch.device("cpu"), dtype=torch.float32).pipeline
    x = torch.from_numpy(np.stack([good[r["key"]] for r in rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return rows, pipe, x


def test_nb_metric_equals_the_library(tmp_path, capsys):
    from mmh_fast import normal_bundle
    from mmh_fast.cli.sources import sample_id

    rows, pipe, x = _scan_with_inputs(tmp_path, capsys, 3, "toy-ddpm", "nb", "--option", "n_samples=48",
                                      "--seed", "2")
    keys = [r["key"] for r in rows]
    ref = normal_bundle(pipe, x, 0.1, n_samples=48, seed=2, sample_ids=torch.tensor([sample_id(k) for k in keys]))
    assert [r["nb"] for r in rows] == ref.tolist()
    schema = pq.read_schema(tmp_path / "out" / "results.parquet")
    assert str(schema.field("nb").type) == "int64"


def test_cfg_norm_train_metric_equals_the_library(tmp_path, capsys):
    from mmh_fast.text import cfg_norm_train

    rows, pipe, x = _scan_with_inputs(tmp_path, capsys, 4, "toy-sd", "cfg_norm_train", "--batch-size", "3",
                                      "--option", "n_euler=2")
    ref = cfg_norm_train(pipe, x, [r["caption"] for r in rows], n_euler=2).double().numpy()  # t0: both default 0.01
    np.testing.assert_allclose([r["cfg_norm_train"] for r in rows], ref, rtol=1e-4, atol=1e-5)
    assert (ref > 0).all()
    meta = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert meta["metrics"]["cfg_norm_train"]["lower_is_memorized"] is False


def test_caption_detector_metrics_equal_the_library(tmp_path, capsys):
    """sharpness / norm_alignment / attention_entropy of a training image are the issue-16
    detectors of its caption as a prompt, with the scan's seed and options."""
    from mmh_fast.text import cross_attention_entropy, hessian_score_difference_norm, norm_alignment_score

    names = "sharpness,norm_alignment,attention_entropy"
    rows, pipe, _ = _scan_with_inputs(tmp_path, capsys, 4, "toy-sd", names, "--seed", "3",
                                      "--option", "num_inference_steps=5", "--option", "sharpness.num_images=2")
    caps = [r["caption"] for r in rows]
    fast = dict(num_inference_steps=5, seed=3)
    ref = {"sharpness": hessian_score_difference_norm(pipe, caps, num_images=2, **fast),
           "norm_alignment": norm_alignment_score(pipe, caps, **fast),
           "attention_entropy": cross_attention_entropy(pipe, caps, **fast)}
    for name, r in ref.items():
        np.testing.assert_allclose([row[name] for row in rows], r.double().numpy(), rtol=1e-6, atol=1e-9,
                                   err_msg=name)
    meta = json.loads((tmp_path / "out" / "scan.json").read_text())
    ms = meta["settings"]["metric_settings"]
    # paper defaults recorded, no diffusion time: these start from pure noise
    assert ms["norm_alignment"] == {"num_images": 1, "norm_weight": 1.0, "alignment_weight": 2.0,
                                    "alignment_step": -3, "num_inference_steps": 5}
    assert ms["sharpness"] == {"num_images": 2, "num_inference_steps": 5, "guidance_scale": 7.5}
    assert all(meta["metrics"][n]["lower_is_memorized"] is False for n in ref)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "bad", "--option", "sharpness.t0=0.1", metrics="sharpness",
                    model="toy-sd")
    assert rc == 2 and "sharpness.t0: not an option of the selected metrics" in err
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "bad2", "--option", "num_images=2.5",
                    metrics="norm_alignment", model="toy-sd")
    # a metric's failure is each row's error, as for every metric (scan itself goes on)
    assert rc == 0 and all("--option num_images: expected an integer, got 2.5" in r["error"]
                           for r in _rows(tmp_path / "bad2")), err


def test_png_metric_and_default_metrics(tmp_path, capsys):
    from mmh_fast import png_complexity

    good = make_folder(tmp_path / "imgs", n=4, corrupt=(2,))
    # no --metrics and no --model: the default is png alone
    rc = main(["scan", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--workers", "0"])
    assert rc == 0, capsys.readouterr().err
    rows = _rows(tmp_path / "out")
    for r in rows:
        if r["key"] in good:
            assert r["png"] == int(png_complexity(good[r["key"]][None])[0])  # [1, H, W, 3]
        else:
            assert r["png"] is None and r["error"].startswith("decode:")
    meta = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert meta["settings"]["metrics"] == ["png"] and meta["model"] is None
    # with a model the default is flipd,png
    rc = main(["scan", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "out2"), "--model", "toy-ddpm",
               "--workers", "0", "--quiet"])
    assert rc == 0 and _rows(tmp_path / "out2")[0].keys() >= {"flipd", "png"}


def test_non_finite_metric_values_become_error_rows(tmp_path, capsys, monkeypatch):
    """A metric returning NaN for one sample: that row gets an error and no value (never a NaN
    in the results); the others keep theirs; the summary names the failed key."""
    good = make_folder(tmp_path / "imgs", n=7)
    monkeypatch.setenv("MMH_TEST_BAD_KEY", "img004.png")
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", metrics="nan_for_key,mean_px", model=None)
    assert rc == 0, err
    rows = {r["key"]: r for r in _rows(tmp_path / "out")}
    bad = rows.pop("img004.png")
    assert bad["nan_for_key"] is None and bad["error"] == "nan_for_key: non-finite value nan (NaN or inf): not a result"
    assert bad["mean_px"] == pytest.approx(good["img004.png"].mean())
    assert all(r["error"] is None and r["nan_for_key"] == pytest.approx(good[k].mean()) for k, r in rows.items())
    assert "1 with errors" in err and "failed: img004.png (nan_for_key: non-finite value nan" in err
    assert "'error' column of" in err
    col = pq.read_table(tmp_path / "out" / "results.parquet").column("nan_for_key")
    assert col.null_count == 1 and all(np.isfinite(v) for v in col.to_pylist() if v is not None)


def test_non_finite_output_error_marks_only_the_named_samples(tmp_path, capsys, monkeypatch):
    """An estimator raising NonFiniteOutputError (positions within its call): only that sample
    gets the error; the rest of its batch is computed (as one call, not one by one)."""
    good = make_folder(tmp_path / "imgs", n=6)
    monkeypatch.setenv("MMH_TEST_BAD_KEY", "img001.png")
    calls = []
    from mmh_fast.cli import metrics as registry

    orig = registry.get_metric("nonfinite_error").fn

    def counting(batch, ctx):
        calls.append(list(batch.keys))
        return orig(batch, ctx)

    registry.register_metric("nonfinite_error", counting, overwrite=True)
    try:
        rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", "--unit-size", "6",
                        metrics="nonfinite_error", model=None)
    finally:
        registry.register_metric("nonfinite_error", orig, overwrite=True)
    assert rc == 0, err
    rows = {r["key"]: r for r in _rows(tmp_path / "out")}
    bad = rows.pop("img001.png")
    assert bad["nonfinite_error"] is None
    assert bad["error"] == ("nonfinite_error: NonFiniteOutputError: the test network's output is not finite "
                            "(NaN or inf) for this sample")
    assert all(r["error"] is None and r["nonfinite_error"] == pytest.approx(good[k].mean()) for k, r in rows.items())
    # batches of 3: [0, 1, 2] fails naming position 1, then [0, 2] in one call, then [3, 4, 5]
    assert calls == [["img000.png", "img001.png", "img002.png"], ["img000.png", "img002.png"],
                     ["img003.png", "img004.png", "img005.png"]]


def test_per_image_metrics_report_progress_inside_a_batch(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=4)
    rc, err = _scan(capsys, tmp_path / "imgs", tmp_path / "out", "--log-every", "0", "--batch-size", "4",
                    metrics="per_image_px", model=None)
    assert rc == 0, err
    assert "per_image_px: 1/4 images of the current batch" in err and "3/4 images of the current batch" in err
    assert [r["per_image_px"] for r in _rows(tmp_path / "out")] == pytest.approx(
        [a.mean() for a in make_folder(tmp_path / "again", n=4).values()])


def test_effective_settings_precedence():
    """NAME.SETTING over --t0 / SETTING over the metric's defaults; t0 falls back to
    FALLBACK_T0 only for a model metric that has a t0; other metrics' keys are ignored
    (expected dicts written by hand from the documented precedence)."""
    from mmh_fast.cli.metrics import FALLBACK_T0, Metric, effective_settings

    m = Metric("m", None, needs_model=True, options=("a", "b"), defaults={"a": 1})
    assert effective_settings(m, t0=None, options={}) == {"a": 1, "t0": FALLBACK_T0}
    assert effective_settings(m, t0=0.3, options={"a": 2, "c": 9, "other.b": 7}) == {"a": 2, "t0": 0.3}
    assert effective_settings(m, t0=0.3, options={"m.t0": 0.2, "a": 2, "m.a": 5, "b": 4}) == \
        {"a": 5, "b": 4, "t0": 0.2}
    # no model, or a caption-level detector (uses_t0=False): no t0, and --t0 does not add one
    free = Metric("f", None, options=("a",))
    assert effective_settings(free, t0=0.3, options={"a": 1}) == {"a": 1}
    no_t0 = Metric("g", None, needs_model=True, uses_t0=False)
    assert effective_settings(no_t0, t0=0.3, options={}) == {}
