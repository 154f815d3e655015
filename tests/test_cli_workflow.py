"""The whole command-line workflow on a folder of images, as a user runs it:
`train` -> `scan` -> `lid-data` -> `classify` -> `report`.

The data are 200 of scikit-learn's 8 x 8 digits saved as PNG files, with two
kinds of planted memorization whose ground truth is known:

* DD-Mem: 4 digits duplicated as files (10 copies each, each copy trained with
  weight 3: 30 draws' worth per digit). The data manifold is a point mass there
  (LID_* = 0, the paper rule).
* OD-Mem: 4 other digits appear ONCE in the folder but are oversampled in the
  training stream (`train --weights`, weight 30: drawn as often as 30 copies
  would be). The model collapses onto them (low LID_theta) while the data around
  them stay as high-dimensional as anywhere (their LID_* is that of ordinary
  digits): the model is more constrained than the data.

The same training frequency for both sets makes the data side the only
difference: the classes must come from comparing the two LIDs, not from the
model alone.
"""
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmh_fast.cli import main

pytest.importorskip("sklearn")

N_DISTINCT, N_PLANTED, COPIES, DRAWS = 200, 4, 10, 30


def _mmh(args):
    assert main(args) == 0, args


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    from sklearn.datasets import load_digits

    tmp = tmp_path_factory.mktemp("workflow")
    folder = tmp / "images"
    folder.mkdir()
    u8 = np.clip(np.rint(load_digits().images[:N_DISTINCT] / 16 * 255), 0, 255).astype(np.uint8)
    keys = [f"d{i:03d}.png" for i in range(N_DISTINCT)]
    for k, img in zip(keys, u8):
        Image.fromarray(img).save(folder / k)
    dup = list(range(N_PLANTED))
    dup_keys = []
    for i in dup:
        for c in range(1, COPIES):
            name = f"d{i:03d}_copy{c:02d}.png"
            Image.fromarray(u8[i]).save(folder / name)
            dup_keys.append(name)
    dup_keys += [keys[i] for i in dup]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast and immune to a busy machine
    try:
        # the data side first: its LIDs do not depend on any model
        _mmh(["lid-data", "--data", str(folder), "--out", str(tmp / "lid"), "--image-size", "8", "--quiet"])
        lid = pq.read_table(tmp / "lid" / "lid_data.parquet").to_pydict()
        lid_of = dict(zip(lid["key"], lid["lid_data"]))
        # oversample the 4 non-duplicated digits of highest LID_*: OD-Mem is LID_theta clearly
        # below LID_*, which a digit whose LID_* is already near 0 cannot show
        rest = [k for k in keys[N_PLANTED:]]
        over_keys = sorted(rest, key=lambda k: (-lid_of[k], k))[:N_PLANTED]
        with open(tmp / "weights.csv", "w") as f:
            f.write("key,weight\n" + "".join(f"{k},{DRAWS}\n" for k in over_keys)
                    + "".join(f"{k},{DRAWS / COPIES}\n" for k in dup_keys))
        _mmh(["train", "--data", str(folder), "--out", str(tmp / "model"), "--arch", "mlp", "--image-size", "8",
              "--steps", "600", "--batch-size", "128", "--width", "128", "--lr", "2e-3",
              "--weights", str(tmp / "weights.csv"), "--quiet"])
        _mmh(["scan", "--model", str(tmp / "model"), "--data", str(folder), "--out", str(tmp / "scan"),
              "--metrics", "flipd", "--t0", "0.05", "--option", "trace=exact", "--workers", "0", "--quiet"])
        _mmh(["classify", str(tmp / "scan"), "--lid-data", str(tmp / "lid"), "--scale", "median_ratio",
              "--margin", "mad", "--quiet"])
        with open(tmp / "labels.csv", "w") as f:
            f.write("file_name,label\n")
            for k in sorted(lid["key"]):
                f.write(f"{k},{'duplicated' if k in dup_keys else 'oversampled' if k in over_keys else 'none'}\n")
        _mmh(["report", str(tmp / "scan"), "--labels", str(tmp / "labels.csv"), "--positive", "duplicated",
              "--out", str(tmp / "report"), "--format", "md", "--quiet"])
    finally:
        torch.set_num_threads(threads)
    return dict(tmp=tmp, folder=folder, u8=u8, dup_keys=dup_keys, over_keys=over_keys, lid=lid)


def test_planted_duplicates_are_dd_mem_and_oversampled_images_od_mem(workflow):
    c = pq.read_table(workflow["tmp"] / "scan" / "classes.parquet").to_pydict()
    label = dict(zip(c["key"], c["label"]))
    assert len(label) == N_DISTINCT + N_PLANTED * (COPIES - 1)
    assert {label[k] for k in workflow["dup_keys"]} == {"dd_mem"}, [(k, label[k]) for k in workflow["dup_keys"]]
    assert {label[k] for k in workflow["over_keys"]} == {"od_mem"}, [(k, label[k]) for k in workflow["over_keys"]]
    # the ordinary digits: measured 0 of 192 flagged (seed 0), the closest 0.42 LID_* units from the
    # OD-Mem boundary; the bound leaves room for another platform's rounding, not for a broken rule
    ordinary = [k for k in label if k not in workflow["dup_keys"] and k not in workflow["over_keys"]]
    flagged = [k for k in ordinary if label[k] != "none"]
    assert len(flagged) <= 0.1 * len(ordinary), flagged


def test_lid_data_equals_lpca_on_the_same_pixels(workflow):
    import mmh_fast

    lid = workflow["lid"]
    # the pixels as the scan feeds them to a model: RGB (grey replicated), x / 127.5 - 1
    x = []
    for k in lid["key"]:
        img = np.asarray(Image.open(workflow["folder"] / k).convert("RGB"), dtype=np.float32)
        x.append(img.transpose(2, 0, 1).reshape(-1) / 127.5 - 1.0)
    expected = mmh_fast.lpca(np.stack(x), k=100, rule="paper", seed=0, progress=False)
    np.testing.assert_array_equal(np.asarray(lid["lid_data"]), np.asarray(expected))
    assert all(lid["lid_data"][lid["key"].index(k)] == 0 for k in workflow["dup_keys"])


def test_report_shows_the_classes_and_marks_the_planted_images(workflow):
    c = pq.read_table(workflow["tmp"] / "scan" / "classes.parquet").to_pydict()
    text = (workflow["tmp"] / "report" / "report.md").read_text()
    # the class counts on the page are those of classes.parquet
    section = text.split("## Memorization classes", 1)[1].split("\n## ", 1)[0]
    for cls in ("dd_mem", "od_mem", "none"):
        assert f"| {cls} | {c['label'].count(cls)} |" in section, (cls, section)
    assert os.path.isfile(workflow["tmp"] / "report" / "mmh_scatter.png")
    assert os.path.isfile(workflow["tmp"] / "report" / "mmh_scatter_labels.png")
    # the flipd title says what it is, with the scan's t0
    assert "FLIPD LID_theta, t0 = 0.05" in text
    meta = json.loads(pq.read_table(workflow["tmp"] / "scan" / "classes.parquet").schema.metadata[b"mmh_fast"])
    assert meta["counts"] == {cls: c["label"].count(cls) for cls in ("od_mem", "dd_mem", "none")}
