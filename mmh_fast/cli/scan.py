"""``mmh-fast scan``: per-image memorization metrics over a dataset, resumable and
distributable with torchrun.

Flow. Every process (one, or one per torchrun rank) opens the same source and
cuts it into the same units; rank r takes units r, r + W, r + 2W, ... (W the
world size), skips the units already complete in the output directory and the
positions already written, and reads its units through a DataLoader whose
workers decode images while the main process runs the metrics. Each unit's rows
go to Parquet parts (see :mod:`mmh_fast.cli.writer`); after a barrier, rank 0
merges all parts into ``results.parquet``.

Batches never span units, so a sample's batch is the same whatever the world
size or worker count; randomized metrics take per-sample seeds derived from the
key. A one-process scan and a torchrun scan therefore give the same rows.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import __version__
from .errors import UserError
from ..models.batching import NonFiniteOutputError
from .metrics import (FALLBACK_T0, MetricBatch, MetricContext, available_metrics, check_options, effective_settings,
                      load_plugins, resolve_metrics, split_values)
from .sources import decode_image, open_source, sample_id
from .writer import (MANIFEST, PartWriter, describe_errors, merge, part_files, read_manifest, read_resume_state,
                     settings_diff, table_metadata, write_json_atomic)

__all__ = ["ScanConfig", "ScanStats", "run_scan", "DEFAULT_METRICS"]

# The default --metrics: the first registered of these (model-free ones when no model).
DEFAULT_METRICS = ("flipd", "png")


class ScanFailed(RuntimeError):
    """The scan cannot go on (a metric fails on every sample, out of memory at batch 1)."""


@dataclass
class ScanConfig:
    """The options of ``mmh-fast scan`` (see its --help)."""

    data: str
    out: str
    model: str | None = None
    metrics: list | None = None
    t0: float | None = None  # overrides every metric's own t0 (see metrics.effective_settings)
    n_probes: int = 1
    batch_size: int = 16
    device: str | None = None
    dtype: str | None = None
    image_size: int | None = None
    limit: int | None = None
    seed: int = 0
    workers: int | None = None
    quiet: bool = False
    unit_size: int = 1024
    part_rows: int = 1024
    flush_seconds: float = 300.0
    log_every: float = 30.0
    image_column: str | None = None
    caption_column: str | None = None
    key_column: str | None = None
    plugins: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    merge: bool = True
    progress: str = "auto"  # "auto" (bar on a terminal), "bar", "log", "none"
    dist_timeout: float = 7 * 24 * 3600.0


@dataclass
class ScanStats:
    """What one process did: rows, errors, seconds per metric, wall time."""

    rank: int = 0
    world_size: int = 1
    rows: int = 0
    errors: int = 0
    skipped_units: int = 0
    metric_seconds: dict = field(default_factory=dict)
    metric_images: dict = field(default_factory=dict)
    wall_seconds: float = 0.0
    interrupted: bool = False
    batch_size: int = 0
    merged: dict | None = None
    column_false: dict = field(default_factory=dict)  # bool side column -> [rows False, rows] (e.g. nb_determined)


# --------------------------------------------------------------------------- data loading
class _UnitDataset(torch.utils.data.IterableDataset):
    """Yields loaded batches of this rank's units; worker w of n takes units w, w + n, ..."""

    def __init__(self, source, units, done_positions, batch_size, image_size):
        super().__init__()
        self.source = source
        self.units = units
        self.done = done_positions
        self.batch_size = batch_size
        self.image_size = image_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in units:
            done = self.done.get(unit.index, ())
            rows, n_ok = [], 0
            for raw in self.source.iter_unit(unit):
                if raw.position in done:
                    continue
                rows.append(self._decode(raw))
                n_ok += rows[-1][-1] is not None
                if n_ok >= self.batch_size:
                    yield _collate(unit.index, rows, last=False)
                    rows, n_ok = [], 0
            yield _collate(unit.index, rows, last=True)

    def _decode(self, raw):
        arr, w, h, err = None, None, None, raw.error
        if err is None:
            try:
                arr, w, h = decode_image(raw.data, self.image_size)
            except Exception as exc:  # PIL raises many types for corrupt data
                err = f"decode: {type(exc).__name__}: {exc}"
        return (raw.position, raw.key, raw.location, raw.caption, w, h, err, arr)


def _collate(unit, rows, last):
    ok = [i for i, r in enumerate(rows) if r[-1] is not None]
    arrays = [rows[i][-1] for i in ok]
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        pixels = torch.from_numpy(np.stack(arrays))
    else:
        pixels = [torch.from_numpy(a) for a in arrays]
    cols = list(zip(*[r[:-1] for r in rows])) if rows else [[]] * 7
    return {"unit": unit, "last": last, "positions": list(cols[0]), "keys": list(cols[1]),
            "locations": list(cols[2]), "captions": list(cols[3]), "widths": list(cols[4]),
            "heights": list(cols[5]), "errors": list(cols[6]), "ok": ok, "pixels": pixels}


def _worker_init(_):
    # Ctrl-C is the main process's business: it finishes the batch and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------- progress
def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _progress_mode(progress: str, quiet: bool) -> str:
    """What --progress means: auto is a bar on a terminal, log lines otherwise; quiet is none."""
    if quiet:
        return "none"
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return progress


class _Progress:
    """A tqdm bar ("bar"), log lines every ``log_every`` seconds ("log") or nothing."""

    def __init__(self, total, mode, log_every, prefix="", *, what="scan", unit="img"):
        self.total, self.mode, self.log_every, self.prefix = total, mode, log_every, prefix
        self.what, self.unit = what, unit
        self.n = self.errors = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, desc=prefix + what, file=sys.stderr)

    def update(self, n, errors):
        self.n += n
        self.errors += errors
        if self.bar is not None:
            self.bar.update(n)
            if errors:
                self.bar.set_postfix(errors=self.errors, refresh=False)
        elif self.mode == "log" and time.monotonic() - self.last >= self.log_every:
            self.last = time.monotonic()
            rate = self.n / max(1e-9, self.last - self.t0)
            noun = "images" if self.unit == "img" else f"{self.unit}s"
            if self.total:
                eta = (self.total - self.n) / rate if rate > 0 else float("inf")
                done = f"{self.n}/{self.total} {noun} ({100 * self.n / self.total:.1f}%), ETA {_fmt_seconds(eta)}"
            else:
                done = f"{self.n} {noun}"
            print(f"{self.prefix}{self.what}: {done}, {rate:.1f} {noun}/s, {self.errors} errors", file=sys.stderr,
                  flush=True)

    def inside(self, name, done, total):
        """Progress inside a batch (a per-image metric): the bar's postfix, or a log line."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{name} {done}/{total} of this batch")
        elif self.mode == "log" and time.monotonic() - self.last >= self.log_every:
            self.last = time.monotonic()
            print(f"{self.prefix}{self.what}: {name}: {done}/{total} images of the current batch, "
                  f"{self.n} images done", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- metric computation
def _nonfinite_error(exc: NonFiniteOutputError) -> str:
    """The error-column text of a sample whose network output is not finite."""
    return f"NonFiniteOutputError: {exc.what} is not finite (NaN or inf) for this sample"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


class _Computer:
    """Runs the metrics over loaded batches, in chunks of the current batch size;
    halves the size on out-of-memory and retries.

    ``ctxs`` maps each metric to its own :class:`MetricContext`; ``tick(name, done,
    total)`` is called after each image of a ``per_image`` metric."""

    def __init__(self, metrics, ctxs, batch_size, dtype, log, tick=None):
        self.metrics, self.ctxs, self.batch_size, self.dtype, self.log = metrics, ctxs, batch_size, dtype, log
        self.ctx = next(iter(ctxs.values()))
        self.tick = tick or (lambda name, done, total: None)
        self.seconds = {m.name: 0.0 for m in metrics}
        self.images = {m.name: 0 for m in metrics}
        self.ever_ok = {m.name: False for m in metrics}
        self.failed = {m.name: 0 for m in metrics}
        self.first_error = {}
        self.column_false = {c: [0, 0] for m in metrics for c, (dt, _) in m.columns.items() if dt == "bool"}

    def __call__(self, lb):
        n = len(lb["keys"])
        values = {name: [None] * n for m in self.metrics for name in (m.name, *m.columns)}
        errors = list(lb["errors"])
        ok = lb["ok"]
        if not ok:
            return values, errors
        pixels = lb["pixels"]
        if isinstance(pixels, list):  # mixed sizes (model-free scan at native size): group by shape
            groups = {}
            for j, row in enumerate(ok):
                groups.setdefault(tuple(pixels[j].shape), []).append((j, row))
            batches = [([row for _, row in g], torch.stack([pixels[j] for j, _ in g])) for g in groups.values()]
        else:
            batches = [(ok, pixels)]
        device = self.ctx.device
        for rows, px in batches:
            keys = [lb["keys"][r] for r in rows]
            base = MetricBatch(px, keys, [lb["captions"][r] for r in rows],
                               torch.tensor([sample_id(k) for k in keys], dtype=torch.int64), device, self.dtype)
            if any(m.needs_model for m in self.metrics):
                base.images  # one host-to-device copy shared by the metrics
            for m in self.metrics:
                idx = list(range(len(rows)))
                if m.needs_captions:
                    for i in idx:
                        if base.captions[i] is None:
                            _add_error(errors, rows[i], f"{m.name}: no caption")
                    idx = [i for i in idx if base.captions[i] is not None]
                for i, v, err, side in self._run(m, base, idx):
                    if err is None:
                        values[m.name][rows[i]] = v
                        for c, cv in side.items():
                            values[c][rows[i]] = cv
                            if c in self.column_false:
                                self.column_false[c][0] += not cv
                                self.column_false[c][1] += 1
                    else:
                        _add_error(errors, rows[i], f"{m.name}: {err}")
        return values, errors

    def _run(self, m, base, idx):
        """(index, value, error, {side column: value}) for the samples ``idx`` of ``base``."""
        start = 0
        while start < len(idx):
            # a per-image metric (minutes per batch) runs image by image, with progress after each
            chunk = idx[start:start + (1 if m.per_image else self.batch_size)]
            vals, oom, failed, nonfinite = None, False, False, None
            try:
                vals = self._timed(m, base.subset(chunk))
            except NonFiniteOutputError as exc:
                nonfinite = exc
            except Exception as exc:
                oom, failed = _is_oom(exc), not _is_oom(exc)
            # (out of the except block: its traceback no longer pins the failed batch's tensors)
            if oom:
                if self.batch_size == 1:
                    raise ScanFailed(f"metric {m.name}: out of memory at batch size 1")
                self.batch_size = max(1, self.batch_size // 2)
                self.log(f"out of memory in {m.name}: batch size halved to {self.batch_size}")
                self._empty_cache()
                continue
            if nonfinite is not None and nonfinite.positions and all(0 <= p < len(chunk)
                                                                        for p in nonfinite.positions):
                # the estimator names the samples whose network output is not finite: they get the
                # error, the rest of the chunk is computed again without them
                bad = set(nonfinite.positions)
                for p in sorted(bad):
                    self._note_failure(m, nonfinite)
                    yield chunk[p], None, _nonfinite_error(nonfinite), {}
                yield from self._run(m, base, [i for p, i in enumerate(chunk) if p not in bad])
            elif failed or nonfinite is not None:  # isolate the failing samples: one at a time
                for i in chunk:
                    yield self._one(m, base, i)
            else:
                vals, side = vals
                for j, (i, v) in enumerate(zip(chunk, vals)):
                    yield self._converted(m, i, v, side, j)
            start += len(chunk)
            if m.per_image:
                self.tick(m.name, start, len(idx))

    def _one(self, m, base, i):
        try:
            vals, side = self._timed(m, base.subset([i]))
        except Exception as exc:
            if _is_oom(exc):
                raise ScanFailed(f"metric {m.name}: out of memory at batch size 1") from None
            self._note_failure(m, exc)
            if isinstance(exc, NonFiniteOutputError):
                return i, None, _nonfinite_error(exc), {}
            return i, None, f"{type(exc).__name__}: {exc}", {}
        return self._converted(m, i, vals[0], side, 0)

    def _converted(self, m, i, v, side, j):
        """(i, value, error, side columns) of the j-th image of a computed chunk."""
        v, err = self._convert(m, v)
        if err is not None:
            return i, None, err, {}
        self.ever_ok[m.name] = True
        return i, v, None, {c: _side_value(m.columns[c][0], a[j]) for c, a in side.items()}

    def _convert(self, m, v):
        """A value as written, or (None, error): a NaN or inf is never written as a result."""
        if not np.isfinite(v):
            self._note_failure(m, ValueError(f"non-finite value {v}"))
            return None, f"non-finite value {v} (NaN or inf): not a result"
        return (int(v), None) if m.dtype == "int64" else (float(v), None)

    def _timed(self, m, mb):
        """(values [len(mb)], {side column: values})."""
        t = time.perf_counter()
        out = m.fn(mb, self.ctxs[m.name])
        vals = split_values(out, len(mb), m)  # moves to the host: synchronises the device
        self.seconds[m.name] += time.perf_counter() - t
        self.images[m.name] += len(mb)
        return vals

    def _note_failure(self, m, exc):
        self.failed[m.name] += 1
        self.first_error.setdefault(m.name, f"{type(exc).__name__}: {exc}")
        # A metric that has never succeeded on a generous number of samples is
        # broken for this model/data, not unlucky: stop instead of writing junk.
        if not self.ever_ok[m.name] and self.failed[m.name] >= max(8, 2 * self.batch_size):
            raise ScanFailed(f"metric {m.name} failed on the first {self.failed[m.name]} samples: "
                             f"{self.first_error[m.name]}")

    def _empty_cache(self):
        if self.ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def _side_value(dtype, v):
    return bool(v) if dtype == "bool" else int(v) if dtype == "int64" else float(v)


def _add_error(errors, row, msg):
    errors[row] = msg if errors[row] is None else f"{errors[row]}; {msg}"


# --------------------------------------------------------------------------- distribution
def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


class _Dist:
    """Small CPU collectives (gloo) for agreement and the final barrier."""

    def __init__(self, rank, world, timeout):
        self.rank, self.world, self.owned = rank, world, False
        if world > 1:
            import datetime

            import torch.distributed as dist

            self.dist = dist
            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
                self.owned = True

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def settle(self):
        """Return once every rank has come back from its last collective. A gloo rank
        that destroys its group while a peer's last receive is still in flight aborts
        that peer ("terminate called without an active exception", seen in CI), so
        each rank posts a key in the rendezvous store (TCP, outside gloo's pairs) after
        its last collective and waits for everyone's before tearing down."""
        if self.world == 1:
            return
        try:
            store = self.dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):  # no store API in this torch: a plain barrier
            self.dist.barrier()
            return
        store.set(f"mmh_fast_scan_done_{self.rank}", "1")
        store.wait([f"mmh_fast_scan_done_{r}" for r in range(self.world)])

    def close(self):
        if self.owned:
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------- the scan
def _metric_settings(cfg: ScanConfig, metrics) -> dict:
    """Each metric's effective settings (t0, options), every one with its value."""
    return {m.name: effective_settings(m, t0=cfg.t0, options=cfg.options) for m in metrics}


def _settings(cfg: ScanConfig, metrics, image_size, dtype) -> dict:
    """The settings that determine the values: a resumed scan must use the same.
    ``metric_settings`` holds what each metric ran with (recorded in scan.json and
    in the Parquet metadata)."""
    return {"metrics": [m.name for m in metrics], "t0": cfg.t0, "n_probes": cfg.n_probes, "seed": cfg.seed,
            "image_size": image_size, "dtype": str(dtype).replace("torch.", "") if dtype else None,
            "limit": cfg.limit, "unit_size": cfg.unit_size, "options": cfg.options,
            "metric_settings": _metric_settings(cfg, metrics)}


def _check_manifest(out, manifest, old) -> None:
    diffs = []
    for section in ("source", "model", "settings"):
        a, b = old.get(section), manifest.get(section)
        if section == "model" and a and b:
            a, b = {k: a.get(k) for k in ("name", "fingerprint")}, {k: b.get(k) for k in ("name", "fingerprint")}
        if section == "source" and a and b:  # the spec may be spelled differently (relative path)
            a, b = {k: a.get(k) for k in ("kind", "fingerprint")}, {k: b.get(k) for k in ("kind", "fingerprint")}
        if isinstance(a, dict) and isinstance(b, dict):
            d = settings_diff(a, b, f"{section}.")
        else:
            d = "" if a == b else f"{section}: was {json.dumps(a, sort_keys=True)}, now {json.dumps(b, sort_keys=True)}"
        if d:
            diffs.append(d.replace("; ", "\n  "))
    if diffs:
        raise UserError(f"{out} holds a scan with other settings; use another --out or remove it. "
                        "What differs:\n  " + "\n  ".join(diffs))


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)


def _default_workers(world_local: int) -> int:
    return max(1, min(8, _cpus() // max(1, world_local) - 1))


def _select_metrics(cfg: ScanConfig):
    load_plugins(cfg.plugins)
    names = cfg.metrics
    if not names:
        registered = available_metrics()
        names = [n for n in DEFAULT_METRICS if n in registered and (cfg.model or n == "png")]
        if not names:
            raise UserError("no default metric is available; name them with --metrics "
                            f"(registered: {', '.join(registered) or 'none'})")
    metrics = resolve_metrics(names)
    check_options(metrics, cfg.options)
    for name, eff in _metric_settings(cfg, metrics).items():
        t0 = eff.get("t0")
        if t0 is not None and (isinstance(t0, bool) or not isinstance(t0, (int, float)) or not 0 < t0 <= 1):
            raise UserError(f"t0 of metric {name} must be a number in (0, 1], got {t0!r}")
    needs_model = [m.name for m in metrics if m.needs_model]
    if needs_model and not cfg.model:
        raise UserError(f"metric(s) {', '.join(needs_model)} need a model: pass --model")
    return metrics, bool(needs_model)


def _check_args(cfg: ScanConfig) -> None:
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.t0 is not None and not (0 < cfg.t0 <= 1):
        raise UserError(f"--t0 must be in (0, 1], got {cfg.t0}")
    if cfg.n_probes < 1:
        raise UserError(f"--n-probes must be at least 1, got {cfg.n_probes}")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise UserError(f"--image-size must be at least 8, got {cfg.image_size}")
    if cfg.workers is not None and cfg.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {cfg.workers}")


def _agree_on_manifest(cfg, manifest, dist, rank, world) -> None:
    """Every rank must see the same source; rank 0 checks the directory's manifest
    against this scan (a resumed scan must have the same settings) and writes it."""
    fps = dist.gather(manifest["source"]["fingerprint"])
    if len(set(fps)) != 1:
        raise UserError("the torchrun ranks see different data (source fingerprints differ); "
                        "every rank must read the same files")
    problem = None
    if rank == 0:
        try:
            os.makedirs(cfg.out, exist_ok=True)
            old = read_manifest(cfg.out)
            if old is None:  # the manifest was removed: the parts carry a copy of it
                parts = part_files(cfg.out)
                old = table_metadata(parts[0][2]) if parts else None
            if old is not None:
                _check_manifest(cfg.out, manifest, old)
            write_json_atomic({**manifest, "world_size": world}, os.path.join(cfg.out, MANIFEST))
        except (UserError, OSError) as exc:
            problem = str(exc)
    problem = dist.gather(problem)[0]
    if problem:
        raise UserError(problem)


def _load(cfg, metrics, device, dtype):
    from .loader import load_model

    model = load_model(cfg.model, device=device, dtype=dtype)
    cond = [m.name for m in metrics if m.needs_conditional_model]
    if cond and not model.conditional:
        raise UserError(f"metric(s) {', '.join(cond)} need a text-conditioned model; "
                        f"{cfg.model} ({model.class_name}) is unconditional")
    return model


def run_scan(cfg: ScanConfig, *, log=None) -> ScanStats:
    """Run a scan as configured. Raises :class:`UserError` for bad inputs and
    :class:`ScanFailed` when the metrics cannot be computed; returns this
    process's :class:`ScanStats` (``interrupted`` set after Ctrl-C / SIGTERM)."""
    t_start = time.monotonic()
    rank, world, local_rank = _dist_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    prefix = f"[rank {rank}] " if world > 1 else ""

    def say(msg, *, always=False):
        if always or (not cfg.quiet and rank == 0):
            print(f"{prefix}{msg}", file=sys.stderr, flush=True)

    log = log or (lambda msg: say(msg, always=not cfg.quiet))

    _check_args(cfg)
    metrics, needs_model = _select_metrics(cfg)
    from .loader import native_image_size, parse_dtype, resolve_device

    device = resolve_device(cfg.device, local_rank)
    dtype = parse_dtype(cfg.dtype, device) if needs_model else None
    image_size = cfg.image_size or (native_image_size(cfg.model) if needs_model else None)
    model = None
    if needs_model and image_size is None:  # the configs do not tell: load first, then read images
        model = _load(cfg, metrics, device, dtype)
        image_size = model.image_size
    source = open_source(cfg.data, unit_size=cfg.unit_size, limit=cfg.limit, image_column=cfg.image_column,
                         caption_column=cfg.caption_column, key_column=cfg.key_column)
    dist = _Dist(rank, world, cfg.dist_timeout)
    threads = torch.get_num_threads()
    loader_it = None
    try:
        # ---- what is left to do; the decoding workers start now, so that their start-up
        # and first batches overlap the model loading (and fork before CUDA is initialised)
        mine = {u.index for u in source.units[rank::world]}
        resume = read_resume_state(cfg.out, mine)
        todo = [u for u in source.units if u.index in mine and u.index not in resume.complete_units]
        workers = min(_default_workers(local_world) if cfg.workers is None else cfg.workers, len(todo))
        if device.type == "cpu" and workers and "OMP_NUM_THREADS" not in os.environ:
            # Model threads and decoding workers share the cores: oversubscribed
            # OpenMP threads spin and can slow the model several-fold.
            torch.set_num_threads(max(1, min(threads, _cpus() // max(1, local_world) - workers)))
        ds = _UnitDataset(source, todo, resume.done_positions, cfg.batch_size, image_size)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                             worker_init_fn=_worker_init if workers else None,
                                             prefetch_factor=4 if workers else None,
                                             pin_memory=device.type == "cuda")
        loader_it = iter(loader)

        if needs_model and model is None:
            model = _load(cfg, metrics, device, dtype)
        manifest = {"version": __version__, "source": {"spec": cfg.data, "kind": source.kind,
                                                       "fingerprint": source.fingerprint(),
                                                       "num_samples": source.num_samples,
                                                       "image_column": getattr(source, "image_column", None)},
                    "model": model.describe() if model else ({"name": cfg.model} if cfg.model else None),
                    "settings": _settings(cfg, metrics, image_size, dtype), "units": len(source.units),
                    "metrics": {m.name: {"lower_is_memorized": m.lower_is_memorized, "dtype": m.dtype,
                                         "description": m.description,
                                         **({"columns": {c: {"dtype": dt, "false_means": what}
                                                         for c, (dt, what) in m.columns.items()}}
                                            if m.columns else {})} for m in metrics}}
        _agree_on_manifest(cfg, manifest, dist, rank, world)

        stats = ScanStats(rank=rank, world_size=world, skipped_units=len(mine) - len(todo))
        total = None
        if all(u.size is not None for u in todo):
            total = sum(u.size for u in todo) - sum(resume.rows_in(u.index) for u in todo)
        if resume.rows:
            say(f"resuming: {resume.rows} rows already in {cfg.out}; {len(resume.complete_units)} units complete")
        say(f"scan: {source.describe()}; metrics {', '.join(m.name for m in metrics)}"
            + (f"; model {cfg.model} on {device} ({str(dtype).replace('torch.', '')})" if model else "")
            + (f"; {world} ranks" if world > 1 else ""))

        settings = manifest["settings"]["metric_settings"]
        ctxs = {m.name: MetricContext(model=model, device=device, n_probes=cfg.n_probes, seed=cfg.seed,
                                      t0=settings[m.name].get("t0", FALLBACK_T0),
                                      options={k: v for k, v in settings[m.name].items() if k != "t0"})
                for m in metrics}
        if any(m.needs_model for m in metrics):
            say("settings: " + "; ".join(f"{name} " + ", ".join(f"{k}={v}" for k, v in eff.items())
                                         for name, eff in settings.items() if eff))
        writer = PartWriter(cfg.out, {name: dt for m in metrics
                                      for name, dt in ((m.name, m.dtype),
                                                       *((c, spec[0]) for c, spec in m.columns.items()))},
                            manifest, next_seq=resume.next_seq,
                            part_rows=cfg.part_rows, flush_seconds=cfg.flush_seconds, rank=rank, world_size=world)
        progress = _Progress(total, _progress_mode(cfg.progress, cfg.quiet or rank != 0), cfg.log_every, prefix)
        computer = _Computer(metrics, ctxs, cfg.batch_size, dtype or torch.float32, log, tick=progress.inside)

        stop = {"flag": False}

        def _on_signal(signum, frame):
            if stop["flag"]:  # a second Ctrl-C: stop now (parts written so far stay valid)
                raise KeyboardInterrupt
            stop["flag"] = True
            print(f"\n{prefix}stopping after the current batch (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, _on_signal)
        t_loop = time.monotonic()
        try:
            for lb in loader_it:
                values, errors = computer(lb)
                rows = {"key": lb["keys"], "source": lb["locations"], "caption": lb["captions"],
                        "width": lb["widths"], "height": lb["heights"], "error": errors, "_pos": lb["positions"],
                        **values}
                writer.add(lb["unit"], rows)
                if lb["last"]:
                    writer.unit_done(lb["unit"])
                n_err = sum(e is not None for e in errors)
                stats.rows += len(errors)
                stats.errors += n_err
                progress.update(len(errors), n_err)
                if stop["flag"]:
                    stats.interrupted = True
                    break
        finally:
            writer.close()
            progress.close()
            for sig, h in handlers.items():
                signal.signal(sig, h)
        loader_it = None  # stops the workers
        stats.wall_seconds = time.monotonic() - t_start
        stats.metric_seconds = dict(computer.seconds)
        stats.metric_images = dict(computer.images)
        stats.batch_size = computer.batch_size
        stats.column_false = {c: list(v) for c, v in computer.column_false.items()}
        loop_seconds = time.monotonic() - t_loop

        # ---- barrier, then rank 0 merges
        all_stats = dist.gather(asdict(stats))
        if rank == 0:
            _print_throughput(all_stats, loop_seconds, say)
            _print_side_columns(metrics, all_stats, say)
        if any(s["interrupted"] for s in all_stats):
            dist.settle()
            return stats
        if rank == 0 and cfg.merge:
            stats.merged = m = merge(cfg.out)
            for note in m["notes"]:
                say(f"note: {note}")
            say(f"results: {m['path']} ({m['rows']} rows, {m['errors']} with errors"
                + ("" if m["complete"] else f"; INCOMPLETE: {m['units_complete']}/{m['units_total']} units") + ")"
                + describe_errors(m))
        dist.gather(None)  # keep every rank alive until the merge is written
        dist.settle()
        return stats
    finally:
        loader_it = None
        torch.set_num_threads(threads)
        dist.close()


def _print_side_columns(metrics, all_stats, say):
    """One line per bool side column with False rows (e.g. nb's undetermined points)."""
    for m in metrics:
        for c, (dt, what) in m.columns.items():
            n = sum(s["column_false"].get(c, (0, 0))[0] for s in all_stats)
            done = sum(s["column_false"].get(c, (0, 0))[1] for s in all_stats)
            if dt == "bool" and n:
                say(f"note: {m.name}: {c} is False for {n} of the {done} images valued in this run: {what}"
                    f" (the rows are kept; filter on {c})", always=True)


def _print_throughput(all_stats, loop_seconds, say):
    rows = sum(s["rows"] for s in all_stats)
    errors = sum(s["errors"] for s in all_stats)
    wall = max(s["wall_seconds"] for s in all_stats)
    say(f"scanned {rows} images in {_fmt_seconds(wall)} ({rows / max(loop_seconds, 1e-9):.1f} images/s "
        f"in the loop), {errors} with errors")
    names = list(all_stats[0]["metric_seconds"])
    for name in names:
        imgs = sum(s["metric_images"].get(name, 0) for s in all_stats)
        # Ranks run side by side: the cluster's rate is the sum of the ranks' rates.
        rate = sum(s["metric_images"].get(name, 0) / s["metric_seconds"][name]
                   for s in all_stats if s["metric_seconds"].get(name))
        secs = sum(s["metric_seconds"].get(name, 0.0) for s in all_stats)
        say(f"  {name}: {rate:.1f} images/s ({imgs} images, {secs:.1f} s of metric time)")
