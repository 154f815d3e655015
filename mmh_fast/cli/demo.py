"""``mmh-fast demo``: the manifold-memorization analysis end to end, as a user runs it.

A thin script over the commands a user runs on their own images; it prints each
command line before running it, so the demo *is* the workflow:

1. **Data.** scikit-learn's 1,797 8 x 8 digits (embedded, no download) are
   written as PNG files to ``DIR/images/`` (``digit_0000.png`` ...), with two
   kinds of planted memorization whose ground truth is known:
   ``n_duplicated`` digits are duplicated as files (``dup_files`` files each,
   ``digit_0007_copy01.png`` ...): the textbook cause of data-driven
   memorization (DD-Mem), where the data manifold is a point mass (LID_* = 0);
   ``n_oversampled`` other digits appear once in the folder. Both planted sets
   are drawn ``copies`` times as often as an ordinary digit in training
   (``train --weights``: weight ``copies`` for an oversampled digit,
   ``copies / dup_files`` for each file of a duplicated one), so the model
   collapses onto both alike and only the data side tells them apart: around
   an oversampled digit the data stay as high-dimensional as anywhere, so its
   low LID_theta is overfitting-driven memorization (OD-Mem).
2. ``mmh-fast train --arch mlp``: a small DDPM model of the folder
   (:class:`~mmh_fast.models.pixel_mlp.PixelMLP`, on the CPU).
3. ``mmh-fast scan --metrics flipd,png``: LID_theta by FLIPD (exact trace,
   d = 3 x 8 x 8 = 192) and the PNG complexity of every image.
4. ``mmh-fast lid-data``: LID_* by local PCA with the paper's rule on the
   pixels (``k = 100``).
5. ``mmh-fast classify --scale median_ratio --margin mad``: OD-Mem / DD-Mem.
6. Generations (the one step done with the Python API,
   :func:`mmh_fast.models.sampling.ddim_sample`): DDIM samples written to
   ``DIR/generations/``.
7. ``mmh-fast report --labels --generations``: figures (the MMH scatter,
   histograms, ROC curves, the lowest-LID images with the planted ones marked,
   each generation beside its nearest training image with Carlini et al.'s
   calibrated l2) and ``DIR/report/report.html``.

It then prints how well each signal separates the duplicated images from the
others (ROC AUC, TPR at 1% FPR), the classes of the planted images, and how
many generations copy a training image; ``DIR/summary.json`` holds the same.
"""
from __future__ import annotations

import json
import os
import shlex
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
        n_images: distinct digits used (the first n of scikit-learn's 1,797).
        n_duplicated: distinct digits planted many times as files (DD-Mem).
        n_oversampled: distinct digits, once in the folder, drawn ``copies`` times as
            often in training (OD-Mem).
        dup_files: files of each duplicated digit (the original included).
        copies: how many times as often as an ordinary digit each planted digit is
            drawn in training.
        train_steps, batch_size, lr, hidden: ``mmh-fast train --arch mlp`` settings.
        t0: FLIPD's time (``scan --t0``).
        k: local-PCA neighbourhood size (``lid-data --k``).
        n_generated, sampling_steps: DDIM generations and their steps.
        copy_threshold: a generation whose calibrated l2 is below this copies its
            nearest training image (Carlini et al. flag reconstructions well below 1/2).
        seed: seeds the planted choice, training, probes and sampling.
    """

    n_images: int = 1797
    n_duplicated: int = 10
    n_oversampled: int = 10
    dup_files: int = 10
    copies: int = 150
    train_steps: int = 8000
    batch_size: int = 256
    lr: float = 2e-3
    hidden: int = 256
    t0: float = 0.05
    k: int = 100
    n_generated: int = 500
    sampling_steps: int = 50
    copy_threshold: float = 1 / 3
    seed: int = 0

    @classmethod
    def quick_settings(cls, **kw) -> "DemoConfig":
        # A third of the digits, each planted one drawn 50x as often: the 20 planted digits are 63% of
        # the training draws, as with the full settings (1,797 digits, 150x), which is what lets
        # 1,000 steps memorize them. Measured (seed 0): at 50x among all 1,797 digits the full
        # model's FLIPD at the duplicates was 21 against 36 elsewhere, too high on the LID_* scale
        # to count as reproduced; at 150x, 5.6 against 35.
        return cls(**{**dict(n_images=600, copies=50, train_steps=1000, batch_size=128, hidden=128, n_generated=128,
                             sampling_steps=25), **kw})


@dataclass
class DemoResult:
    """What :func:`run_demo` measured (also written to ``summary.json``)."""

    out: str
    auc: dict = field(default_factory=dict)
    tpr_at_1pct_fpr: dict = field(default_factory=dict)
    classes: dict = field(default_factory=dict)
    flagged: dict = field(default_factory=dict)
    duplicated_keys: list = field(default_factory=list)
    oversampled_keys: list = field(default_factory=list)
    planted_classes: dict = field(default_factory=dict)
    lid_data_duplicated: list = field(default_factory=list)
    generations: dict = field(default_factory=dict)
    commands: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    report: str | None = None


def digits_with_duplicates(*, n_duplicated: int = 10, copies: int = 50, seed: int = 0, n_images: int = 1797):
    """scikit-learn's digits (the first ``n_images``) in [-1, 1] with planted duplicates.

    Returns:
        images [n_images, 1, 8, 8] float32 (each distinct image once), targets
        [n_images] int64, duplicated [n_duplicated] int64 indices of the planted
        images, and rows [n_images + n_duplicated * (copies - 1)] int64: the
        training set as indices into ``images`` (every image once, then the extra
        copies).
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
    if not 1 <= n_images <= len(d.images):
        raise ValueError(f"n_images must be in [1, {len(d.images)}], got {n_images}")
    images = (d.images[:n_images].astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16 -> [-1, 1]
    n = images.shape[0]
    if n_duplicated > n:
        raise ValueError(f"n_duplicated must be <= {n}, got {n_duplicated}")
    rng = np.random.default_rng(seed)
    dup = np.sort(rng.choice(n, n_duplicated, replace=False)).astype(np.int64)
    rows = np.concatenate([np.arange(n), np.repeat(dup, copies - 1)]).astype(np.int64)
    return images, d.target[:n_images].astype(np.int64), dup, rows


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


def _write_pngs(u8: np.ndarray, names: list[str], folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for img, name in zip(u8, names):
        Image.fromarray(img, mode="RGB" if img.ndim == 3 else "L").save(os.path.join(folder, name))


def run_demo(out: str = "mmh_demo", quick: bool = False, *, config: DemoConfig | None = None,
             quiet: bool = False, report: bool = True) -> DemoResult:
    """Run the demo; see the module docstring. Returns a :class:`DemoResult`."""
    cfg = config or (DemoConfig.quick_settings() if quick else DemoConfig())
    threads = torch.get_num_threads()
    # The demo's matrices are small (a 256-wide MLP): one intra-op thread is as fast as two
    # on an idle machine and avoids the OpenMP spin-waiting that made training 10x slower
    # on a busy one.
    torch.set_num_threads(1)
    import warnings

    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    # diffusers' loading chatter (the accelerate hint, the component type check that a PixelMLP
    # unet trips, the loading bar, a deprecation in its own from_pretrained) says nothing about
    # the analysis; the demo's output is the commands and their results
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
            return _run(cfg, out, quick, quiet, report)
    finally:
        torch.set_num_threads(threads)
        dlog.set_verbosity(level)
        dlog.enable_progress_bar()


def _run(cfg: DemoConfig, out: str, quick: bool, quiet: bool, report: bool) -> DemoResult:
    import pyarrow.parquet as pq

    from .. import backend_info
    from . import main
    from .errors import UserError
    from .report import roc_auc, roc_curve, tpr_at_fpr

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    log = _Log(quiet)
    info = backend_info()
    log.info(f"mmh_fast {info['version']} (native={info['native']}, cuda={info['cuda']}); "
             f"{'quick' if quick else 'full'} demo, output in {out}")
    commands = []

    def mmh(*args):
        args = [str(a) for a in args]
        commands.append("mmh-fast " + " ".join(shlex.quote(a) for a in args))
        log.info("$ " + commands[-1])
        if main(args + (["--quiet"] if quiet else [])) != 0:
            raise UserError(f"the demo's step `{commands[-1]}` failed (its message is above)")

    # ---- 1. the data, as files
    images, targets, dup, rows = digits_with_duplicates(n_duplicated=cfg.n_duplicated, copies=cfg.dup_files,
                                                        seed=cfg.seed, n_images=cfg.n_images)
    n = images.shape[0]
    rng = np.random.default_rng(cfg.seed + 1)
    over = np.sort(rng.choice(np.setdiff1d(np.arange(n), dup), cfg.n_oversampled, replace=False))
    u8 = np.clip(np.rint((images[:, 0] + 1.0) * 127.5), 0, 255).astype(np.uint8)
    folder = os.path.join(out, "images")
    # a rerun (another seed, --quick) starts afresh: scan and lid-data would resume, or refuse, in
    # the folders of the last run, and its extra copies would stay among the images
    import shutil

    for sub in ("images", "model", "scan", "lid", "generations", "report"):
        if os.path.isdir(os.path.join(out, sub)):
            shutil.rmtree(os.path.join(out, sub))
    names = [f"digit_{i:04d}.png" for i in range(n)]
    _write_pngs(u8, names, folder)
    copy_names = [f"digit_{i:04d}_copy{c:02d}.png" for i in dup for c in range(1, cfg.dup_files)]
    _write_pngs(u8[np.repeat(dup, cfg.dup_files - 1)], copy_names, folder)
    for name, t in zip(names, targets):
        with open(os.path.join(folder, name[:-4] + ".txt"), "w") as f:
            f.write(f"digit {int(t)}\n")
    dup_keys = [names[i] for i in dup] + copy_names
    over_keys = [names[i] for i in over]
    dup_set, over_set = set(dup_keys), set(over_keys)
    weights = os.path.join(out, "weights.csv")
    with open(weights, "w") as f:
        f.write("key,weight\n" + "".join(f"{k},{cfg.copies}\n" for k in over_keys)
                + "".join(f"{k},{cfg.copies / cfg.dup_files}\n" for k in dup_keys))
    labels_csv = os.path.join(out, "labels.csv")
    all_keys = sorted(names + copy_names)
    with open(labels_csv, "w") as f:
        f.write("key,label\n")
        for k in all_keys:
            f.write(f"{k},{'duplicated' if k in dup_set else 'oversampled' if k in over_set else 'not'}\n")
    log.step("data", f"data: {n} digits as PNG files in {folder}; {cfg.n_duplicated} of them x {cfg.dup_files} "
             f"files (DD-Mem), {cfg.n_oversampled} others once (OD-Mem); both drawn {cfg.copies}x as often in "
             "training (weights.csv)")

    # ---- 2-5. the commands
    model, scan, lid = (os.path.join(out, d) for d in ("model", "scan", "lid"))
    mmh("train", "--data", folder, "--out", model, "--arch", "mlp", "--image-size", 8, "--steps", cfg.train_steps,
        "--batch-size", cfg.batch_size, "--width", cfg.hidden, "--lr", cfg.lr, "--weights", weights,
        "--seed", cfg.seed, "--overwrite", "--progress", "log" if not quiet else "none")
    log.step("train", "trained the model")
    mmh("scan", "--model", model, "--data", folder, "--out", scan, "--metrics", "flipd,png", "--t0", cfg.t0,
        "--option", "trace=exact", "--seed", cfg.seed, "--workers", 0, "--progress", "none")
    log.step("scan", "scanned: FLIPD LID_theta and PNG complexity")
    mmh("lid-data", "--data", folder, "--out", lid, "--image-size", 8, "--k", cfg.k, "--rule", "paper",
        "--seed", cfg.seed, "--progress", "none")
    log.step("lid-data", "LID_* of the data")
    mmh("classify", scan, "--lid-data", lid, "--scale", "median_ratio", "--margin", "mad")
    log.step("classify", "classes")

    # ---- 6. generations (Python API: the CLI has no sampler)
    from PIL import Image

    from ..models.sampling import ddim_sample
    from .loader import load_model

    pipe = load_model(model, device=torch.device("cpu"), dtype=torch.float32).pipeline
    gen = ddim_sample(pipe.unet, cfg.n_generated, scheduler=pipe.scheduler, num_steps=cfg.sampling_steps,
                      seed=cfg.seed, clip_x0=1.0, batch_size=512)
    gdir = os.path.join(out, "generations")
    os.makedirs(gdir, exist_ok=True)
    g8 = np.clip(np.rint((gen.numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, img in enumerate(g8):
        Image.fromarray(img, mode="RGB").save(os.path.join(gdir, f"gen_{i:04d}.png"))
    log.step("generate", f"generated {cfg.n_generated} images (DDIM, {cfg.sampling_steps} steps) into {gdir}")

    # ---- 7. the report
    page = None
    if report:
        mmh("report", scan, "--labels", labels_csv, "--positive", "duplicated", "--generations", gdir,
            "--out", os.path.join(out, "report"), "--top", 24)
        page = os.path.join(out, "report", "report.html")
    log.step("report", "report written" if report else "no report")

    # ---- the summary: read back from the commands' outputs
    from .classify import CLASSES
    from .lid_data import RESULT as LID_DATA
    from .writer import RESULTS

    res_t = pq.read_table(os.path.join(scan, RESULTS)).to_pydict()
    cls_t = pq.read_table(os.path.join(scan, CLASSES)).to_pydict()
    lid_t = pq.read_table(os.path.join(lid, LID_DATA)).to_pydict()
    keys = res_t["key"]
    lid_of = dict(zip(lid_t["key"], lid_t["lid_data"]))
    is_dup = np.array([k in dup_set for k in keys])
    not_over = np.array([k not in over_set for k in keys])  # duplicated vs. not: the oversampled set aside
    signals = {"flipd": np.asarray(res_t["flipd"], dtype=np.float64),
               "lid_data": np.array([lid_of[k] for k in keys], dtype=np.float64),
               "png": np.asarray(res_t["png"], dtype=np.float64)}
    auc, tpr = {}, {}
    for name, v in signals.items():
        fpr, tp, _ = roc_curve(-v[not_over], is_dup[not_over])  # low value = memorized
        auc[name], tpr[name] = roc_auc(fpr, tp), tpr_at_fpr(fpr, tp, 0.01)
    label_of = dict(zip(cls_t["key"], cls_t["label"]))
    counts = {c: cls_t["label"].count(c) for c in ("dd_mem", "od_mem", "none")}
    planted = {"duplicated": {c: sum(label_of.get(k) == c for k in dup_keys) for c in counts},
               "oversampled": {c: sum(label_of.get(k) == c for k in over_keys) for c in counts}}
    gens = _generation_summary(gen.numpy(), u8, names, dup, cfg)
    res = DemoResult(
        out=out, auc=auc, tpr_at_1pct_fpr=tpr, classes=counts,
        flagged={c: [k for k in cls_t["key"] if label_of[k] == c] for c in ("dd_mem", "od_mem")},
        duplicated_keys=dup_keys, oversampled_keys=over_keys, planted_classes=planted,
        lid_data_duplicated=[float(lid_of[k]) for k in dup_keys], generations=gens, commands=commands,
        seconds={**log.seconds, "total": round(time.perf_counter() - log.t0, 2)}, report=page)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(asdict(res), f, indent=1)
    if not quiet:
        _print_summary(res, signals, is_dup, not_over, cls_t)
    return res


def _generation_summary(gen: np.ndarray, u8: np.ndarray, names, dup, cfg) -> dict:
    """Copies among the generations: calibrated l2 to the distinct digits (grey, as generated)."""
    from ..retrieval import calibrated_l2

    train = u8.reshape(len(u8), -1).astype(np.float32) / 127.5 - 1.0
    g = gen.mean(axis=1).reshape(len(gen), -1).astype(np.float32)  # the model's 3 channels are one grey
    cl2, nearest = calibrated_l2(g, train, n=50, alpha=0.5, return_indices=True)
    cl2, nearest = np.asarray(cl2, dtype=np.float64), np.asarray(nearest, dtype=np.int64)
    is_copy = cl2 < cfg.copy_threshold
    duplicated = np.zeros(len(u8), dtype=bool)
    duplicated[dup] = True
    return {"n": int(len(gen)), "copies": int(is_copy.sum()),
            "copies_of_duplicated": int((is_copy & duplicated[nearest]).sum()),
            "distinct_images_copied": int(len(set(nearest[is_copy].tolist()))),
            "copy_threshold": cfg.copy_threshold, "median_calibrated_l2": float(np.median(cl2))}


def _print_summary(res: DemoResult, signals, is_dup, not_over, cls_t) -> None:
    w = sys.stdout.write
    n_dup = int(is_dup.sum())
    w(f"\nHow well each signal separates the {n_dup} duplicated image files from the other "
      f"{int((~is_dup & not_over).sum())} (the oversampled set aside; low value = memorized):\n\n")
    w(f"  {'signal':<9} {'AUC':>6} {'TPR@1%FPR':>10}   {'median (dup)':>12} {'median (rest)':>13}\n")
    for name, v in signals.items():
        w(f"  {name:<9} {res.auc[name]:6.4g} {res.tpr_at_1pct_fpr[name]:10.4g}   "
          f"{np.median(v[is_dup]):12.4g} {np.median(v[~is_dup & not_over]):13.4g}\n")
    c = res.classes
    w(f"\nMemorization classes (mmh-fast classify: scale {cls_t['scale'][0]:.4g}, low {cls_t['low'][0]:.4g}, "
      f"margin {cls_t['margin'][0]:.4g}): DD-Mem {c['dd_mem']}, OD-Mem {c['od_mem']}, none {c['none']}\n")
    for what, cl in res.planted_classes.items():
        w(f"  planted {what}: " + ", ".join(f"{k} {v}" for k, v in cl.items() if v) + "\n")
    g = res.generations
    w(f"\nGenerations: {g['copies']} of {g['n']} copy a training image (calibrated l2 < "
      f"{g['copy_threshold']:.4g}); {g['copies_of_duplicated']} of those copy a duplicated image; "
      f"{g['distinct_images_copied']} distinct images copied.\n")
    w(f"\nThe commands (run them on your own images):\n" + "".join(f"  {c}\n" for c in res.commands))
    w(f"\nResults: {os.path.join(res.out, 'scan', 'classes.parquet')}\nReport:  {res.report}\n"
      f"Total time: {res.seconds['total']:.0f} s\n")
