"""``mmh-fast demo``: the manifold-memorization analysis end to end on embedded data.

The data are scikit-learn's 8 x 8 digits (1,797 real images that ship with the
package), with a few images planted many times over: duplicated training data
is the textbook cause of data-driven memorization (DD-Mem). The demo

1. trains a small diffusion model (:class:`~mmh_fast.models.training.MLPDenoiser`,
   DDPM schedule, eps-prediction) on the digits with their duplicates, on the CPU;
2. measures, for every distinct training image, LID_theta by FLIPD
   (:func:`mmh_fast.flipd`, exact trace: d = 64), LID_* by local PCA with the
   paper's rule (:func:`mmh_fast.lpca`, ``rule="paper"``, on the training set as
   the model saw it, copies included) and the PNG complexity;
3. generates images by DDIM and finds, for each, its nearest training image and
   Carlini et al.'s calibrated l2 (:func:`mmh_fast.retrieval.calibrated_l2`);
4. labels the images with :func:`mmh_fast.classify_memorization` (OD-Mem / DD-Mem);
5. writes ``results.parquet`` (one row per distinct training image, the layout of
   ``mmh-fast scan`` results), ``generations.parquet``, ``labels.csv``,
   ``summary.json``, the images under ``images/`` and a report under ``report/``,
   and prints how well each signal separates the planted duplicates from the rest
   (ROC AUC, TPR at 1% FPR) and which images are flagged.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = ["DemoConfig", "DemoResult", "digits_with_duplicates", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo (``quick`` picks the smaller ones).

    Attributes:
        n_duplicated: distinct images planted many times.
        copies: copies of each planted image in the training set (the original included).
        train_steps, batch_size, lr, hidden, depth: the denoiser and its AdamW training.
        t0: FLIPD's time (continuous, in (0, 1]; DDPM's 1000 steps).
        k: local-PCA neighbourhood size.
        n_generated, sampling_steps: DDIM generations and their steps.
        copy_threshold: a generation whose calibrated l2 is below this copies its
            nearest training image (Carlini et al. flag reconstructions well below 1/2).
        seed: seeds the duplicate choice, training, probes and sampling.
    """

    n_duplicated: int = 10
    copies: int = 50
    train_steps: int = 8000
    batch_size: int = 256
    lr: float = 2e-3
    hidden: int = 256
    depth: int = 3
    t0: float = 0.05
    k: int = 100
    n_generated: int = 500
    sampling_steps: int = 50
    copy_threshold: float = 1 / 3
    seed: int = 0

    @classmethod
    def quick_settings(cls, **kw) -> "DemoConfig":
        return cls(**{**dict(train_steps=1000, batch_size=128, hidden=128, n_generated=128, sampling_steps=25), **kw})


@dataclass
class DemoResult:
    """What :func:`run_demo` measured (also written to ``summary.json``)."""

    out: str
    auc: dict = field(default_factory=dict)
    tpr_at_1pct_fpr: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)
    flagged: dict = field(default_factory=dict)
    duplicated_keys: list = field(default_factory=list)
    lid_data_duplicated: list = field(default_factory=list)
    generations: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    report: str | None = None


def digits_with_duplicates(*, n_duplicated: int = 10, copies: int = 50, seed: int = 0):
    """scikit-learn's digits in [-1, 1] with planted duplicates.

    Returns:
        images [1797, 1, 8, 8] float32 (each distinct image once), targets [1797]
        int64, duplicated [n_duplicated] int64 indices of the planted images, and
        rows [1797 + n_duplicated * (copies - 1)] int64: the training set as
        indices into ``images`` (every image once, then the extra copies).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        from .errors import UserError

        raise UserError("the demo reads scikit-learn's embedded digits: pip install 'mmh_fast[demo]' "
                        "(or scikit-learn)") from None

    if n_duplicated < 1 or copies < 2:
        raise ValueError(f"need n_duplicated >= 1 and copies >= 2, got {n_duplicated}, {copies}")
    d = load_digits()
    images = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    n = images.shape[0]
    if n_duplicated > n:
        raise ValueError(f"n_duplicated must be <= {n}, got {n_duplicated}")
    rng = np.random.default_rng(seed)
    dup = np.sort(rng.choice(n, n_duplicated, replace=False)).astype(np.int64)
    rows = np.concatenate([np.arange(n), np.repeat(dup, copies - 1)]).astype(np.int64)
    return images, d.target.astype(np.int64), dup, rows


class _Log:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()
        self.seconds: dict[str, float] = {}
        self._last = self.t0

    def step(self, name: str, msg: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now
        if not self.quiet:
            print(f"[{now - self.t0:6.1f} s] {msg}", flush=True)

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(f"           {msg}", flush=True)


def _auc_rows(signals: dict, positive: np.ndarray):
    from .report import roc_auc, roc_curve, tpr_at_fpr

    auc, tpr = {}, {}
    for name, v in signals.items():
        fpr, tp, _ = roc_curve(-np.asarray(v, dtype=np.float64), positive)  # low value = memorized
        auc[name], tpr[name] = roc_auc(fpr, tp), tpr_at_fpr(fpr, tp, 0.01)
    return auc, tpr


def _write_images(images: np.ndarray, keys: list[str], folder: str) -> list[str]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    u8 = np.clip(np.rint((images[:, 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    paths = []
    for img, key in zip(u8, keys):
        p = os.path.join(folder, f"{key}.png")
        Image.fromarray(img, mode="L").save(p)
        paths.append(p)
    return paths


def _write_parquet(columns: dict, path: str, meta: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .writer import META_KEY

    table = pa.table(columns)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def run_demo(out: str = "mmh_demo", quick: bool = False, *, config: DemoConfig | None = None,
             quiet: bool = False, report: bool = True) -> DemoResult:
    """Run the demo; see the module docstring. Returns a :class:`DemoResult`."""
    cfg = config or (DemoConfig.quick_settings() if quick else DemoConfig())
    threads = torch.get_num_threads()
    # The demo's matrices are small (a 256-wide MLP): one intra-op thread is as fast as two
    # on an idle machine and avoids the OpenMP spin-waiting that made training 10x slower
    # on a busy one.
    torch.set_num_threads(1)
    try:
        return _run(cfg, out, quick, quiet, report)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, out: str, quick: bool, quiet: bool, report: bool) -> DemoResult:
    from diffusers import DDPMScheduler

    from .. import backend_info, classify_memorization, flipd, lpca, png_complexity
    from ..models.sampling import ddim_sample
    from ..models.training import MLPDenoiser, train_denoiser
    from ..retrieval import calibrated_l2

    os.makedirs(out, exist_ok=True)
    log = _Log(quiet)
    info = backend_info()
    log.info(f"mmh_fast {info['version']} (native={info['native']}, cuda={info['cuda']}); "
             f"{'quick' if quick else 'full'} demo, output in {os.path.abspath(out)}")

    # ---- data
    images, targets, dup, rows = digits_with_duplicates(n_duplicated=cfg.n_duplicated, copies=cfg.copies,
                                                        seed=cfg.seed)
    n, d = images.shape[0], int(np.prod(images.shape[1:]))
    keys = [f"digit_{i:04d}" for i in range(n)]
    n_copies = np.bincount(rows, minlength=n)
    duplicated = n_copies > 1
    paths = _write_images(images, keys, os.path.join(out, "images"))
    train = torch.from_numpy(images[rows])
    log.step("data", f"data: {n} digits (8 x 8), {cfg.n_duplicated} of them x {cfg.copies} copies -> "
             f"{len(rows)} training images")

    # ---- the model
    torch.manual_seed(cfg.seed)
    scheduler = DDPMScheduler()
    net = MLPDenoiser(images.shape[1:], hidden=cfg.hidden, depth=cfg.depth, time_dim=64, seed=cfg.seed)
    every = max(1, cfg.train_steps // 5)

    def _progress(step, loss):
        if (step + 1) % every == 0:
            log.info(f"train step {step + 1}/{cfg.train_steps}, loss {loss:.4f}")

    losses = train_denoiser(net, train, scheduler=scheduler, steps=cfg.train_steps, batch_size=cfg.batch_size,
                            lr=cfg.lr, t_power=2.0, lr_warmup=min(100, cfg.train_steps // 10), seed=cfg.seed,
                            callback=_progress)
    log.step("train", f"trained a {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M-parameter denoiser, "
             f"{cfg.train_steps} steps; final loss {float(np.mean(losses[-50:])):.4f}")

    # ---- LID_theta (FLIPD), LID_* (local PCA, paper rule), PNG complexity
    x = torch.from_numpy(images)
    lid_model = flipd(net, x, cfg.t0, scheduler=scheduler, seed=cfg.seed, batch_size=512).double().numpy()
    log.step("flipd", f"LID_theta: FLIPD at t0 = {cfg.t0} (exact trace, d = {d}) for {n} images")
    lid_all = lpca(train.reshape(len(rows), -1), k=cfg.k, rule="paper", seed=cfg.seed, progress=False)
    lid_data = lid_all.numpy()[:n].astype(np.float64)  # rows[:n] holds each image once, in order
    log.step("lpca", f"LID_*: local PCA, paper rule, k = {cfg.k}, on the {len(rows)} training images")
    png = png_complexity(images, value_range=(-1.0, 1.0)).astype(np.float64)
    log.step("png", "PNG complexity (bytes at compression level 9)")

    # ---- generations and their nearest training images
    gen = ddim_sample(net, cfg.n_generated, scheduler=scheduler, num_steps=cfg.sampling_steps, seed=cfg.seed,
                      clip_x0=1.0, batch_size=512)
    cl2, nearest = calibrated_l2(gen.reshape(len(gen), -1), x.reshape(n, -1), n=50, alpha=0.5,
                                 return_indices=True)
    cl2, nearest = np.asarray(cl2, dtype=np.float64), np.asarray(nearest, dtype=np.int64)
    l2 = (gen.reshape(len(gen), -1).double() - x.reshape(n, -1).double()[torch.from_numpy(nearest)]).norm(dim=1)
    is_copy = cl2 < cfg.copy_threshold
    copied = np.bincount(nearest[is_copy], minlength=n)
    log.step("generate", f"generated {cfg.n_generated} images (DDIM, {cfg.sampling_steps} steps); nearest training "
             "image and calibrated l2 of each")

    # ---- memorization classes: LIDs clamped to [0, d] (FLIPD is an estimate and can leave that range);
    # FLIPD and local PCA are different estimators, so they are first put on one scale (FLIPD
    # times median LID_* / median FLIPD over the dataset), and "clearly below" must exceed their
    # typical disagreement: the OD-Mem margin is three robust standard deviations (1.4826 MAD)
    # of the difference, never below classify_memorization's own default margin.
    t_clamped = np.clip(lid_model, 0, d)
    classes = classify_memorization(t_clamped, lid_data, scale="median_ratio", margin="mad")
    t_scale, margin = classes.scale, classes.margin
    log.info(f"classes: FLIPD x {t_scale:.3f} onto the LID_* scale, margin {margin:.2f}")
    labels = classes.labels

    # ---- files
    meta = {
        "model": {"name": "demo denoiser trained on the digits with planted duplicates", "class": "MLPDenoiser"},
        "settings": {**asdict(cfg), "quick": bool(quick)},
        "metrics": {"flipd": {"lower_is_memorized": True, "t0": cfg.t0},
                    "lpca": {"lower_is_memorized": True, "rule": "paper", "k": cfg.k},
                    "png": {"lower_is_memorized": True}},
        "source": {"kind": "folder", "spec": os.path.abspath(os.path.join(out, "images"))},
    }
    results = os.path.join(out, "results.parquet")
    _write_parquet({
        "key": keys, "source": paths, "caption": [f"digit {int(t)}" for t in targets],
        "width": np.full(n, 8, dtype=np.int32), "height": np.full(n, 8, dtype=np.int32),
        "error": [None] * n,
        "flipd": lid_model, "lpca": lid_data, "png": png,
        "n_copies": n_copies.astype(np.int64), "duplicated": duplicated,
        "mem_class": labels.astype(object), "generated_copies": copied.astype(np.int64),
    }, results, meta)
    _write_parquet({
        "index": np.arange(len(gen), dtype=np.int64), "nearest_key": [keys[i] for i in nearest],
        "calibrated_l2": cl2, "l2": l2.numpy(), "copy": is_copy,
        "nearest_duplicated": duplicated[nearest],
    }, os.path.join(out, "generations.parquet"))
    labels_csv = os.path.join(out, "labels.csv")
    with open(labels_csv, "w") as f:
        f.write("key,label\n")
        for k, is_dup in zip(keys, duplicated):
            f.write(f"{k},{'duplicated' if is_dup else 'not'}\n")

    signals = {"flipd": lid_model, "lpca": lid_data, "png": png}
    auc, tpr = _auc_rows(signals, duplicated)
    page = None
    if report:
        from .report import make_report

        page = make_report(results, out=os.path.join(out, "report"), labels=labels_csv, positive="duplicated")
    log.step("report", f"wrote {results}" + (f" and {page}" if page else ""))

    res = DemoResult(
        out=os.path.abspath(out), auc=auc, tpr_at_1pct_fpr=tpr, classes=classes.counts(),
        flagged={c: [keys[i] for i in np.nonzero(labels == c)[0]] for c in ("dd_mem", "od_mem")},
        duplicated_keys=[keys[i] for i in dup], lid_data_duplicated=lid_data[dup].tolist(),
        generations={"n": int(len(gen)), "copies": int(is_copy.sum()),
                     "copies_of_duplicated": int((is_copy & duplicated[nearest]).sum()),
                     "distinct_images_copied": int((copied > 0).sum()),
                     "copy_threshold": cfg.copy_threshold,
                     "median_calibrated_l2": float(np.median(cl2))},
        seconds={**log.seconds, "total": round(time.perf_counter() - log.t0, 2)}, report=page)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({**asdict(res), "classes_low": classes.low, "classes_margin": classes.margin}, f, indent=1)
    if not quiet:
        _print_summary(res, signals, duplicated, keys, lid_data, lid_model, classes)
    return res


def _print_summary(res: DemoResult, signals, duplicated, keys, lid_data, lid_model, classes) -> None:
    w = sys.stdout.write
    n_dup = int(duplicated.sum())
    w(f"\nHow well each signal separates the {n_dup} duplicated images from the other "
      f"{len(keys) - n_dup} (low value = memorized):\n\n")
    w(f"  {'signal':<8} {'AUC':>6} {'TPR@1%FPR':>10}   {'median (dup)':>12} {'median (rest)':>13}\n")
    for name, v in signals.items():
        v = np.asarray(v, dtype=np.float64)
        w(f"  {name:<8} {res.auc[name]:6.3f} {res.tpr_at_1pct_fpr[name]:10.3f}   "
          f"{np.median(v[duplicated]):12.2f} {np.median(v[~duplicated]):13.2f}\n")
    c = res.classes
    w(f"\nMemorization classes (classify_memorization, low = {classes.low:.2f}, margin = {classes.margin:.2f}): "
      f"DD-Mem {c['dd_mem']}, OD-Mem {c['od_mem']}, none {c['none']}\n")
    for label, name in (("dd_mem", "DD-Mem"), ("od_mem", "OD-Mem")):
        flagged = np.nonzero(classes.labels == label)[0]
        if len(flagged):
            show = ", ".join(f"{keys[i]} (LID_* {lid_data[i]:.0f}, FLIPD {lid_model[i]:.1f}"
                             f"{', duplicated' if duplicated[i] else ''})" for i in flagged[:8])
            more = f" and {len(flagged) - 8} more" if len(flagged) > 8 else ""
            w(f"  {name}: {show}{more}\n")
    g = res.generations
    w(f"\nGenerations: {g['copies']} of {g['n']} copy a training image (calibrated l2 < "
      f"{g['copy_threshold']:.2f}); {g['copies_of_duplicated']} of those copy a duplicated image; "
      f"{g['distinct_images_copied']} distinct images copied.\n")
    w(f"\nResults: {os.path.join(res.out, 'results.parquet')}\nReport:  {res.report}\n"
      f"Total time: {res.seconds['total']:.0f} s\n")
