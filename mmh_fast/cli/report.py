"""``mmh-fast report``: figures and a page summarising scan results.

Writes into DIR: ``hist_<metric>.png`` (density histograms, split by label when
labels are given, as in the MMH paper's Fig. 5 and 6), ``roc.png`` (ROC curves of
every metric, linear and log false-positive axes, with AUC and TPR at 1% FPR),
``lowest_<metric>.png`` (the lowest-LID images with keys and captions, when the
images can still be read from their ``source``), and ``report.html`` (one
self-contained page, figures embedded as base64) or ``report.md``.

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
from .writer import META_KEY, RESULTS

__all__ = ["roc_curve", "roc_auc", "tpr_at_fpr", "make_report", "load_results", "load_labels"]

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
    import pyarrow.parquet as pq

    if os.path.isdir(path):
        path = os.path.join(path, RESULTS)
    if not os.path.isfile(path):
        raise UserError(f"results file {path!r} does not exist (run `mmh-fast merge DIR` for a scan's parts)")
    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise UserError(f"cannot read {path!r} as Parquet: {exc}") from None
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    if "key" not in table.column_names:
        raise UserError(f"{path!r} has no 'key' column: not a scan result")
    return table, meta


def load_labels(path: str) -> dict:
    """key -> label (as str) from a CSV or Parquet file with 'key' and 'label' columns
    (or, lacking those names, its first two columns)."""
    if not os.path.isfile(path):
        raise UserError(f"labels file {path!r} does not exist")
    try:
        if path.lower().endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            t = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            t = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    except Exception as exc:
        raise UserError(f"cannot read labels {path!r}: {exc}") from None
    names = t.column_names
    if "key" in names and "label" in names:
        kc, lc = "key", "label"
    elif len(names) >= 2:
        kc, lc = names[0], names[1]
    else:
        raise UserError(f"labels {path!r} need a key and a label column; found {names}")
    keys = [str(k) for k in t.column(kc).to_pylist()]
    labels = [None if v is None else str(v) for v in t.column(lc).to_pylist()]
    return {k: v for k, v in zip(keys, labels) if v is not None}


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


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _hist(name, values, groups, path, direction):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    finite = values[np.isfinite(values)]
    edges = np.histogram_bin_edges(finite, bins="auto")
    if len(edges) > 61:
        edges = np.linspace(finite.min(), finite.max(), 61)
    if groups:
        for label, mask in groups.items():
            v = values[mask & np.isfinite(values)]
            if v.size:
                ax.hist(v, bins=edges, density=True, alpha=0.5, label=f"{label} (n={v.size})")
        ax.legend(fontsize=8)
    else:
        ax.hist(finite, bins=edges, density=True, alpha=0.8, color="tab:blue")
    ax.set_xlabel(f"{name} ({direction})")
    ax.set_ylabel("density")
    ax.set_title(name)
    _save(fig, path)


def _roc_figure(curves, path):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, (fpr, tpr, auc, t1) in curves.items():
        for ax in axes:
            ax.plot(fpr, tpr, label=f"{name}: AUC {auc:.3f}, TPR@1% {t1:.3f}", drawstyle="default")
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


def _thumb_grid(rows, name, path):
    plt = _plt()
    n = len(rows)
    cols = min(8, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.3 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, key, value, caption) in zip(axes.flat, rows):
        ax.imshow(img)
        ax.set_title(f"{_short(key, 22)}\n{name}={value:.3g}", fontsize=7)
        if caption:
            ax.text(0.5, -0.04, _short(caption, 40), fontsize=6, ha="center", va="top", transform=ax.transAxes,
                    wrap=True)
    fig.suptitle(f"lowest {name}", fontsize=10)
    _save(fig, path)


def _short(text, n):
    text = str(text)
    return text if len(text) <= n else text[:n - 1] + "\u2026"


# --------------------------------------------------------------------------- the report
def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _float_column(col, name):
    """A numeric column as float64 with NaN for nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        return pc.fill_null(col.cast(pa.float64()), float("nan")).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise UserError(f"column {name!r} is not numeric") from None


def make_report(results: str, *, out: str, labels: str | None = None, fmt: str = "html",
                positive: str | None = None, top: int = 16, lid_metric: str | None = None) -> str:
    """Write the figures and the page; returns the page's path."""
    if fmt not in ("html", "md"):
        raise UserError(f"--format must be html or md, got {fmt!r}")
    table, meta = load_results(results)
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

    groups, pos_classes, label_note = {}, None, None
    if labels:
        lab = load_labels(labels)
        assigned = [lab.get(k) for k in keys]
        classes = sorted({a for a in assigned if a is not None})
        if not classes:
            raise UserError(f"no key of {labels!r} matches a key of the results")
        groups = {c: np.array([a == c for a in assigned]) for c in classes}
        pos_classes = _positive_classes(classes, positive)
        n_unl = sum(a is None for a in assigned)
        if n_unl:
            label_note = f"{n_unl} results rows have no label and are left out of the ROC curves."
        if pos_classes is None:
            label_note = ((label_note + " ") if label_note else "") + (
                f"Labels {', '.join(classes)}: which one means memorized is not clear; pass --positive.")

    figures, summary, curves = [], [], {}
    for n in metrics:
        v = cols[n]
        finite = np.isfinite(v)
        direction = "low = memorized" if lower[n] else "high = memorized"
        row = {"metric": n, "direction": direction, "n": int(finite.sum())}
        if finite.any():
            row.update(mean=float(v[finite].mean()), median=float(np.median(v[finite])),
                       min=float(v[finite].min()), max=float(v[finite].max()))
            p = os.path.join(out, f"hist_{n}.png")
            _hist(n, v, groups, p, direction)
            figures.append((f"Density of {n}" + (" by label" if groups else ""), p))
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

    # ---- the lowest-LID images
    lid = lid_metric or next((n for n in _LID_PREFERENCE if n in metrics), None) or next(
        (n for n in metrics if lower[n]), None)
    if lid is not None and lid not in metrics:
        raise UserError(f"--lid-metric {lid!r} is not a metric of the results ({', '.join(metrics)})")
    lowest, thumb_note = [], None
    if lid is not None and "source" in table.column_names:
        from .sources import read_image_at

        v = cols[lid]
        order = [i for i in np.argsort(v, kind="mergesort") if np.isfinite(v[i])][:top]
        sources = table.column("source").to_pylist()
        caps = table.column("caption").to_pylist() if "caption" in table.column_names else [None] * len(keys)
        image_col = (meta.get("source") or {}).get("image_column")
        missing = 0
        for i in order:
            try:
                img = read_image_at(sources[i], image_column=image_col).convert("RGB")
                img.thumbnail((128, 128))
                lowest.append((np.asarray(img), keys[i], float(v[i]), caps[i]))
            except Exception:
                missing += 1
        if lowest:
            p = os.path.join(out, f"lowest_{lid}.png")
            _thumb_grid(lowest, lid, p)
            figures.append((f"The {len(lowest)} images with the lowest {lid}", p))
        if missing:
            thumb_note = f"{missing} of the lowest-{lid} images could not be read from their source."

    title = f"mmh-fast report: {os.path.basename(os.path.abspath(results))}"
    info = _info_lines(meta, table.num_rows, table.column("error").null_count if "error" in table.column_names
                       else table.num_rows, labels)
    notes = [x for x in (label_note, thumb_note) if x]
    low_rows = [(k, val, c) for _, k, val, c in lowest]
    if fmt == "md":
        page = os.path.join(out, "report.md")
        text = _markdown(title, info, summary, figures, notes, lid, low_rows, out)
    else:
        page = os.path.join(out, "report.html")
        text = _html(title, info, summary, figures, notes, lid, low_rows)
    tmp = page + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, page)
    return page


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
        lines.append(("settings", ", ".join(f"{k}={v}" for k, v in st.items() if k != "metrics")))
    mg = meta.get("merge") or {}
    if mg and not mg.get("complete", True):
        lines.append(("WARNING", f"incomplete scan: {mg.get('units_complete')}/{mg.get('units_total')} units"))
    if labels:
        lines.append(("labels", labels))
    lines.append(("written", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")))
    return lines


def _summary_columns(summary):
    cols = ["metric", "direction", "n", "mean", "median", "min", "max"]
    extra = []
    for row in summary:
        for k in row:
            if k not in cols and k not in extra:
                extra.append(k)
    return cols + sorted(extra, key=lambda k: (k.startswith("mean["), k))


def _html(title, info, summary, figures, notes, lid, low_rows):
    e = html.escape
    cols = _summary_columns(summary)
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right;font-size:13px}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:13px;color:#555}</style>",
             "</head><body>", f"<h1>{e(title)}</h1>", "<table>"]
    for k, v in info:
        parts.append(f"<tr><th>{e(k)}</th><td style=\"text-align:left\">{e(v)}</td></tr>")
    parts.append("</table>")
    for n in notes:
        parts.append(f"<p><em>{e(n)}</em></p>")
    parts.append("<h2>Metrics</h2><table><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>")
    for row in summary:
        parts.append("<tr>" + "".join(f"<td>{e(_fmt(row.get(c)))}</td>" for c in cols) + "</tr>")
    parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for caption, path in figures:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        parts.append(f"<figure><img alt=\"{e(caption)}\" src=\"data:image/png;base64,{data}\">"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    if low_rows:
        parts.append(f"<h2>Lowest {e(lid)}</h2><table><tr><th>key</th><th>{e(lid)}</th><th>caption</th></tr>")
        for k, v, c in low_rows:
            parts.append(f"<tr><td>{e(str(k))}</td><td>{e(_fmt(v))}</td>"
                         f"<td style=\"text-align:left\">{e(c or '')}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _md_cell(v):
    return str(v).replace("|", "\\|").replace("\n", " ")


def _markdown(title, info, summary, figures, notes, lid, low_rows, out):
    cols = _summary_columns(summary)
    lines = [f"# {title}", ""]
    for k, v in info:
        lines.append(f"- **{k}**: {_md_cell(v)}")
    lines.append("")
    for n in notes:
        lines += [f"*{n}*", ""]
    lines += ["## Metrics", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in summary:
        lines.append("| " + " | ".join(_md_cell(_fmt(row.get(c))) for c in cols) + " |")
    lines += ["", "## Figures", ""]
    for caption, path in figures:
        lines += [f"![{caption}]({os.path.relpath(path, out)})", "", f"*{caption}*", ""]
    if low_rows:
        lines += [f"## Lowest {lid}", "", f"| key | {lid} | caption |", "|---|---|---|"]
        for k, v, c in low_rows:
            lines.append(f"| {_md_cell(k)} | {_fmt(v)} | {_md_cell(c or '')} |")
        lines.append("")
    return "\n".join(lines) + "\n"
