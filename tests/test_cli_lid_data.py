"""`mmh-fast lid-data`: LID_* of every sample of a source, checked against
mmh_fast.lpca on the same features (the independent path: the library called on
the decoded pixels / vectors directly), faiss against the exact kNN, resume."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import mmh_fast
from mmh_fast.cli import main
from mmh_fast.cli.sources import decode_image

from cli_data import make_folder, make_shards, make_table


def _run(capsys, *argv):
    rc = main(["lid-data", *map(str, argv), "--workers", "0"])
    return rc, capsys.readouterr().err


def _rows(out):
    return pq.read_table(os.path.join(out, "lid_data.parquet")).to_pylist()


def _pixels(locations, size=None):
    """The images as the library takes them: float32 [n, 3 H W] in [-1, 1]."""
    arrs = [decode_image(p, size)[0] for p in locations]
    return np.stack(arrs).reshape(len(arrs), -1).astype(np.float32) / np.float32(127.5) - np.float32(1)


@pytest.fixture
def dup_folder(tmp_path):
    """60 smooth random images, one of them (img010.png) planted 8 more times, and a corrupt file."""
    make_folder(tmp_path / "imgs", n=60, corrupt=(5,), captions=False)
    for i in range(8):
        shutil.copy(tmp_path / "imgs" / "img010.png", tmp_path / "imgs" / f"zdup{i}.png")
    return tmp_path / "imgs"


@pytest.mark.parametrize("rule", ["paper", "fo", "maxgap"])
def test_lid_data_equals_lpca_on_the_same_pixels(tmp_path, capsys, dup_folder, rule):
    rc, err = _run(capsys, "--data", dup_folder, "--out", tmp_path / "out", "--k", 15, "--rule", rule,
                   "--chunk-rows", 16)
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    # the scan's keys: the relative path with its extension, in source order
    assert [r["key"] for r in rows] == sorted(os.listdir(dup_folder))
    bad = [r for r in rows if r["error"] is not None]
    assert [r["key"] for r in bad] == ["img005.png"] and bad[0]["lid_data"] is None
    ok = [r for r in rows if r["error"] is None]
    x = torch.from_numpy(_pixels([r["source"] for r in ok]))
    ref = mmh_fast.lpca(x, k=15, rule=rule, progress=False).numpy()
    assert [r["lid_data"] for r in ok] == ref.tolist()
    # the 9 copies of img010 each have the other 8 among their 15 neighbours, at distance 0
    copies = {r["key"]: r["n_copies"] for r in ok if r["n_copies"]}
    assert copies == {k: 8 for k in ["img010.png"] + [f"zdup{i}.png" for i in range(8)]}
    if rule == "paper":  # the paper rule's point masses
        assert all(r["lid_data"] == 0 for r in ok if r["key"] in copies)
    meta = json.loads(pq.read_schema(tmp_path / "out" / "lid_data.parquet").metadata[b"mmh_fast"])
    assert meta["settings"]["rule"] == rule and meta["index"]["kind"] == "exact" and meta["errors"] == 1


def test_resume_skips_done_work_and_changed_settings_name_the_difference(tmp_path, capsys, dup_folder):
    out = tmp_path / "out"
    args = ["--data", dup_folder, "--out", out, "--k", 10, "--chunk-rows", 16]
    assert _run(capsys, *args)[0] == 0
    first = _rows(out)
    # as if killed during the neighbour phase: one chunk and the result missing, not done
    os.unlink(out / "chunks" / "c0000002.npz")
    os.unlink(out / "lid_data.parquet")
    man = json.loads((out / "lid_data.json").read_text())
    man.pop("done")
    (out / "lid_data.json").write_text(json.dumps(man))
    chunk0 = os.path.getmtime(out / "chunks" / "c0000000.npz")
    rc, err = _run(capsys, *args)
    assert rc == 0 and "resuming: 4 of 5 neighbour chunks done" in err, err
    assert os.path.getmtime(out / "chunks" / "c0000000.npz") == chunk0
    assert _rows(out) == first
    rc, err = _run(capsys, *args)
    assert rc == 0 and "nothing to do" in err
    rc, err = _run(capsys, "--data", dup_folder, "--out", out, "--k", 12, "--chunk-rows", 16)
    assert rc == 2 and "k: was 10, now 12" in err and "rule" not in err.split("settings")[1]


@pytest.mark.parametrize("kind", ["webdataset", "csv"])
def test_keys_are_the_scan_keys_for_every_source_kind(tmp_path, capsys, kind):
    if kind == "webdataset":
        good = make_shards(tmp_path / "shards", n_shards=3, per_shard=5)
        data = tmp_path / "shards" / "{00000..00002}.tar"
    else:
        good = make_table(str(tmp_path / "c" / "t.csv"), n=15, mode="path")
        data = tmp_path / "c" / "t.csv"
    rc, err = _run(capsys, "--data", data, "--out", tmp_path / "out", "--k", 5, "--rule", "fo")
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    assert [r["key"] for r in rows] == list(good)
    x = np.stack([good[k].transpose(2, 0, 1) for k in good]).reshape(len(good), -1).astype(np.float32)
    ref = mmh_fast.lpca(torch.from_numpy(x / np.float32(127.5) - 1), k=5, rule="fo", progress=False)
    assert [r["lid_data"] for r in rows] == ref.tolist()


def _embeddings(n=400, dim=64, seed=0):
    """Vectors on 3-, 6- and 10-dimensional linear patches in R^dim, 20 rows copies of one vector."""
    g = np.random.default_rng(seed)
    parts = []
    for i, k in enumerate((3, 6, 10)):
        basis = np.linalg.qr(g.normal(size=(dim, k)))[0]
        parts.append(5.0 * i + g.normal(size=(n // 3, k)) @ basis.T)
    x = np.concatenate(parts + [np.repeat(g.normal(size=(1, dim)), 20, 0)]).astype(np.float32)
    return x


def _vector_table(path, x, null_row=None):
    vals = [list(map(float, v)) for v in x]
    if null_row is not None:
        vals[null_row] = None
    keys = [f"e{i:05d}" for i in range(len(x))]
    pq.write_table(pa.table({"key": keys, "emb": pa.array(vals, pa.list_(pa.float32()))}), path, row_group_size=100)
    return keys


def test_vector_column_of_a_parquet_source(tmp_path, capsys):
    x = _embeddings()
    keys = _vector_table(tmp_path / "emb.parquet", x, null_row=7)
    rc, err = _run(capsys, "--data", tmp_path / "emb.parquet", "--out", tmp_path / "out", "--features", "emb",
                   "--k", 20, "--unit-size", 64)
    assert rc == 0, err
    rows = _rows(tmp_path / "out")
    assert [r["key"] for r in rows] == keys
    assert rows[7]["error"].startswith("column 'emb' holds null") and rows[7]["lid_data"] is None
    keep = np.array([i != 7 for i in range(len(x))])
    ref = mmh_fast.lpca(torch.from_numpy(x[keep]), k=20, rule="paper", progress=False).numpy()
    assert [r["lid_data"] for r in rows if r["error"] is None] == ref.tolist()
    assert all(r["lid_data"] == 0 for r in rows[-20:])
    # a column without nulls is read without Python lists (fixed-size lists too): the same LIDs
    vals = pa.FixedSizeListArray.from_arrays(pa.array(x[keep].reshape(-1)), x.shape[1])
    pq.write_table(pa.table({"id": [k for k, m in zip(keys, keep) if m], "emb": vals}), tmp_path / "dense.parquet")
    rc, err = _run(capsys, "--data", tmp_path / "dense.parquet", "--out", tmp_path / "dense", "--features", "emb",
                   "--k", 20, "--unit-size", 64)
    assert rc == 0, err
    assert [r["lid_data"] for r in _rows(tmp_path / "dense")] == ref.tolist()
    # a folder has no vector column; an unknown column is named
    rc, err = _run(capsys, "--data", tmp_path / "emb.parquet", "--out", tmp_path / "o2", "--features", "clip")
    assert rc == 2 and "has no such column" in err and "emb" in err


@pytest.mark.parametrize("index", ["faiss-ivf", "faiss-hnsw"])
def test_faiss_recall_and_lid_agreement_with_the_exact_path(tmp_path, capsys, index):
    pytest.importorskip("faiss")
    x = _embeddings(n=3000, seed=1)
    _vector_table(tmp_path / "emb.parquet", x)
    common = ["--data", tmp_path / "emb.parquet", "--features", "emb", "--k", 20, "--rule", "fo"]
    assert _run(capsys, *common, "--out", tmp_path / "exact")[0] == 0
    rc, err = _run(capsys, *common, "--out", tmp_path / "faiss", "--index", index, "--recall-sample", 500)
    assert rc == 0, err
    meta = json.loads((tmp_path / "faiss" / "lid_data.json").read_text())["index"]
    assert meta["kind"] == index and meta["recall_sample"] == 500
    assert meta["recall_at_k"] >= 0.99 and f"recall@20 = {meta['recall_at_k']:.4f}" in err
    # the bar: LID_* from faiss's neighbours equals the exact path's for >= 99% of points
    a = np.array([r["lid_data"] for r in _rows(tmp_path / "exact")])
    b = np.array([r["lid_data"] for r in _rows(tmp_path / "faiss")])
    assert (a == b).mean() >= 0.99
    # the duplicates keep their copies whatever the index
    assert [r["n_copies"] for r in _rows(tmp_path / "faiss")][-20:] == [19] * 20


def test_bad_arguments(tmp_path, capsys, dup_folder):
    rc, err = _run(capsys, "--data", dup_folder, "--out", tmp_path / "o", "--features", "emb")
    assert rc == 2 and "needs a Parquet source" in err
    rc, err = _run(capsys, "--data", dup_folder, "--out", tmp_path / "o", "--k", 500)
    assert rc == 2 and "--k 500 needs at least 501 samples" in err
    rc, err = _run(capsys, "--data", dup_folder, "--out", tmp_path / "o", "--rule", "pca")
    assert rc == 2 and "--rule must be one of" in err


def test_rerank_distances_equal_float64_brute_force_for_any_block():
    """The faiss path's exact re-ranking (_exact_distances) against distances summed in
    float64 from float64 differences, whatever the row block (a speed knob only)."""
    from mmh_fast.cli.lid_data import _exact_distances

    g = np.random.default_rng(3)
    x = torch.from_numpy(g.normal(size=(300, 37)).astype(np.float32))
    x[5] = x[9]  # an exact copy: distance 0 exactly
    rows = torch.arange(40, 110)
    nb = torch.from_numpy(g.integers(0, 300, size=(70, 12)))
    nb[0, 0] = 9
    rows[0] = 5
    x64 = x.to(torch.float64)
    ref = (x64[nb] - x64[rows].unsqueeze(1)).pow(2).sum(-1).sqrt()
    out = [_exact_distances(x, rows, nb, block=b) for b in (1, 7, 16, 256)]
    for d in out:
        assert torch.equal(d, out[0])
        # float32 differences (one rounding each) summed in float64: within 2 float32 ulps
        assert torch.allclose(d, ref, rtol=2 * 2.0 ** -23, atol=0)
    assert out[0][0, 0] == 0


def test_recall_with_the_exact_kth_given_equals_recomputed():
    """tune() computes the exact k-th distances once per sample; the recall is the same
    as with them recomputed, and equals a brute-force count."""
    from mmh_fast.cli.lid_data import _exact_kth, _tie_aware_recall

    g = np.random.default_rng(4)
    x = torch.from_numpy(g.normal(size=(200, 8)).astype(np.float32))
    rows = torch.arange(0, 50)
    k = 10
    d = torch.cdist(x.double(), x.double())
    d[rows, rows] = float("inf")
    order = d[rows].argsort(1)
    found = order[:, 1:k + 1].clone()  # misses the nearest: k - 1 of k right (no ties here)
    dk = _exact_kth(x, rows, k)
    assert torch.allclose(dk, d[rows].sort(1).values[:, k - 1], rtol=1e-6)
    r1 = _tie_aware_recall(x, rows, found, k)
    r2 = _tie_aware_recall(x, rows, found, k, dk)
    assert r1 == r2 == pytest.approx((k - 1) / k)


def test_constant_features_are_a_clear_error(tmp_path, capsys):
    x = np.ones((30, 16), np.float32)
    _vector_table(tmp_path / "c.parquet", x)
    rc, err = _run(capsys, "--data", tmp_path / "c.parquet", "--out", tmp_path / "o", "--features", "emb",
                   "--k", 5)
    assert rc == 2 and "zero variance" in err and "Traceback" not in err
