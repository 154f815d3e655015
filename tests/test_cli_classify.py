"""`mmh-fast classify`: a scan's LID_theta joined with lid-data's LID_* by key,
labelled by classify_memorization. LID_theta comes from a test metric
(cli_plugin.lid_table) whose values the test sets: a generalising model
(LID_theta = LID_*), a memorizer of a few non-duplicated images (LID_theta 0:
OD-Mem) and of the planted duplicates (LID_* 0 and LID_theta 0: DD-Mem)."""
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

import mmh_fast
from mmh_fast.cli import main

from cli_data import PLUGIN, make_folder

DUP_KEYS = ["img010.png"] + [f"zdup{i}.png" for i in range(8)]


@pytest.fixture(scope="module")
def scanned(tmp_path_factory):
    """A folder with planted duplicates and a corrupt file, its lid-data, and a function
    scanning it with LID_theta = factor * (designed values)."""
    root = tmp_path_factory.mktemp("classify")
    make_folder(root / "imgs", n=60, corrupt=(5,), captions=False)
    for i in range(8):
        shutil.copy(root / "imgs" / "img010.png", root / "imgs" / f"zdup{i}.png")
    assert main(["lid-data", "--data", str(root / "imgs"), "--out", str(root / "lid"), "--k", "15",
                 "--workers", "0", "--quiet"]) == 0
    lid = {r["key"]: r["lid_data"] for r in pq.read_table(root / "lid" / "lid_data.parquet").to_pylist()
           if r["lid_data"] is not None}
    assert all(lid[k] == 0 for k in DUP_KEYS)
    # the memorizer's victims: the 4 images of highest LID_* (clearly above any margin), LID_theta 0
    od = sorted(lid, key=lambda k: (-lid[k], k))[:4]
    assert min(lid[k] for k in od) > np.percentile(list(lid.values()), 75)
    designed = {k: (0.0 if k in od else float(v)) for k, v in lid.items()}

    def scan(name, factor):
        path = root / f"{name}.json"
        path.write_text(json.dumps({k: factor * v for k, v in designed.items()}))
        os.environ["MMH_TEST_LIDS"] = str(path)
        try:
            assert main(["scan", "--data", str(root / "imgs"), "--out", str(root / name), "--metrics", "lid_table",
                         "--plugin", PLUGIN, "--workers", "0", "--quiet"]) == 0
        finally:
            del os.environ["MMH_TEST_LIDS"]
        return root / name

    return root, lid, designed, scan, od


def _classes(path):
    return pq.read_table(path).to_pylist()


def test_classify_joins_by_key_and_labels_as_the_library(scanned, capsys):
    root, lid, designed, scan, od_keys = scanned
    sdir = scan("scan1", 1.0)
    rc = main(["classify", str(sdir), "--lid-data", str(root / "lid"), "--model-metric", "lid_table"])
    assert rc == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    rows = _classes(sdir / "classes.parquet")
    keys = [r["key"] for r in rows]
    assert keys == sorted(lid) and "img005.png" not in keys  # the corrupt image has neither LID
    assert "1 scanned samples without both LIDs left out" in err
    t = np.array([designed[k] for k in keys])
    s = np.array([lid[k] for k in keys], dtype=float)
    ref = mmh_fast.classify_memorization(t, s)
    assert [r["label"] for r in rows] == ref.labels.tolist()
    label = {r["key"]: r["label"] for r in rows}
    assert all(label[k] == "dd_mem" for k in DUP_KEYS) and all(label[k] == "od_mem" for k in od_keys)
    r0 = rows[0]
    assert (r0["scale"], r0["margin"], r0["low"]) == (1.0, ref.margin, ref.low)
    assert [r["lid_theta"] for r in rows] == t.tolist() and [r["lid_data"] for r in rows] == s.tolist()
    assert {r["key"]: r["n_copies"] for r in rows if r["n_copies"]} == {k: 8 for k in DUP_KEYS}
    meta = json.loads(pq.read_schema(sdir / "classes.parquet").metadata[b"mmh_fast"])
    assert meta["counts"] == ref.counts() and meta["model_metric"] == "lid_table"
    assert f"DD-Mem {ref.counts()['dd_mem']}, OD-Mem {ref.counts()['od_mem']}" in err


def test_incompatible_scales_are_refused_and_median_ratio_maps_them(scanned, capsys):
    root, lid, designed, scan, od_keys = scanned
    sdir = scan("scan_raw", 1000.0)   # as raw FLIPD in the thousands against LID_* of a few
    rc = main(["classify", str(sdir), "--lid-data", str(root / "lid"), "--model-metric", "lid_table"])
    err = capsys.readouterr().err
    assert rc == 2 and "not on one scale" in err and "--scale median_ratio" in err
    assert not (sdir / "classes.parquet").exists()
    rc = main(["classify", str(sdir), "--lid-data", str(root / "lid"), "--model-metric", "lid_table",
               "--scale", "median_ratio", "--margin", "mad", "--out", str(root / "c.parquet")])
    assert rc == 0
    rows = _classes(root / "c.parquet")
    keys = [r["key"] for r in rows]
    t = 1000.0 * np.array([designed[k] for k in keys])
    s = np.array([lid[k] for k in keys], dtype=float)
    ref = mmh_fast.classify_memorization(t, s, scale="median_ratio", margin="mad")
    assert [r["label"] for r in rows] == ref.labels.tolist()
    assert rows[0]["scale"] == pytest.approx(np.median(s) / np.median(t))
    assert [r["lid_theta_scaled"] for r in rows] == pytest.approx((t * ref.scale).tolist())
    label = {r["key"]: r["label"] for r in rows}
    assert all(label[k] == "dd_mem" for k in DUP_KEYS) and all(label[k] == "od_mem" for k in od_keys)


def test_classify_input_errors(scanned, capsys, tmp_path):
    root, lid, designed, scan, od_keys = scanned
    sdir = scan("scan2", 1.0)
    rc = main(["classify", str(sdir), "--lid-data", str(root / "lid")])
    assert rc == 2 and "none of the model-LID columns flipd, nb" in capsys.readouterr().err
    rc = main(["classify", str(sdir), "--lid-data", str(root / "lid"), "--model-metric", "flipd"])
    assert rc == 2 and "--model-metric 'flipd'" in capsys.readouterr().err
    rc = main(["classify", str(sdir), "--lid-data", str(root / "lid"), "--model-metric", "lid_table",
               "--scale", "-1"])
    assert rc == 2 and "--scale must be a positive number" in capsys.readouterr().err
    # keys that do not match: a few examples of both sides
    other = tmp_path / "other"
    make_folder(other, n=20, captions=False, seed=3)
    os.rename(other / "img000.png", other / "a.png")
    assert main(["lid-data", "--data", str(other), "--out", str(tmp_path / "lid2"), "--k", "5",
                 "--workers", "0", "--quiet"]) == 0
    import pyarrow as pa
    t = pq.read_table(tmp_path / "lid2" / "lid_data.parquet")
    t = t.set_column(0, "key", pa.array([f"x/{k}" for k in t.column("key").to_pylist()]))
    pq.write_table(t, tmp_path / "lid2" / "lid_data.parquet")
    rc = main(["classify", str(sdir), "--lid-data", str(tmp_path / "lid2"), "--model-metric", "lid_table"])
    err = capsys.readouterr().err
    assert rc == 2 and "no key of" in err and "'img000.png'" in err and "'x/a.png'" in err


def test_classify_unreadable_inputs_name_the_argument(scanned, capsys, tmp_path):
    root, scan = scanned[0], scanned[3]
    rc = main(["classify", str(tmp_path / "nothing"), "--lid-data", str(root / "lid")])
    assert rc == 2 and "SCAN_DIR" in (err := capsys.readouterr().err) and "does not exist" in err, err
    rc = main(["classify", str(scan("scan_ok", 1.0)), "--lid-data", str(tmp_path / "nothing")])
    assert rc == 2 and "--lid-data" in (err := capsys.readouterr().err) and "does not exist" in err, err
    (tmp_path / "bad.parquet").write_text("not parquet")
    rc = main(["classify", str(tmp_path / "bad.parquet"), "--lid-data", str(root / "lid")])
    assert rc == 2 and "is not a readable Parquet file" in capsys.readouterr().err
    # a Parquet file that is no scan result (no key column): a clear error, not a traceback
    import pyarrow as pa
    pq.write_table(pa.table({"flipd": [1.0, 2.0]}), tmp_path / "nokey.parquet")
    rc = main(["classify", str(tmp_path / "nokey.parquet"), "--lid-data", str(root / "lid")])
    assert rc == 2 and "has no 'key' column" in capsys.readouterr().err
