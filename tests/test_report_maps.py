"""`mmh-fast report --maps`: memorization maps of the images a scan ranks most
memorized, end to end on a tiny Stable Diffusion pipeline saved with
save_pretrained. The maps, generated images and overlays the report writes must
equal what the library computes for those images' captions, and the images must
be the top N by the scan's metric in its own direction."""
import json
import os
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmh_fast.cli import main

from cli_data import make_folder

STEPS = 3  # a short trajectory keeps the test fast; the maps are taken at its last step either way


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A saved tiny SD pipeline (32 x 32 images, 16 x 16 latents), a captioned folder,
    and its scan with flipd (low = memorized) and cfg_norm_train (high = memorized)."""
    from mmh_fast.cli.loader import load_model

    root = tmp_path_factory.mktemp("maps")
    pipe = load_model("toy-sd", device=torch.device("cpu"), dtype=torch.float32).pipeline
    pipe.save_pretrained(root / "sd")
    make_folder(root / "imgs", n=6)
    (root / "imgs" / "img004.txt").unlink()  # one image without a caption
    assert main(["scan", "--data", str(root / "imgs"), "--out", str(root / "scan"), "--model", str(root / "sd"),
                 "--metrics", "flipd,cfg_norm_train", "--seed", "3", "--workers", "0", "--quiet"]) == 0
    rows = pq.read_table(root / "scan" / "results.parquet").to_pylist()
    return root, rows


def _sd(root):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(root / "sd"), safety_checker=None,
                                                   requires_safety_checker=False)


def _top(rows, metric, n, lower):
    """Independent ranking: rows with a finite value and a caption, lowest (or highest) first."""
    ok = [r for r in rows if r[metric] is not None and r["caption"]]
    return [r["key"] for r in sorted(ok, key=lambda r: r[metric] if lower else -r[metric])[:n]]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self.captions, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self._in = tag

    def handle_data(self, data):
        if self._in == "td":
            self.cells.append(data)
        elif self._in == "figcaption":
            self.captions.append(data)


def test_score_maps_equal_the_library_for_the_lowest_flipd_images(scanned, capsys):
    from mmh_fast.text import generate, map_overlay, score_difference_map

    root, rows = scanned
    out = root / "rep_score"
    rc = main(["report", str(root / "scan"), "--out", str(out), "--maps", "3", "--map-steps", str(STEPS),
               "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    z = np.load(out / "maps" / "maps.npz")
    keys = z["keys"].tolist()
    # the report's default ranking: its LID metric (flipd), lowest first; img004 has no caption
    assert keys == _top(rows, "flipd", 3, lower=True)
    by_key = {r["key"]: r for r in rows}
    caps = [by_key[k]["caption"] for k in keys]
    assert z["captions"].tolist() == caps
    assert z["values"].tolist() == [by_key[k]["flipd"] for k in keys]
    pipe = _sd(root)
    kw = dict(num_images=1, seed=3, num_inference_steps=STEPS, guidance_scale=7.5)  # the scan's --seed
    ref = score_difference_map(pipe, caps, **kw)[:, 0]
    assert ref.shape == (3, 32, 32)  # 16 x 16 latent maps upsampled to the image
    np.testing.assert_allclose(z["maps"], ref.numpy(), rtol=1e-5, atol=1e-8)
    gen = generate(pipe, caps, **kw)
    np.testing.assert_allclose(z["generated"], gen.numpy(), rtol=1e-5, atol=1e-5)
    over = map_overlay(gen, ref)
    np.testing.assert_allclose(z["overlays"], over.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(z["overlays"] - z["generated"]).max() > 0.1  # the map does mark the image
    settings = json.loads(str(z["settings"]))
    assert settings["function"] == "mmh_fast.text.score_difference_map" and settings["num_inference_steps"] == STEPS
    # the page: the figure with a title saying what the map is, and the table of the ranked images
    page = _Page()
    page.feed((out / "report.html").read_text())
    cap = [c for c in page.captions if c.startswith("Memorization maps")]
    assert len(cap) == 1 and "score-difference map" in cap[0] and "lowest FLIPD" in cap[0]
    for k in keys:
        assert k in page.cells
    assert (out / "maps.png").stat().st_size > 0


def test_curvature_maps_ranked_by_a_score_highest_first(scanned, capsys):
    from mmh_fast.text import curvature_difference_map

    root, rows = scanned
    out = root / "rep_curv"
    rc = main(["report", str(root / "scan"), "--out", str(out), "--maps", "2", "--map", "curvature",
               "--maps-metric", "cfg_norm_train", "--map-steps", str(STEPS), "--map-probes", "2",
               "--map-guidance", "3", "--format", "md", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    z = np.load(out / "maps" / "maps.npz")
    keys = z["keys"].tolist()
    assert keys == _top(rows, "cfg_norm_train", 2, lower=False)  # a score: highest first
    caps = [r["caption"] for k in keys for r in rows if r["key"] == k]
    ref = curvature_difference_map(_sd(root), caps, num_images=1, seed=3, num_inference_steps=STEPS,
                                   guidance_scale=3.0, n_probes=2)[:, 0]
    np.testing.assert_allclose(z["maps"], ref.numpy(), rtol=1e-4, atol=1e-7)
    md = (out / "report.md").read_text()
    assert "curvature-difference map" in md and "## Memorization maps (curvature), ranked by cfg_norm_train" in md


def test_maps_refuse_scans_without_what_they_need(scanned, tmp_path, capsys):
    root, _ = scanned
    # an unconditional model
    make_folder(tmp_path / "imgs", n=3)
    assert main(["scan", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "uncond"), "--model", "toy-ddpm",
                 "--metrics", "flipd", "--workers", "0", "--quiet"]) == 0
    rc = main(["report", str(tmp_path / "uncond"), "--out", str(tmp_path / "r1"), "--maps", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "unconditional" in err and "--map-model" in err
    # no model at all
    assert main(["scan", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "nomodel"), "--metrics", "png",
                 "--workers", "0", "--quiet"]) == 0
    rc = main(["report", str(tmp_path / "nomodel"), "--out", str(tmp_path / "r2"), "--maps", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "without --model" in err and "--map-model" in err
    # ... which --map-model supplies; but captions are still needed
    make_folder(tmp_path / "nocap", n=3, captions=False)
    assert main(["scan", "--data", str(tmp_path / "nocap"), "--out", str(tmp_path / "nocap_scan"), "--metrics",
                 "png", "--workers", "0", "--quiet"]) == 0
    rc = main(["report", str(tmp_path / "nocap_scan"), "--out", str(tmp_path / "r3"), "--maps", "2",
               "--map-model", str(root / "sd")])
    err = capsys.readouterr().err
    assert rc == 2 and "--maps" in err and "no captions" in err
    # bad values name the option
    rc = main(["report", str(root / "scan"), "--out", str(tmp_path / "r4"), "--maps", "-1"])
    assert rc == 2 and "--maps must be an integer >= 0" in capsys.readouterr().err
    rc = main(["report", str(root / "scan"), "--out", str(tmp_path / "r5"), "--maps", "1", "--maps-metric", "nope"])
    assert rc == 2 and "--maps-metric 'nope'" in capsys.readouterr().err
