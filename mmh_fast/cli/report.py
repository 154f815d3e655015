"""``mmh-fast report``: figures and a page summarising scan results.

Writes into DIR: ``hist_<metric>.png`` (density histograms, split by label when
labels are given, as in the MMH paper's Fig. 5 and 6), ``roc.png`` (ROC curves of
every metric, linear and log false-positive axes, with AUC and TPR at 1% FPR),
``lowest_<metric>.png`` (the lowest-LID images with keys and captions, when the
images can still be read from their ``source``), ``maps.png`` and ``maps/``
(with ``--maps N``: memorization maps of the N images ranked most memorized,
see :func:`memorization_maps`), and ``report.html`` (one self-contained page,
figures embedded as base64) or ``report.md``.

ROC orientation comes from the metrics' ``lower_is_memorized`` flags stored in
the results' metadata (LID metrics: low values are flagged), never from the
labels, so an AUC below 0.5 means the metric points the wrong way.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os

import numpy as np

from .errors import UserError
from .writer import META_KEY, RESULTS, read_output

__all__ = ["roc_curve", "roc_auc", "tpr_at_fpr", "make_report", "load_results", "load_labels", "read_table",
           "memorization_maps", "MAP_KINDS"]

_NEGATIVE_WORDS = {"none", "not", "not_memorized", "not memorized", "negative", "neg", "clean", "false", "no", "0",
                   "normal", "unmemorized", "non-memorized", "generalized", "generalised"}
_POSITIVE_WORDS = {"memorized", "memorised", "mem", "positive", "pos", "true", "yes", "1", "duplicate", "dup",
                   "duplicated", "dd_mem", "od_mem", "memorized_dd", "memorized_od"}
_BASE_COLUMNS = {"key", "source", "caption", "width", "height", "error"}
_LID_PREFERENCE = ("flipd", "nb", "flipd_cond")


# --------------------------------------------------------------------------- ROC
def roc_curve(scores, positive):
    """ROC curve of ``scores`` (higher = more likely positive) against boolean labels.

    Returns (fpr, tpr, thresholds), one point per distinct score plus the origin;
    tied scores form one step (so the area counts ties as one half, as the
    Mann-Whitney statistic does)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(positive, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (drop missing values first)")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes; got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def roc_auc(fpr, tpr) -> float:
    """Area under a ROC curve (trapezoids)."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def tpr_at_fpr(fpr, tpr, target: float = 0.01) -> float:
    """The largest true-positive rate reached at a false-positive rate <= target."""
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return float(tpr[fpr <= target + 1e-12].max())


# --------------------------------------------------------------------------- inputs
def load_results(path: str):
    """(pyarrow table, metadata dict) of a results file or a scan directory."""
    path, table, meta = read_output(path, default_name=RESULTS, what="results file",
                                    missing_hint=" (run `mmh-fast merge DIR` for a scan's parts)")
    if "key" not in table.column_names:
        raise UserError(f"{path!r} has no 'key' column: not a scan result")
    return table, meta


def read_table(path: str, *, what: str):
    """A CSV or Parquet file as a pyarrow table; ``what`` names the option in errors."""
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path!r} does not exist")
    try:
        if path.lower().endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    except Exception as exc:
        raise UserError(f"cannot read {what} {path!r}: {exc}") from None


# image columns of common labelling tools, tried after 'key': Hugging Face's metadata.csv
# names the image file (relative to its folder, extension included: a folder scan's key)
_LABEL_KEY_COLUMNS = ("key", "file_name")


def load_labels(path: str) -> dict:
    """key -> label (as str) from a CSV or Parquet file: the key column is 'key', else
    'file_name' (Hugging Face's metadata.csv: the image's path relative to the folder,
    which is the key a folder scan gives it), else the first column; the label column
    is 'label', else the first other column."""
    t = read_table(path, what="labels")
    names = t.column_names
    kc = next((c for c in _LABEL_KEY_COLUMNS if c in names), names[0] if names else None)
    others = [c for c in names if c != kc]
    lc = "label" if "label" in others else (others[0] if others else None)
    if kc is None or lc is None:
        raise UserError(f"labels {path!r} need a key and a label column; found {names}")
    keys = [str(k) for k in t.column(kc).to_pylist()]
    labels = [None if v is None else str(v) for v in t.column(lc).to_pylist()]
    return {k: v for k, v in zip(keys, labels) if v is not None}


def _no_match_message(what, path, theirs, ours) -> str:
    ex = lambda keys: ", ".join(repr(k) for k in list(keys)[:3]) or "none"  # noqa: E731
    return (f"no key of {what} {path!r} matches a key of the results: {what} keys look like {ex(theirs)}; "
            f"results keys look like {ex(ours)} (a folder scan's key is the image's path relative to the "
            "folder, extension included)")


def _positive_classes(classes, positive):
    if positive is not None:
        if positive not in classes:
            raise UserError(f"--positive {positive!r} is not among the labels ({', '.join(sorted(classes))})")
        return {positive}
    low = {c: c.strip().lower() for c in classes}
    neg = [c for c in classes if low[c] in _NEGATIVE_WORDS]
    pos = [c for c in classes if low[c] in _POSITIVE_WORDS]
    if len(classes) >= 2 and len(neg) == 1:
        return set(classes) - set(neg)
    if len(pos) == 1 and len(classes) == 2:
        return set(pos)
    return None


# --------------------------------------------------------------------------- what a metric is
# What each built-in column measures, for titles and axis labels; the settings that
# determine its value are appended from the results' metadata.
_METRIC_NAMES = {
    "flipd": "FLIPD LID_theta",
    "flipd_cond": "FLIPD LID_theta(x | caption)",
    "nb": "normal-bundle LID_theta",
    "png": "PNG complexity (bytes)",
    "cfg_norm_train": "CFG-vector norm",
    "lpca": "local PCA LID_*",
    "lid_data": "local PCA LID_*",
}
_TIMED = {"flipd", "flipd_cond", "nb", "cfg_norm_train"}  # metrics read off at a diffusion time t0


def metric_title(name: str, meta: dict) -> str:
    """What column ``name`` is, e.g. "FLIPD LID_theta, t0 = 0.05": the metric's own
    recorded settings (``meta["metrics"][name]``: t0, k, rule) first, then the effective
    settings the scan ran it with (``meta["settings"]["metric_settings"][name]``), then
    the scan's ``--t0`` for the metrics that have one."""
    mm = (meta.get("metrics") or {}).get(name) or {}
    st = meta.get("settings") or {}
    eff = (st.get("metric_settings") or {}).get(name) or {}
    parts = []
    t0 = next((v for v in (mm.get("t0"), eff.get("t0"), st.get("t0") if name in _TIMED else None)
               if v is not None), None)
    if t0 is not None:
        parts.append(f"t0 = {_fmt(float(t0))}")
    for k in ("rule", "k"):
        if mm.get(k) is not None:
            parts.append(f"{k} = {mm[k]}")
    base = _METRIC_NAMES.get(name)
    if base is None:
        desc = mm.get("description")
        base = f"{name}: {_short(desc, 60)}" if desc else name
    return ", ".join([base] + parts)


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "x", "P", "*")


def curve_style(i: int) -> dict:
    """Line style and marker of the i-th curve: no two of the first 8 curves share
    both, so curves that coincide stay distinguishable."""
    return {"ls": _LINESTYLES[i % len(_LINESTYLES)], "marker": _MARKERS[i % len(_MARKERS)]}


def _hist(title, values, groups, path, direction):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    finite = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(finite, bins="auto")
    if len(edges) > 61:
        edges = np.linspace(finite.min(), finite.max(), 61)
    if groups:
        hatches = (None, "//", "\\\\", "xx", "..")
        for i, (label, mask) in enumerate(groups.items()):
            v = values[mask & np.isfinite(values)]
            if v.size:
                ax.hist(v, bins=edges, density=True, alpha=0.5, label=f"{label} (n={v.size})",
                        hatch=hatches[i % len(hatches)], histtype="stepfilled", edgecolor="k", linewidth=0.6)
        ax.legend(fontsize=8)
    else:
        ax.hist(finite, bins=edges, density=True, alpha=0.8, color="tab:blue")
    ax.set_xlabel(f"{title} ({direction})")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def _roc_figure(curves, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (name, (fpr, tpr, auc, t1)) in enumerate(curves.items()):
        style = curve_style(i)
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{name}: AUC {_fmt(auc)}, TPR@1% {_fmt(t1)}", ls=style["ls"],
                    marker=style["marker"], markevery=max(1, len(fpr) // 12), markersize=4, alpha=0.85)
    diag = np.logspace(-3, 0, 50)
    for ax in axes:
        ax.plot(diag, diag, color="0.7", lw=0.8, ls="--")  # chance
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
    axes[1].set_xscale("log")
    axes[1].set_xlim(1e-3, 1)
    axes[1].axvline(0.01, color="0.5", lw=0.8, ls=":")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title("ROC")
    axes[1].set_title("ROC, log FPR")
    _save(fig, path)


def _thumb_grid(rows, name, title, path):
    """rows: (image, key, value, caption, positive label or None); positives get a red frame."""
    plt = _plt()
    n = len(rows)
    cols = min(8, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, key, value, caption, pos) in zip(axes.flat, rows):
        ax.imshow(img)
        ax.set_title(f"{_short(key, 22)}\n{name}={_fmt(value)}" + (f"\n[{pos}]" if pos else ""), fontsize=7,
                     color="tab:red" if pos else "k")
        if pos:
            h, w = img.shape[:2]
            ax.add_patch(_plt().Rectangle((-0.5, -0.5), w, h, fill=False, ec="tab:red", lw=3))
        if caption:
            ax.text(0.5, -0.04, _short(caption, 40), fontsize=6, ha="center", va="top", transform=ax.transAxes,
                    wrap=True)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _pairs_grid(pairs, path):
    """pairs: (generated image, training image, generated key, training key, calibrated l2)."""
    plt = _plt()
    n = len(pairs)
    cols = min(4, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, 2 * cols, figsize=(1.8 * 2 * cols, 2.1 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (g, t, gk, tk, c) in enumerate(pairs):
        r, c0 = divmod(i, cols)
        a, b = axes[r, 2 * c0], axes[r, 2 * c0 + 1]
        a.imshow(g)
        a.set_title(f"gen {_short(gk, 16)}\ncal. l2 = {_fmt(c)}", fontsize=7)
        b.imshow(t)
        b.set_title(f"nearest train\n{_short(tk, 18)}", fontsize=7)
    fig.suptitle("generated image | its nearest training image (calibrated l2, low = copy)", fontsize=10)
    _save(fig, path)


_CLASS_STYLE = {"dd_mem": ("tab:red", "s"), "od_mem": ("tab:orange", "^"), "none": ("0.6", "o")}


def _mmh_scatter(theta, star, colour_by, th, path, x_title, y_title):
    """The MMH picture: LID_* (x) against LID_theta (y), one colour and marker per group,
    with the classes' thresholds (the regions of classify_memorization) drawn."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    others = [c for c in colour_by if c not in _CLASS_STYLE]
    for i, (group, mask) in enumerate(colour_by.items()):
        colour, marker = _CLASS_STYLE.get(group, (f"C{others.index(group) % 10}" if group in others else "k",
                                                  _MARKERS[i % len(_MARKERS)]))
        if mask.any():
            ax.scatter(star[mask], theta[mask], s=14, c=colour, marker=marker, alpha=0.7, edgecolors="none",
                       label=f"{group} (n={int(mask.sum())})", zorder=3 if group != "none" else 2)
    finite = np.isfinite(star) & np.isfinite(theta)
    lo = float(min(star[finite].min(), theta[finite].min(), 0.0)) if finite.any() else 0.0
    hi = float(max(star[finite].max(), theta[finite].max())) if finite.any() else 1.0
    pad = 0.04 * (hi - lo or 1.0)
    xs = np.linspace(lo - pad, hi + pad, 2)
    ax.plot(xs, xs, color="0.75", lw=0.8, ls=":", label="LID_theta = LID_*")
    m, low = th.get("margin"), th.get("low")
    if m is not None:
        ax.plot(xs, xs - m, color="tab:orange", lw=1.2, ls="--",
                label=f"OD-Mem below: LID_theta < LID_* - {_fmt(m)}")
    if low is not None:
        # classify_memorization's DD-Mem region: LID_* <= low and LID_theta <= LID_* + margin
        mm = m or 0.0
        seg = np.array([lo - pad, low])
        ax.plot(seg, seg + mm, color="tab:red", lw=1.2, ls="-.")
        ax.plot([low, low], [lo - pad, low + mm], color="tab:red", lw=1.2, ls="-.",
                label=f"DD-Mem inside: LID_* <= {_fmt(low)}, LID_theta <= LID_* + {_fmt(mm)}")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    ax.set_title("MMH: model LID against data LID", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def _short(text, n):
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "\u2026"


# --------------------------------------------------------------------------- the report
def _fmt(v, digits=4):
    """Numbers with 4 significant digits (integers as they are); '-' for missing values."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    return str(v)


def _float_column(col, name):
    """A numeric column as float64 with NaN for nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise UserError(f"column {name!r} is not numeric") from None


def resolve_source(location: str, results_path: str) -> str:
    """A ``source`` value as a path that resolves: as stored when it exists (absolute,
    or relative to the working directory), else relative to the results file's folder."""
    container = location.rpartition("::")[0] or location
    if os.path.isabs(container) or os.path.exists(container):
        return location
    return os.path.join(os.path.dirname(os.path.abspath(results_path)), location)


def _read_thumb(location, results_path, image_col, size=128):
    from .sources import read_image_at

    img = read_image_at(resolve_source(location, results_path), image_column=image_col).convert("RGB")
    img.thumbnail((size, size))
    return np.asarray(img)


class _Notes:
    """The report's warnings: on the page, and on stderr as they happen."""

    def __init__(self, echo):
        self.items, self.echo = [], echo

    def __call__(self, msg):
        self.items.append(msg)
        if self.echo:
            import sys

            print(f"mmh-fast report: warning: {msg}", file=sys.stderr, flush=True)


def _results_path(results):
    return os.path.join(results, RESULTS) if os.path.isdir(results) else results


def make_report(results: str, *, out: str, labels: str | None = None, fmt: str = "html",
                positive: str | None = None, top: int = 16, lid_metric: str | None = None,
                classes: str | None = None, generations: str | None = None, image_size: int | None = None,
                warn: bool = True, maps: int = 0, map_kind: str = "score", maps_metric: str | None = None,
                map_model: str | None = None, map_steps: int = 50, map_guidance: float = 7.5,
                map_probes: int = 16, device: str | None = None) -> str:
    """Write the figures and the page; returns the page's path.

    Args:
        results: results.parquet or the scan directory holding it.
        labels: CSV/Parquet of key -> label (ground truth), or None.
        classes: classes.parquet of ``mmh-fast classify`` (default: the one beside the
            results, when there is one): the MMH scatter and the class counts.
        generations: a source of generated images (any scan source): each is shown
            next to its nearest training image (the results' images) with Carlini
            et al.'s calibrated l2 (:func:`mmh_fast.retrieval.calibrated_l2`).
        image_size: the side at which generations and training images are compared
            (default: the scan's image size, else the first generated image's).
        warn: also print the page's warnings on stderr.
        maps: memorization maps of the ``maps`` images ranked most memorized by
            ``maps_metric`` (0: none); see :func:`memorization_maps` for the other
            ``map_*`` options and ``device``.
    """
    if fmt not in ("html", "md"):
        raise UserError(f"--format must be html or md, got {fmt!r}")
    map_opts = _check_map_options(maps, map_kind, map_steps, map_guidance, map_probes)
    notes = _Notes(warn)
    table, meta = load_results(results)
    rpath = _results_path(results)
    if table.num_rows == 0:
        raise UserError(f"{results!r} holds no rows")
    os.makedirs(out, exist_ok=True)
    mmeta = meta.get("metrics") or {}
    numeric = [n for n in table.column_names if n not in _BASE_COLUMNS and not n.startswith("_")]
    metrics = [n for n in mmeta if n in table.column_names] or numeric
    if not metrics:
        raise UserError(f"{results!r} has no metric columns")
    lower = {n: bool(mmeta.get(n, {}).get("lower_is_memorized", True)) for n in metrics}
    keys = [str(k) for k in table.column("key").to_pylist()]
    cols = {n: _float_column(table.column(n), n) for n in metrics}
    titles = {n: metric_title(n, meta) for n in metrics}

    groups, pos_classes, assigned = {}, None, None
    if labels:
        lab = load_labels(labels)
        assigned = [lab.get(k) for k in keys]
        label_set = sorted({a for a in assigned if a is not None})
        if not label_set:
            raise UserError(_no_match_message("labels", labels, lab, keys))
        groups = {c: np.array([a == c for a in assigned]) for c in label_set}
        pos_classes = _positive_classes(label_set, positive)
        n_unl = sum(a is None for a in assigned)
        if n_unl:
            notes(f"{n_unl} results rows have no label and are left out of the ROC curves.")
        if pos_classes is None:
            notes(f"Labels {', '.join(label_set)}: which one means memorized is not clear; pass --positive.")

    figures, summary, curves = [], [], {}
    for n in metrics:
        v = cols[n]
        finite = np.isfinite(v)
        direction = "low = memorized" if lower[n] else "high = memorized"
        row = {"metric": n, "what": titles[n], "direction": direction, "n": int(finite.sum())}
        if finite.any():
            row.update(mean=float(v[finite].mean()), median=float(np.median(v[finite])),
                       min=float(v[finite].min()), max=float(v[finite].max()))
            p = os.path.join(out, f"hist_{n}.png")
            _hist(titles[n], v, groups, p, direction)
            figures.append((f"Density of {titles[n]}" + (" by label" if groups else ""), p))
        for c, mask in groups.items():
            sel = mask & finite
            row[f"mean[{c}]"] = float(v[sel].mean()) if sel.any() else None
        if pos_classes is not None:
            labelled = np.zeros(len(keys), dtype=bool)
            for m in groups.values():
                labelled |= m
            sel = labelled & finite
            y = np.zeros(len(keys), dtype=bool)
            for c in pos_classes:
                y |= groups[c]
            if sel.any() and 0 < y[sel].sum() < sel.sum():
                score = -v[sel] if lower[n] else v[sel]
                fpr, tpr, _ = roc_curve(score, y[sel])
                row["auc"], row["tpr@1%fpr"] = roc_auc(fpr, tpr), tpr_at_fpr(fpr, tpr, 0.01)
                curves[n] = (fpr, tpr, row["auc"], row["tpr@1%fpr"])
        summary.append(row)
    if curves:
        p = os.path.join(out, "roc.png")
        _roc_figure(curves, p)
        figures.append((f"ROC curves ({' + '.join(sorted(pos_classes))} = positive)", p))

    image_col = (meta.get("source") or {}).get("image_column")
    sources = table.column("source").to_pylist() if "source" in table.column_names else None

    # ---- the MMH classes
    class_info = _classes_section(classes, rpath, keys, groups, out, figures, notes)

    # ---- the lowest-LID images, ground-truth positives marked
    lid = lid_metric or next((n for n in _LID_PREFERENCE if n in metrics), None) or next(
        (n for n in metrics if lower[n]), None)
    if lid is not None and lid not in metrics:
        raise UserError(f"--lid-metric {lid!r} is not a metric of the results ({', '.join(metrics)})")
    lowest = []
    if lid is not None and sources is not None:
        v = cols[lid]
        order = [i for i in np.argsort(v, kind="mergesort") if np.isfinite(v[i])][:top]
        caps = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * len(keys)
        missing = []
        for i in order:
            pos = assigned[i] if assigned is not None and pos_classes and assigned[i] in pos_classes else None
            try:
                lowest.append((_read_thumb(sources[i], rpath, image_col), keys[i], float(v[i]), caps[i], pos,
                               assigned[i] if assigned is not None else None))
            except Exception as exc:
                missing.append((keys[i], sources[i], exc))
        if lowest:
            p = os.path.join(out, f"lowest_{lid}.png")
            n_pos = sum(r[4] is not None for r in lowest)
            _thumb_grid([r[:5] for r in lowest], lid, f"lowest {titles[lid]}", p)
            figures.append((f"The {len(lowest)} images with the lowest {titles[lid]}"
                            + (f"; {n_pos} of them labelled positive (red frame)" if pos_classes else ""), p))
        if missing:
            k, s, exc = missing[0]
            notes(f"{len(missing)} of the lowest-{lid} images could not be read from their source (first: "
                  f"{k!r} at {s!r}: {type(exc).__name__}: {_short(exc, 120)}).")

    # ---- generations next to their nearest training images
    pairs = []
    if generations:
        if sources is None:
            raise UserError(f"--generations needs the training images: {results!r} has no 'source' column")
        pairs = _generation_pairs(generations, sources, keys, rpath, image_col, meta, image_size, top, notes)
        if pairs:
            p = os.path.join(out, "generations.png")
            _pairs_grid([(g, t, gk, tk, c) for g, t, gk, tk, c, _ in pairs], p)
            figures.append((f"The {len(pairs)} generated images closest to a training image (calibrated l2)", p))

    # ---- memorization maps of the images ranked most memorized
    map_rows = []
    if maps:
        mm = maps_metric or lid or metrics[0]
        if mm not in metrics:
            raise UserError(f"--maps-metric {mm!r} is not a metric of the results ({', '.join(metrics)})")
        map_rows = memorization_maps(table, meta, rpath, metric=mm, values=cols[mm], lower=lower[mm],
                                     metric_title=titles[mm], n=maps, kind=map_kind, model=map_model,
                                     out=out, notes=notes, figures=figures, device=device, **map_opts)

    title = f"mmh-fast report: {os.path.basename(os.path.abspath(results))}"
    info = _info_lines(meta, table.num_rows, table.column("error").null_count if "error" in table.column_names
                       else table.num_rows, labels)
    low_rows = [(k, val, c, lab_) for _, k, val, c, _, lab_ in lowest]
    gen_rows = [(gk, tk, c, l2) for _, _, gk, tk, c, l2 in pairs]
    sections = dict(title=title, info=info, summary=summary, figures=figures, notes=notes.items,
                    lid=lid, lid_title=titles.get(lid), low_rows=low_rows, labelled=assigned is not None,
                    classes=class_info, gen_rows=gen_rows, map_rows=map_rows)
    if fmt == "md":
        page = os.path.join(out, "report.md")
        text = _markdown(sections, out)
    else:
        page = os.path.join(out, "report.html")
        text = _html(sections)
    tmp = page + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, page)
    return page


def _generation_pairs(spec, sources, keys, rpath, image_col, meta, image_size, top, notes):
    """[(gen thumb, train thumb, gen key, train key, calibrated l2, l2)] of the ``top``
    generations with the lowest calibrated l2, nearest = the exact nearest training
    image in pixel space at ``image_size`` (float32 in [0, 1]). The generations are
    held in memory (the queries); the training images are streamed in chunks of
    :data:`TRAIN_CHUNK` (the exact per-chunk neighbours merged by
    :func:`mmh_fast.retrieval.calibrated_l2`) and only the shown ones read again."""
    from ..retrieval import calibrated_l2
    from .sources import decode_image, open_source

    size = image_size or (meta.get("settings") or {}).get("image_size")
    src = open_source(spec)
    gkeys, garr = [], []
    for unit in src.units:
        for raw in src.iter_unit(unit):
            try:
                if raw.error is not None or raw.data is None:
                    raise ValueError(raw.error or "no image")
                if size is None:
                    w, h = _open_size(raw.data)
                    size = min(w, h)
                arr, _, _ = decode_image(raw.data, size)
            except Exception as exc:
                notes(f"generated image {raw.key!r} could not be read ({type(exc).__name__}: {_short(exc, 80)})")
                continue
            gkeys.append(raw.key)
            garr.append(arr)
    if not garr:
        raise UserError(f"--generations {spec!r}: no image could be read")
    g = np.stack(garr).reshape(len(garr), -1).astype(np.float32) / 255.0
    tkeys, bad = [], [0]

    def search(n):  # one streamed pass over the training images
        tkeys.clear()
        bad[0] = 0
        return calibrated_l2(g, _training_chunks(keys, sources, rpath, image_col, size, tkeys, bad), n=n,
                             return_indices=True)

    n = min(50, len(keys))
    try:
        cl2, idx = search(n)
    except ValueError:
        if tkeys and len(tkeys) >= n:
            raise
        if tkeys:  # fewer readable training images than n: calibrate on all of them (a small set, read again)
            n = len(tkeys)
            cl2, idx = search(n)
    if bad[0]:
        notes(f"{bad[0]} training images could not be read and are left out of the nearest-image search.")
    if not tkeys:
        notes("no training image could be read: no generated image is compared with the training set.")
        return []
    if n < 50:
        notes(f"calibrated l2 over the {n} nearest training images (Carlini et al. use 50; the training set "
              f"has {len(tkeys)}).")
    cl2, idx = np.asarray(cl2, dtype=np.float64), np.asarray(idx, dtype=np.int64)
    order = np.argsort(cl2, kind="mergesort")[:top]
    pairs = []
    for i in order:  # only the shown training images are decoded again
        t = _decode_training(tkeys[idx[i]][1], rpath, image_col, size)
        l2 = float(np.linalg.norm(g[i].astype(np.float64) - (t.reshape(-1).astype(np.float32) / 255.0)
                                  .astype(np.float64)))
        pairs.append((garr[i].transpose(1, 2, 0), t.transpose(1, 2, 0), gkeys[i], tkeys[idx[i]][0], float(cl2[i]),
                      l2))
    return pairs


#: training images decoded per chunk of the nearest-image search of --generations: memory
#: stays at one chunk (256 x 3 x size^2 float32: 3 MiB at 32 x 32, 200 MiB at 256 x 256)
TRAIN_CHUNK = 256


def _decode_training(source, rpath, image_col, size):
    """A training image as uint8 [3, size, size], as the scan decodes it."""
    from .sources import LOCATION_SEP, decode_image, read_image_at

    loc = resolve_source(source, rpath)
    if LOCATION_SEP in loc:  # inside a shard or table: re-encoded losslessly for decode_image
        buf = io.BytesIO()
        with read_image_at(loc, image_column=image_col) as img:
            img.convert("RGB").save(buf, format="PNG")
        loc = buf.getvalue()
    return decode_image(loc, size)[0]


def _training_chunks(keys, sources, rpath, image_col, size, tkeys, bad):
    """float32 [<= TRAIN_CHUNK, 3 size^2] chunks in [0, 1] of the readable training images;
    appends (key, source) of each to ``tkeys`` (the stream's row order) and counts the
    unreadable ones in ``bad[0]``."""
    buf = []
    for k, s in zip(keys, sources):
        try:
            buf.append(_decode_training(s, rpath, image_col, size))
        except Exception:
            bad[0] += 1
            continue
        tkeys.append((k, s))
        if len(buf) == TRAIN_CHUNK:
            yield np.stack(buf).reshape(len(buf), -1).astype(np.float32) / 255.0
            buf = []
    if buf:
        yield np.stack(buf).reshape(len(buf), -1).astype(np.float32) / 255.0


# --------------------------------------------------------------------------- memorization maps
#: --map: (library function, what the map is, its unit)
MAP_KINDS = {
    "score": ("score_difference_map", "score-difference map sum_k (s_c - s_u)^2 per pixel (Kim and Lee, ICML 2026)",
              "score^2"),
    "curvature": ("curvature_difference_map", "curvature-difference map relu(sum_k diag d(eps_c - eps_u)/dx) per "
                  "pixel, Hutchinson diagonal (Kim and Lee, ICML 2026)", "eps units"),
}


def _check_map_options(maps, kind, steps, guidance, probes) -> dict:
    if isinstance(maps, bool) or not isinstance(maps, int) or maps < 0:
        raise UserError(f"--maps must be an integer >= 0 (the number of images), got {maps!r}")
    if kind not in MAP_KINDS:
        raise UserError(f"--map must be one of {', '.join(MAP_KINDS)}, got {kind!r}")
    for name, v in (("--map-steps", steps), ("--map-probes", probes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{name} must be an integer >= 1, got {v!r}")
    g = float(guidance)
    if not (np.isfinite(g) and g >= 1):
        raise UserError(f"--map-guidance must be a finite number >= 1, got {guidance!r}")
    return {"steps": steps, "guidance": g, "probes": probes}


def _resolve_model(spec, rpath, given):
    """A scan's model argument as a loadable path: a toy name, the path as stored when it
    exists, else relative to the results file's folder."""
    from .loader import TOY_MODELS

    if spec in TOY_MODELS or os.path.exists(spec) or given:
        return spec
    beside = os.path.join(os.path.dirname(os.path.abspath(rpath)), spec)
    if os.path.exists(beside):
        return beside
    raise UserError(f"--maps: the scan's model {spec!r} cannot be found (from here or beside the results); "
                    "pass its pipeline directory with --map-model DIR")


def memorization_maps(table, meta, rpath, *, metric, values, lower, metric_title, n, kind, model, out, notes,
                      figures, steps, guidance, probes, device=None) -> list:
    """Memorization maps of the ``n`` images the results rank most memorized by
    ``metric`` (lowest first when ``lower``, else highest; rows without a finite
    value or a caption are passed over): for each, the caption is given to the
    scan's text-conditioned pipeline (``model``, default the one the scan
    recorded), and :func:`mmh_fast.text.score_difference_map` (``kind`` "score")
    or :func:`mmh_fast.text.curvature_difference_map` ("curvature", ``probes``
    Hutchinson probes) is taken at the last step of the caption's CFG DDIM
    trajectory (``steps`` steps, guidance ``guidance``, latent 0 keyed by the
    scan's --seed), upsampled to image size for latent pipelines. The map
    belongs to that trajectory, so it is drawn over the image the trajectory
    ends in (:func:`mmh_fast.text.generate`, same seed): when the caption is
    memorized that image reproduces the training image, and the map shows
    which part is copied.

    Writes ``maps.png`` (training image | generated image | map overlay, one row
    per image) and ``maps/maps.npz``: ``keys``, ``captions``, ``values`` [n]
    (the metric), ``maps`` float64 [n, H, W], ``generated`` and ``overlays``
    float32 [n, 3, H, W] in [-1, 1] (:func:`mmh_fast.text.map_overlay`), and
    ``settings`` (JSON). Returns the table rows of the page."""
    import torch

    from .. import text as mtext
    from .loader import load_model, parse_dtype, resolve_device

    fn_name, what, unit = MAP_KINDS[kind]
    caps = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * table.num_rows
    if not any(isinstance(c, str) and c.strip() for c in caps):
        raise UserError(f"--maps: {rpath!r} holds no captions; memorization maps compare the model's conditional "
                        "and unconditional scores of an image's caption. Scan a source with captions (a caption "
                        "column, .txt or .json beside each image)")
    spec = model or (meta.get("model") or {}).get("name")
    if not spec:
        raise UserError(f"--maps: {rpath!r} was scanned without --model; memorization maps need the "
                        "text-conditioned pipeline (Stable Diffusion-like): pass it with --map-model DIR")
    spec = _resolve_model(spec, rpath, model is not None)
    dev = resolve_device(device)
    loaded = load_model(spec, device=dev, dtype=parse_dtype(None, dev))
    if not loaded.conditional:
        raise UserError(f"--maps: the model {spec!r} ({loaded.class_name}) is unconditional; memorization maps "
                        "need a text-conditioned pipeline (conditional and unconditional scores): pass one with "
                        "--map-model DIR")
    fp = (meta.get("model") or {}).get("fingerprint")
    if fp and fp != loaded.fingerprint:
        notes(f"the model at {spec!r} differs from the one the scan used (config fingerprint {loaded.fingerprint} "
              f"against {fp}): the maps are this model's.")

    keys = [str(k) for k in table.column("key").to_pylist()]
    order = np.argsort(values if lower else -values, kind="mergesort")
    chosen, passed = [], []
    for i in order:
        if len(chosen) == n or not np.isfinite(values[i]):
            break
        (chosen if isinstance(caps[i], str) and caps[i].strip() else passed).append(int(i))
    if passed:
        notes(f"--maps: {len(passed)} of the images ranked most memorized by {metric} have no caption and get no "
              f"map (first: {keys[passed[0]]!r}).")
    if not chosen:
        raise UserError(f"--maps: no image with a finite {metric} has a caption")
    prompts = [caps[i] for i in chosen]
    seed = int((meta.get("settings") or {}).get("seed") or 0)
    kw = dict(num_images=1, seed=seed, num_inference_steps=steps, guidance_scale=guidance)
    fn = getattr(mtext, fn_name)
    m = fn(loaded.pipeline, prompts, **kw, **({"n_probes": probes} if kind == "curvature" else {}))
    maps = m[:, 0].to(torch.float64)
    with torch.no_grad():
        gen = mtext.generate(loaded.pipeline, prompts, **kw).float().cpu()
    overlays = mtext.map_overlay(gen, maps)

    settings = {"kind": kind, "function": f"mmh_fast.text.{fn_name}", "metric": metric, "lower_is_memorized": lower,
                "model": spec, "seed": seed, "num_inference_steps": steps, "guidance_scale": guidance, "step": -1,
                **({"n_probes": probes} if kind == "curvature" else {})}
    d = os.path.join(out, "maps")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "maps.tmp.npz")
    np.savez_compressed(tmp, keys=np.array([keys[i] for i in chosen]), captions=np.array(prompts),
                        values=values[chosen], maps=maps.numpy(), generated=gen.numpy(), overlays=overlays.numpy(),
                        settings=np.array(json.dumps(settings)))
    os.replace(tmp, os.path.join(d, "maps.npz"))

    image_col = (meta.get("source") or {}).get("image_column")
    sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * len(keys)
    hwc = lambda t: ((t.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)  # noqa: E731
    rows, unread = [], 0
    for r, i in enumerate(chosen):
        try:
            train = _read_thumb(sources[i], rpath, image_col)
        except Exception:
            train, unread = None, unread + 1
        rows.append((train, hwc(gen[r]), hwc(overlays[r]), keys[i], float(values[i]), prompts[r]))
    if unread:
        notes(f"--maps: {unread} training image(s) could not be read from their source (left blank).")
    setting = f"last step of the {steps}-step CFG DDIM trajectory, guidance {_fmt(guidance)}, seed {seed}" + (
        f", {probes} probes" if kind == "curvature" else "")
    p = os.path.join(out, "maps.png")
    _maps_grid(rows, metric, f"{what}; {setting}", p)
    direction = "lowest" if lower else "highest"
    figures.append((f"Memorization maps of the {len(chosen)} images with the {direction} {metric_title}: the "
                    f"training image | the image its caption generates | the {what} over it ({setting}; red = "
                    "high, each map scaled by its own maximum)", p))
    flat = maps.reshape(len(chosen), -1)
    return [{"rank": r + 1, "key": keys[i], "value": float(values[i]), "caption": prompts[r], "metric": metric,
             "kind": kind, "unit": unit, "max": float(flat[r].max()), "mean": float(flat[r].mean())}
            for r, i in enumerate(chosen)]


def _maps_grid(rows, name, title, path):
    """rows: (training image or None, generated image, overlay, key, value, caption)."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 3, figsize=(6.3, 2.3 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for (a, b, c), (train, gen, over, key, value, caption) in zip(axes, rows):
        if train is not None:
            a.imshow(train)
        a.set_title(f"{_short(key, 22)}\n{name}={_fmt(value)}", fontsize=7)
        b.imshow(gen)
        b.set_title(f"generated from\n{_short(caption, 26)}", fontsize=7)
        c.imshow(over)
        c.set_title("memorization map\n(red = high)", fontsize=7)
    fig.subplots_adjust(top=1 - 0.75 / fig.get_figheight())  # the title just above the first row
    fig.suptitle(_short(title, 160), fontsize=8, wrap=True)
    _save(fig, path)


def _open_size(data):
    from .sources import _open_pil

    return _open_pil(data).size


def _classes_section(classes, rpath, keys, groups, out, figures, notes):
    """The MMH scatter and the class counts from classes.parquet (None without one)."""
    path = classes
    if path is None:
        from .classify import CLASSES

        beside = os.path.join(os.path.dirname(os.path.abspath(rpath)), CLASSES)
        if not os.path.isfile(beside):
            return None
        path = beside
    ct = read_table(path, what="--classes")
    names = ct.column_names
    need = {"key", "label", "lid_data"}
    if not need <= set(names) or not {"lid_theta", "lid_theta_scaled"} & set(names):
        raise UserError(f"--classes {path!r} is not a classes.parquet of `mmh-fast classify` (key, label, "
                        f"lid_theta[_scaled], lid_data); its columns: {', '.join(names)}")
    cmeta = json.loads((ct.schema.metadata or {}).get(META_KEY, b"{}"))
    ckeys = [str(k) for k in ct.column("key").to_pylist()]
    label = np.array([str(v) for v in ct.column("label").to_pylist()])
    tcol = "lid_theta_scaled" if "lid_theta_scaled" in names else "lid_theta"  # the value compared
    theta = _float_column(ct.column(tcol), tcol)
    star = _float_column(ct.column("lid_data"), "lid_data")
    th = {}
    for col in ("scale", "margin", "low"):
        v = cmeta.get(col)
        if v is None and col in names and ct.num_rows:
            v = float(_float_column(ct.column(col), col)[0])
        th[col] = v
    counts = {c: int((label == c).sum()) for c in ("od_mem", "dd_mem", "none")}
    counts.update({c: int((label == c).sum()) for c in sorted(set(label.tolist())) if c not in counts})
    metric = cmeta.get("model_metric")
    y_title = metric_title(metric, {"metrics": {}, "settings": cmeta.get("scan_settings") or {}}) if metric \
        else "LID_theta"
    if th.get("scale") not in (None, 1.0):
        y_title += f" (x {_fmt(th['scale'])}, onto the LID_* scale)"
    ls = cmeta.get("lid_data_settings") or {}
    x_title = ", ".join(["local PCA LID_*"] + [f"{k} = {ls[k]}" for k in ("rule", "k") if ls.get(k) is not None])
    colour = {c: label == c for c in counts}
    p = os.path.join(out, "mmh_scatter.png")
    _mmh_scatter(theta, star, colour, th, p, x_title, y_title)
    figures.append(("The MMH picture: LID_theta against LID_*, coloured by class, with the class thresholds", p))
    if groups:
        index = {k: i for i, k in enumerate(keys)}
        rows = [index.get(k) for k in ckeys]
        by_label = {}
        for c, mask in groups.items():
            by_label[c] = np.array([r is not None and bool(mask[r]) for r in rows])
        if any(m.any() for m in by_label.values()):
            p = os.path.join(out, "mmh_scatter_labels.png")
            _mmh_scatter(theta, star, by_label, th, p, x_title, y_title)
            figures.append(("The MMH picture coloured by the ground-truth labels", p))
    matched = len(set(ckeys) & set(keys))
    if matched < len(ckeys):
        notes(f"{len(ckeys) - matched} of the {len(ckeys)} rows of {path!r} have no row in the results.")
    return {"path": path, "counts": counts, "thresholds": th, "n": len(ckeys)}


def _info_lines(meta, n_rows, n_ok, labels):
    lines = [("rows", str(n_rows)), ("rows without error", str(n_ok))]
    model = meta.get("model") or {}
    if model:
        lines.append(("model", f"{model.get('name')} ({model.get('class', '?')})"))
    src = meta.get("source") or {}
    if src:
        lines.append(("data", f"{src.get('spec')} ({src.get('kind')})"))
    st = meta.get("settings") or {}
    if st:
        lines.append(("settings", ", ".join(f"{k}={_fmt(v)}" for k, v in st.items() if k != "metrics")))
    mg = meta.get("merge") or {}
    if mg and not mg.get("complete", True):
        lines.append(("WARNING", f"incomplete scan: {mg.get('units_complete')}/{mg.get('units_total')} units"))
    if labels:
        lines.append(("labels", labels))
    lines.append(("written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
    return lines


def _summary_columns(summary):
    cols = ["metric", "what", "direction", "n", "mean", "median", "min", "max"]
    extra = []
    for row in summary:
        for k in row:
            if k not in cols and k not in extra:
                extra.append(k)
    return cols + sorted(extra, key=lambda k: (k.startswith("mean["), k))


def _tables(s):
    """[(heading, header cells, rows of cells)] of the page's tables after the figures."""
    out = []
    if s["classes"]:
        c, th = s["classes"], s["classes"]["thresholds"]
        out.append(("Memorization classes", ["class", "count", "share"],
                    [[k, _fmt(v), _fmt(v / max(1, c["n"]))] for k, v in c["counts"].items()]))
        out.append(("Class thresholds", ["threshold", "value"], [[k, _fmt(v)] for k, v in th.items()
                                                                 if v is not None and not isinstance(v, dict)]))
    if s["low_rows"]:
        head = ["key", s["lid"]] + (["label"] if s["labelled"] else []) + ["caption"]
        rows = [[k, _fmt(v)] + ([lab or ""] if s["labelled"] else []) + [c or ""] for k, v, c, lab in s["low_rows"]]
        out.append((f"Lowest {s['lid_title']}", head, rows))
    if s["map_rows"]:
        r0 = s["map_rows"][0]
        out.append((f"Memorization maps ({r0['kind']}), ranked by {r0['metric']}",
                    ["rank", "key", r0["metric"], f"map max ({r0['unit']})", f"map mean ({r0['unit']})", "caption"],
                    [[r["rank"], r["key"], _fmt(r["value"]), _fmt(r["max"]), _fmt(r["mean"]), r["caption"]]
                     for r in s["map_rows"]]))
    if s["gen_rows"]:
        out.append(("Generations and their nearest training images",
                    ["generated", "nearest training image", "calibrated l2", "l2 (pixels in [0, 1])"],
                    [[g, t, _fmt(c), _fmt(l2)] for g, t, c, l2 in s["gen_rows"]]))
    return out


def _html(s):
    e = html.escape
    cols = _summary_columns(s["summary"])
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{e(s['title'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right;font-size:13px}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}</style>",
             "</head><body>", f"<h1>{e(s['title'])}</h1>", "<table>"]
    for k, v in s["info"]:
        parts.append(f"<tr><th>{e(k)}</th><td style=\"text-align:left\">{e(v)}</td></tr>")
    parts.append("</table>")
    for n in s["notes"]:
        parts.append(f"<p><em>{e(n)}</em></p>")
    parts.append("<h2>Metrics</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    for row in s["summary"]:
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(row.get(c)))}</td>" for c in cols) + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for caption, path in s["figures"]:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<figure><img alt=\"{e(caption)}\" src=\"data:image/png;base64,{data}\">"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    for heading, head, rows in _tables(s):
        parts.append(f"<h2>{e(heading)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(v):
    return str(v).replace("|", "\\|").replace("\n", " ")


def _markdown(s, out):
    cols = _summary_columns(s["summary"])
    lines = [f"# {s['title']}", ""]
    for k, v in s["info"]:
        lines.append(f"- **{k}**: {_md_cell(v)}")
    lines.append("")
    for n in s["notes"]:
        lines += [f"*{n}*", ""]
    lines += ["## Metrics", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in s["summary"]:
        lines.append("| " + " | ".join(_md_cell(_fmt(row.get(c))) for c in cols) + " |")
    lines += ["", "## Figures", ""]
    for caption, path in s["figures"]:
        lines += [f"![{caption}]({os.path.relpath(path, out)})", "", f"*{caption}*", ""]
    for heading, head, rows in _tables(s):
        lines += [f"## {heading}", "", "| " + " | ".join(_md_cell(h) for h in head) + " |",
                  "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines) + "\n"
