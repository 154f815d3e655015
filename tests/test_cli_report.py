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
