"""Review gaps of issues 14/16: clear errors instead of silent NaN or silent rounding,
and the nb metric's determined mask."""
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
