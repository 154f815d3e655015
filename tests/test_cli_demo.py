"""`mmh-fast demo --quick` end to end: the planted duplicates of the digits must be
found (LID_* = 0, AUC > 0.9 on LID_*), the files written and the report readable."""
import html.parser
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmh_fast.cli import main
from mmh_fast.cli.demo import digits_with_duplicates


def test_digits_with_duplicates_plants_copies():
    images, targets, dup, rows = digits_with_duplicates(n_duplicated=4, copies=7, seed=3)
    assert images.shape == (1797, 1, 8, 8) and images.min() == -1.0 and images.max() == 1.0
    assert len(rows) == 1797 + 4 * 6 and len(set(dup.tolist())) == 4
    counts = np.bincount(rows, minlength=1797)
    assert sorted(np.nonzero(counts > 1)[0].tolist()) == sorted(dup.tolist()) and (counts[dup] == 7).all()
    with pytest.raises(ValueError, match="copies >= 2"):
        digits_with_duplicates(copies=1)


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["demo", "--quick", "--out", str(out)])
    return rc, out, buf.getvalue()


def test_quick_demo_finds_the_planted_duplicates(quick_demo):
    rc, out, printed = quick_demo
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    # the data side needs no training: every planted image is a point mass of the data
    assert summary["lid_data_duplicated"] == [0.0] * len(summary["duplicated_keys"])
    assert summary["auc"]["lpca"] > 0.9
    # FLIPD's AUC is measured and printed whatever it is (the README records the full demo's)
    assert 0.0 <= summary["auc"]["flipd"] <= 1.0
    assert "flipd" in printed and "AUC" in printed and "lpca" in printed
    # LID_* = 0 and a model LID clamped at >= 0 cannot be OD-Mem: the duplicates are DD-Mem
    assert set(summary["duplicated_keys"]) <= set(summary["flagged"]["dd_mem"])
    assert sum(summary["classes"].values()) == 1797


def test_quick_demo_files(quick_demo):
    _, out, _ = quick_demo
    t = pq.read_table(out / "results.parquet")
    assert t.num_rows == 1797
    d = t.to_pydict()
    assert len(set(d["key"])) == 1797
    assert sum(d["duplicated"]) == 10 and all(n == 50 for n, dup in zip(d["n_copies"], d["duplicated"]) if dup)
    assert all(np.isfinite(d["flipd"])) and set(d["mem_class"]) <= {"od_mem", "dd_mem", "none"}
    meta = json.loads(t.schema.metadata[b"mmh_fast"])
    assert meta["metrics"]["lpca"]["lower_is_memorized"] is True
    g = pq.read_table(out / "generations.parquet").to_pydict()
    assert len(g["calibrated_l2"]) == 128 and min(g["calibrated_l2"]) >= 0
    assert (out / "labels.csv").read_text().count("duplicated") == 10
    page = (out / "report" / "report.html").read_text()
    p = _Tags()
    p.feed(page)
    imgs = [a["src"] for tag, a in p.tags if tag == "img"]
    assert len(imgs) >= 3 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "roc.png" in {f.name for f in (out / "report").iterdir()}
