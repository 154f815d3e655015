"""The keyed lab: the quick lab retrained on SolidMark-bordered images, and
SolidMark's eidetic counts measured on it (issue 15, measurement 5).

Design (why these numbers):

- Every distinct training image of the lab (the quick recipe's digits, 16 x 16,
  pixels in [-1, 1]) gets its key border through :class:`SolidMarkDataset`
  with ``SolidMark(thickness=4, seed=seed, value_range=(-1, 1))``: a canvas of
  24 x 24. The VAE downsamples by 4 (three levels), so the latent grid is
  6 x 6, integral, even (the UNet halves it once), and its outer ring of latent
  cells covers exactly the 4-pixel border. Thickness 4 is the paper's on
  32 x 32 CIFAR-10.
- The sample id of an image is its lab key (``digit0123``), so a DD-Mem image,
  one row of train.parquet repeated in the dataset through its stream weight,
  carries ONE key in all its copies (what ``id_fn="content"`` gives exact
  duplicates). The paper instead gives every copy its own key and names that
  as its limitation for duplication-induced memorization; that setting is not
  measured here.
- Training reuses the lab's own stages (:func:`mmh_fast.lab.build`'s
  ``_train``: VAE, UNet + text encoder, decoder refinement) with the quick
  recipe; only ``image_size`` becomes the canvas size (24), so the pipeline
  generates bordered canvases by default. train.parquet holds the bordered
  images (with column ``solidmark_key``), keys.parquet the exact keys
  (:func:`mmh_fast.solidmark.save_keys`).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..solidmark import SolidMark, SolidMarkDataset, load_keys
from .build import Lab, _expected, _load_existing, _train_and_record, load_checkpoint, save_checkpoint
from .data import make_data
from .training import LabConfig

THICKNESS = 4
KEYS_FILE = "keys.parquet"
VARIANT = "keyed"


def keyed_solidmark(seed: int) -> SolidMark:
    """The SolidMark of the keyed lab of ``seed``: 4-pixel border, keys seeded by the lab seed,
    pixels in the lab's [-1, 1]."""
    return SolidMark(THICKNESS, seed=int(seed), value_range=(-1.0, 1.0))


def keyed_config(size: str = "quick") -> tuple[LabConfig, int]:
    """(recipe, interior size): ``size``'s :class:`LabConfig` with ``image_size`` the
    canvas (interior + 2 x 4), and the interior image size the data is drawn at."""
    base = LabConfig.for_size(size)
    canvas = base.image_size + 2 * THICKNESS
    down = 2 ** (len(base.vae_channels) - 1)
    if canvas % (down * 2 ** (len(base.unet_channels) - 1)):
        raise ValueError(f"canvas {canvas} does not give an integral latent grid for the recipe's VAE and UNet")
    return dataclasses.replace(base, image_size=canvas), base.image_size


def _want(size: str, seed: int, cfg: LabConfig, interior: int) -> dict:
    sm = keyed_solidmark(seed)
    return {**_expected(size, seed, cfg), "variant": VARIANT,
            "solidmark": {"thickness": sm.thickness, "seed": sm.seed, "value_range": list(sm.value_range),
                          "interior_size": interior}}


def keyed_data(size: str, seed: int):
    """(data, dataset, interior): the lab's :func:`make_data` at the interior size, its
    images replaced by their bordered canvases [N, 3, S + 8, S + 8] (the
    :class:`SolidMarkDataset` over the distinct images, ids = the lab keys)."""
    base = LabConfig.for_size(size)
    data = make_data(n_dd=base.n_dd, dd_copies=base.dd_copies, n_od=base.n_od, od_boost=base.od_boost,
                     n_generic=base.n_generic, image_size=base.image_size, seed=seed)
    ds = SolidMarkDataset(data.images, keyed_solidmark(seed), ids=data.keys)
    canvases = np.stack([ds[i] for i in range(len(ds))]).astype(np.float32)
    return dataclasses.replace(data, images=canvases), ds, base.image_size


def build_keyed(out_dir, *, size: str = "quick", seed: int = 0, threads: int | None = 1, progress: bool = True,
                force: bool = False) -> Lab:
    """Build (or reuse) the keyed lab in ``out_dir``: the lab's directory layout
    (pipeline/, prompts.parquet, train.parquet of bordered 24 x 24 images with
    their ``solidmark_key``, build.json with ``variant`` and ``solidmark``) plus
    ``keys.parquet`` (:func:`mmh_fast.solidmark.save_keys`). A second call with the
    same arguments returns what is on disk (``force=True`` retrains)."""
    if size not in ("full", "quick"):
        raise ValueError(f"size must be 'full' or 'quick', got {size!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    cfg, interior = keyed_config(size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    want = _want(size, int(seed), cfg, interior)
    keys_path = os.path.join(out_dir, KEYS_FILE)
    rec = None if force or not os.path.exists(keys_path) else _load_existing(out_dir, want)
    if rec is None:
        data, ds, _ = keyed_data(size, int(seed))
        # the key file first: a build.json on disk then always has its keys beside it
        ds.save_keys(keys_path)
        rec = _train_and_record(out_dir, cfg, int(seed), threads, progress, want, data=data,
                                train_columns={"solidmark_key": ds.keys().tolist()})
    return Lab(out_dir=out_dir, config=cfg, seed=int(seed), size=size, record=rec)


def save_keyed_checkpoint(lab: Lab, directory, *, command: str | None = None) -> None:
    """:func:`mmh_fast.lab.save_checkpoint` (float16 pipeline, tables, build.json) plus the key file."""
    import shutil

    save_checkpoint(lab, directory, command=command)
    shutil.copy(os.path.join(lab.out_dir, KEYS_FILE), os.path.join(os.fspath(directory), KEYS_FILE))


def load_keyed_checkpoint(directory, out_dir) -> Lab:
    """:func:`mmh_fast.lab.load_checkpoint` plus the key file: an ordinary keyed lab in ``out_dir``
    (which :func:`build_keyed` with the recorded arguments then reuses)."""
    import shutil

    lab = load_checkpoint(directory, out_dir)
    shutil.copy(os.path.join(os.fspath(directory), KEYS_FILE), os.path.join(lab.out_dir, KEYS_FILE))
    return lab


def lab_keys(lab: Lab):
    """(keys [N] float64 aligned with train.parquet, the SolidMark) of a keyed lab, from its
    key file; ValueError when the file's ids are not train.parquet's keys in order."""
    table = load_keys(os.path.join(lab.out_dir, KEYS_FILE))
    names = [r["key"] for r in lab.train()]
    if list(table.ids) != names:
        raise ValueError(f"{KEYS_FILE} does not list train.parquet's images in order")
    return table.keys, table.solidmark()


# -- measurement ----------------------------------------------------------------------------------------

#: the eidetic thresholds of the keyed lab's table (key units; the issue's 0.01, 0.05 and 0.1)
DELTAS = (0.01, 0.05, 0.1)
RESULTS_FILE = "keyed.json"
GNI_SCALES = (0.5, 1.0)  # the lab's mitigation measurement's (measure.mitigation)


def _crop(sm: SolidMark, images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(sm.crop(np.asarray(images, np.float32)))


def verify_keyed(lab: Lab, pipe, *, seed: int | None = None, prompts=None) -> dict:
    """Ground truth of the keyed lab by generation, on the interior.

    Every training prompt (planted and generic; the held-out prompts name no
    training image) is generated ``n_generations`` times with the pipeline's own
    ``__call__`` (the recipe's guidance scale and DDIM steps, generation j
    seeded ``seed + j``); the 4-pixel border is cropped off each 24 x 24
    generation and the 16 x 16 interior is matched to the interiors of the
    training images by calibrated l2 (:func:`mmh_fast.lab.copy_scores`).

    Returns per prompt ``prompts``, ``min_l2``, ``memorized`` (a generation
    below 1/3), and per training image (train.parquet order) ``image_memorized``:
    some generation of a prompt whose training keys include the image copies
    that very image (nearest training interior and calibrated l2 < 1/3).
    ``prompts``: a subset of the training prompts' texts to generate (default
    all); the images of the other prompts then stay False."""
    from .truth import COPY_THRESHOLD, copy_scores, generate_images

    cfg = lab.config
    seed = lab.seed if seed is None else int(seed)
    _, sm = lab_keys(lab)
    every = [p for p in lab.prompts() if p["split"] == "train"]
    if prompts is None:
        prompts = every
    else:
        by_text = {p["prompt"]: p for p in every}
        missing = [t for t in prompts if t not in by_text]
        if missing:
            raise ValueError(f"prompts must be training prompts of the lab, got e.g. {missing[0]!r}")
        prompts = [by_text[t] for t in dict.fromkeys(prompts)]
    train = lab.train()
    inner = _crop(sm, lab.train_images())
    gen = generate_images(pipe, [p["prompt"] for p in prompts], n=cfg.n_generations,
                          guidance_scale=cfg.guidance_scale, num_inference_steps=cfg.num_inference_steps, seed=seed)
    d, idx = copy_scores(_crop(sm, gen), inner)
    row = {r["key"]: i for i, r in enumerate(train)}
    image_mem = np.zeros(len(train), bool)
    for p, dp, ip in zip(prompts, d, idx):
        own = {row[k] for k in p["train_keys"]}
        for dist, near in zip(dp, ip):
            if dist < COPY_THRESHOLD and int(near) in own:
                image_mem[int(near)] = True
    kinds = np.array([p["kind"] for p in prompts])
    mem = d.min(1) < COPY_THRESHOLD
    ikinds = np.array([r["kind"] for r in train])
    summary = {k: {"prompts": int((kinds == k).sum()), "prompts_memorized": int(((kinds == k) & mem).sum()),
                   "median_min_l2": float(np.median(d.min(1)[kinds == k])),
                   "images": int((ikinds == k).sum()), "images_memorized": int((image_mem & (ikinds == k)).sum())}
               for k in ("dd", "od", "generic") if (kinds == k).any()}
    return {"prompts": [p["prompt"] for p in prompts], "kinds": kinds.tolist(), "min_l2": d.min(1),
            "memorized": mem, "image_memorized": image_mem, "summary": summary}


def _mitigation_transforms(pipe, name: str, captions: list[str], *, seed: int, guidance_scale: float,
                           num_inference_steps: int, opt_iters: int) -> dict:
    """evaluate() keywords applying mitigation ``name`` to the inpainting's captions, through
    :mod:`mmh_fast.mitigations` and :mod:`mmh_fast.text` (nothing reimplemented here)."""
    import torch

    from ..mitigations import CaptionWordRepeat, GaussianNoiseInjection, RandomNumberAddition, RandomTokenAddition
    from ..text import mitigate, optimize_prompt_embedding

    if name == "none":
        return {}
    if name.startswith("gni:"):
        return {"embedding_transform": GaussianNoiseInjection(float(name[4:]), seed=seed, skip_first_token=True)}
    if name in ("rta", "cwr", "rna"):
        tf = {"rta": lambda: RandomTokenAddition(1, seed=seed, tokenizer=pipe.tokenizer),
              "cwr": lambda: CaptionWordRepeat(1, seed=seed), "rna": lambda: RandomNumberAddition(1, seed=seed)}[name]()
        return {"prompt_transform": tf}
    if name.startswith("mitigate:"):
        once = {c: mitigate(pipe, c, k=1, metric="cfg", rephraser=name.split(":", 1)[1], n=1, seed=seed,
                            attribution_kwargs=dict(num_images=2, guidance_scale=guidance_scale,
                                                    num_inference_steps=num_inference_steps))[0]
                for c in dict.fromkeys(captions)}  # generic captions are shared: one rewrite per caption
        new = [once[c] for c in captions]
        return {"prompt_transform": lambda _p, i: new[i], "new_prompts": new}
    if name == "optimize_prompt_embedding":
        once = {c: optimize_prompt_embedding(pipe, c, metric="cfg", iters=opt_iters, num_images=1, seed=seed,
                                             guidance_scale=guidance_scale, num_inference_steps=num_inference_steps)
                for c in dict.fromkeys(captions)}
        emb = torch.cat([once[c] for c in captions])
        # evaluate's embedding hook receives the captions' embeddings of a chunk and their positions
        return {"embedding_transform": lambda e, ids: emb[list(ids)].to(e.device, e.dtype)}
    raise ValueError(f"unknown mitigation {name!r}")


MITIGATIONS = ("none",) + tuple(f"gni:{s:g}" for s in GNI_SCALES) + ("rta", "cwr", "rna", "mitigate:drop",
                                                                     "optimize_prompt_embedding")


def check_mitigations(mitigations) -> list[str]:
    """The mitigation names as a list; ValueError naming ``mitigations`` and the accepted forms
    on an unknown name (checked before any training or inpainting)."""
    from ..text import REPHRASERS

    if isinstance(mitigations, str):
        mitigations = [mitigations]
    out = list(mitigations)
    for m in out:
        ok = m in ("none", "rta", "cwr", "rna", "optimize_prompt_embedding") or \
            (isinstance(m, str) and m.startswith("mitigate:") and m.split(":", 1)[1] in REPHRASERS)
        if isinstance(m, str) and m.startswith("gni:"):
            try:
                ok = 0 <= float(m[4:]) < float("inf")
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(f"mitigations: unknown entry {m!r}; expected 'none', 'gni:<scale >= 0>', 'rta', 'cwr', "
                             f"'rna', 'optimize_prompt_embedding' or 'mitigate:<one of {', '.join(REPHRASERS)}>'")
    if len(set(out)) != len(out):
        raise ValueError(f"mitigations: each name once, got {out}")
    return out


def eidetic_rows(l_sm: dict, groups: dict, *, deltas=DELTAS) -> list[dict]:
    """One row per (mitigation, group, delta): :func:`mmh_fast.solidmark.eidetic_table` of the
    group's l_SM (``l_sm``: mitigation -> [N]; ``groups``: name -> [N] bool) with the chance level."""
    from ..solidmark import eidetic_table

    rows = []
    for m, v in l_sm.items():
        v = np.asarray(v, np.float64)
        for g, sel in groups.items():
            for r in eidetic_table(v[np.asarray(sel, bool)], deltas):
                rows.append({"mitigation": m, "group": g, "n": int(np.sum(sel)), **r})
    return rows


def _settings(size, seed, mitigations, max_not_memorized, opt_iters) -> dict:
    from ..solidmark.inpaint import DEFAULT_JUMP_LENGTH, DEFAULT_RESAMPLE

    return {"size": size, "seed": int(seed), "deltas": list(DELTAS), "mitigations": list(mitigations),
            "max_not_memorized": int(max_not_memorized), "opt_iters": int(opt_iters),
            "evaluate": {"num_inference_steps": 50, "resample": DEFAULT_RESAMPLE, "jump_length": DEFAULT_JUMP_LENGTH,
                         "guidance_scale": None, "prompts": "training captions"}}


def _select(gt: dict, kinds: np.ndarray, max_not_memorized: int, seed: int) -> np.ndarray:
    """Rows of train.parquet to inpaint: every planted or verified-memorized image, and up to
    ``max_not_memorized`` verified-not-memorized generic ones (a seeded draw, in table order)."""
    mem = gt["image_memorized"]
    first = np.flatnonzero(np.isin(kinds, ["dd", "od"]) | mem)
    rest = np.flatnonzero(~np.isin(kinds, ["dd", "od"]) & ~mem)
    rng = np.random.default_rng(seed)
    if len(rest) > max_not_memorized:
        rest = np.sort(rng.choice(rest, max_not_memorized, replace=False))
    return np.sort(np.concatenate([first, rest]))


def markdown_table(rows: list[dict], groups: list[str], *, deltas=DELTAS) -> list[str]:
    """SolidMark's Table 1 shape: one line per mitigation, the (l_SM, delta)-eidetic counts of each
    group at each delta, the chance counts (n 2 delta) below, and the reduction of the first group's
    (l_SM, 0.01)-eidetic count relative to ``none``."""
    get = {(r["mitigation"], r["group"], r["delta"]): r for r in rows}
    mits = list(dict.fromkeys(r["mitigation"] for r in rows))
    ns = {g: next(r["n"] for r in rows if r["group"] == g) for g in groups}
    head = "| mitigation | " + " | ".join(f"{g} (n={ns[g]}) d={d:g}" for g in groups for d in deltas) + \
        f" | change of {groups[0]} d={deltas[0]:g} |"
    lines = [head, "|" + "---|" * (1 + len(groups) * len(deltas) + 1)]
    base = get.get(("none", groups[0], deltas[0]))
    for m in mits:
        cells = [str(get[(m, g, d)]["eidetic_count"]) for g in groups for d in deltas]
        c = get[(m, groups[0], deltas[0])]["eidetic_count"]
        change = "-" if base is None or m == "none" or base["eidetic_count"] == 0 else \
            f"{100 * (c - base['eidetic_count']) / base['eidetic_count']:+.0f}%"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {change} |")
    chance = [f"{ns[g] * min(2 * d, 1):.1f}" for g in groups for d in deltas]
    lines.append("| chance (n 2 delta) | " + " | ".join(chance) + " | |")
    return lines


def _figure(l_sm: np.ndarray, groups: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    grid = np.linspace(0, 0.5, 201)
    for name, sel in groups.items():
        v = np.sort(l_sm[np.asarray(sel, bool)])
        if v.size:
            ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=f"{name} (n={v.size})")
    ax.plot(grid, np.minimum(2 * grid, 1), "k:", label="chance (2 delta)")
    for d in DELTAS:
        ax.axvline(d, color="0.8", lw=0.8)
    ax.set_xlabel("l_SM (key units)")
    ax.set_ylabel("fraction with l_SM <= x (eidetic rate)")
    ax.set_xlim(0, 0.5)
    ax.set_title("SolidMark on the keyed lab, no mitigation", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_keyed(out_dir, *, size: str = "quick", seed: int = 0, threads: int | None = 1, progress: bool = True,
              mitigations=MITIGATIONS, max_not_memorized: int = 30, opt_iters: int = 10) -> dict:
    """Build (or reuse) the keyed lab in ``out_dir`` and measure SolidMark on it.

    1. Ground truth by generation (:func:`verify_keyed`): which training images
       their own prompts copy (interior, calibrated l2 < 1/3).
    2. :func:`mmh_fast.solidmark.evaluate` (latent inpainting, its defaults: 50
       levels, resample 5, jump 5, no guidance, the training caption as prompt)
       on every planted or verified-memorized image and up to
       ``max_not_memorized`` verified-not-memorized generic ones, once per
       mitigation of ``mitigations`` (applied to the inpainting's captions:
       GNI on their embeddings, RT / CWR / RNA and ``mitigate`` on their text,
       ``optimize_prompt_embedding`` replacing their embeddings). The same
       noise per image in every row (evaluate seeds it by position).
    3. (l_SM, delta)-eidetic counts at 0.01, 0.05 and 0.1 per group (verified
       memorized / not; planted kinds beside) against chance (n 2 delta).

    Writes ``keyed.json`` and ``keyed_lsm.png``; a second call with the same
    arguments returns them without recomputing.

    Args:
        size: "quick" (the measured variant, README) or "full" (the same
            construction on the full recipe: every digit, 5,000 UNet steps; not
            run yet, expect several times the quick variant's time).
        mitigations: names among :data:`MITIGATIONS`, "gni:<scale>" and
            "mitigate:<rephraser>" (:data:`mmh_fast.text.REPHRASERS`).
        max_not_memorized: generic images inpainted beside the planted ones.
        opt_iters: AdamW steps of ``optimize_prompt_embedding``.

    Returns:
        {"results": JSON-able dict, "markdown": [report lines], "figures": [PNG paths]}.
    """
    import json
    import sys
    import time

    import torch

    from ..solidmark import evaluate

    mitigations = check_mitigations(mitigations)
    if isinstance(max_not_memorized, bool) or not isinstance(max_not_memorized, (int, np.integer)) \
            or max_not_memorized < 0:
        raise ValueError(f"max_not_memorized must be an integer >= 0, got {max_not_memorized!r}")
    out_dir = os.fspath(out_dir)
    settings = _settings(size, seed, mitigations, max_not_memorized, opt_iters)
    res_path, fig_path = os.path.join(out_dir, RESULTS_FILE), os.path.join(out_dir, "keyed_lsm.png")
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        lab = build_keyed(out_dir, size=size, seed=seed, threads=threads, progress=progress)
        if os.path.exists(res_path):
            with open(res_path) as f:
                prev = json.load(f)
            if prev.get("results", {}).get("settings") == settings and prev["results"].get("build") == \
                    {k: lab.record.get(k) for k in ("format", "size", "seed", "config", "variant", "solidmark")}:
                figs = [fig_path] if os.path.exists(fig_path) else []
                return {"results": prev["results"], "markdown": prev["markdown"], "figures": figs}

        def say(msg):
            if progress:
                print(f"mmh-fast lab (keyed): {msg}", file=sys.stderr, flush=True)

        pipe = lab.load_pipeline()
        t = time.perf_counter()
        gt = verify_keyed(lab, pipe)
        t_gt = time.perf_counter() - t
        say(f"ground truth {gt['summary']}")
        keys, sm = lab_keys(lab)
        train = lab.train()
        kinds = np.array([r["kind"] for r in train])
        sel = _select(gt, kinds, max_not_memorized, seed)
        inner = _crop(sm, lab.train_images())[sel]
        caps = [train[i]["caption"] for i in sel]
        mem = gt["image_memorized"][sel]
        groups = {"memorized": mem, "not memorized": ~mem, "planted dd": kinds[sel] == "dd",
                  "planted od": kinds[sel] == "od", "generic": kinds[sel] == "generic"}
        cfg = lab.config
        l_sm, pred, secs, new_prompts = {}, {}, {}, {}
        for m in mitigations:
            t = time.perf_counter()
            kw = _mitigation_transforms(pipe, m, caps, seed=seed, guidance_scale=cfg.guidance_scale,
                                        num_inference_steps=cfg.num_inference_steps, opt_iters=opt_iters)
            if "new_prompts" in kw:
                new_prompts[m] = kw.pop("new_prompts")
            r = evaluate(pipe, inner, keys[sel], solidmark=sm, prompts=caps, seed=seed, deltas=DELTAS,
                         progress=progress, **kw)
            secs[m] = time.perf_counter() - t
            l_sm[m], pred[m] = r.l_sm, r.predicted_keys
            say(f"{m}: memorized {r.l_sm[mem].round(3).tolist()[:5]}..., {secs[m]:.0f} s")
        rows = eidetic_rows(l_sm, groups)
        results = {
            "settings": settings,
            "build": {k: lab.record.get(k) for k in ("format", "size", "seed", "config", "variant", "solidmark")},
            "train_seconds": lab.record.get("seconds"),
            "ground_truth": {"summary": gt["summary"], "seconds": t_gt},
            "images": {"key": [train[i]["key"] for i in sel], "kind": kinds[sel].tolist(),
                       "memorized": mem.tolist(), "solidmark_key": keys[sel].tolist()},
            "l_sm": {m: v.tolist() for m, v in l_sm.items()},
            "predicted_keys": {m: v.tolist() for m, v in pred.items()},
            "seconds": secs, "new_prompts": new_prompts, "table": rows,
        }
        summ = gt["summary"]
        md = ["## SolidMark on the keyed lab", "",
              f"The quick lab retrained on 24 x 24 canvases (16 x 16 digits, 4-pixel SolidMark border, keys seeded {seed}). "
              "Ground truth by generation on the interior: "
              + ", ".join(f"{k} {v['images_memorized']}/{v['images']} images copied" for k, v in summ.items()) + ".",
              "", "(l_SM, delta)-eidetic counts (latent inpainting, solidmark.evaluate defaults); "
              "chance is a constant guess, n 2 delta:", ""]
        md += markdown_table(rows, ["memorized", "not memorized"])
        md += ["", "Planted kinds beside:", ""]
        md += markdown_table(rows, ["planted dd", "planted od", "generic"])
        # the planted images generation does not copy apart from the generic ones: SolidMark may still find them
        planted = np.isin(kinds[sel], ["dd", "od"])
        figs = [_figure(l_sm["none"], {"memorized": mem, "planted, not copied": planted & ~mem,
                                       "generic, not copied": ~planted & ~mem}, fig_path)] if "none" in l_sm else []
        tmp = res_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"results": results, "markdown": md}, f, indent=1, default=float)
        os.replace(tmp, res_path)
        return {"results": json.loads(json.dumps(results, default=float)), "markdown": md, "figures": figs}
    finally:
        torch.set_num_threads(old)
