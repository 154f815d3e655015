"""`mmh-fast report`: ROC/AUC against scikit-learn, the figures, the HTML page
(parsed) and the Markdown table."""
import base64
import io
import os
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from mmh_fast.cli import main
from mmh_fast.cli.report import roc_auc, roc_curve, tpr_at_fpr

from cli_data import PLUGIN, make_folder


@pytest.mark.parametrize("seed", range(4))
def test_roc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    y = rng.random(n) < 0.3
    scores = np.round(rng.normal(size=n) + 1.2 * y, 1)  # rounding makes many ties
    fpr, tpr, thr = roc_curve(scores, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])
    assert roc_auc(fpr, tpr) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    # TPR at 1% FPR: the best operating point whose FPR does not exceed 1%
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(sk_tpr[sk_fpr <= 0.01].max())


def test_roc_extremes_and_bad_input():
    fpr, tpr, _ = roc_curve([3, 2, 1, 0], [1, 1, 0, 0])
    assert roc_auc(fpr, tpr) == 1.0 and tpr_at_fpr(fpr, tpr) == 1.0
    fpr, tpr, _ = roc_curve([1, 1, 1, 1], [1, 0, 1, 0])
    assert roc_auc(fpr, tpr) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([1, 2], [1, 1])
    with pytest.raises(ValueError, match="finite"):
        roc_curve([1, np.nan], [1, 0])
    with pytest.raises(ValueError, match="differ in length"):
        roc_curve([1, 2, 3], [1, 0])


class _Page(HTMLParser):
    """Collects images and table cells, and checks that every element is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images, self.cells, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "th"):
            self.cells.append(data)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    good = make_folder(tmp / "imgs", n=14)
    assert main(["scan", "--data", str(tmp / "imgs"), "--out", str(tmp / "out"), "--metrics",
                 "mean_px,caption_len", "--plugin", PLUGIN, "--workers", "0", "--quiet"]) == 0
    return tmp, good


def _labels(tmp, good, words):
    keys = sorted(good)
    brightness = np.array([good[k].mean() for k in keys])
    mem = brightness >= np.sort(brightness)[-5]  # the 5 brightest are "memorized"
    path = tmp / "labels.csv"
    with open(path, "w") as f:
        f.write("key,label\n")
        for k, m, i in zip(keys, mem, range(len(keys))):
            f.write(f"{k},{words[0] if m else words[1 + i % (len(words) - 1)]}\n")
    return path, keys, mem, brightness


def test_report_html_with_labels(scanned, capsys):
    tmp, good = scanned
    labels, keys, mem, brightness = _labels(tmp, good, ["memorized", "none"])
    out = tmp / "rep"
    assert main(["report", str(tmp / "out"), "--labels", str(labels), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    for f in ("hist_mean_px.png", "hist_caption_len.png", "roc.png", "lowest_caption_len.png"):
        assert Image.open(out / f).size[0] > 100
    page = _Page()
    page.feed((out / "report.html").read_text())
    page.close()
    assert page.stack == [] and len(page.images) == 4
    assert all(src.startswith("data:image/png;base64,") for src in page.images)  # self-contained
    Image.open(io.BytesIO(base64.b64decode(page.images[0].split(",", 1)[1]))).verify()
    # the AUC in the table is the metric's AUC on these labels, oriented by the metric:
    # mean_px is "high = memorized", caption_len "low = memorized"
    cells = [c.strip() for c in page.cells]
    caplen = np.array([len(f"caption {int(k[3:6])}") for k in keys])
    for name, score in (("mean_px", brightness), ("caption_len", -caplen)):
        row = cells[cells.index(name):]
        assert f"{roc_auc_score(mem, score):.4g}" in row[:14], (name, row[:14])
    assert f"{roc_auc_score(mem, brightness):.4g}" == "1"


def test_report_markdown_and_multiclass_labels(scanned, capsys):
    tmp, good = scanned
    labels, keys, mem, brightness = _labels(tmp, good, ["dd_mem", "none"])
    out = tmp / "md"
    assert main(["report", str(tmp / "out" / "results.parquet"), "--labels", str(labels), "--out", str(out),
                 "--format", "md", "--quiet"]) == 0
    text = (out / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert {"auc", "tpr@1%fpr", "mean[dd_mem]", "mean[none]"} <= set(cols)
    row = next(line for line in text.splitlines() if line.startswith("| mean_px |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[cols.index("auc")] == "1" and cells[cols.index("tpr@1%fpr")] == "1"
    assert "![ROC curves (dd_mem = positive)](roc.png)" in text and os.path.isfile(out / "roc.png")


def test_report_labels_without_a_clear_positive(scanned, capsys):
    tmp, good = scanned
    labels, *_ = _labels(tmp, good, ["cat", "dog"])
    out = tmp / "unclear"
    assert main(["report", str(tmp / "out"), "--labels", str(labels), "--out", str(out), "--quiet"]) == 0
    assert "pass --positive" in (out / "report.html").read_text() and not (out / "roc.png").exists()
    assert main(["report", str(tmp / "out"), "--labels", str(labels), "--out", str(out), "--quiet",
                 "--positive", "cat"]) == 0
    assert (out / "roc.png").exists()
    assert main(["report", str(tmp / "out"), "--labels", str(labels), "--out", str(out), "--positive", "cow"]) == 2
    assert "is not among the labels" in capsys.readouterr().err


def test_report_on_results_without_readable_images(tmp_path, capsys):
    # results whose sources are gone: the report still works, and says so
    t = pa.table({"key": ["a", "b", "c"], "source": ["/gone/a.png"] * 3, "caption": [None] * 3,
                  "width": pa.array([8] * 3, pa.int32()), "height": pa.array([8] * 3, pa.int32()),
                  "flipd": [1.0, 2.0, 3.0], "error": pa.array([None] * 3, pa.string())})
    pq.write_table(t, tmp_path / "r.parquet")
    assert main(["report", str(tmp_path / "r.parquet"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    html = (tmp_path / "o" / "report.html").read_text()
    assert "3 of the lowest-flipd images could not be read" in html
    assert (tmp_path / "o" / "hist_flipd.png").exists()


# --------------------------------------------------------------------------- issue 14: the report's new parts
def test_format_has_four_significant_digits():
    from mmh_fast.cli.report import _fmt

    assert _fmt(0.123456) == "0.1235" and _fmt(123456.7) == "1.235e+05" and _fmt(3.0) == "3"
    assert _fmt(7) == "7" and _fmt(float("nan")) == "-" and _fmt(None) == "-"


def test_curves_that_coincide_stay_distinguishable():
    from mmh_fast.cli.report import curve_style

    styles = [(s["ls"], s["marker"]) for s in map(curve_style, range(8))]
    assert len(set(styles)) == 8 and len({m for _, m in styles}) == 8


def test_metric_titles_say_what_a_metric_is():
    from mmh_fast.cli.report import metric_title

    meta = {"settings": {"t0": 0.05}, "metrics": {"flipd": {}, "nb": {"t0": 0.2}, "lpca": {"rule": "paper", "k": 100},
                                                  "mine": {"description": "my score"}}}
    assert metric_title("flipd", meta) == "FLIPD LID_theta, t0 = 0.05"
    assert metric_title("nb", meta) == "normal-bundle LID_theta, t0 = 0.2"  # the metric's own t0 first
    assert metric_title("png", meta) == "PNG complexity (bytes)"  # no t0 for a model-free metric
    assert metric_title("lpca", meta) == "local PCA LID_*, rule = paper, k = 100"
    assert metric_title("mine", meta) == "mine: my score"
    # a scan records each metric's effective t0 (--t0 unset: each metric's own default)
    scan_meta = {"settings": {"t0": None, "metric_settings": {"flipd": {"t0": 0.05}, "nb": {"t0": 0.1}}},
                 "metrics": {"flipd": {"lower_is_memorized": True}}}
    assert metric_title("flipd", scan_meta) == "FLIPD LID_theta, t0 = 0.05"
    assert metric_title("nb", scan_meta) == "normal-bundle LID_theta, t0 = 0.1"


def _write_results(path, keys, sources, flipd, meta=None):
    import json

    t = pa.table({"key": keys, "source": sources, "caption": [None] * len(keys),
                  "flipd": pa.array(flipd, pa.float64()), "error": pa.array([None] * len(keys), pa.string())})
    if meta is not None:
        t = t.replace_schema_metadata({b"mmh_fast": json.dumps(meta).encode()})
    pq.write_table(t, path)


def test_labels_from_a_file_name_column_and_examples_when_no_key_matches(tmp_path, capsys):
    good = make_folder(tmp_path / "imgs", n=6, captions=False)
    keys = sorted(good)
    _write_results(tmp_path / "r.parquet", keys, [str(tmp_path / "imgs" / k) for k in keys],
                   [float(i) for i in range(6)])
    # Hugging Face's metadata.csv: file_name (the folder key) and any label column
    (tmp_path / "metadata.csv").write_text("file_name,label\n" + "".join(
        f"{k},{'memorized' if i < 2 else 'none'}\n" for i, k in enumerate(keys)))
    out = tmp_path / "o"
    assert main(["report", str(tmp_path / "r.parquet"), "--labels", str(tmp_path / "metadata.csv"), "--out",
                 str(out), "--format", "md", "--quiet"]) == 0
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| flipd |"))
    assert "| 1 | 1 |" in row  # the two lowest flipd are the two memorized: AUC 1, TPR@1% 1
    # no key matches: both sides' keys are shown
    (tmp_path / "stems.csv").write_text("key,label\n" + "".join(f"{k[:-4]},none\n" for k in keys))
    assert main(["report", str(tmp_path / "r.parquet"), "--labels", str(tmp_path / "stems.csv"), "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "'img000'" in err and "'img000.png'" in err and "extension included" in err


def test_lowest_grid_marks_positives_and_resolves_sources_relative_to_the_results(tmp_path, monkeypatch, capsys):
    good = make_folder(tmp_path / "scan" / "imgs", n=6, captions=False)
    keys = sorted(good)
    # relative sources (as a scan run from tmp_path/scan writes them), read from another folder
    _write_results(tmp_path / "scan" / "results.parquet", keys, [f"imgs/{k}" for k in keys],
                   [float(i) for i in range(6)])
    (tmp_path / "labels.csv").write_text("key,label\n" + "".join(
        f"{k},{'memorized' if i in (1, 4) else 'none'}\n" for i, k in enumerate(keys)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(tmp_path / "scan"), "--labels", str(tmp_path / "labels.csv"), "--out", "o",
                 "--format", "md", "--top", "3"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # every image was found
    text = (elsewhere / "o" / "report.md").read_text()
    assert "1 of them labelled positive (red frame)" in text  # the 3 lowest: img000, img001 (memorized), img002
    table = text.split("## Lowest", 1)[1]
    assert f"| {keys[1]} | 1 | memorized |" in table and f"| {keys[0]} | 0 | none |" in table
    # the images gone: a warning on the page and on stderr
    for k in keys:
        os.remove(tmp_path / "scan" / "imgs" / k)
    assert main(["report", str(tmp_path / "scan"), "--out", "o2", "--format", "md"]) == 0
    err = capsys.readouterr().err
    assert "warning: 6 of the lowest-flipd images could not be read" in err and keys[0] in err
    assert "6 of the lowest-flipd images could not be read" in (elsewhere / "o2" / "report.md").read_text()


def test_generations_shown_next_to_the_brute_force_nearest_training_image(tmp_path):
    from mmh_fast.cli.report import _generation_pairs
    from cli_data import make_images, png_bytes

    train = make_images(60, size=16, seed=1)
    keys = [f"t{i:02d}.png" for i in range(60)]
    (tmp_path / "train").mkdir()
    for k, a in zip(keys, train):
        (tmp_path / "train" / k).write_bytes(png_bytes(a))
    _write_results(tmp_path / "results.parquet", keys, [str(tmp_path / "train" / k) for k in keys],
                   [1.0] * 60, meta={"settings": {"image_size": 16}})
    rng = np.random.default_rng(0)
    gens = [np.clip(train[7].astype(int) + rng.integers(-3, 4, train[7].shape), 0, 255).astype(np.uint8),
            train[23].copy()] + make_images(3, size=16, seed=9)
    (tmp_path / "gen").mkdir()
    for i, g in enumerate(gens):
        (tmp_path / "gen" / f"g{i}.png").write_bytes(png_bytes(g))
    notes = []
    pairs = _generation_pairs(str(tmp_path / "gen"), [str(tmp_path / "train" / k) for k in keys], keys,
                              str(tmp_path / "results.parquet"), None, {"settings": {"image_size": 16}}, None, 10,
                              notes.append)
    assert notes == []
    # brute force: nearest by l2 over all training images, calibrated by the mean of the 50 nearest (alpha 1/2)
    T = np.stack(train).reshape(60, -1).astype(np.float64) / 255
    expect = {}
    for i, g in enumerate(gens):
        d = np.linalg.norm(T - g.reshape(-1).astype(np.float64) / 255, axis=1)
        near = np.sort(d)[:50]
        expect[f"g{i}.png"] = (keys[int(np.argmin(d))], near[0] / (0.5 * near.mean()), near[0])
    got = {gk: (tk, c, l2) for _, _, gk, tk, c, l2 in pairs}
    assert set(got) == set(expect)
    for gk, (tk, c, l2) in got.items():
        assert tk == expect[gk][0]
        assert c == pytest.approx(expect[gk][1], rel=1e-5, abs=1e-9) and l2 == pytest.approx(expect[gk][2], rel=1e-5)
    assert got["g0.png"][0] == "t07.png" and got["g1.png"][:2] == ("t23.png", 0.0)
    assert [gk for *_, gk, _, c, _ in pairs][:2] == ["g1.png", "g0.png"]  # sorted by calibrated l2, copies first


def test_report_with_classes_counts_and_scatter(tmp_path):
    import json

    keys = [f"k{i}" for i in range(8)]
    _write_results(tmp_path / "results.parquet", keys, [f"/gone/{k}.png" for k in keys], [float(i) for i in range(8)],
                   meta={"settings": {"t0": 0.05}, "metrics": {"flipd": {"lower_is_memorized": True}}})
    labels = ["dd_mem", "dd_mem", "od_mem", "none", "none", "none", "none", "none"]
    ct = pa.table({"key": keys, "label": labels, "lid_theta": [float(i) for i in range(8)],
                   "lid_theta_scaled": [i / 2 for i in range(8)], "lid_data": [0.0, 0.0, 9.0, 4, 5, 6, 7, 8],
                   "margin": [2.0] * 8, "low": [1.0] * 8, "scale": [0.5] * 8})
    ct = ct.replace_schema_metadata({b"mmh_fast": json.dumps(
        {"model_metric": "flipd", "scale": 0.5, "margin": 2.0, "low": 1.0,
         "scan_settings": {"t0": 0.05}, "lid_data_settings": {"rule": "paper", "k": 5}}).encode()})
    pq.write_table(ct, tmp_path / "classes.parquet")  # found beside the results without --classes
    assert main(["report", str(tmp_path / "results.parquet"), "--out", str(tmp_path / "o"), "--format", "md",
                 "--quiet"]) == 0
    text = (tmp_path / "o" / "report.md").read_text()
    section = text.split("## Memorization classes", 1)[1].split("\n## ", 1)[0]
    assert "| dd_mem | 2 | 0.25 |" in section and "| od_mem | 1 | 0.125 |" in section
    assert "| none | 5 | 0.625 |" in section
    thresholds = text.split("## Class thresholds", 1)[1].split("\n## ", 1)[0]
    assert "| margin | 2 |" in thresholds and "| low | 1 |" in thresholds and "| scale | 0.5 |" in thresholds
    assert Image.open(tmp_path / "o" / "mmh_scatter.png").size[0] > 300
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": keys}), bad)
    assert main(["report", str(tmp_path / "results.parquet"), "--classes", str(bad), "--out",
                 str(tmp_path / "o3")]) == 2
