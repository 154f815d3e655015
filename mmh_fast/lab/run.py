"""``run_lab``: build (or reuse) the lab, verify its ground truth by
generation, run the measurements and write lab.json, Parquet tables and a
report (report.md + report.html, PNG figures)."""
from __future__ import annotations

import base64
import json
import os
import sys
import time

import numpy as np

from .build import build
from .measure import DETECTORS, attribution, detection, digit_classifier, image_level, mitigation, roc_stats_or_nan
from .truth import COPY_THRESHOLD, ground_truth


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"mmh-fast lab: {msg}", file=sys.stderr, flush=True)


def verify(lab, pipe=None, *, prompts=None, train_images=None, return_images: bool = False) -> dict:
    """Ground truth of every prompt of ``lab`` (its recipe's guidance scale, DDIM
    steps and ``n_generations``), with the planted/verified summary."""
    cfg = lab.config
    pipe = pipe or lab.load_pipeline()
    prompts = prompts if prompts is not None else lab.prompts()
    train_images = train_images if train_images is not None else lab.train_images()
    gt = ground_truth(pipe, [p["prompt"] for p in prompts], train_images, n=cfg.n_generations,
                      guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps, seed=lab.seed,
                      return_images=return_images)
    kinds = np.array([p["kind"] for p in prompts])
    planted = np.isin(kinds, ["dd", "od"])
    mem = gt["memorized"]
    summary = {"planted": int(planted.sum()), "planted_memorized": int((planted & mem).sum()),
               "not_planted": int((~planted).sum()), "not_planted_not_memorized": int((~planted & ~mem).sum()),
               "by_kind": {k: {"prompts": int((kinds == k).sum()), "memorized": int(((kinds == k) & mem).sum()),
                               "median_min_l2": float(np.median(gt["min_l2"][kinds == k]))}
                           for k in ("dd", "od", "generic", "heldout") if (kinds == k).any()}}
    gt["summary"] = summary
    gt["planted"] = planted
    return gt


def _dump(out: str, res: dict) -> None:
    """lab.json after every section, so that a long run interrupted later keeps what it measured."""
    tmp = os.path.join(out, "lab.json.tmp")
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=float)
    os.replace(tmp, os.path.join(out, "lab.json"))


def _fig_roc(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for r in rows:
        if r["fpr"]:
            ax.plot(r["fpr"], r["tpr"], label=f"{r['detector']} (AUC {r['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    if any(r["fpr"] for r in rows):  # no curve when one class is empty (e.g. nothing verified memorized)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_scatter(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    for r in rows:
        ax.scatter(r["alignment"], r["copy_rate"])
        ax.annotate(r["method"], (r["alignment"], r["copy_rate"]), fontsize=7)
    ax.set_xlabel("alignment (digit classifier agrees with the caption; stands in for CLIP score)")
    ax.set_ylabel("copy rate (calibrated l2 < 1/3)")
    ax.xaxis.label.set_fontsize(7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig_hist(values, kinds, path, xlabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k in ("dd", "od", "generic", "heldout"):
        v = values[kinds == k]
        if len(v):
            ax.hist(v, bins=30, alpha=0.5, label=k)
    ax.axvline(COPY_THRESHOLD, color="k", ls=":", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table_md(rows, cols) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _write_parquet(path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def run_lab(out, *, size: str = "full", seed: int = 0, threads: int | None = 1, progress: bool = True,
            max_attribution: int | None = None, max_mitigation: int | None = None,
            max_detection: int | None = None, config=None, partial: bool = True, keyed: bool = True,
            max_maps: int = 4, fresh: bool = False) -> dict:
    """Everything ``mmh-fast lab`` does; returns the lab.json content.

    ``max_detection`` / ``max_attribution`` / ``max_mitigation`` cap the prompts
    of those sections (None: all). The detection cap keeps every planted prompt
    and an evenly spaced subset of the others; lab.json records the counts.
    ``config``: a :class:`LabConfig` overriding ``size``'s recipe (as for :func:`build`).

    Memorization maps: overlays for ``max_maps`` verified-memorized planted prompts
    (and two held-out ones); with ``partial`` the partial-copy variant
    (:func:`mmh_fast.lab.partial.run_partial`, built or reused in ``out/partial``)
    and its localisation table. With ``keyed`` the keyed (SolidMark) variant
    (:func:`mmh_fast.lab.keyed.run_keyed`, the same size as the lab) runs in
    ``out/keyed`` and its section joins the report. Both variants train their own model the first time (minutes).

    Resuming: lab.json records each section's settings. A second run on the same
    built lab (same size, seed, recipe and build record) reuses the finished
    sections -- ground truth, detection, image level, attribution, mitigation, in
    that order -- from lab.json and the Parquet tables, up to the first whose
    settings (caps, detector list) differ or that did not finish; that section
    and every later one are measured again. ``fresh=True`` measures everything
    again. lab.json lists the reused sections under "reused"."""
    import torch

    # a negative cap would slice prompts off the end of a list instead of failing
    for name, v in (("max_detection", max_detection), ("max_attribution", max_attribution),
                    ("max_mitigation", max_mitigation), ("max_maps", max_maps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0):
            raise ValueError(f"{name} must be an integer >= 0 or None, got {v!r}")
    for name, v in (("partial", partial), ("keyed", keyed), ("fresh", fresh)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    out = os.fspath(out)
    t_all = time.time()
    lab = build(out, size=size, seed=seed, threads=threads, progress=progress, config=config)
    cfg = lab.config
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        pipe = lab.load_pipeline()
        prompts = lab.prompts()
        train_rows = lab.train()
        train_images = lab.train_images()
        res = {"size": size, "seed": seed, "config": cfg.to_dict(), "build": lab.record}
        kinds = np.array([p["kind"] for p in prompts])
        texts = [p["prompt"] for p in prompts]
        keys = [r["key"] for r in train_rows]
        settings = {"ground_truth": {}, "detection": {"max_detection": max_detection, "metrics": list(DETECTORS)},
                    "image_level": {}, "attribution": {"max_attribution": max_attribution},
                    "mitigation": {"max_mitigation": max_mitigation}}
        res["settings"] = settings
        res["reused"] = []
        resume = _Resume(out, None if fresh else _previous(out, res), settings)

        gt = resume.ground_truth(kinds, keys)
        if gt is None:
            _say(progress, f"ground truth: {len(texts)} prompts x {cfg.n_generations} generations")
            t = time.time()
            gt = verify(lab, pipe, prompts=prompts, train_images=train_images, return_images=True)
            res["ground_truth"] = {**gt["summary"], "seconds": time.time() - t, "threshold": COPY_THRESHOLD,
                                   "guidance_scale": cfg.guidance_scale,
                                   "num_inference_steps": cfg.num_inference_steps,
                                   "n_generations": cfg.n_generations}
            _write_parquet(os.path.join(out, "ground_truth.parquet"), {
                "prompt": texts, "kind": kinds.tolist(), "planted": gt["planted"].tolist(),
                "memorized": gt["memorized"].tolist(), "min_l2": gt["min_l2"].tolist(),
                "copy_rate": gt["copy_rate"].tolist(), "nearest_key": [keys[i] for i in gt["nearest"]]})
        else:
            res["ground_truth"] = resume.section("ground_truth", res)
        _say(progress, f"ground truth: {json.dumps(gt['summary'])}")
        labels = gt["memorized"]
        _dump(out, res)

        det = resume.detection(labels)
        if det is None:
            _say(progress, "detection")
            sel = np.arange(len(texts))
            if max_detection is not None and max_detection < len(texts):
                rest = np.flatnonzero(~gt["planted"])
                keep = max(0, max_detection - int(gt["planted"].sum()))
                sel = np.sort(np.concatenate([np.flatnonzero(gt["planted"]),
                                              rest[np.linspace(0, len(rest) - 1, keep).astype(int)] if keep else []])
                              ).astype(int)
            det = detection(pipe, [texts[i] for i in sel], labels[sel], guidance_scale=cfg.guidance_scale,
                            num_inference_steps=cfg.num_inference_steps, num_images=cfg.n_generations, seed=seed,
                            generations=gt["images"][sel])
            for r in det:  # NaN when a cap at or below the planted count selects planted prompts only
                r["auc_vs_planted"] = roc_stats_or_nan(r["scores"], gt["planted"][sel])["auc"]
                r["prompts"] = len(sel)
                r["memorized_prompts"] = int(labels[sel].sum())
            res["detection"] = [{k: v for k, v in r.items() if k not in ("scores", "fpr", "tpr")} for r in det]
            _write_parquet(os.path.join(out, "detection.parquet"),
                           {"prompt": [texts[i] for i in sel], "memorized": labels[sel].tolist(),
                            "planted": gt["planted"][sel].tolist(),
                            **{r["detector"]: r["scores"] for r in det}})
        else:
            res["detection"] = resume.section("detection", res)
        _dump(out, res)

        if resume.reuse("image_level"):
            res["image_level"] = resume.section("image_level", res)
        else:
            _say(progress, "image level")
            tkinds = [r["kind"] for r in train_rows]
            il = image_level(pipe, train_images, [r["caption"] for r in train_rows], tkinds,
                             [r["dataset_count"] for r in train_rows], seed=seed)
            tk = np.array(tkinds)
            res["image_level"] = {
                "auc_planted_vs_generic": il["auc"], "seconds": il["seconds"], "lpca_k": il["lpca_k"],
                "class_error": il["class_error"],
                "classes": {k: {c: int(((tk == k) & (np.array(il["class"]) == c)).sum())
                                for c in ("od_mem", "dd_mem", "none")} for k in ("dd", "od", "generic")},
                "median": {k: {name: float(np.median(il[name][tk == k]))
                               for name in ("flipd_cond", "flipd_uncond", "cfg_norm_train", "lid_star", "png")}
                           for k in ("dd", "od", "generic")}}
            _write_parquet(os.path.join(out, "images.parquet"), {
                "key": keys, "kind": tkinds, **{n: il[n].tolist() for n in ("flipd_cond", "flipd_uncond",
                                                                            "cfg_norm_train", "lid_star", "png")},
                "class": il["class"]})
        _dump(out, res)

        if resume.reuse("attribution"):
            res["attribution"] = resume.section("attribution", res)
        else:
            _say(progress, "attribution")
            trig = [(p["prompt"], p["trigger"]) for p, m in zip(prompts, labels) if p["trigger"] and m]
            if max_attribution is not None:
                trig = trig[:max_attribution]
            att = attribution(pipe, [a for a, _ in trig], [b for _, b in trig], guidance_scale=cfg.guidance_scale,
                              num_inference_steps=cfg.num_inference_steps, seed=seed) if trig else []
            res["attribution"] = [{**r, "prompts": len(trig)} for r in att]
        _dump(out, res)

        if resume.reuse("mitigation"):
            res["mitigation"] = mit = resume.section("mitigation", res)
        else:
            _say(progress, "mitigation")
            mem_idx = [i for i in range(len(prompts)) if labels[i]]
            if max_mitigation is not None:
                mem_idx = mem_idx[:max_mitigation]
            mit = mitigation(pipe, [texts[i] for i in mem_idx], [prompts[i]["digit"] for i in mem_idx],
                             train_images, guidance_scale=cfg.guidance_scale,
                             num_inference_steps=cfg.num_inference_steps, n=cfg.n_generations, seed=seed,
                             predict=digit_classifier(seed)) if mem_idx else []
            res["mitigation"] = [{k: v for k, v in r.items() if k != "new_prompts"} | {"prompts": len(mem_idx)}
                                 for r in mit]
        _dump(out, res)
        if res["reused"]:
            _say(progress, f"reused from {os.path.join(out, 'lab.json')}: {', '.join(res['reused'])}")

        extra_md = _maps_section(out, res, pipe, prompts, labels, gt["planted"], cfg, seed, progress, max_maps)
        _dump(out, res)
        if partial:
            _say(progress, "partial-copy lab (memorization maps' localisation)")
            from .partial import run_partial

            part = run_partial(os.path.join(out, "partial"), seed=seed, threads=threads, progress=progress,
                               figures_dir=os.path.join(out, "figures"), report_dir=out)
            res["maps"]["partial"] = part["results"]
            extra_md += part["markdown"]
            _dump(out, res)
        if keyed:
            extra_md += _keyed_section(out, res, size, seed, threads, progress)
        res["seconds_total"] = time.time() - t_all
        _report(out, res, det, gt, kinds, mit, extra_md)
        _dump(out, res)
        return res
    finally:
        torch.set_num_threads(old)


def _previous(out: str, header: dict) -> dict | None:
    """lab.json of an earlier run on the same built lab (size, seed, recipe, build record), else None."""
    path = os.path.join(out, "lab.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            prev = json.load(f)
    except (OSError, ValueError):
        return None
    same = json.loads(json.dumps({k: header[k] for k in ("size", "seed", "config", "build")}, default=float))
    return prev if {k: prev.get(k) for k in same} == same else None


class _Resume:
    """Which sections of an earlier run are reused: a prefix of SECTIONS, each finished
    (in lab.json, its tables on disk) with the same settings as now."""

    def __init__(self, out: str, prev: dict | None, settings: dict):
        self.out, self.prev, self.settings = out, prev, settings
        self.ok = True  # False from the first section that is measured again

    def _reusable(self, name: str) -> bool:
        p = self.prev
        files = {"ground_truth": "ground_truth.parquet", "detection": "detection.parquet",
                 "image_level": "images.parquet"}.get(name)
        return bool(p is not None and name in p
                    and p.get("settings", {}).get(name) == json.loads(json.dumps(self.settings[name]))
                    and (files is None or os.path.exists(os.path.join(self.out, files))))

    def reuse(self, name: str) -> bool:
        self.ok = self.ok and self._reusable(name)
        return self.ok

    def section(self, name: str, res: dict):
        res["reused"].append(name)
        return self.prev[name]

    def ground_truth(self, kinds: np.ndarray, keys: list) -> dict | None:
        """The ground-truth arrays from ground_truth.parquet, when detection is reusable too
        (the generations are not stored: a detection measured again needs them, so ground
        truth is then measured again)."""
        if not (self.reuse("ground_truth") and self._reusable("detection")):
            self.ok = False
            return None
        import pyarrow.parquet as pq

        t = pq.read_table(os.path.join(self.out, "ground_truth.parquet")).to_pydict()
        if len(t["prompt"]) != len(kinds):
            self.ok = False
            return None
        at = {k: i for i, k in enumerate(keys)}
        return {"memorized": np.asarray(t["memorized"], bool), "planted": np.asarray(t["planted"], bool),
                "min_l2": np.asarray(t["min_l2"], np.float64), "copy_rate": np.asarray(t["copy_rate"], np.float64),
                "nearest": np.asarray([at[k] for k in t["nearest_key"]]), "summary": {
                    k: v for k, v in self.prev["ground_truth"].items()
                    if k in ("planted", "planted_memorized", "not_planted", "not_planted_not_memorized", "by_kind")}}

    def detection(self, labels: np.ndarray) -> list | None:
        """The detection rows with their per-prompt scores (detection.parquet) and ROC points."""
        if not self.reuse("detection"):
            return None
        import pyarrow.parquet as pq

        t = pq.read_table(os.path.join(self.out, "detection.parquet")).to_pydict()
        rows = []
        for r in self.prev["detection"]:
            s = np.asarray(t[r["detector"]], np.float64)
            st = roc_stats_or_nan(s, t["memorized"])
            rows.append({**r, "scores": s.tolist(), "fpr": st["fpr"], "tpr": st["tpr"]})
        return rows


def _maps_section(out, res, pipe, prompts, labels, planted, cfg, seed, progress, max_maps) -> list:
    """Overlays of both memorization maps for up to ``max_maps`` verified-memorized planted
    prompts and two held-out ones; fills res["maps"] and returns the report lines."""
    from .partial import maps_figure, whole_image_maps

    mem = [i for i in range(len(prompts)) if labels[i] and planted[i]][:max_maps]
    held = [i for i, p in enumerate(prompts) if p["kind"] == "heldout" and not labels[i]][:2]
    sel = mem + held
    res["maps"] = {"whole_image": []}
    if not sel:
        return ["## Memorization maps", "", "No verified-memorized planted or held-out prompt to draw.", ""]
    _say(progress, f"memorization maps: {len(sel)} prompts")
    t = time.time()
    w = whole_image_maps(pipe, [prompts[i]["prompt"] for i in sel], guidance_scale=cfg.guidance_scale,
                         num_inference_steps=cfg.num_inference_steps, seed=seed)
    res["maps"]["whole_image"] = [{"prompt": prompts[i]["prompt"], "kind": prompts[i]["kind"],
                                   "memorized": bool(labels[i]),
                                   **{f"mean_{k}": w["mean"][k][j] for k in w["maps"]}} for j, i in enumerate(sel)]
    res["maps"]["whole_image_seconds"] = time.time() - t
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    maps_figure(w["images"], w["maps"], [f"{prompts[i]['prompt']} ({prompts[i]['kind']})" for i in sel],
                os.path.join(fig_dir, "maps_whole.png"))
    return ["## Memorization maps", "",
            "Per-pixel maps (mmh_fast.text.curvature_difference_map with 16 Hutchinson probes, and "
            "score_difference_map) at the last step of one CFG DDIM trajectory per prompt (the lab's guidance and "
            "steps), upsampled from the 4x4 latent grid to 16x16 pixels and drawn in red over the generation "
            "(map_overlay; each map scaled by its own maximum). Verified-memorized planted prompts copy the whole "
            "image, so their maps have no region to find; the two held-out prompts show the maps of prompts that "
            "copy nothing.", "",
            _table_md(res["maps"]["whole_image"], ["prompt", "kind", "memorized", "mean_curvature_difference",
                                                   "mean_score_difference"]), "",
            "![maps_whole](figures/maps_whole.png)", ""]


def _keyed_section(out, res, size, seed, threads, progress) -> list:
    """The keyed (SolidMark) variant (:func:`mmh_fast.lab.keyed.run_keyed`) in ``out/keyed``:
    fills res["keyed"] and returns the report lines."""
    from .keyed import run_keyed

    _say(progress, "keyed (SolidMark) lab")
    k = run_keyed(os.path.join(out, "keyed"), size=size, seed=seed, threads=threads, progress=progress)
    res["keyed"] = k["results"]
    figs = [os.path.relpath(os.path.abspath(p), os.path.abspath(out)) for p in k.get("figures", [])]
    res["keyed_figures"] = figs
    _dump(out, res)
    md = list(k["markdown"])
    text = "\n".join(md)
    # figures the section does not link itself, linked from the report's directory
    return md + [line for f in figs if os.path.basename(f) not in text for line in (f"![keyed]({f})", "")]


def _report(out, res, det, gt, kinds, mit, extra_md=()) -> None:
    figs = {}
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    figs["roc"] = os.path.join(fig_dir, "roc.png")
    _fig_roc(det, figs["roc"], "prompt-level detection vs verified memorization")
    figs["copy"] = os.path.join(fig_dir, "min_l2_by_kind.png")
    _fig_hist(gt["min_l2"], kinds, figs["copy"], "smallest calibrated l2 over a prompt's generations")
    if mit:
        figs["mitigation"] = os.path.join(fig_dir, "mitigation.png")
        _fig_scatter(mit, figs["mitigation"])
    g = res["ground_truth"]
    md = [f"# Memorization lab ({res['size']}, seed {res['seed']})", "",
          f"Build: {res['build'].get('seconds', {}).get('total', float('nan')):.0f} s of training; "
          f"whole run {res['seconds_total']:.0f} s"
          + (f" (read back from an earlier run: {', '.join(res['reused'])}; their seconds are that run's)."
             if res.get("reused") else "."), "",
          "## Ground truth by generation", "",
          f"{g['n_generations']} generations per prompt (guidance {g['guidance_scale']}, "
          f"{g['num_inference_steps']} DDIM steps); memorized = some generation has calibrated l2 < 1/3.", "",
          f"- planted prompts verified memorized: {g['planted_memorized']} / {g['planted']}",
          f"- non-planted prompts verified not memorized: {g['not_planted_not_memorized']} / {g['not_planted']}", "",
          _table_md([{"kind": k, **v} for k, v in g["by_kind"].items()], ["kind", "prompts", "memorized",
                                                                          "median_min_l2"]), "",
          "![copy](figures/min_l2_by_kind.png)", "",
          "## Prompt-level detection", "",
          "Scores oriented so that high = memorized (sign -1: the quantity is negated). AUC and TPR@1%FPR "
          "against the verified label; auc_vs_planted against the planted one.", "",
          _table_md(res["detection"], ["detector", "what", "sign", "prompts", "memorized_prompts", "auc",
                                       "tpr_at_1fpr", "auc_vs_planted", "seconds_per_prompt"]), "",
          "![roc](figures/roc.png)", "",
          "## Image level (training images)", "",
          f"AUC of each signal, planted (DD/OD) against generic images, high = memorized "
          f"(FLIPD at t0 = 0.05, LID_* by local PCA with k = {res['image_level']['lpca_k']} on the dataset "
          "with its duplicates):", "",
          _table_md([{"signal": k, "auc": v} for k, v in res["image_level"]["auc_planted_vs_generic"].items()],
                    ["signal", "auc"]), "",
          "Medians by planted kind:", "",
          _table_md([{"kind": k, **v} for k, v in res["image_level"]["median"].items()],
                    ["kind", "flipd_cond", "flipd_uncond", "cfg_norm_train", "lid_star", "png"]), "",
          "classify_memorization classes by planted kind (scale='median_ratio', margin='mad')"
          + (f" -- not computed: {res['image_level']['class_error']}" if res["image_level"]["class_error"] else "")
          + ":", "",
          _table_md([{"kind": k, **v} for k, v in res["image_level"]["classes"].items()],
                    ["kind", "od_mem", "dd_mem", "none"]), "",
          "## Token attribution (trigger-token prompts)", "",
          _table_md(res["attribution"], ["metric", "wrt", "prompts", "top1", "top3", "seconds_per_prompt"]), "",
          "## Mitigation (verified-memorized prompts)", "",
          "Alignment: a scikit-learn digit classifier (logistic regression on the 8x8 digits) predicts each "
          "generation's digit; the fraction matching the caption's digit word stands in for CLIP score.", "",
          _table_md(res["mitigation"], ["method", "prompts", "copy_rate", "alignment", "median_l2",
                                        "seconds_per_prompt"]), ""]
    if mit:
        md += ["![mitigation](figures/mitigation.png)", ""]
    md += list(extra_md)
    text = "\n".join(md)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    html = _md_to_html(text, out)
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(html)


def _md_to_html(md: str, base: str) -> str:
    """A minimal Markdown -> self-contained HTML (headings, tables, lists, images inlined as base64)."""
    import html as H

    out, in_table = ["<!doctype html><html><head><meta charset='utf-8'><title>mmh-fast lab</title>"
                     "<style>body{font-family:sans-serif;max-width:60em;margin:auto}"
                     "td,th{border:1px solid #ccc;padding:2px 6px}table{border-collapse:collapse}</style>"
                     "</head><body>"], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= set("-") for c in cells):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
                out.append("<tr>" + "".join(f"<th>{H.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                out.append("<tr>" + "".join(f"<td>{H.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("!["):
            path = line[line.index("(") + 1:-1]
            with open(os.path.join(base, path), "rb") as f:
                b64 = base64.b64encode(f.read()).decode()
            out.append(f"<img src='data:image/png;base64,{b64}'>")
        elif line.startswith("#"):
            n = len(line) - len(line.lstrip("#"))
            out.append(f"<h{n}>{H.escape(line[n:].strip())}</h{n}>")
        elif line.startswith("- "):
            out.append(f"<li>{H.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{H.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)
