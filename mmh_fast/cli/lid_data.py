"""``mmh-fast lid-data``: LID_* (local PCA, :func:`mmh_fast.lpca`) of every sample
of a source, with the scan's keys so that the two join.

Features are the decoded pixels (RGB, resized and centre-cropped to
``--image-size`` as the scan does, scaled to [-1, 1] as the scan feeds a
model: ``x / 127.5 - 1``, flattened to [3 * size * size]) or a vector column
of a Parquet source (``--features COLUMN``: CLIP or SSCD embeddings, a list or
fixed-size-list of numbers per row; such a table needs no image column).

Flow, in three resumable phases:

1. **features**: the source is read unit by unit (the scan's units and keys,
   :mod:`mmh_fast.cli.sources`); each unit's features go to one file, written
   atomically; then the units are gathered into one memory-mapped float32
   matrix ``features.npy`` [N_ok, D] (the samples that decoded) and
   ``samples.parquet`` (every sample: key, source, error, its row in the
   matrix), and the unit files are removed. Memory: one unit.
2. **neighbours**: the k nearest neighbours of every row, in chunks of
   ``--chunk-rows`` rows, each written to ``chunks/cNNNNNN.npz`` with what the
   LID needs (the LIDs themselves, or for the paper rule the spectra); a
   resumed run skips the chunks present. ``--index exact`` (default) is the
   library's exact kNN (:func:`mmh_fast.ops.knn`, the one :func:`mmh_fast.lpca`
   uses): O(N^2 D) work. ``--index faiss-ivf`` / ``faiss-hnsw`` use faiss
   (IVF-Flat with 4 sqrt(N) lists, nprobe from 8; or HNSW-Flat, M = 32,
   efConstruction 200, efSearch from 2 (k + 1); IVF on the GPU when faiss has
   GPU support and ``--device cuda``): before the search, the recall@k of the index against
   the exact kNN is measured on ``--recall-sample`` rows and the search breadth
   (nprobe / efSearch) doubled until it reaches ``--target-recall``; the
   measured recall is printed and stored. The neighbours faiss returns are
   re-ranked by exact distances before the LID.
3. **LID**: local PCA of each neighbourhood with ``--rule`` (as
   :func:`mmh_fast.lpca`; the paper rule's global threshold needs every
   chunk's spectra first), written with the sample table to
   ``lid_data.parquet``.

Output directory::

    lid_data.json        the source, the settings (checked on resume) and, once
                         done, the index report (recall) and timings
    features.npy         float32 [N_ok, D] features of the samples that decoded
    samples.parquet      key, source, error, row (into features.npy, -1 if none)
    chunks/              per-chunk neighbour results (kept for resuming)
    lid_data.parquet     THE RESULT: one row per sample, in source order:
                           key       (str) the scan's key, to join with results.parquet
                           source    (str) where the sample was read
                           lid_data  (int64; float64 for participation_ratio) LID_*
                           n_copies  (int64) exact copies of the sample among its k
                                     neighbours (distance 0): duplicates
                           error     (str) why the sample has no LID (null if fine)
                         and the JSON metadata (settings, index report) under
                         the Parquet metadata key ``mmh_fast``.

Exact cost: the kNN computes N^2 D distance terms (quadratic in N), then
N local PCAs of k x D neighbourhoods (linear in N: a (k+1)^2 D Gram and its
eigenvalues, ~0.5 ms per point at k = 100, D = 512 on one core); the index
report splits the neighbour phase's seconds into search and local PCA;
bench/README.md has the measured times.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import __version__
from .errors import UserError
from .writer import META_KEY, read_manifest, settings_diff, write_json_atomic, write_table_atomic

__all__ = ["LidDataConfig", "run_lid_data", "MANIFEST", "RESULT", "INDEXES"]

MANIFEST = "lid_data.json"
RESULT = "lid_data.parquet"
INDEXES = ("exact", "faiss-ivf", "faiss-hnsw")


@dataclass
class LidDataConfig:
    """The options of ``mmh-fast lid-data`` (see its --help)."""

    data: str
    out: str
    k: int = 100
    rule: str = "paper"
    alpha: float = 0.05
    features: str = "pixels"
    image_size: int | None = None
    index: str = "exact"
    recall_sample: int = 1000
    target_recall: float = 0.99
    limit: int | None = None
    unit_size: int = 4096
    chunk_rows: int = 8192
    image_column: str | None = None
    key_column: str | None = None
    device: str | None = None
    seed: int = 0
    workers: int | None = None
    quiet: bool = False
    progress: str = "auto"
    log_every: float = 30.0


def _settings(cfg: LidDataConfig) -> dict:
    """What determines the values: a resumed run must use the same."""
    return {"k": cfg.k, "rule": cfg.rule, "alpha": cfg.alpha, "features": cfg.features,
            "image_size": cfg.image_size, "index": cfg.index, "recall_sample": cfg.recall_sample,
            "target_recall": cfg.target_recall, "limit": cfg.limit, "unit_size": cfg.unit_size,
            "chunk_rows": cfg.chunk_rows, "seed": cfg.seed}


def _check_args(cfg: LidDataConfig) -> None:
    from ..lid.lpca import RULES

    if cfg.k < 2:
        raise UserError(f"--k must be at least 2 (a neighbourhood needs 2 points), got {cfg.k}")
    if cfg.rule not in RULES:
        raise UserError(f"--rule must be one of {', '.join(sorted(RULES))}, got {cfg.rule!r}")
    if not 0 < cfg.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {cfg.alpha}")
    if cfg.index not in INDEXES:
        raise UserError(f"--index must be one of {', '.join(INDEXES)}, got {cfg.index!r}")
    if not 0 < cfg.target_recall <= 1:
        raise UserError(f"--target-recall must be in (0, 1], got {cfg.target_recall}")
    for name in ("recall_sample", "unit_size", "chunk_rows"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {cfg.image_size}")
    if cfg.features != "pixels" and cfg.image_size is not None:
        raise UserError("--image-size applies to --features pixels only")


# --------------------------------------------------------------------------- phase 1: features
class _UnitFeatures(torch.utils.data.Dataset):
    """Item i: the decoded features of unit i (run in DataLoader workers)."""

    def __init__(self, source, units, image_size):
        self.source, self.units, self.image_size = source, units, image_size

    def __len__(self):
        return len(self.units)

    def __getitem__(self, i):
        from .sources import decode_image

        unit = self.units[i]
        keys, locs, errors, feats, pos = [], [], [], [], []
        for raw in self.source.iter_unit(unit):
            err, arr = raw.error, None
            if err is None:
                try:
                    arr = decode_image(raw.data, self.image_size)[0]
                except Exception as exc:  # PIL raises many types for corrupt data
                    err = f"decode: {type(exc).__name__}: {exc}"
            keys.append(raw.key)
            locs.append(raw.location)
            pos.append(raw.position)
            errors.append(err)
            feats.append(arr)
        return unit.index, keys, locs, pos, errors, feats


def _pixel_features(arrs, errors, shape):
    """uint8 [3, H, W] arrays -> float32 [n_ok, 3 H W] in [-1, 1]; a size other than
    ``shape`` (the first image's, without --image-size) is an error row."""
    ok = []
    for j, a in enumerate(arrs):
        if a is None:
            continue
        if shape[0] is None:
            shape[0] = a.shape
        if a.shape != shape[0]:
            errors[j] = (f"image is {a.shape[2]}x{a.shape[1]}, the first was {shape[0][2]}x{shape[0][1]}: "
                         "pass --image-size to bring all images to one size")
            continue
        ok.append(j)
    if not ok:
        return ok, np.zeros((0, 0), np.float32)
    x = np.stack([arrs[j] for j in ok]).reshape(len(ok), -1).astype(np.float32)
    return ok, x / np.float32(127.5) - np.float32(1.0)


def _vector_units(source, column, unit_size):
    """(unit index, keys, locations, positions, errors, float32 [n_ok, D] or None rows) per
    unit of a Parquet source's vector column, streamed by record batches."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(source.path)
    cols = list(dict.fromkeys([c for c in (source.key_column, column) if c]))
    row, unit = 0, 0
    for batch in pf.iter_batches(batch_size=unit_size, columns=cols):
        if source.num_samples is not None and row >= source.num_samples:
            return
        n = min(batch.num_rows, source.num_samples - row)
        col = batch.column(column).slice(0, n)
        fast = _dense_vectors(col)
        keys = ([str(k) for k in batch.column(source.key_column).to_pylist()[:n]] if source.key_column
                else [str(row + j) for j in range(n)])
        locs = [f"{source.path}::row={row + j}" for j in range(n)]
        if fast is not None:
            yield unit, keys, locs, list(range(n)), [None] * n, list(fast)
            row += n
            unit += 1
            continue
        errors, feats = [], []
        for v in col.to_pylist():
            if v is None or not isinstance(v, (list, tuple)) or not v:
                errors.append(f"column {column!r} holds {'null' if v is None else type(v).__name__}, "
                              "expected a vector of numbers")
                feats.append(None)
                continue
            a = np.asarray(v, dtype=np.float32)
            if a.ndim != 1 or not np.isfinite(a).all():
                errors.append(f"column {column!r}: not a finite vector")
                feats.append(None)
                continue
            errors.append(None)
            feats.append(a)
        yield unit, keys, locs, list(range(n)), errors, feats
        row += n
        unit += 1


def _dense_vectors(col):
    """float32 [n, D] of a list / fixed-size-list column without nulls whose rows all have
    one length and finite values (the usual embedding column), without Python lists;
    None otherwise (the row-by-row path then names the bad rows)."""
    import pyarrow as pa

    t = col.type
    if col.null_count or not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        return None
    if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
        return None
    n = len(col)
    flat = col.flatten()
    if n == 0 or len(flat) % n or flat.null_count:
        return None
    if not pa.types.is_fixed_size_list(t):
        offsets = col.offsets.to_numpy()
        lengths = np.diff(offsets)
        if not (lengths == lengths[0]).all() or lengths[0] == 0:
            return None
    x = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, -1)
    return x if np.isfinite(x).all() else None


def _unit_path(out, index):
    return os.path.join(out, "units", f"u{index:07d}.npz")


def _save_npz_atomic(path, **arrays):
    tmp = f"{path}.tmp.{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _features_phase(cfg, source, progress, say):
    """Decode every unit to its features file; then gather them (see the module docstring)."""
    os.makedirs(os.path.join(cfg.out, "units"), exist_ok=True)
    shape = [None]
    vec_dim = [None]

    def store(unit, keys, locs, pos, errors, feats):
        errors = list(errors)
        if cfg.features == "pixels":
            ok, x = _pixel_features(feats, errors, shape)
        else:
            ok = [j for j, f in enumerate(feats) if f is not None]
            for j in list(ok):
                if vec_dim[0] is None:
                    vec_dim[0] = feats[j].shape[0]
                if feats[j].shape[0] != vec_dim[0]:
                    errors[j] = f"vector of length {feats[j].shape[0]}, the first had {vec_dim[0]}"
                    ok.remove(j)
            x = np.stack([feats[j] for j in ok]) if ok else np.zeros((0, 0), np.float32)
        row = np.full(len(keys), -1, np.int64)
        row[ok] = np.arange(len(ok))
        _save_npz_atomic(_unit_path(cfg.out, unit), keys=np.array(keys, dtype=object),
                         locs=np.array(locs, dtype=object), pos=np.array(pos, np.int64),
                         errors=np.array(errors, dtype=object), row=row, x=x, n_ok=np.int64(len(ok)),
                         dim=np.int64(x.shape[1] if len(ok) else 0))
        progress.update(len(keys), sum(e is not None for e in errors))

    done = {int(os.path.basename(p)[1:8]) for p in glob.glob(os.path.join(cfg.out, "units", "u*.npz"))}
    if cfg.features == "pixels":
        todo = [u for u in source.units if u.index not in done]
        if done:
            say(f"resuming: {len(done)} of {len(source.units)} units already decoded")
        from .scan import _default_workers, _worker_init

        workers = min(_default_workers(1) if cfg.workers is None else cfg.workers, len(todo))
        loader = torch.utils.data.DataLoader(_UnitFeatures(source, todo, cfg.image_size), batch_size=None,
                                             num_workers=workers, worker_init_fn=_worker_init if workers else None)
        for item in loader:
            store(*item)
    else:
        for item in _vector_units(source, cfg.features, cfg.unit_size):
            if item[0] not in done:
                store(*item)
            else:
                progress.update(len(item[1]), 0)
    return _gather(cfg, source)


def _gather(cfg, source):
    """Unit files -> features.npy + samples.parquet (then the unit files go)."""
    import pyarrow as pa

    paths = sorted(glob.glob(os.path.join(cfg.out, "units", "u*.npz")))
    units = [np.load(p, allow_pickle=True) for p in paths]
    n_ok = sum(int(u["n_ok"]) for u in units)
    dims = {int(u["dim"]) for u in units if int(u["n_ok"])}
    if len(dims) > 1:
        raise UserError(f"the features have different lengths across units ({sorted(dims)}); "
                        "pass --image-size to bring all images to one size")
    if n_ok < 2:
        raise UserError(f"only {n_ok} sample(s) of {cfg.data!r} have features: LID_* needs at least 2")
    dim = dims.pop()
    feats = np.lib.format.open_memmap(os.path.join(cfg.out, "features.npy.tmp"), mode="w+", dtype=np.float32,
                                      shape=(n_ok, dim))
    keys, locs, errors, rows = [], [], [], []
    at = 0
    for u in units:
        x = u["x"]
        feats[at:at + x.shape[0]] = x
        r = u["row"].copy()
        r[r >= 0] += at
        at += x.shape[0]
        keys += u["keys"].tolist()
        locs += u["locs"].tolist()
        errors += u["errors"].tolist()
        rows += r.tolist()
    feats.flush()
    del feats
    os.replace(os.path.join(cfg.out, "features.npy.tmp"), os.path.join(cfg.out, "features.npy"))
    write_table_atomic(pa.table({"key": pa.array(keys, pa.string()), "source": pa.array(locs, pa.string()),
                                 "error": pa.array(errors, pa.string()), "row": pa.array(rows, pa.int64())}),
                       os.path.join(cfg.out, "samples.parquet"))
    for p in paths:
        os.unlink(p)
    os.rmdir(os.path.join(cfg.out, "units"))


# --------------------------------------------------------------------------- phase 2: neighbours
def _exact_knn(x, k):
    from .. import ops

    def search(r0, r1):
        return ops.knn(x, k=k, exclude_self=True, rows=slice(r0, r1), progress=False)

    return search


def _exact_kth(x, rows, k):
    """float64 [len(rows)]: the exact distance from each row to its k-th nearest other
    row, as ops.knn gives it (the query itself excluded by index, as in the search)."""
    from .. import ops

    rows = torch.as_tensor(rows)
    d, i = ops.knn(x, x[rows], k + 1, progress=False)
    d = d.to(torch.float64)
    self_hit = (i == rows.unsqueeze(1)).any(1)
    # the (k+1)-th of the k + 1 when the query is among them, else the k-th
    return torch.where(self_hit, d[:, k], d[:, k - 1])


def _tie_aware_recall(x, rows, found, k, dk=None):
    """Mean over ``rows`` of #(found neighbours no farther than the exact k-th) / k.
    With exact copies many neighbour sets are equally right, so recall counts
    distances, not indices. ``dk``: :func:`_exact_kth` of the rows, if known (the
    exact search is the costly part: one per sample, not one per breadth tried)."""
    rows = torch.as_tensor(rows)
    if dk is None:
        dk = _exact_kth(x, rows, k)
    dq = _exact_distances(x, rows, found)
    hits = (dq <= (dk * (1 + 1e-6) + 1e-12).unsqueeze(1)).sum(1).clamp(max=k)
    return float(hits.to(torch.float64).mean() / k)


def _exact_distances(x, rows, nb, *, block: int = 16):
    """float64 [len(rows), k] distances |x[rows] - x[nb]|, ``block`` rows at a time.
    The differences are taken in the data's dtype (0 exactly for copies), the norm
    accumulated in float64; no float64 copy of the gathered neighbours (2x faster).
    16 rows of 100 neighbours at D = 512 are 3 MiB, within the cache: measured
    4x faster than 256 rows (52 MiB per temporary), with bit-identical values."""
    out = torch.empty(nb.shape, dtype=torch.float64)
    for b0 in range(0, len(rows), block):
        nbb = nb[b0:b0 + block]
        diff = x[nbb.reshape(-1)].reshape(*nbb.shape, -1) - x[rows[b0:b0 + block]].unsqueeze(1)
        out[b0:b0 + block] = torch.linalg.vector_norm(diff, dim=-1, dtype=torch.float64)
    return out


def _mean_sq_norm(x, block: int = 65536) -> float:
    """mean_i |x_i|^2 in float64, a block at a time (no float64 copy of the data)."""
    return sum(float(x[b:b + block].to(torch.float64).pow(2).sum()) for b in range(0, x.shape[0], block)) / x.shape[0]


def _drop_self(ids, rows, k):
    """faiss results for k + 1 -> k neighbours without the query itself (by index; when a
    copy at distance 0 outranked it and it is missing, the last one goes)."""
    ids = torch.from_numpy(ids.astype(np.int64))
    hit = ids == rows.unsqueeze(1)
    drop = torch.where(hit.any(1), hit.to(torch.int64).argmax(1), torch.full_like(rows, k))
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[torch.arange(len(rows)), drop] = False
    return ids[keep].reshape(len(rows), k)


class _FaissSearch:
    """A faiss index over the features, its breadth tuned to a target recall."""

    def __init__(self, x, cfg, say):
        try:
            import faiss
        except ImportError:
            raise UserError(f"--index {cfg.index} needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
        self.faiss, self.x, self.k = faiss, x, cfg.k
        xn = x.numpy()
        n, d = xn.shape
        t = time.perf_counter()
        gpu = cfg.device is not None and cfg.device.startswith("cuda") and hasattr(faiss, "StandardGpuResources")
        if cfg.index == "faiss-ivf":
            # 4 sqrt(N) lists, the low end of faiss's guideline (4 to 16 sqrt(N)): a query
            # scans the nlist centroids and nprobe lists of N / nlist rows, nlist + nprobe N /
            # nlist rows in all, least at nlist = sqrt(nprobe N), i.e. 4 sqrt(N) at nprobe 16.
            # k-means on 64 points per list (faiss warns below 39): 64 nlist^2 D per iteration,
            # 16 N D at 10^6 rows, below the search's ~8,000 N D. The search breadth (nprobe)
            # is then widened until the measured recall reaches the target.
            self.nlist = max(1, min(int(round(4 * math.sqrt(n))), n // 39))
            quantizer = faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_L2)
            g = np.random.default_rng(cfg.seed)
            train = xn[np.sort(g.choice(n, min(n, 64 * self.nlist), replace=False))]
            if gpu:
                self.res = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self.res, int(cfg.device.partition(":")[2] or 0), index)
            index.train(np.ascontiguousarray(train))
            self.param, self.value, self.limit = "nprobe", 8, self.nlist
        else:
            if gpu:
                say("note: faiss-hnsw runs on the CPU (faiss has no GPU HNSW)")
                gpu = False
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_L2)
            index.hnsw.efConstruction = 200
            self.param, self.value, self.limit = "efSearch", max(64, 2 * (self.k + 1)), 1 << 14
        for r0 in range(0, n, 65536):
            index.add(np.ascontiguousarray(xn[r0:r0 + 65536]))
        self.index, self.gpu = index, gpu
        self.build_seconds = time.perf_counter() - t

    def _set(self, value):
        self.value = value
        if self.param == "nprobe":
            self.index.nprobe = value
        else:
            self.index.hnsw.efSearch = value

    def tune(self, sample, target, say):
        """Double the breadth until recall@k on ``sample`` reaches ``target`` (or the limit)."""
        t = time.perf_counter()
        rows = torch.as_tensor(sample)
        history = []
        value = self.value
        dk = _exact_kth(self.x, rows, self.k)
        self.exact_sample_seconds = time.perf_counter() - t
        while True:
            self._set(value)
            nb = self._search_rows(rows)
            recall = _tie_aware_recall(self.x, sample, nb, self.k, dk)
            history.append({self.param: value, "recall": recall})
            say(f"faiss {self.param} = {value}: recall@{self.k} = {recall:.4f} on {len(sample)} rows")
            if recall >= target or value >= self.limit:
                break
            value = min(2 * value, self.limit)
        self.recall, self.history = recall, history
        self.tune_seconds = time.perf_counter() - t
        return recall

    def _search_rows(self, rows):
        q = np.ascontiguousarray(self.x.numpy()[rows.numpy()])
        _, ids = self.index.search(q, self.k + 1)
        if (ids < 0).any():
            raise UserError(f"faiss returned fewer than {self.k + 1} neighbours for some rows "
                            f"({self.param} = {self.value} too small for this data); use --index exact")
        return _drop_self(ids, rows, self.k)

    def __call__(self, r0, r1):
        rows = torch.arange(r0, r1)
        nb = self._search_rows(rows)
        d = _exact_distances(self.x, rows, nb)
        # ops.knn's order, ascending by (distance, index): the paper rule takes "the first n"
        o = torch.argsort(nb, dim=1)
        nb, d = torch.gather(nb, 1, o), torch.gather(d, 1, o)
        o = torch.argsort(d, dim=1, stable=True)
        return torch.gather(d, 1, o).to(self.x.dtype), torch.gather(nb, 1, o)

    def report(self):
        return {"kind": "faiss-ivf" if self.param == "nprobe" else "faiss-hnsw", "gpu": self.gpu,
                **({"nlist": self.nlist} if self.param == "nprobe" else {"M": 32, "efConstruction": 200}),
                self.param: self.value, "recall_at_k": self.recall, "recall_sample": None,
                "tuning": self.history, "build_seconds": round(self.build_seconds, 3),
                "tune_seconds": round(self.tune_seconds, 3),
                "exact_sample_seconds": round(self.exact_sample_seconds, 3),
                "faiss_version": self.faiss.__version__}


def _chunk_path(out, i):
    return os.path.join(out, "chunks", f"c{i:07d}.npz")


def _local_pca_kernels(x):
    """(spectra(nb, sizes), fo_count(nb, alpha)): the native kernels behind
    ops.local_pca / ops.local_pca_count, the same numbers. Why not those
    functions per chunk: each call re-validates the whole feature matrix (a
    finite check and a not-all-identical check, ~3 s per call at N = 10^6,
    D = 512: 6 min over 123 chunks of 8,192 rows), and here it was validated
    once (finite when read; not constant: checked here, once)."""
    from ..ops._dispatch import kernel
    from ..ops.local_pca import check_not_constant

    try:
        check_not_constant(x, "the features")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    spectra, count = kernel("local_pca", x.device), kernel("local_pca_count", x.device)
    xc = x.contiguous()

    def pca(nb, sizes=None):
        return spectra(xc, nb.to(torch.int64).contiguous(),
                       None if sizes is None else sizes.to(torch.int64).contiguous())

    def fo(nb, alpha):
        return count(xc, nb.to(torch.int64).contiguous(), float(alpha))[0]

    return pca, fo


def _lid_chunk(x, d, nb, cfg, paper, kernels):
    """What chunk (d, nb) contributes: the LIDs, or (paper rule) the floored spectra."""
    from ..lid.lpca import _floor_zeros, apply_rule

    pca, fo = kernels

    n_dup = (d <= 0).sum(1)
    n_copies = n_dup.cpu().numpy().astype(np.int64)
    if paper is not None:
        r_star, scale2, r0 = paper
        own = torch.arange(r0, r0 + len(nb), device=nb.device).unsqueeze(1)
        n_near = (d <= r_star).sum(1)
        # as lpca(rule="paper"): the copies if any, else the neighbours within r*, else all k
        use = torch.where(n_dup > 0, n_dup, torch.where(n_near > 0, n_near, torch.full_like(n_near, cfg.k)))
        ev = pca(torch.cat([own, nb], 1), use + 1)
        return {"ev": _floor_zeros(ev, scale2).cpu().numpy(), "n_copies": n_copies}
    if cfg.rule == "fo":
        lid = fo(nb, cfg.alpha)
    else:
        lid = apply_rule(pca(nb), cfg.rule, float(cfg.alpha))
    return {"lid": lid.cpu().numpy(), "n_copies": n_copies}


def _neighbour_phase(cfg, x, progress, say):
    """Chunks of neighbours -> chunk files; returns the index report."""
    from ..lid.lpca import _pair_distance_quantile

    os.makedirs(os.path.join(cfg.out, "chunks"), exist_ok=True)
    n = x.shape[0]
    if cfg.k > n - 1:
        raise UserError(f"--k {cfg.k} needs at least {cfg.k + 1} samples with features, got {n}")
    chunks = [(r0, min(n, r0 + cfg.chunk_rows)) for r0 in range(0, n, cfg.chunk_rows)]
    todo = [i for i in range(len(chunks)) if not os.path.isfile(_chunk_path(cfg.out, i))]
    if len(todo) < len(chunks):
        say(f"resuming: {len(chunks) - len(todo)} of {len(chunks)} neighbour chunks done")
    paper = None
    if cfg.rule == "paper":
        # as lpca(rule="paper") with its defaults (quantile 0.1, 100,000 pairs) and --seed
        paper = (_pair_distance_quantile(x, 0.1, 100_000, cfg.seed), _mean_sq_norm(x))
    report = {"kind": "exact"}
    if cfg.index == "exact":
        search = _exact_knn(x, cfg.k)
    else:
        search = _FaissSearch(x, cfg, say)
        g = np.random.default_rng(cfg.seed + 1)
        sample = np.sort(g.choice(n, min(n, cfg.recall_sample), replace=False))
        recall = search.tune(sample, cfg.target_recall, say)
        report = search.report()
        report["recall_sample"] = int(len(sample))
        if recall < cfg.target_recall:
            say(f"warning: faiss reached recall@{cfg.k} = {recall:.4f} only, below --target-recall "
                f"{cfg.target_recall}, at the widest search tried")
    kernels = _local_pca_kernels(x)
    pending = set(todo)
    progress.update(sum(r1 - r0 for i, (r0, r1) in enumerate(chunks) if i not in pending), 0)
    # where the time goes (this run's chunks only, on a resume): the kNN search (with
    # faiss: search and exact re-ranking) against the local PCA
    t_search = t_pca = 0.0
    for i in todo:
        r0, r1 = chunks[i]
        t = time.perf_counter()
        d, nb = search(r0, r1)
        nb = nb.to(x.device)
        t_search += time.perf_counter() - t
        t = time.perf_counter()
        part = _lid_chunk(x, d.to(x.device), nb, cfg, None if paper is None else (*paper, r0), kernels)
        t_pca += time.perf_counter() - t
        _save_npz_atomic(_chunk_path(cfg.out, i), **part)
        progress.update(r1 - r0, 0)
    report["search_seconds"], report["local_pca_seconds"] = round(t_search, 3), round(t_pca, 3)
    return report, len(chunks)


def _lids(cfg, n_chunks):
    """Gather the chunk files into [N_ok] LIDs and copies counts (the paper rule's threshold here)."""
    from ..lid.lpca import _quantile_large

    parts = [np.load(_chunk_path(cfg.out, i)) for i in range(n_chunks)]
    n_copies = np.concatenate([p["n_copies"] for p in parts])
    if cfg.rule != "paper":
        return np.concatenate([p["lid"] for p in parts]), n_copies, None
    ev = torch.from_numpy(np.concatenate([p["ev"] for p in parts]))
    tau = max(_quantile_large(ev, 0.1), 0.0)
    return (ev > tau).sum(1).numpy().astype(np.int64), n_copies, tau


# --------------------------------------------------------------------------- the command
def run_lid_data(cfg: LidDataConfig) -> dict:
    """Run ``lid-data`` as configured; returns the summary written to ``lid_data.json``.
    Raises :class:`UserError` for bad inputs."""
    from .scan import _Progress, _progress_mode
    from .sources import open_source

    t_start = time.monotonic()

    def say(msg):
        if not cfg.quiet:
            print(msg, file=sys.stderr, flush=True)

    _check_args(cfg)
    pixels = cfg.features == "pixels"
    source = open_source(cfg.data, unit_size=cfg.unit_size, limit=cfg.limit, image_column=cfg.image_column,
                         key_column=cfg.key_column, require_image=pixels)
    if not pixels:
        if source.kind != "table" or not source.is_parquet:
            raise UserError(f"--features {cfg.features}: a vector column needs a Parquet source, "
                            f"got a {source.kind} source {cfg.data!r}")
        if cfg.features not in source.columns:
            raise UserError(f"--features {cfg.features!r}: {cfg.data!r} has no such column; columns: "
                            f"{', '.join(source.columns)}")
    device = torch.device(cfg.device) if cfg.device else torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    manifest = {"version": __version__, "source": {"spec": cfg.data, "kind": source.kind,
                                                   "fingerprint": source.fingerprint(),
                                                   "num_samples": source.num_samples},
                "settings": _settings(cfg)}
    os.makedirs(cfg.out, exist_ok=True)
    old = read_manifest(cfg.out, name=MANIFEST)
    if old is not None:
        diff = settings_diff({"source": {k: old["source"].get(k) for k in ("kind", "fingerprint")},
                              **old["settings"]},
                             {"source": {k: manifest["source"][k] for k in ("kind", "fingerprint")},
                              **manifest["settings"]})
        if diff:
            raise UserError(f"{cfg.out} holds lid-data results with other settings ({diff}); "
                            "use another --out or remove it")
        if old.get("done") and os.path.isfile(os.path.join(cfg.out, RESULT)):
            say(f"{os.path.join(cfg.out, RESULT)} is complete; nothing to do")
            return old
    write_json_atomic(manifest, os.path.join(cfg.out, MANIFEST))

    mode = _progress_mode(cfg.progress, cfg.quiet)
    seconds = {}
    say(f"lid-data: {source.describe()}; features {cfg.features}"
        + (f" at {cfg.image_size} x {cfg.image_size}" if pixels and cfg.image_size else "")
        + f"; local PCA rule {cfg.rule}, k = {cfg.k}; {cfg.index} kNN")
    t = time.monotonic()
    if not os.path.isfile(os.path.join(cfg.out, "samples.parquet")):
        progress = _Progress(source.num_samples, mode, cfg.log_every, what="features", unit="sample")
        try:
            _features_phase(cfg, source, progress, say)
        finally:
            progress.close()
    seconds["features"] = round(time.monotonic() - t, 3)

    import pyarrow as pa
    import pyarrow.parquet as pq

    samples = pq.read_table(os.path.join(cfg.out, "samples.parquet"))
    feats = np.load(os.path.join(cfg.out, "features.npy"), mmap_mode="c")
    x = torch.from_numpy(feats)
    if device.type == "cuda":
        x = x.to(device)
    say(f"features: {x.shape[0]} samples x {x.shape[1]}"
        + (f" ({samples.num_rows - x.shape[0]} without: see the error column)" if samples.num_rows > x.shape[0]
           else ""))
    t = time.monotonic()
    threads = torch.get_num_threads()
    progress = _Progress(x.shape[0], mode, cfg.log_every, what="neighbours", unit="sample")
    try:
        report, n_chunks = _neighbour_phase(cfg, x.cpu() if cfg.index != "exact" else x, progress, say)
    finally:
        progress.close()
        torch.set_num_threads(threads)
    seconds["neighbours"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    lid, n_copies, tau = _lids(cfg, n_chunks)
    seconds["lid"] = round(time.monotonic() - t, 3)

    row = samples.column("row").to_numpy()
    has = row >= 0
    lid_col = np.zeros(len(row), dtype=lid.dtype)
    lid_col[has] = lid[row[has]]
    cop = np.zeros(len(row), dtype=np.int64)
    cop[has] = n_copies[row[has]]
    report.setdefault("recall_sample", None)
    summary = {**manifest, "done": True, "index": report, "features_shape": list(x.shape),
               "paper_tau": tau, "rows": samples.num_rows, "errors": int((~has).sum()),
               "seconds": {**seconds, "total": round(time.monotonic() - t_start, 3)}}
    dtype = pa.float64() if lid.dtype.kind == "f" else pa.int64()
    table = pa.table({"key": samples.column("key"), "source": samples.column("source"),
                      "lid_data": pa.array(lid_col, dtype, mask=~has), "n_copies": pa.array(cop, pa.int64(), mask=~has),
                      "error": samples.column("error")})
    table = table.replace_schema_metadata({META_KEY: json.dumps(summary).encode()})
    write_table_atomic(table, os.path.join(cfg.out, RESULT))
    write_json_atomic(summary, os.path.join(cfg.out, MANIFEST))
    if report.get("recall_at_k") is not None:
        say(f"faiss recall@{cfg.k} = {report['recall_at_k']:.4f} against the exact kNN on "
            f"{report['recall_sample']} rows ({report.get('nprobe') and 'nprobe ' + str(report['nprobe']) or 'efSearch ' + str(report.get('efSearch'))})")
    say(f"results: {os.path.join(cfg.out, RESULT)} ({samples.num_rows} rows, {summary['errors']} with errors); "
        f"LID_* median {float(np.median(lid)):.4g}, {int((n_copies > 0).sum())} samples with exact copies")
    return summary
