"""The ``mmh-fast`` command line (also ``python -m mmh_fast``).

Commands: ``scan`` (per-image memorization metrics over a dataset), ``merge``
(gather a scan's parts into results.parquet), ``lid-data`` (LID_* of the data,
keyed like the scan), ``classify`` (OD-Mem / DD-Mem from both), ``report``
(figures and an HTML or Markdown page), ``train`` (a small diffusion model of your
images), ``metrics`` (list the metrics), ``demo``.
Exit codes: 0 fine, 1 failed (or interrupted), 2 bad arguments or inputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from .errors import UserError

__all__ = ["main", "build_parser", "UserError"]


def _cmd_demo(args) -> int:
    from .demo import run_demo

    from .demo import DemoConfig

    cfg = DemoConfig.quick_settings(seed=args.seed) if args.quick else DemoConfig(seed=args.seed)
    run_demo(out=args.out, quick=args.quick, config=cfg, quiet=args.quiet)
    return 0


def _parse_options(items) -> dict:
    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UserError(f"--option expects NAME=VALUE, got {item!r}")
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def _cmd_scan(args) -> int:
    from .scan import ScanConfig, ScanFailed, run_scan

    plugins = list(args.plugin or [])
    env = os.environ.get("MMH_FAST_PLUGINS")
    if env:
        plugins = [p for p in env.split(",") if p] + plugins
    from .loader import TOY_MODELS

    if args.model in TOY_MODELS and not args.quiet:
        print(f"mmh-fast scan: warning: {args.model} has random weights: it exercises the pipeline, but its LIDs "
              "say nothing about your data (toy-ddpm's FLIPD is ~3600, above d = 3072). Train a model of your "
              "images with `mmh-fast train`, or pass a real one.", file=sys.stderr)
    cfg = ScanConfig(data=args.data, out=args.out, model=args.model,
                     metrics=[m for m in args.metrics.split(",")] if args.metrics else None, t0=args.t0,
                     n_probes=args.n_probes, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                     image_size=args.image_size, limit=args.limit, seed=args.seed, workers=args.workers,
                     quiet=args.quiet, unit_size=args.unit_size, part_rows=args.part_rows,
                     log_every=args.log_every, image_column=args.image_column, caption_column=args.caption_column,
                     key_column=args.key_column, plugins=plugins, options=_parse_options(args.option),
                     merge=not args.no_merge, progress=args.progress)
    try:
        stats = run_scan(cfg)
    except ScanFailed as exc:
        print(f"mmh-fast scan: failed: {exc}", file=sys.stderr)
        return 1
    if stats.interrupted:
        print(f"mmh-fast scan: interrupted; the rows written so far are in {args.out}: run the same command "
              "again to resume", file=sys.stderr)
        return 1
    return 0


def _cmd_lid_data(args) -> int:
    from .lid_data import LidDataConfig, run_lid_data

    cfg = LidDataConfig(data=args.data, out=args.out, k=args.k, rule=args.rule, alpha=args.alpha,
                        features=args.features, image_size=args.image_size, index=args.index,
                        recall_sample=args.recall_sample, target_recall=args.target_recall, limit=args.limit,
                        unit_size=args.unit_size, chunk_rows=args.chunk_rows, image_column=args.image_column,
                        key_column=args.key_column, device=args.device, seed=args.seed, workers=args.workers,
                        quiet=args.quiet, progress=args.progress, log_every=args.log_every)
    run_lid_data(cfg)
    return 0


def _cmd_classify(args) -> int:
    from .classify import run_classify

    run_classify(args.scan_dir, args.lid_data, model_metric=args.model_metric, margin=args.margin, low=args.low,
                 scale=args.scale, out=args.out, quiet=args.quiet)
    return 0


def _cmd_merge(args) -> int:
    from .writer import describe_errors, merge

    s = merge(args.dir)
    if not args.quiet:
        for note in s["notes"]:
            print(f"note: {note}", file=sys.stderr)
        state = "complete" if s["complete"] else (
            f"INCOMPLETE: {s['units_complete']}/{s['units_total'] if s['units_total'] is not None else '?'} units")
        print(f"{s['path']}: {s['rows']} rows, {s['errors']} with errors ({state}){describe_errors(s)}",
              file=sys.stderr)
    return 0


def _cmd_report(args) -> int:
    from .report import make_report

    path = make_report(args.results, out=args.out, labels=args.labels, fmt=args.format, positive=args.positive,
                       top=args.top, lid_metric=args.lid_metric, classes=args.classes,
                       generations=args.generations, image_size=args.image_size, warn=not args.quiet,
                       maps=args.maps, map_kind=args.map, maps_metric=args.maps_metric, map_model=args.map_model,
                       map_steps=args.map_steps, map_guidance=args.map_guidance, map_probes=args.map_probes,
                       device=args.device)
    if not args.quiet:
        print(path)
    return 0


def _cmd_train(args) -> int:
    from .train import TrainConfig, run_train

    run_train(TrainConfig(data=args.data, out=args.out, arch=args.arch, image_size=args.image_size, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, width=args.width, t_power=args.t_power,
                          weights=args.weights, device=args.device, seed=args.seed, limit=args.limit,
                          image_column=args.image_column, key_column=args.key_column, progress=args.progress,
                          quiet=args.quiet, overwrite=args.overwrite, captions=args.captions,
                          caption_column=args.caption_column, vae_steps=args.vae_steps))
    return 0


def _cmd_metrics(args) -> int:
    from .metrics import available_metrics, get_metric, load_plugins

    load_plugins(args.plugin or [])
    for name in available_metrics():
        m = get_metric(name)
        needs = [w for w, f in (("model", m.needs_model), ("captions", m.needs_captions)) if f]
        direction = "low = memorized" if m.lower_is_memorized else "high = memorized"
        print(f"{name:16s} needs: {', '.join(needs) or 'nothing':16s} {direction:17s} {m.description}")
    return 0


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors about one argument's value (``--batch-size 0``)
    are one line, without the usage block; other errors (a missing argument, an
    unknown command) keep the usage, which then helps."""

    def error(self, message):
        if message.startswith("argument ") and "invalid choice" not in message:
            self.exit(2, f"{self.prog}: error: {message}\n")
        super().error(message)


def _add_table_columns(p, *, caption: bool = False) -> None:
    """The column options of table sources, shared by the commands that read sources."""
    p.add_argument("--image-column", help="table sources: the image path/bytes column (default: auto)")
    if caption:
        p.add_argument("--caption-column", help="table sources: the caption column (default: auto)")
    p.add_argument("--key-column", help="table sources: a unique key column (default: key/id, else the row number)")


def _add_progress_options(p, *, log_every: bool = True) -> None:
    """--quiet, --progress and (for the long runs that log) --log-every."""
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                   help="progress display: a bar on a terminal, log lines otherwise (default: auto)")
    if log_every:
        p.add_argument("--log-every", type=float, default=30.0, metavar="SEC",
                       help="seconds between progress log lines (default: 30)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mmh-fast", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="run the memorization analysis end to end on embedded data",
                       description="Run the memorization analysis end to end on embedded data.")
    d.add_argument("--out", default="mmh_demo", help="output directory (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="smaller settings (under a minute)")
    d.add_argument("--seed", type=int, default=0, help="seeds the duplicates, training, probes and sampling "
                                                        "(default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress lines or summary table")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser(
        "scan", help="per-image memorization metrics over a dataset (resumable, torchrun-ready)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compute per-image memorization metrics over a dataset.\n\n"
        "SOURCE: a folder of images (captions from same-stem .txt files), WebDataset tar shards\n"
        "(shards/{00000..00099}.tar, a glob, or a folder of .tar files), or a .parquet/.csv table\n"
        "with an image path or bytes column and a caption column.\n"
        "Results go to Parquet parts in DIR and are merged into DIR/results.parquet. Run the same\n"
        "command again after a crash or Ctrl-C: finished work is skipped. Scale out with\n"
        "`torchrun --nproc-per-node N -m mmh_fast scan ...` (one shard/file set per rank).")
    s.add_argument("--model", metavar="MODEL",
                   help="a local diffusers pipeline directory (SD 1.x/2.x, DDPM, DDIM; nothing is downloaded) "
                        "or a built-in toy model with random weights: toy-ddpm (unconditional pixels), toy-sd (a tiny "
                        "Stable Diffusion). The toys only exercise the pipeline: their LIDs mean nothing (toy-ddpm's "
                        "FLIPD is ~3600, above d = 3072); `mmh-fast train` makes a real model of your images")
    s.add_argument("--data", required=True, metavar="SOURCE", help="the images (see above)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (resumed when it exists)")
    s.add_argument("--metrics", metavar="M1,M2",
                   help="comma-separated metrics (`mmh-fast metrics` lists them; default: flipd,png with a "
                        "model, png without). Cost: flipd about 2.5 network passes per image; nb 4d network "
                        "calls per image (d = pixel or latent entries: ~44 s per 32x32 RGB image on a 2-core "
                        "CPU; --option nb.n_samples=K for K calls), with progress per image")
    s.add_argument("--t0", type=float, default=None,
                   help="diffusion time for EVERY metric, overriding each one's own default (the paper's: "
                        "flipd and flipd_cond 0.05, nb 0.1, cfg_norm_train 0.01 with n_euler 3; 0.01 for plugin "
                        "metrics); set one metric's with --option NAME.t0=VALUE. The effective values are "
                        "recorded in DIR/scan.json and the results' metadata")
    s.add_argument("--n-probes", type=_positive_int, default=1, help="Hutchinson probes per image (default: 1)")
    s.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images per model batch; halved automatically on CUDA out-of-memory (default: 16)")
    s.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available; torchrun: cuda:LOCAL_RANK)")
    s.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="model precision (default: fp16 on CUDA, fp32 on CPU)")
    s.add_argument("--image-size", type=_positive_int,
                   help="resize (shorter side) and centre-crop images to this size; default: the model's "
                        "native resolution (e.g. 512 for SD 1.x), or the original size without a model")
    s.add_argument("--limit", type=_positive_int, help="scan only the first N samples of SOURCE")
    s.add_argument("--seed", type=int, default=0, help="seed of randomized estimators (default: 0)")
    s.add_argument("--workers", type=int, help="DataLoader workers decoding images (default: CPUs per process - 1, at most 8)")
    _add_progress_options(s)
    s.add_argument("--unit-size", type=_positive_int, default=1024,
                   help="files/rows per work unit of folder and table sources (a shard is one unit): the "
                        "granule of torchrun distribution (default: 1024)")
    s.add_argument("--part-rows", type=_positive_int, default=1024,
                   help="rows per Parquet part: at most this much work is lost by a crash (default: 1024)")
    _add_table_columns(s, caption=True)
    s.add_argument("--option", action="append", metavar="NAME=VALUE",
                   help="a metric setting: SETTING=VALUE for every metric that reads it (e.g. guidance_scale=7.5), "
                        "METRIC.SETTING=VALUE for one (e.g. flipd.t0=0.05, nb.n_samples=256); repeatable")
    s.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import a module or .py file that registers metrics (also $MMH_FAST_PLUGINS); repeatable")
    s.add_argument("--no-merge", action="store_true", help="leave the parts unmerged at the end")
    s.set_defaults(func=_cmd_scan)

    ld = sub.add_parser(
        "lid-data", help="LID_* (local PCA) of every sample of a source, keyed like scan (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="LID_* of the data by local PCA (mmh_fast.lpca) for every sample of SOURCE (any source scan\n"
        "reads), keyed as scan keys it, written to DIR/lid_data.parquet (key, source, lid_data,\n"
        "n_copies, error). Features: the pixels (scaled to [-1, 1]) or a vector column of a Parquet\n"
        "source. The exact kNN (default) is quadratic in N: ~10^5 rows on a CPU; beyond, --index\n"
        "faiss-ivf or faiss-hnsw, whose recall@k against the exact kNN is measured on a sample and\n"
        "printed. Run the same command again to resume.")
    ld.add_argument("--data", required=True, metavar="SOURCE", help="a folder, WebDataset shards or a Parquet/CSV table")
    ld.add_argument("--out", required=True, metavar="DIR", help="output directory (resumed when it exists)")
    ld.add_argument("--k", type=_positive_int, default=100, help="neighbourhood size (default: %(default)s, the paper's)")
    ld.add_argument("--rule", default="paper",
                    help="local PCA rule: paper (App. C.1: duplicates get 0), fo, maxgap, ratio, "
                         "participation_ratio, kaiser, broken_stick (default: %(default)s)")
    ld.add_argument("--alpha", type=float, default=0.05, help="alpha of the fo and ratio rules (default: %(default)s)")
    ld.add_argument("--features", default="pixels", metavar="pixels|COLUMN",
                    help="pixels, or a vector column of a Parquet source (e.g. CLIP embeddings) (default: pixels)")
    ld.add_argument("--image-size", type=_positive_int,
                    help="pixels: resize (shorter side) and centre-crop to this size, as scan does (default: "
                         "the images' own size, which must then be one size)")
    ld.add_argument("--index", default="exact", choices=["exact", "faiss-ivf", "faiss-hnsw"],
                    help="kNN: exact (native, O(N^2 D)) or a faiss index (default: %(default)s)")
    ld.add_argument("--recall-sample", type=_positive_int, default=1000,
                    help="faiss: rows on which recall@k is measured against the exact kNN (default: %(default)s)")
    ld.add_argument("--target-recall", type=float, default=0.99,
                    help="faiss: widen the search (nprobe/efSearch) until recall@k reaches this (default: %(default)s)")
    ld.add_argument("--limit", type=_positive_int, help="only the first N samples of SOURCE")
    ld.add_argument("--unit-size", type=_positive_int, default=4096,
                    help="samples per decoding unit (resume granule of the first phase) (default: %(default)s)")
    ld.add_argument("--chunk-rows", type=_positive_int, default=8192,
                    help="rows per neighbour chunk (resume granule of the kNN) (default: %(default)s)")
    _add_table_columns(ld)
    ld.add_argument("--device", help="cpu (default) or cuda[:N]: where the exact kNN and local PCA run")
    ld.add_argument("--seed", type=int, default=0, help="seeds the paper rule's pair sample and faiss (default: 0)")
    ld.add_argument("--workers", type=int, help="processes decoding images (default: CPUs - 1, at most 8)")
    _add_progress_options(ld)
    ld.set_defaults(func=_cmd_lid_data)

    c = sub.add_parser(
        "classify", help="OD-Mem / DD-Mem classes from a scan's LID_theta and lid-data's LID_*",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Join a scan's model LID (LID_theta) with lid-data's LID_* by key, put them on one scale and\n"
        "label each sample with mmh_fast.classify_memorization: od_mem (LID_theta clearly below LID_*),\n"
        "dd_mem (LID_* low and LID_theta as low), none. Writes classes.parquet (key, source, label,\n"
        "lid_theta, lid_theta_scaled, lid_data, n_copies, scale, margin, low). Refuses when the two\n"
        "LIDs' medians are more than 10x apart and no --scale is given.")
    c.add_argument("scan_dir", metavar="SCAN_DIR", help="a scan's output directory (or its results.parquet)")
    c.add_argument("--lid-data", required=True, metavar="DIR", help="a lid-data output directory (or lid_data.parquet)")
    c.add_argument("--model-metric", help="the scan's LID_theta column (default: flipd, else nb, else flipd_cond)")
    c.add_argument("--margin", help="how far from LID_* counts (LID_* units): a number, or 'mad' (three robust "
                                    "standard deviations of LID_theta - LID_*) (default: half the IQR of LID_*)")
    c.add_argument("--low", type=float, help="LID_* at or below this is low (default: a quarter of its median)")
    c.add_argument("--scale", default="none", metavar="none|median_ratio|FACTOR",
                   help="LID_theta onto the LID_* scale: none, median_ratio (x median LID_* / median "
                        "LID_theta) or a factor (default: none)")
    c.add_argument("--out", metavar="FILE", help="output file or directory (default: SCAN_DIR/classes.parquet)")
    c.add_argument("--quiet", action="store_true", help="print nothing on success")
    c.set_defaults(func=_cmd_classify)

    m = sub.add_parser("merge", help="merge a scan's Parquet parts into DIR/results.parquet",
                       description="Merge the Parquet parts of a scan (finished or not) into DIR/results.parquet, "
                                   "every sample exactly once, in source order.")
    m.add_argument("dir", metavar="DIR", help="the scan's output directory")
    m.add_argument("--quiet", action="store_true", help="print only errors")
    m.set_defaults(func=_cmd_merge)

    r = sub.add_parser("report", help="figures and an HTML/Markdown report of scan results",
                       description="Density histograms, ROC curves (AUC, TPR at 1% FPR) and the lowest-LID images "
                                   "of scan results, as PNG files and one self-contained HTML page (or Markdown).")
    r.add_argument("results", metavar="RESULTS", help="results.parquet (or the scan directory holding it)")
    r.add_argument("--labels", metavar="LABELS",
                   help="CSV or Parquet of key -> label (columns 'key' and 'label', or the first two)")
    r.add_argument("--out", required=True, metavar="DIR", help="output directory")
    r.add_argument("--format", choices=["html", "md"], default="html", help="page format (default: html)")
    r.add_argument("--positive", help="the label counted as memorized in ROC curves (default: inferred)")
    r.add_argument("--top", type=_positive_int, default=16, help="images in the lowest-LID grid (default: 16)")
    r.add_argument("--lid-metric", help="metric of the lowest-LID grid (default: flipd, nb or the first LID metric)")
    r.add_argument("--classes", metavar="FILE",
                   help="classes.parquet of `mmh-fast classify`: the MMH scatter (LID_theta against LID_*) and "
                        "class counts (default: the classes.parquet beside RESULTS, when there is one)")
    r.add_argument("--generations", metavar="SOURCE",
                   help="generated images (a folder or any scan source): each shown next to its nearest training "
                        "image (the results' images, streamed in chunks of 256: memory stays bounded) with the "
                        "calibrated l2")
    r.add_argument("--image-size", type=_positive_int,
                   help="side at which generations and training images are compared (default: the scan's image "
                        "size, else the first generated image's)")
    r.add_argument("--maps", type=int, default=0, metavar="N",
                   help="memorization maps (Kim and Lee, ICML 2026) of the N images ranked most memorized by "
                        "--maps-metric: each image's caption is run through the scan's text-conditioned model and "
                        "the map, taken at the last step of that caption's CFG DDIM trajectory (upsampled to image "
                        "size for latent models), is drawn in red over the image the trajectory generates, beside "
                        "the training image (maps.png, maps/maps.npz). Needs captions and a conditional model; "
                        "computed when the report is made, so scans stay lean (default: 0, none)")
    r.add_argument("--map", choices=["score", "curvature"], default="score",
                   help="which map: score (score difference sum_k (s_c - s_u)^2, one two-branch UNet call per "
                        "image after the trajectory) or curvature (coordinate-wise curvature difference, "
                        "--map-probes Jacobian-vector products) (default: score)")
    r.add_argument("--maps-metric", metavar="NAME",
                   help="metric ranking the images for --maps, in its own direction (default: the --lid-metric, "
                        "lowest first)")
    r.add_argument("--map-model", metavar="DIR",
                   help="the text-conditioned pipeline for --maps (default: the model the scan recorded)")
    r.add_argument("--map-steps", type=_positive_int, default=50,
                   help="DDIM steps of the map's trajectory (default: 50, the paper's)")
    r.add_argument("--map-guidance", type=float, default=7.5,
                   help="CFG guidance scale of the trajectory (default: 7.5)")
    r.add_argument("--map-probes", type=_positive_int, default=16,
                   help="Hutchinson probes of --map curvature (default: 16, the paper's)")
    r.add_argument("--device", help="device of --maps (cuda, cuda:N, cpu; default: cuda when available)")
    r.add_argument("--quiet", action="store_true", help="print nothing on success (warnings included)")
    r.set_defaults(func=_cmd_report)

    tr = sub.add_parser(
        "train", help="train a small diffusion model on your images, unconditional or (--captions) "
                 "caption-conditioned (for scan --model DIR)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a small unconditional diffusers model (DDPMScheduler, eps-prediction) on the images\n"
        "of SOURCE (any source scan reads; RGB, resized and centre-cropped to --image-size, in [-1, 1] as\n"
        "scan feeds models) and save it as a DDPMPipeline in DIR (save_pretrained), so that\n"
        "`mmh-fast scan --model DIR` measures LID_theta with it. Meaningful for small datasets and for\n"
        "studying duplication or oversampling in your own data; not a stand-in for the model you want to\n"
        "audit. The images are held in memory. --captions trains a caption-conditioned\n"
        "StableDiffusionPipeline instead (the memorization lab's training code, CPU only).")
    tr.add_argument("--data", required=True, metavar="SOURCE", help="the training images (as for scan)")
    tr.add_argument("--out", required=True, metavar="DIR", help="where the pipeline is saved")
    tr.add_argument("--arch", choices=["unet", "mlp"], default="unet",
                    help="unet: a small UNet2DModel (default); mlp: a residual MLP on the pixels, far cheaper "
                         "per step on tiny images (e.g. 8 x 8), no convolutional prior")
    tr.add_argument("--image-size", type=_positive_int, default=32, help="training resolution (default: 32)")
    tr.add_argument("--steps", type=_positive_int, default=2000, help="optimiser steps (default: 2000)")
    tr.add_argument("--batch-size", type=_positive_int, default=64, help="images per step (default: 64)")
    tr.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, warm-up then cosine "
                                                           "(default: 1e-3)")
    tr.add_argument("--width", type=_positive_int, default=64,
                    help="unet: channels of the top level (a multiple of 8); mlp: hidden width (default: 64)")
    tr.add_argument("--t-power", type=float, default=2.0,
                    help="training times t = u^p, u ~ U(0,1): p > 1 favours the small times at which LID is "
                         "measured (default: 2)")
    tr.add_argument("--weights", metavar="FILE",
                    help="CSV/Parquet of key -> sampling weight (columns key, weight): an image of weight w is "
                         "drawn as often as w copies would be (oversampling without duplicate files); "
                         "unlisted keys weigh 1")
    tr.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    tr.add_argument("--seed", type=int, default=0, help="seeds the weights, minibatches and noise (default: 0)")
    tr.add_argument("--limit", type=_positive_int, help="train on the first N images of SOURCE only")
    tr.add_argument("--captions", action="store_true",
                    help="train a caption-conditioned StableDiffusionPipeline (VAE, CLIP text encoder with a "
                         "vocabulary of the caption words, conditional UNet, DDIM) with the memorization lab's "
                         "training code, on the captions scan reads (folder .txt, WebDataset .txt/.json, table "
                         "--caption-column); every image needs one. CPU only")
    tr.add_argument("--vae-steps", type=_positive_int, default=600,
                    help="--captions: VAE steps (the decoder is then refined for twice as many; default: 600)")
    _add_table_columns(tr, caption=True)
    tr.add_argument("--overwrite", action="store_true", help="replace a model already in DIR")
    _add_progress_options(tr, log_every=False)
    tr.set_defaults(func=_cmd_train)

    from .lab import add_lab_parser  # the memorization lab (mmh_fast.lab)

    add_lab_parser(sub)

    ls = sub.add_parser("metrics", help="list the available metrics", description="List the registered metrics.")
    ls.add_argument("--plugin", action="append", metavar="MODULE", help="import a plugin module first; repeatable")
    ls.set_defaults(func=_cmd_metrics)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"mmh-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmh-fast {args.command}: interrupted", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print(f"mmh-fast {args.command}: failed with an unexpected error (traceback above)", file=sys.stderr)
        return 1
