"""Retrieval-based memorization metrics: nearest training neighbours of
generated images, Carlini et al.'s calibrated l2 distance, eidetic counts.

Definitions (SolidMark paper, Sec. 3 and App. A.1):

- For a distance l between a generation (or an inpainting) and the training
  data, an (l, delta)-eidetic metric counts the distances l <= delta; a
  training image x is (l, delta)-eidetically memorized when the model returns
  a generation x_hat with l(x_hat, x) <= delta (:func:`eidetic_count`,
  :func:`eidetic_rate`).
- Calibrated l2 (Carlini et al. 2023; SolidMark App. A.1): with S the n
  nearest training images of x_hat (nearest included) and d_1 the distance
  to the nearest,

      l2_bar(x_hat) = d_1 / (alpha * mean_{y in S} l2(x_hat, y)),

  n = 50, alpha = 0.5 by default. Small values flag a generation much closer
  to one training image than to its other neighbours (memorization); it is
  defined as 0 when d_1 = 0 (an exact copy), even if all n neighbours are at 0.
- Tiled variant (Carlini et al.'s distance for large images): the images are
  cut into non-overlapping th x tw tiles and the distance between two images
  is the largest tile distance, max_T l2(x_hat_T, x_T); the calibration then
  uses the n nearest images under that distance.
- Percentile score (Somepalli et al. 2023): one percentile of all scores, e.g.
  the 95th of SSCD similarities, which the SolidMark paper shows can miss
  reductions in the tail (its Fig. 2) (:func:`percentile_score`).

Inputs are numpy arrays or torch tensors (CPU or CUDA) of images [M, ...],
flattened to vectors; results come back as the kind ``generated`` came in.
A training set that does not fit in memory is given as a memory-mapped array
(read in chunks) or as an iterable of batches; the per-chunk top-n lists are
merged exactly, ties broken by the lower training index.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .ops import knn
from .ops.knn import candidate_screen, check_precision
from .ops._arrays import as_tensor

__all__ = [
    "nearest_neighbors",
    "calibrated_l2",
    "load_torchscript_embedder",
    "TorchScriptEmbedder",
    "eidetic_count",
    "eidetic_rate",
    "percentile_score",
]

#: bytes of training data converted per chunk when reading arrays (memmaps)
_CHUNK_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------
# eidetic counts and percentiles
# ---------------------------------------------------------------------------

def _scores(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        a = np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers (numpy, torch or a sequence), got {type(x).__name__}") from None
    if a.size and not np.isfinite(a).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} NaN or inf value(s)")
    return a


def _deltas(delta) -> np.ndarray:
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim > 1 or not np.isfinite(d).all():
        raise ValueError(f"delta must be a finite number or a 1-D sequence of them, got {delta!r}")
    return d


def eidetic_count(distances, delta):
    """(l, delta)-eidetic count: #{i : distances[i] <= delta}.

    Args:
        distances: [N] distances l (numpy, torch or a sequence; flattened).
        delta: a threshold, or a 1-D sequence of thresholds.

    Returns:
        an int for a scalar delta, an int64 array [len(delta)] otherwise.
    """
    a = _scores(distances, "distances")
    d = _deltas(delta)
    counts = np.searchsorted(np.sort(a), d, side="right").astype(np.int64)
    return int(counts) if d.ndim == 0 else counts


def eidetic_rate(distances, delta):
    """(l, delta)-eidetic rate: eidetic_count / N (a float, or an array for
    several deltas). Raises ValueError for an empty set."""
    a = _scores(distances, "distances")
    if a.size == 0:
        raise ValueError("distances is empty: the eidetic rate is undefined")
    c = eidetic_count(a, delta)
    return c / a.size if isinstance(c, int) else c.astype(np.float64) / a.size


def percentile_score(scores, q: float = 95) -> float:
    """The q-th percentile of ``scores`` (linear interpolation between order
    statistics, numpy's default), e.g. the 95th percentile of SSCD
    similarities of Somepalli et al. (2023)."""
    a = _scores(scores, "scores")
    if a.size == 0:
        raise ValueError("scores is empty")
    q = float(q)
    if not 0 <= q <= 100:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    return float(np.percentile(a, q))


# ---------------------------------------------------------------------------
# embedders
# ---------------------------------------------------------------------------

class TorchScriptEmbedder:
    """A TorchScript image embedder (e.g. an SSCD model) as a batch callable:
    ``embedder(images [B, C, H, W]) -> embeddings [B, E]`` (float32, on the
    model's device, no autograd). ``preprocess`` (optional) is applied to each
    batch first (resizing, ImageNet normalisation: whatever the model expects)."""

    def __init__(self, module, *, device=None, preprocess: Callable | None = None):
        self.module = module
        self.device = torch.device(device) if device is not None else None
        self.preprocess = preprocess

    def __call__(self, images) -> torch.Tensor:
        x, _ = as_tensor(images, "images")
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if self.device is not None:
            x = x.to(self.device)
        if self.preprocess is not None:
            x = self.preprocess(x)
        with torch.no_grad():
            out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the embedder returned {type(out).__name__}, expected a tensor")
        return out.reshape(out.shape[0], -1).to(torch.float32)


def load_torchscript_embedder(path, *, device=None, preprocess: Callable | None = None) -> TorchScriptEmbedder:
    """Load a TorchScript embedder (such as the SSCD copy-detection models,
    ``sscd_disc_mixup.torchscript.pt``) from a local file.

    Args:
        path: the ``.pt`` file written by ``torch.jit.save``.
        device: where to run it (default: CPU).
        preprocess: optional callable applied to each image batch first.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no TorchScript model at {path!r} (weights are not downloaded; give a local file)")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in recent torch, but SSCD ships as it
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(path, map_location=device or "cpu")
    except RuntimeError as exc:
        raise ValueError(f"{path!r} is not a TorchScript model (torch.jit.load failed: {exc})") from None
    module.eval()
    return TorchScriptEmbedder(module, device=device, preprocess=preprocess)


# ---------------------------------------------------------------------------
# training-set streaming
# ---------------------------------------------------------------------------

def _work_dtype(*dtypes) -> torch.dtype:
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


def _rows_as_tensor(x, name: str) -> torch.Tensor:
    """Any array-like batch [b, ...] -> tensor [b, ...] (no float conversion)."""
    if isinstance(x, (torch.Tensor, np.ndarray)) or type(x).__module__.split(".")[0] == "cupy":
        t, _ = as_tensor(x, name)
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be arrays or tensors, got {type(x).__name__}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real values, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must be [n, ...] with one row per image, got shape {tuple(t.shape)}")
    return t


def _train_chunks(train, chunk_rows: int | None, value_bytes: int = 4) -> Iterator[torch.Tensor]:
    """Batches of the training set as tensors [b, ...] in index order.

    Tensors are cut into row views and numpy arrays (memory-mapped or not)
    read in chunks whose working copy in the kernel (``value_bytes`` per
    value: 4 for float32, 2 when the kNN screens in bf16) is about 256 MiB
    (``chunk_rows`` rows when given), so memory stays bounded whatever N;
    other iterables are taken batch by batch."""
    if chunk_rows is not None:
        _check_positive_int(chunk_rows, "chunk_rows")

    def rows_per_chunk(shape):
        return chunk_rows or max(1, _CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * value_bytes))

    if isinstance(train, torch.Tensor) or type(train).__module__.split(".")[0] == "cupy":
        t = _rows_as_tensor(train, "train")
        step = rows_per_chunk(t.shape)
        for i in range(0, t.shape[0], step):  # views: the kernel's working copies stay bounded
            yield t[i:i + step]
        return
    if isinstance(train, np.ndarray):
        if train.ndim < 2:
            raise ValueError(f"train must be [N, ...], got shape {train.shape}")
        step = rows_per_chunk(train.shape)
        # an in-memory, writable, C-contiguous array is cut into views (copying it cost as much as
        # the search); a memory map or a read-only / strided array is read chunk by chunk into copies
        view = (not isinstance(train, np.memmap) and train.flags.writeable and train.flags.c_contiguous)
        for i in range(0, train.shape[0], step):
            rows = train[i:i + step]
            yield _rows_as_tensor(rows if view else np.array(rows), "train")
        return
    if isinstance(train, (str, bytes)) or not isinstance(train, Iterable):
        raise TypeError("train must be a tensor, a numpy array (memory-mapped for large sets) or an iterable of "
                        f"batches, got {type(train).__name__}")
    for batch in train:
        yield _rows_as_tensor(batch, "train batches")


def _flat(t: torch.Tensor, dtype, device) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).to(device=device, dtype=dtype)


def _embed_batches(embed, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [embed(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    outs = [o if isinstance(o, torch.Tensor) else torch.as_tensor(np.asarray(o)) for o in outs]
    return torch.cat([o.reshape(o.shape[0], -1) for o in outs]) if outs else torch.zeros(0, 0)


def _merge_topk(best_d, best_i, d, i, k):
    """Merge two (distance, index) lists, each sorted by (distance, index),
    where every index of the second exceeds every index of the first: a stable
    sort by distance keeps the (distance, index) order."""
    if best_d is None:
        return d[:, :k], i[:, :k]
    cd, ci = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
    order = torch.sort(cd, dim=1, stable=True).indices[:, :k]
    return cd.gather(1, order), ci.gather(1, order)


def _check_positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


# ---------------------------------------------------------------------------
# nearest neighbours
# ---------------------------------------------------------------------------

def nearest_neighbors(generated, train, k: int = 1, *, embed: Callable | None = None, metric: str = "l2",
                      batch_size: int | None = None, chunk_rows: int | None = None, precision: str = "auto"):
    """The k nearest training images of each generated image.

    Args:
        generated: [M, ...] images or vectors (numpy / torch / cupy), flattened.
        train: [N, ...] in memory, a memory-mapped numpy array, or an iterable
            of batches [b_i, ...] (streamed; indices count across batches).
        k: neighbours per generated image (1 <= k <= N).
        embed: optional batch callable images -> embeddings [b, E] applied to
            both sides before the search (e.g. :func:`load_torchscript_embedder`).
        metric: "l2" (Euclidean distance) or "cosine" (1 - cosine similarity
            of the vectors / embeddings, in [0, 2]; SSCD similarity = 1 - it).
        batch_size: images per ``embed`` call and queries per native call.
        chunk_rows: training rows read per chunk from numpy arrays.
        precision: the candidate screen of :func:`mmh_fast.ops.knn`
            ("auto", "full", "bf16" or "float32"); results are exact in every mode.

    Returns:
        (distances [M, k], indices [M, k] int64), each row ascending by
        (distance, index), as the array kind of ``generated``. Exact (the
        native brute-force kNN re-ranks its candidates by exact distances).
    """
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    k = _check_positive_int(k, "k")
    g, back = as_tensor(generated, "generated")
    d, i = _stream_knn(g, train, k, embed=embed, cosine=metric == "cosine", batch_size=batch_size,
                       chunk_rows=chunk_rows, what=f"k={k}", precision=precision)
    if metric == "cosine":
        d = d * d / 2  # |a - b|^2 / 2 = 1 - cos for unit vectors
    return back(d), back(i)


def _stream_knn(g: torch.Tensor, train, k: int, *, embed=None, cosine=False, batch_size=None, chunk_rows=None,
                what: str, precision: str = "auto"):
    """Exact k nearest rows of the training stream for the queries g [M, ...]:
    the native kNN per chunk, per-chunk lists merged by (distance, index)."""
    if g.dim() < 2 or g.shape[0] == 0:
        raise ValueError(f"generated must be [M, ...] with M >= 1, got shape {tuple(g.shape)}")
    bs = _check_positive_int(batch_size, "batch_size") if batch_size is not None else 256
    if embed is not None:
        g = _embed_batches(embed, g, bs)
    elif not g.is_floating_point():
        g = g.to(torch.float32)
    best_d = best_i = q = dtype = None
    offset = 0
    width = int(np.prod(g.shape[1:])) if embed is None else 0
    screen = candidate_screen(precision, torch.float64 if g.dtype == torch.float64 else torch.float32,
                              g.device, width)
    for chunk in _train_chunks(train, chunk_rows, value_bytes=2 if screen == "bf16" else 4):
        if embed is not None:
            chunk = _embed_batches(embed, chunk, bs)
        if dtype is None:
            dtype = _work_dtype(g.dtype, chunk.dtype)
            q = g.reshape(g.shape[0], -1).to(dtype)
            if cosine:
                q = torch.nn.functional.normalize(q, dim=1)
        x = _flat(chunk, dtype, g.device)
        if x.shape[1] != q.shape[1]:
            raise ValueError(f"train rows have {x.shape[1]} values, generated rows {q.shape[1]}")
        if x.shape[0] == 0:
            continue
        if cosine:
            x = torch.nn.functional.normalize(x, dim=1)
        d, i = knn(x, q, min(k, x.shape[0]), batch_size=batch_size, progress=False, precision=precision)
        best_d, best_i = _merge_topk(best_d, best_i, d, i + offset, k)
        offset += x.shape[0]
    if offset < k:
        raise ValueError(f"the training set has {offset} images, fewer than {what} neighbours")
    return best_d, best_i


# ---------------------------------------------------------------------------
# calibrated l2
# ---------------------------------------------------------------------------

def _tile_view(x: torch.Tensor, tiles: tuple[int, int]) -> torch.Tensor:
    """[b, ..., H, W] -> [b, T, tile_values] for non-overlapping th x tw tiles
    (channels and any leading image dims belong to every tile)."""
    th, tw = tiles
    if x.dim() < 3:
        raise ValueError(f"tiled calibrated l2 needs images [M, ..., H, W], got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % th or W % tw:
        raise ValueError(f"tiles={tiles} must divide the image size {H} x {W}")
    b = x.shape[0]
    c = int(math.prod(x.shape[1:-2]))
    t = x.reshape(b, c, H // th, th, W // tw, tw).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b, (H // th) * (W // tw), c * th * tw)


def _tiled_dist2(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """max over tiles of the squared tile distances, [m, T, v] x [c, T, v] -> [m, c],
    by one GEMM per tile (|q|^2 + |x|^2 - 2 q.x, clamped at 0)."""
    qn, xn = (q * q).sum(-1), (x * x).sum(-1)  # [m, T], [c, T]
    out = None
    for t in range(q.shape[1]):
        d2 = torch.addmm(qn[:, t:t + 1] + xn[None, :, t], q[:, t], x[:, t].T, alpha=-2).clamp_min_(0)
        out = d2 if out is None else torch.maximum(out, d2)
    return out


def _tiled_exact(q: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Exact tiled distances of queries q [m, T, v] to the candidates x[idx]
    [m, c]: squared differences summed per tile in float64, max, sqrt.
    Evaluated in row blocks of at most ~2^23 differences."""
    c, D = idx.shape[1], q.shape[1] * q.shape[2]
    step = max(1, (1 << 23) // max(1, c * D))
    out = []
    for r in range(0, q.shape[0], step):
        diff = q[r:r + step, None].to(torch.float64) - x[idx[r:r + step]].to(torch.float64)  # [m, c, T, v]
        out.append((diff * diff).sum(-1).amax(-1).sqrt())
    return torch.cat(out)


#: training rows per GEMM tile of the tiled distance (bounds the [block, tile] matrices)
_TILED_ROWS = 4096


def _tiled_topk(q: torch.Tensor, chunks, n: int, extra: int, block: int):
    """Top-(n + extra) candidates per [query block, training tile] under the
    tiled distance from GEMMs, exact re-ranking of the candidates, exact merge
    across tiles (ties broken by the lower index). Memory: a few
    [block, _TILED_ROWS] matrices."""
    best_d = best_i = None
    offset = 0
    for chunk in chunks:
        for s0 in range(0, chunk.shape[0], _TILED_ROWS):
            x = chunk[s0:s0 + _TILED_ROWS]
            c = x.shape[0]
            kk = min(n + extra, c)
            ds, ids = [], []
            for r in range(0, q.shape[0], block):
                qb = q[r:r + block]
                cand = torch.topk(_tiled_dist2(qb, x), kk, dim=1, largest=False).indices
                cand = torch.sort(cand, dim=1).values  # index order: the stable sort below breaks ties by index
                exact = _tiled_exact(qb, x, cand)
                order = torch.sort(exact, dim=1, stable=True).indices[:, :min(n, c)]
                ds.append(exact.gather(1, order))
                ids.append(cand.gather(1, order))
            best_d, best_i = _merge_topk(best_d, best_i, torch.cat(ds), torch.cat(ids) + offset, n)
            offset += c
    return best_d, best_i, offset


def calibrated_l2(generated, train, *, n: int = 50, alpha: float = 0.5, tiles: tuple[int, int] | None = None,
                  batch_size: int | None = None, chunk_rows: int | None = None, return_indices: bool = False,
                  precision: str = "auto"):
    """Carlini et al.'s calibrated l2 distance of each generated image to the
    training set (SolidMark App. A.1):

        l2_bar(x_hat) = d_1 / (alpha * mean of the n nearest distances, d_1 included)

    (0 when d_1 = 0). With ``tiles=(th, tw)`` the distance between two images
    is the largest l2 distance over their non-overlapping th x tw tiles and the
    n nearest neighbours are taken under that distance (Carlini et al.'s
    tiled distance; the image height and width must be multiples of th, tw).

    Args:
        generated: [M, ...] images (numpy / torch, CPU or CUDA); flattened
            ([M, ..., H, W] for tiles).
        train: [N, ...] in memory, a memory-mapped numpy array, or an iterable
            of batches (streamed; the per-chunk n nearest are merged exactly).
        n: neighbours in the calibration set (N >= n required).
        alpha: the scale factor (0.5 in Carlini et al.).
        tiles: (th, tw) tile size, or None for whole-image distances.
        batch_size: queries per native call (tiled: per GEMM block, default 1024).
        chunk_rows: training rows read per chunk from numpy arrays.
        return_indices: also return the index of each nearest training image.
        precision: the candidate screen of :func:`mmh_fast.ops.knn` ("auto",
            "full", "bf16" or "float32"; whole-image distances only). "auto" screens
            with a bf16 GEMM on CPUs that have bf16 instructions, which is
            what makes the CPU search ~3x faster than scikit-learn's; rows the
            bf16 screen cannot certify are searched again in float32, so the
            scores are the same in every mode.

    Returns:
        scores [M] float64 (and indices [M] int64), as the kind of ``generated``.
        Computation is in float32 unless an input is float64; the returned
        distances are exact (candidates re-ranked by exact distances).
    """
    n = _check_positive_int(n, "n")
    check_precision(precision)  # the tiled variant does not search with knn, but a typo is still an error
    alpha = float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    if tiles is not None:
        try:
            th, tw = (int(v) for v in tiles)
        except (TypeError, ValueError):
            raise TypeError(f"tiles must be a pair (th, tw) of positive integers, got {tiles!r}") from None
        if th < 1 or tw < 1:
            raise ValueError(f"tiles must be positive, got {tiles!r}")
        tiles = (th, tw)
    g, back = as_tensor(generated, "generated")
    if g.dim() < 2 or g.shape[0] == 0:
        raise ValueError(f"generated must be [M, ...] with M >= 1, got shape {tuple(g.shape)}")
    if not g.is_floating_point():
        g = g.to(torch.float32)
    dev = g.device
    if tiles is None:
        d, i = _stream_knn(g, train, n, batch_size=batch_size, chunk_rows=chunk_rows,
                           what=f"n={n} (the calibration set)", precision=precision)
    else:
        dtype = g.dtype if g.dtype in (torch.float32, torch.float64) else torch.float32
        q = _tile_view(g.to(dtype), tiles)

        def chunks():
            for ch in _train_chunks(train, chunk_rows):
                if ch.shape[1:] != g.shape[1:]:
                    raise ValueError(f"train images have shape {tuple(ch.shape[1:])}, generated {tuple(g.shape[1:])}")
                yield _tile_view(ch.to(device=dev, dtype=torch.float64 if ch.dtype == torch.float64 else dtype), tiles)

        block = _check_positive_int(batch_size, "batch_size") if batch_size is not None else 1024
        d, i, total = _tiled_topk(q, chunks(), n, 8, block)
        if total < n:
            raise ValueError(f"the training set has {total} images, fewer than n={n} neighbours "
                             "(the calibration set)")
    d = d.to(torch.float64)
    d1, mean = d[:, 0], d.mean(1)
    score = torch.where(d1 == 0, torch.zeros_like(d1), d1 / (alpha * mean.clamp_min(torch.finfo(d.dtype).tiny)))
    if return_indices:
        return back(score), back(i[:, 0].contiguous())
    return back(score)
