"""Data sources of `mmh-fast scan`: enumeration, keys, captions, units, decoding."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from mmh_fast.cli.errors import UserError
from mmh_fast.cli.sources import decode_image, expand_braces, open_source, read_image_at, sample_id

from cli_data import make_folder, make_shards, make_table, png_bytes


def _all(src):
    return [s for u in src.units for s in src.iter_unit(u)]


def test_expand_braces():
    assert expand_braces("a/{00000..00003}.tar") == [f"a/{i:05d}.tar" for i in range(4)]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{9..11}") == ["x9", "x10", "x11"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_folder_source_units_captions_limit(tmp_path):
    good = make_folder(tmp_path / "imgs", n=10)
    os.makedirs(tmp_path / "imgs" / "sub")
    Image.fromarray(good["img000.png"]).save(tmp_path / "imgs" / "sub" / "x.jpg")  # nested, no caption
    src = open_source(str(tmp_path / "imgs"), unit_size=4)
    assert src.kind == "folder" and src.num_samples == 11
    assert [u.size for u in src.units] == [4, 4, 3]
    rows = _all(src)
    assert [r.key for r in rows] == [f"img{i:03d}.png" for i in range(10)] + ["sub/x.jpg"]
    assert [r.position for r in rows] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]
    assert rows[3].caption == "caption 3" and rows[-1].caption is None
    assert rows[0].location == str(tmp_path / "imgs" / "img000.png")
    lim = open_source(str(tmp_path / "imgs"), unit_size=4, limit=5)
    assert [r.key for r in _all(lim)] == [f"img{i:03d}.png" for i in range(5)]
    assert lim.fingerprint() != src.fingerprint()
    assert open_source(str(tmp_path / "imgs"), unit_size=4).fingerprint() == src.fingerprint()


def test_tar_source_brace_pattern_and_limit(tmp_path):
    good = make_shards(tmp_path / "shards", n_shards=3, per_shard=4)
    src = open_source(str(tmp_path / "shards" / "{00000..00002}.tar"))
    assert src.kind == "webdataset" and len(src.units) == 3 and src.num_samples is None
    rows = _all(src)
    assert [r.key for r in rows] == list(good)
    assert rows[5].caption == "caption 5"
    assert rows[5].location.endswith("00001.tar::000010001.png")
    arr, w, h = decode_image(rows[5].data, None)
    np.testing.assert_array_equal(arr.transpose(1, 2, 0), good[rows[5].key])
    # a folder holding only shards is read as shards; --limit cuts across shards
    lim = open_source(str(tmp_path / "shards"), limit=6)
    assert lim.kind == "webdataset" and lim.num_samples == 6 and [u.size for u in lim.units] == [4, 2]
    assert [r.key for r in _all(lim)] == list(good)[:6]
    # the location opens the image again
    np.testing.assert_array_equal(np.asarray(read_image_at(rows[5].location)), good[rows[5].key])


def test_tar_source_truncated_shard_reports_an_error_row(tmp_path):
    make_shards(tmp_path / "s", n_shards=1, per_shard=6)
    path = tmp_path / "s" / "00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 700])  # cut inside a member
    rows = _all(open_source(str(path)))
    assert all(r.error is None for r in rows[:-1]) and len(rows) >= 2
    assert "unreadable shard" in rows[-1].error


def test_parquet_bytes_and_csv_paths(tmp_path):
    good = make_table(str(tmp_path / "t.parquet"), n=10, mode="bytes")
    src = open_source(str(tmp_path / "t.parquet"), unit_size=3)
    assert (src.image_column, src.caption_column, src.key_column) == ("image", "caption", "key")
    rows = _all(src)
    assert [r.key for r in rows] == list(good) and [u.size for u in src.units] == [3, 3, 3, 1]
    for r in rows:
        arr, _, _ = decode_image(r.data, None)
        np.testing.assert_array_equal(arr.transpose(1, 2, 0), good[r.key])
    assert rows[7].location.endswith("t.parquet::row=7")
    np.testing.assert_array_equal(np.asarray(read_image_at(rows[7].location)), good["k0007"])

    good = make_table(str(tmp_path / "c" / "t.csv"), n=5, mode="path")
    rows = _all(open_source(str(tmp_path / "c" / "t.csv")))
    assert [r.key for r in rows] == list(good) and rows[2].caption == "caption 2"
    assert rows[2].location == str(tmp_path / "c" / "files" / "2.png")


def test_table_without_key_uses_row_numbers_and_rejects_duplicate_keys(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    img = png_bytes(np.zeros((8, 8, 3), np.uint8))
    pq.write_table(pa.table({"jpg": [img, img]}), tmp_path / "a.parquet")
    assert [r.key for r in _all(open_source(str(tmp_path / "a.parquet")))] == ["0", "1"]
    pq.write_table(pa.table({"key": ["x", "x"], "image": [img, img]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="duplicates"):
        open_source(str(tmp_path / "b.parquet"))
    pq.write_table(pa.table({"key": ["x"], "pixels": [img]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match="no image column"):
        open_source(str(tmp_path / "c.parquet"))
    with pytest.raises(UserError, match="no column 'nope'"):
        open_source(str(tmp_path / "a.parquet"), caption_column="nope")


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="holds no images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="matches no shard"):
        open_source(str(tmp_path / "none-*.tar"))
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "{0..1}.tar"))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="must be .parquet"):
        open_source(str(tmp_path / "x.json"))


def test_decode_resizes_shorter_side_and_centre_crops():
    # a 40x20 image, left half black, right half white: the crop keeps the centre
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out, w, h = decode_image(buf.getvalue(), 10)
    assert out.shape == (3, 10, 10) and (w, h) == (40, 20)
    ref = np.asarray(Image.fromarray(arr).resize((20, 10), Image.BICUBIC).crop((5, 0, 15, 10)))
    np.testing.assert_array_equal(out.transpose(1, 2, 0), ref)
    # grayscale and RGBA come out as RGB (alpha over white)
    rgba = np.zeros((4, 4, 4), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    out, _, _ = decode_image(buf.getvalue(), None)
    assert out.shape == (3, 4, 4) and (out == 255).all()


def test_sample_id_is_stable_and_63_bit():
    a = sample_id("img001.png")
    assert a == sample_id("img001.png") != sample_id("img002.png")
    assert 0 <= a < 2 ** 63
