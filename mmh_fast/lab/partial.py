"""The partial-copy lab: memorized image *regions* pasted into otherwise
varied images, the ground truth for the memorization maps (Kim and Lee,
ICML 2026: "which part of this image is copied").

Design (every number is a field of :class:`PartialConfig`, stored in build.json):

- The data are the quick lab's (``LabConfig.for_size("quick")``: DD-Mem,
  OD-Mem, generic and held-out prompts, unchanged), plus ``n_plants`` partial
  plants.
- Plant k: the central ``patch`` x ``patch`` pixel region of a source digit
  (one not otherwise in the data; of 40 random candidates, the one whose
  window has the largest pixel standard deviation: strokes and gaps, not a
  solid block), pasted at a fixed, latent-aligned location: the quadrant
  k mod 4 of the 16 x 16 image. With the lab's 4x down-sampling VAE an 8-pixel
  patch is exactly 2 x 2 latent positions, so the known mask is a union of
  whole latent cells. Why the centre: a first build took each patch from the
  same corner of its source digit; corners of digits are mostly background,
  the patches were faint blobs close to many natural corners, and no
  generation's region passed the calibrated-l2 copy test (region RMS to the
  patch 0.27 against 0.81 for held-out prompts: partly reproduced, never
  copied). A stroke-filled patch in a corner where digits are dark is what a
  pasted logo or watermark is in real data.
- The patch is pasted (pixels replaced exactly) at that location into
  ``hosts`` generic digits that appear nowhere else in the data; each host's
  caption is its own generic caption ``"a <style> <digit>"`` plus the plant's
  rare word (its trigger). The rest of each host image varies with the host.
- Hosts are drawn ``host_boost`` times as often as a generic image, so each
  patch is seen about ``hosts x host_boost`` / 20 times as often as one DD-Mem
  image (72 / 20 with the defaults): the patch is repeated like a duplicated
  image while everything around it changes.
- Prompts (kind ``"partial"``): per plant ``prompts_per_plant`` captions
  ``"a <style> <digit> <rare>"``, half of them host captions seen in training
  (split "train") and half with a (style, digit) pair that no host of that
  plant has (split "heldout": the patch must come with a digit it was never
  pasted on). Each carries its plant's mask.

Whether the model memorises the regions is measured, never assumed:
:func:`region_copy_scores` compares the patch region of each generation with
the patch (calibrated l2 against every distinct training image's region at
that location, and plain RMS) and the same numbers for generic prompts are the
baseline. :func:`measure_partial` adds the maps' localisation
(:func:`mmh_fast.text.map_localization` of :func:`curvature_difference_map` and
:func:`score_difference_map`) against the pasted-region mask.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .build import Lab, _expected, _load_existing, _train_and_record
from .data import DIGIT_WORDS, STYLE_WORDS, LabData, make_data, single_token_rare_words, upscale
from .training import LabConfig
from .truth import COPY_THRESHOLD, generate_images

VARIANT = "partial"
SIZE = "quick"
PAPER_STEP = (-1,)  # Kim and Lee take the maps at the last step of the trajectory
# earlier steps of the lab's 20-step grid, measured beside it (the last step localises worst here)
SWEEP_STEPS = (4, 8, 12, 16)


@dataclass(frozen=True)
class PartialConfig:
    """The partial plants (see the module docstring)."""

    n_plants: int = 6
    hosts: int = 24
    host_boost: float = 3.0
    patch: int = 8
    prompts_per_plant: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def _quadrant(k: int, image_size: int, patch: int) -> tuple[int, int]:
    q = k % 4
    return (0 if q < 2 else image_size - patch), (0 if q % 2 == 0 else image_size - patch)


def make_partial_data(*, seed: int = 0, config: LabConfig | None = None,
                      partial: PartialConfig | None = None) -> tuple[LabData, dict]:
    """The quick lab's data (:func:`make_data` with ``config``'s fields) plus the
    partial plants, deterministic in ``seed``.

    Returns ``(data, extra)``: ``data`` a :class:`LabData` (hosts appended with
    kind "partial", the partial prompts appended to ``data.prompts``) and
    ``extra`` with ``patches`` [n_plants, 3, patch, patch] (pixels in [-1, 1]),
    ``boxes`` [n_plants, 4] (row, col, height, width), ``masks``
    [n_plants, H, W] bool, ``train_plant`` / ``prompt_plant`` (plant index per
    training image / prompt, -1 for none)."""
    cfg = config if config is not None else LabConfig.for_size(SIZE)
    pc = partial if partial is not None else PartialConfig()
    S = cfg.image_size
    if pc.patch <= 0 or pc.patch > S // 2:
        raise ValueError(f"partial.patch must be in [1, {S // 2}] (a quadrant at most), got {pc.patch}")
    from sklearn.datasets import load_digits

    data = make_data(n_dd=cfg.n_dd, dd_copies=cfg.dd_copies, n_od=cfg.n_od, od_boost=cfg.od_boost,
                     n_generic=cfg.n_generic, image_size=S, seed=seed)
    d = load_digits()
    x8, y = d.images, d.target.astype(np.int64)
    used = {int(k[len("digit"):]) for k in data.keys}
    rng = np.random.default_rng([seed, 16])  # a stream of its own: make_data's draws are unchanged
    free = rng.permutation(np.array(sorted(set(range(len(y))) - used)))
    n_host = pc.n_plants * pc.hosts
    if len(free) < n_host + 40 * pc.n_plants:
        raise ValueError("not enough unused digits for the partial plants")
    ink = x8.reshape(len(y), -1).sum(1)
    cuts = np.quantile(ink, [1 / 3, 2 / 3])
    style = np.digitize(ink, cuts)
    rares = single_token_rare_words(pc.n_plants, rng, list(data.words))
    hosts_all, pool = free[:n_host], list(free[n_host:])
    boxes = np.zeros((pc.n_plants, 4), np.int64)
    masks = np.zeros((pc.n_plants, S, S), bool)
    patches = []
    images, keys, caps, kinds, digits, counts, weights, train_plant = [], [], [], [], [], [], [], []
    prompts, prompt_plant = [], []
    for k in range(pc.n_plants):
        r0, c0 = _quadrant(k, S, pc.patch)
        boxes[k] = (r0, c0, pc.patch, pc.patch)
        masks[k, r0:r0 + pc.patch, c0:c0 + pc.patch] = True
        cand = [pool.pop() for _ in range(40)]
        big = upscale(x8[cand], S)
        s0 = (S - pc.patch) // 2  # the centre window: strokes, where a digit's corners are mostly background
        src = int(np.argmax(big[:, 0, s0:s0 + pc.patch, s0:s0 + pc.patch].std((1, 2))))
        patch = big[src, :, s0:s0 + pc.patch, s0:s0 + pc.patch].copy()
        patches.append(patch)
        hosts = hosts_all[k * pc.hosts:(k + 1) * pc.hosts]
        imgs = upscale(x8[hosts], S)
        imgs[:, :, r0:r0 + pc.patch, c0:c0 + pc.patch] = patch
        host_caps = []
        for i, im in zip(hosts, imgs):
            cap = f"a {STYLE_WORDS[style[i]]} {DIGIT_WORDS[y[i]]} {rares[k]}"
            images.append(im)
            keys.append(f"partial{k}_digit{i:04d}")
            caps.append(cap)
            host_caps.append(cap)
            kinds.append("partial")
            digits.append(int(y[i]))
            counts.append(1)
            weights.append(float(pc.host_boost))
            train_plant.append(k)
        host_keys = keys[-pc.hosts:]
        seen = sorted(set(host_caps), key=host_caps.index)
        n_train = min(len(seen), pc.prompts_per_plant - pc.prompts_per_plant // 2)
        unseen = [f"a {s} {w} {rares[k]}" for w in DIGIT_WORDS for s in STYLE_WORDS
                  if f"a {s} {w} {rares[k]}" not in set(host_caps)]
        pick = rng.choice(len(unseen), pc.prompts_per_plant - n_train, replace=False)
        for split, text in [("train", c) for c in seen[:n_train]] + [("heldout", unseen[j]) for j in sorted(pick)]:
            dg = DIGIT_WORDS.index(text.split()[2])
            prompts.append(dict(prompt=text, kind="partial", train_keys=host_keys, trigger=rares[k], split=split,
                                digit=dg))
            prompt_plant.append(k)
    n0 = len(data.keys)
    data = LabData(images=np.concatenate([data.images, np.stack(images)]), keys=data.keys + keys,
                   captions=data.captions + caps, kinds=data.kinds + kinds,
                   digits=np.concatenate([data.digits, np.asarray(digits, np.int64)]),
                   dataset_count=np.concatenate([data.dataset_count, np.asarray(counts, np.int64)]),
                   stream_weight=np.concatenate([data.stream_weight, np.asarray(weights, np.float64)]),
                   prompts=data.prompts + prompts, words=list(data.words) + rares)
    extra = {"patches": np.stack(patches), "boxes": boxes, "masks": masks,
             "train_plant": np.asarray([-1] * n0 + train_plant, np.int64),
             "prompt_plant": np.asarray([-1] * (len(data.prompts) - len(prompts)) + prompt_plant, np.int64)}
    return data, extra


def _mask_columns(plant: np.ndarray, boxes: np.ndarray) -> dict:
    """Table columns: ``plant`` (-1: none) and ``mask_box`` [row, col, height, width] of the
    pasted region in pixels (null without a plant): the mask is that rectangle."""
    return {"plant": [int(p) for p in plant],
            "mask_box": [None if p < 0 else [int(v) for v in boxes[p]] for p in plant]}


def box_mask(box, image_size: int) -> np.ndarray:
    """[H, W] bool mask of a ``mask_box`` [row, col, height, width]."""
    r, c, h, w = (int(v) for v in box)
    m = np.zeros((image_size, image_size), bool)
    m[r:r + h, c:c + w] = True
    return m


def build_partial(out_dir, *, seed: int = 0, threads: int | None = 1, progress: bool = True,
                  partial: PartialConfig | None = None, force: bool = False) -> Lab:
    """Build and train the partial-copy lab into ``out_dir`` (or reuse it), with
    the machinery of :func:`mmh_fast.lab.build` and the quick recipe.

    Writes what :func:`~mmh_fast.lab.build` writes (``pipeline/``,
    ``prompts.parquet``, ``train.parquet``, ``build.json``); both tables carry
    two more columns, ``plant`` (partial plant index, -1 for none) and
    ``mask_box`` ([row, col, height, width] of the pasted region in pixels, null
    for none). build.json records ``variant="partial"`` and the
    :class:`PartialConfig`; a second call with the same arguments reuses the
    directory."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    pc = partial if partial is not None else PartialConfig()
    cfg = LabConfig.for_size(SIZE)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    want = {**_expected(SIZE, seed, cfg), "variant": VARIANT, "partial": pc.to_dict()}
    if not force:
        rec = _load_existing(out_dir, want)
        if rec is not None:
            return Lab(out_dir=out_dir, config=cfg, seed=int(seed), size=SIZE, record=rec)
    data, extra = make_partial_data(seed=int(seed), config=cfg, partial=pc)
    rec = _train_and_record(out_dir, cfg, int(seed), threads, progress, want, data=data,
                            train_columns=_mask_columns(extra["train_plant"], extra["boxes"]),
                            prompt_columns=_mask_columns(extra["prompt_plant"], extra["boxes"]))
    return Lab(out_dir=out_dir, config=cfg, seed=int(seed), size=SIZE, record=rec)


def region_copy_scores(generated: np.ndarray, train_images: np.ndarray, box, patch: np.ndarray) -> dict:
    """How closely the ``box`` region of each generation reproduces ``patch``.

    - ``cal_l2`` [M]: Carlini et al.'s calibrated l2 (:func:`mmh_fast.retrieval.calibrated_l2`,
      n = 50, alpha = 0.5) of the generation's region against the *distinct* regions
      of the training images at that location (the patch once, however many hosts
      carry it: with 24 identical neighbours the calibration would hide every copy);
    - ``nearest_is_patch`` [M]: the nearest distinct region is the patch itself;
    - ``copied`` [M]: both (cal_l2 < 1/3, the lab's whole-image copy threshold, and the
      region copied is the patch);
    - ``rms`` [M]: plain root-mean-square pixel difference to the patch (pixels in [-1, 1]).

    Args:
        generated: [M, 3, H, W] in [-1, 1]; train_images: [N, 3, H, W] (the lab's distinct images);
        box: (row, col, height, width) in pixels; patch: [3, height, width].
    """
    from ..retrieval import calibrated_l2

    r, c, h, w = (int(v) for v in box)
    gen = np.asarray(generated, np.float32)[:, :, r:r + h, c:c + w].reshape(len(generated), -1)
    regions = np.unique(np.asarray(train_images, np.float32)[:, :, r:r + h, c:c + w].reshape(len(train_images), -1),
                        axis=0)
    p = np.asarray(patch, np.float32).reshape(-1)
    hit = np.flatnonzero((regions == p).all(1))
    if len(hit) != 1:
        raise ValueError("patch is not one of the training images' regions at box")
    d, idx = calibrated_l2(gen, regions, n=min(50, len(regions)), return_indices=True)
    d, idx = np.asarray(d, np.float64), np.asarray(idx)
    near = idx == hit[0]
    return {"cal_l2": d, "nearest_is_patch": near, "copied": near & (d < COPY_THRESHOLD),
            "rms": np.sqrt(((gen - p) ** 2).mean(1)).astype(np.float64)}


def _partial_tables(lab: Lab):
    prompts = lab.prompts()
    part = [i for i, p in enumerate(prompts) if p["kind"] == "partial"]
    held = [i for i, p in enumerate(prompts) if p["kind"] == "heldout"]
    return prompts, part, held


def _plants(lab: Lab, train_rows: list, train_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boxes [K, 4] and patches [K, 3, h, w] read back from train.parquet (the first host of each plant)."""
    first = {}
    for i, r in enumerate(train_rows):
        if r["plant"] >= 0 and r["plant"] not in first:
            first[r["plant"]] = i
    K = len(first)
    boxes = np.array([train_rows[first[k]]["mask_box"] for k in range(K)], np.int64)
    patches = np.stack([train_images[first[k], :, b[0]:b[0] + b[2], b[1]:b[1] + b[3]] for k, b in enumerate(boxes)])
    return boxes, patches


def measure_partial(lab: Lab, pipe=None, *, n: int | None = None, n_probes: int = 16, max_baseline: int = 24,
                    steps=PAPER_STEP + SWEEP_STEPS, progress: bool = False) -> dict:
    """Ground truth by generation and the maps' localisation on a partial-copy lab.

    For every partial prompt (with its plant's mask) and ``max_baseline``
    evenly spaced held-out prompts (the baseline: no rare token, never trained
    on), ``n`` CFG DDIM generations with :func:`mmh_fast.text.generate` (the
    lab's guidance scale and steps; image j keyed by (lab seed, j), the same
    trajectories the maps are taken on), then

    - region copies (:func:`region_copy_scores`): partial prompts against their own
      patch, baseline prompts against every plant's patch;
    - for each DDIM step index in ``steps`` (-1, the last, is the paper's setting):
      :func:`mmh_fast.text.curvature_difference_map` (``n_probes`` probes) and
      :func:`mmh_fast.text.score_difference_map`, upsampled to image resolution,
      and :func:`mmh_fast.text.map_localization` (ROC AUC; IoU of the top-|mask|
      pixels) against the pasted-region mask; for the baseline, each held-out
      prompt's maps against every plant's mask. Chance: AUC 0.5, IoU of a random
      top-|mask| set |mask| / (2 HW - |mask|) (0.143 for a quadrant).

    Returns a JSON-able dict: ``summary`` (copy rates, timings), ``localization``
    (one row per map and step: mean AUC / IoU over all partial generations, over
    those whose region was copied and those whose was not, by caption split, and
    the baseline's), ``per_plant`` and ``prompts`` rows; plus non-JSON ``arrays``
    (images, maps per step, masks) for figures.
    """
    from ..text import curvature_difference_map, generate, map_localization, score_difference_map

    cfg = lab.config
    for name, v in (("n", n), ("n_probes", n_probes), ("max_baseline", max_baseline)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    n = cfg.n_generations if n is None else int(n)
    if isinstance(steps, (str, bytes)) or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                                  for s in steps) or not len(steps):
        raise ValueError(f"steps must be a non-empty sequence of DDIM step indices (ints), got {steps!r}")
    steps = [int(s) for s in steps]
    prompts, part, held = _partial_tables(lab)
    if not part:
        raise ValueError("lab has no partial prompts (build it with build_partial)")
    pipe = pipe or lab.load_pipeline()
    train_rows = lab.train()
    train_images = lab.train_images()
    boxes, patches = _plants(lab, train_rows, train_images)
    base = [held[j] for j in np.linspace(0, len(held) - 1, min(max_baseline, len(held))).astype(int)]
    texts = [prompts[i]["prompt"] for i in part + base]
    P, K, S = len(part), len(boxes), cfg.image_size
    kw = dict(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, seed=lab.seed)
    t = time.time()
    images = generate(pipe, texts, num_images=n, **kw).numpy().reshape(len(texts), n, 3, S, S)
    t_gen = time.time() - t
    plant = np.array([prompts[i]["plant"] for i in part])
    own = [region_copy_scores(images[j], train_images, boxes[plant[j]], patches[plant[j]]) for j in range(P)]
    other = [[region_copy_scores(images[P + j], train_images, boxes[k], patches[k]) for k in range(K)]
             for j in range(len(base))]
    masks = torch.from_numpy(np.stack([box_mask(b, S) for b in boxes]))
    copied = np.stack([o["copied"] for o in own])  # [P, n]
    split = np.array([prompts[i]["split"] for i in part])
    maps, seconds, loc, per_plant = {}, {}, [], []
    for name, fn, extra in (("curvature_difference", curvature_difference_map, dict(n_probes=n_probes)),
                            ("score_difference", score_difference_map, {})):
        maps[name], seconds[name] = {}, 0.0
        for step in steps:
            t = time.time()
            m = fn(pipe, texts, num_images=n, step=step, **kw, **extra)
            seconds[name] += (time.time() - t) / (len(texts) * n * len(steps))
            maps[name][step] = m.numpy()
            own_loc = map_localization(m[:P], masks[torch.from_numpy(plant)][:, None])
            base_loc = map_localization(m[P:, :, None].expand(-1, -1, K, -1, -1).contiguous(), masks[None, None])
            auc, iou = own_loc["auc"].numpy(), own_loc["iou"].numpy()
            b_auc, b_iou = base_loc["auc"].numpy(), base_loc["iou"].numpy()
            row = {"map": name, "step": step, "maps": int(auc.size), "auc": float(auc.mean()),
                   "iou": float(iou.mean()), "auc_below_0.5": float((auc < 0.5).mean()),
                   "baseline_maps": int(b_auc.size), "baseline_auc": float(b_auc.mean()),
                   "baseline_iou": float(b_iou.mean())}
            for label, sel in (("copied", copied), ("not_copied", ~copied),
                               ("train_captions", np.repeat((split == "train")[:, None], n, 1)),
                               ("heldout_captions", np.repeat((split == "heldout")[:, None], n, 1))):
                row[f"auc_{label}"] = float(auc[sel].mean()) if sel.any() else float("nan")
            loc.append(row)
            for k in range(K):
                sel = plant == k
                per_plant.append({"map": name, "step": step, "plant": k, "box": boxes[k].tolist(),
                                  "copy_rate": float(copied[sel].mean()), "auc": float(auc[sel].mean()),
                                  "iou": float(iou[sel].mean()), "baseline_auc": float(b_auc[:, :, k].mean())})
    frac = float(masks[0].float().mean())
    base_copy = np.stack([[o["copied"] for o in row] for row in other])  # [B, K, n]
    summary = {
        "partial_prompts": P, "baseline_prompts": len(base), "generations_per_prompt": n, "plants": K,
        "mask_fraction": frac, "chance_iou": frac / (2 - frac),
        "region_copy_rate": float(copied.mean()),
        "prompts_with_region_copy": int(copied.any(1).sum()),
        "region_copy_rate_train_captions": float(copied[split == "train"].mean()),
        "region_copy_rate_heldout_captions": float(copied[split == "heldout"].mean()),
        "baseline_region_copy_rate": float(base_copy.mean()),
        "median_region_cal_l2": float(np.median([o["cal_l2"] for o in own])),
        "baseline_median_region_cal_l2": float(np.median([[o["cal_l2"] for o in row] for row in other])),
        "median_region_rms": float(np.median([o["rms"] for o in own])),
        "baseline_median_region_rms": float(np.median([[o["rms"] for o in row] for row in other])),
        "seconds_generate_per_image": t_gen / (len(texts) * n),
        "seconds_per_map": seconds, "n_probes": n_probes, "steps": steps,
        "guidance_scale": cfg.guidance_scale, "num_inference_steps": cfg.num_inference_steps,
    }
    rows = [{"prompt": texts[j], "plant": int(plant[j]), "split": str(split[j]),
             "min_region_cal_l2": float(own[j]["cal_l2"].min()), "region_copy_rate": float(copied[j].mean()),
             "min_region_rms": float(own[j]["rms"].min())} for j in range(P)]
    if progress:
        import sys

        print(f"mmh-fast lab: partial: {summary['prompts_with_region_copy']}/{P} partial prompts copy their patch "
              f"(rate {summary['region_copy_rate']:.2f}; baseline {summary['baseline_region_copy_rate']:.3f})",
              file=sys.stderr, flush=True)
    return {"summary": summary, "localization": loc, "per_plant": per_plant, "prompts": rows,
            "arrays": {"images": images, "maps": maps, "plant": plant, "masks": masks.numpy(), "copied": copied,
                       "texts": texts}}


MAP_NAMES = {"curvature_difference": "curvature difference", "score_difference": "score difference"}


def maps_figure(images: np.ndarray, maps: dict, labels: list, path: str, *, masks: np.ndarray | None = None) -> None:
    """One row per image: the image, then :func:`mmh_fast.text.map_overlay` of each map
    (red = high), with the known pasted region outlined when ``masks`` [R, H, W] is given.

    images: [R, 3, H, W] in [-1, 1]; maps: name -> [R, H, W] at image resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..text import map_overlay

    R = len(images)
    fig, axes = plt.subplots(R, 1 + len(maps), figsize=(1.6 * (1 + len(maps)) + 1.5, 1.6 * R), squeeze=False)
    panels = [("generation", images)] + [(MAP_NAMES.get(k, k), map_overlay(torch.from_numpy(images).float(),
                                                                           torch.from_numpy(v).double()).numpy())
                                         for k, v in maps.items()]
    for r in range(R):
        for c, (title, arr) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.clip((arr[r].transpose(1, 2, 0) + 1) / 2, 0, 1), interpolation="nearest")
            if masks is not None and masks[r].any():
                ys, xs = np.nonzero(masks[r])
                ax.add_patch(matplotlib.patches.Rectangle((xs.min() - 0.5, ys.min() - 0.5), xs.max() - xs.min() + 1,
                                                          ys.max() - ys.min() + 1, fill=False, ec="cyan", lw=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
        axes[r, 0].set_ylabel(labels[r], fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def whole_image_maps(pipe, prompts: list, *, guidance_scale: float, num_inference_steps: int, seed: int,
                     n_probes: int = 16) -> dict:
    """Both maps and the generation (one trajectory per prompt, image 0 keyed by ``seed``)
    for whole-image prompts (e.g. verified-memorized DD/OD and held-out ones), for overlays.
    Returns ``images`` [R, 3, H, W], ``maps`` name -> [R, H, W] and the mean map value per prompt."""
    from ..text import curvature_difference_map, generate, score_difference_map

    kw = dict(num_images=1, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed)
    images = generate(pipe, prompts, **kw).numpy()
    maps = {"curvature_difference": curvature_difference_map(pipe, prompts, n_probes=n_probes, **kw)[:, 0].numpy(),
            "score_difference": score_difference_map(pipe, prompts, **kw)[:, 0].numpy()}
    return {"images": images, "maps": maps,
            "mean": {k: v.reshape(len(v), -1).mean(1).tolist() for k, v in maps.items()}}


def _fmt_table(rows: list, cols: list) -> list:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + \
        ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]


def run_partial(out_dir, *, seed: int = 0, threads: int | None = 1, progress: bool = True, n_probes: int = 16,
                figures_dir: str | None = None, report_dir: str | None = None, max_figure: int = 6) -> dict:
    """Build (or reuse) the partial-copy lab in ``out_dir`` and measure it
    (:func:`measure_partial`); the figure of overlays goes to ``figures_dir``
    (default ``out_dir/figures``), linked in the Markdown relative to ``report_dir``
    (default ``out_dir``). Returns ``{"results": JSON-able dict,
    "markdown": report lines, "figures": [paths]}`` (the lab report's section)."""
    out_dir = os.fspath(out_dir)
    lab = build_partial(out_dir, seed=seed, threads=threads, progress=progress)
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        m = measure_partial(lab, n_probes=n_probes, progress=progress)
    finally:
        torch.set_num_threads(old)
    a = m.pop("arrays")
    fig_dir = figures_dir or os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    # one generation per plant, its first copied one when there is one
    rows = []
    for k in range(len(np.unique(a["plant"]))):
        cand = [(j, i) for j in np.flatnonzero(a["plant"] == k) for i in range(a["copied"].shape[1])]
        cop = [(j, i) for j, i in cand if a["copied"][j, i]]
        rows.append((cop or cand)[0])
    rows = rows[:max_figure]
    path = os.path.join(fig_dir, "maps_partial.png")
    shown = [st for st in (PAPER_STEP[0], SWEEP_STEPS[0]) if st in m["summary"]["steps"]]
    maps_figure(np.stack([a["images"][j, i] for j, i in rows]),
                {f"{MAP_NAMES[k]}, step {st}": np.stack([v[st][j, i] for j, i in rows])
                 for st in shown for k, v in a["maps"].items()},
                [a["texts"][j] + (" (copied)" if a["copied"][j, i] else "") for j, i in rows], path,
                masks=np.stack([a["masks"][a["plant"][j]] for j, _ in rows]))
    s = m["summary"]
    res = {"build": {"seconds": lab.record.get("seconds"), "partial": lab.record.get("partial"),
                     "threads": lab.record.get("threads")}, **m}
    md = ["### Partial copies: where the maps point", "",
          f"A variant of the quick lab (mmh_fast.lab.partial.build_partial; training "
          f"{(lab.record.get('seconds') or {}).get('total', float('nan')):.0f} s on "
          f"{lab.record.get('threads')} thread(s)): {s['plants']} patches of "
          f"{lab.record['partial']['patch']}x{lab.record['partial']['patch']} pixels, each pasted at a fixed "
          f"quadrant into {lab.record['partial']['hosts']} varied digits whose captions carry the plant's rare word.",
          "",
          f"Region copies ({s['generations_per_prompt']} generations per prompt; the patch region's calibrated l2 "
          "against every distinct training region there < 1/3, nearest = the patch): "
          f"{s['prompts_with_region_copy']} / {s['partial_prompts']} partial prompts copy their patch, "
          f"rate {s['region_copy_rate']:.2f} (train captions {s['region_copy_rate_train_captions']:.2f}, "
          f"held-out captions {s['region_copy_rate_heldout_captions']:.2f}); baseline "
          f"(held-out prompts vs every patch) {s['baseline_region_copy_rate']:.3f}. Median region calibrated l2 "
          f"{s['median_region_cal_l2']:.2f} vs {s['baseline_median_region_cal_l2']:.2f}; median region RMS "
          f"{s['median_region_rms']:.2f} vs {s['baseline_median_region_rms']:.2f}.", "",
          "Localisation: mean map_localization of each (prompt, generation) map against its plant's "
          f"pasted-region mask, at DDIM step index `step` of {s['num_inference_steps']} (-1, the last, is the "
          f"paper's setting; {s['n_probes']} probes for the curvature map). Baseline: held-out prompts' maps "
          f"against every plant's mask. Chance: AUC 0.5, IoU {s['chance_iou']:.3f}.", ""]
    md += _fmt_table(m["localization"], ["map", "step", "maps", "auc", "iou", "auc_copied", "auc_not_copied",
                                         "auc_train_captions", "auc_heldout_captions", "auc_below_0.5",
                                         "baseline_auc", "baseline_iou"])
    weak = [r for r in m["localization"] if r["auc"] < r["baseline_auc"] + 0.1]
    md += ["", "Where a map loses (mean AUC within 0.1 of its baseline): "
           + ("; ".join(f"{r['map']} at step {r['step']} (AUC {r['auc']:.2f} vs {r['baseline_auc']:.2f})"
                        for r in weak) or "nowhere") + ".", "",
           f"Per plant at the paper's step ({PAPER_STEP[0]}):", ""]
    md += _fmt_table([r for r in m["per_plant"] if r["step"] == PAPER_STEP[0]],
                     ["map", "plant", "box", "copy_rate", "auc", "iou", "baseline_auc"])
    md += ["", "Overlays (cyan: the pasted region), each map scaled by its own maximum:", "",
           f"![maps_partial]({os.path.relpath(path, report_dir or out_dir)})", ""]
    return {"results": res, "markdown": md, "figures": [path]}
