"""``mmh-fast classify``: the MMH memorization classes (OD-Mem / DD-Mem) of scanned
samples, from a scan's LID_theta and ``lid-data``'s LID_*, joined by key.

Inputs: a scan directory (or its ``results.parquet``), whose model-LID column
(``--model-metric``, default ``flipd``, else ``nb``) gives LID_theta, and a
``lid-data`` directory (or its ``lid_data.parquet``), whose ``lid_data``
column gives LID_*. Rows are joined on ``key`` (both commands key a sample
the same way; see :mod:`mmh_fast.cli.sources`); a sample counts only when
both values are present and finite.

The two LIDs must be on one scale (:func:`mmh_fast.classify_memorization`
compares them directly). FLIPD and NB estimate LID_theta with their own
biases, local PCA LID_* with its own, so ``--scale median_ratio`` multiplies
LID_theta by median(LID_*) / median(LID_theta), or ``--scale FACTOR`` by a
given factor. With ``--scale none`` (default) the command refuses when the
medians are more than :data:`~mmh_fast.lid.memorization.SCALE_TOLERANCE`
times apart (either way): the labels would mean nothing (e.g. raw FLIPD of an
untrained model, ~3600, against LID_* ~3).

Output: ``classes.parquet`` (in the scan directory unless ``--out``), one row
per joined sample, in the scan's order::

    key              (str)
    source           (str) where the scan read the image
    label            (str) "od_mem", "dd_mem" or "none"
    lid_theta        (float64) the scan's model metric as scanned
    lid_theta_scaled (float64) lid_theta x scale: the value compared
    lid_data         (float64) LID_* from lid-data
    n_copies         (int64) exact copies among the sample's k neighbours (lid-data)
    scale, margin, low (float64) the thresholds used (the same on every row)

and under the Parquet metadata key ``mmh_fast`` (JSON): the model metric, the
thresholds, the class counts, the inputs and how many samples did not join.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from .errors import UserError
from .writer import META_KEY, RESULTS, read_output, write_table_atomic

__all__ = ["run_classify", "CLASSES", "MODEL_METRICS"]

CLASSES = "classes.parquet"
#: the default --model-metric: the first of these the scan has
MODEL_METRICS = ("flipd", "nb", "flipd_cond")


def _parse_scale(text):
    """--scale: none, median_ratio or a positive number."""
    from ..lid.memorization import SCALES

    if text in SCALES:
        return text
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"--scale must be one of {', '.join(SCALES)} or a positive number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise UserError(f"--scale must be a positive number, got {text}")
    return v


def _parse_margin(text):
    if text is None or text == "mad":
        return text
    try:
        v = float(text)
    except ValueError:
        raise UserError(f"--margin must be a number >= 0 or 'mad', got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise UserError(f"--margin must be a number >= 0 or 'mad', got {text}")
    return v


def _check_medians(t, s, model_metric) -> None:
    """UserError when --scale median_ratio has no ratio: a median of 0 (more than half
    the samples at LID 0, e.g. exact duplicates for LID_*) cannot be rescaled."""
    for name, v, why in ((f"{model_metric} (LID_theta)", t, "the model collapses most samples"),
                         ("LID_* (lid-data)", s, "most samples have exact duplicates or --k is too small")):
        med = float(np.median(v))
        if med <= 0:
            n0 = int((v <= 0).sum())
            raise UserError(
                f"--scale median_ratio: the median {name} is {med:.4g} ({n0} of {v.size} samples at 0: {why}), "
                "so the ratio of medians is undefined. Pass --scale FACTOR instead (a positive number multiplying "
                "LID_theta onto the LID_* scale, e.g. the ratio of the medians of the samples you trust), or "
                "--scale none when both are already on one scale")


def run_classify(scan: str, lid_data: str, *, model_metric: str | None = None, margin=None, low=None,
                 scale="none", out: str | None = None, quiet: bool = False) -> dict:
    """Join, classify and write ``classes.parquet`` (see the module docstring).
    Returns a summary dict (path, counts, thresholds, join counts)."""
    import pyarrow as pa

    from ..lid.memorization import SCALE_TOLERANCE, classify_memorization, scale_ratio

    scale = _parse_scale(scale) if isinstance(scale, str) else scale
    margin = _parse_margin(margin) if isinstance(margin, str) or margin is None else float(margin)
    scan_path, st, smeta = read_output(scan, default_name=RESULTS, what="SCAN_DIR")
    lid_path, lt, lmeta = read_output(lid_data, default_name="lid_data.parquet", what="--lid-data")
    if "key" not in st.column_names:
        raise UserError(f"SCAN_DIR: {scan_path} has no 'key' column (made by mmh-fast scan?)")
    if "lid_data" not in lt.column_names or "key" not in lt.column_names:
        raise UserError(f"--lid-data: {lid_path} has no 'key' and 'lid_data' columns (made by mmh-fast lid-data?)")
    if model_metric is None:
        model_metric = next((m for m in MODEL_METRICS if m in st.column_names), None)
        if model_metric is None:
            raise UserError(f"{scan_path} has none of the model-LID columns {', '.join(MODEL_METRICS)}; name one with "
                            f"--model-metric (columns: {', '.join(st.column_names)})")
    elif model_metric not in st.column_names:
        raise UserError(f"--model-metric {model_metric!r}: {scan_path} has no such column "
                        f"(columns: {', '.join(st.column_names)})")
    info = (smeta.get("metrics") or {}).get(model_metric, {})
    if info and info.get("lower_is_memorized") is False:
        raise UserError(f"--model-metric {model_metric!r} is a score (high = memorized), not an LID")

    s_keys = st.column("key").to_pylist()
    l_keys = lt.column("key").to_pylist()
    for keys, path in ((s_keys, scan_path), (l_keys, lid_path)):
        if len(set(keys)) != len(keys):
            raise UserError(f"{path} holds duplicated keys; cannot join by key")
    t_all = np.array([np.nan if v is None else v for v in st.column(model_metric).to_pylist()], dtype=np.float64)
    s_vals = {k: v for k, v in zip(l_keys, lt.column("lid_data").to_pylist()) if v is not None}
    copies = dict(zip(l_keys, lt.column("n_copies").to_pylist())) if "n_copies" in lt.column_names else {}
    common = [i for i, k in enumerate(s_keys) if k in s_vals]
    if not common:
        raise UserError(f"no key of {scan_path} is in {lid_path}: e.g. {', '.join(map(repr, s_keys[:3]))} "
                        f"against {', '.join(map(repr, l_keys[:3]))}; run lid-data on the source the scan read")
    idx = [i for i in common if np.isfinite(t_all[i]) and np.isfinite(s_vals[s_keys[i]])]
    if len(idx) < 2:
        raise UserError(f"only {len(idx)} sample(s) have both a finite {model_metric} and LID_*: nothing to classify")
    t = t_all[idx]
    s = np.array([s_vals[s_keys[i]] for i in idx], dtype=np.float64)
    if scale == "none":
        ratio = scale_ratio(t, s)
        if ratio is not None and not (1 / SCALE_TOLERANCE <= ratio <= SCALE_TOLERANCE):
            raise UserError(
                f"{model_metric} (median {np.median(t):.4g}) and LID_* (median {np.median(s):.4g}) are not on one "
                f"scale (a factor {ratio:.4g}); comparing them gives meaningless classes. Pass --scale median_ratio "
                "(LID_theta x median LID_* / median LID_theta) or --scale FACTOR; check the model first (an "
                "untrained network's FLIPD is about the number of pixels)")
    if scale == "median_ratio":
        _check_medians(t, s, model_metric)
    try:
        res = classify_memorization(t, s, margin=margin, low=low, scale=scale)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    n = len(idx)
    src = st.column("source").to_pylist() if "source" in st.column_names else [None] * len(s_keys)
    summary = {"scan": os.path.abspath(scan_path), "lid_data": os.path.abspath(lid_path), "model_metric": model_metric,
               "scale": res.scale, "scale_mode": scale if isinstance(scale, str) else "factor",
               "margin": res.margin, "low": res.low, "counts": res.counts(), "rows": n,
               "scan_rows": len(s_keys), "lid_data_rows": len(l_keys),
               "not_in_lid_data": len(s_keys) - len(common), "without_values": len(common) - n,
               "lid_data_settings": lmeta.get("settings"), "scan_settings": smeta.get("settings")}
    table = pa.table({
        "key": pa.array([s_keys[i] for i in idx], pa.string()),
        "source": pa.array([src[i] for i in idx], pa.string()),
        "label": pa.array(res.labels.tolist(), pa.string()),
        "lid_theta": pa.array(t, pa.float64()),
        "lid_theta_scaled": pa.array(t * res.scale, pa.float64()),
        "lid_data": pa.array(s, pa.float64()),
        "n_copies": pa.array([copies.get(s_keys[i]) for i in idx], pa.int64()),
        "scale": pa.array(np.full(n, res.scale), pa.float64()),
        "margin": pa.array(np.full(n, res.margin), pa.float64()),
        "low": pa.array(np.full(n, res.low), pa.float64()),
    }).replace_schema_metadata({META_KEY: json.dumps(summary).encode()})
    if out is None:
        out = os.path.join(os.path.dirname(os.path.abspath(scan_path)), CLASSES)
    elif os.path.isdir(out):
        out = os.path.join(out, CLASSES)
    write_table_atomic(table, out)
    summary["path"] = out
    if not quiet:
        c = res.counts()
        skipped = summary["not_in_lid_data"] + summary["without_values"]
        print(f"classify: {n} samples ({model_metric} x {res.scale:.4g} against LID_*; margin {res.margin:.4g}, "
              f"low {res.low:.4g}): DD-Mem {c['dd_mem']}, OD-Mem {c['od_mem']}, none {c['none']}"
              + (f"; {skipped} scanned samples without both LIDs left out" if skipped else ""), file=sys.stderr)
        print(out)
    return summary
