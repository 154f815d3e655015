"""SolidMark: keyed-border training data and inpainting evaluation of
pixel-level memorization (SolidMark paper, Sec. 4-5).

Every training image x gets a solid grayscale border of width ``thickness``
whose value is a per-image key k_x ~ U(0, 1) (the same value in every channel).
A model trained on the keyed images is then asked to inpaint the border of a
training image from its interior; the distance

    l_SM(x) = | k_x - mean(inpainted border of x) |           (paper, Sec. 4)

in key units ([0, 1]) measures whether the model has memorized that image:
the key is unrelated to the image content, so only a model that memorized
the image (interior -> key) can recall it. A training image is
(l_SM, delta)-eidetically memorized when l_SM <= delta
(:mod:`mmh_fast.retrieval` holds the definitions).

One pixel range end to end: keys live in [0, 1]; a key is written into images
whose pixels span ``value_range = (lo, hi)`` as lo + k (hi - lo), and read
back from inpainted pixels with the inverse map. (The public SolidMark code
inserted keys in [-1, 1] and compared them with generations in [0, 1]; here
both directions go through the same ``value_range``.)

Layout: images are channel-first, [..., H, W] (the last two dimensions are
height and width). A single image goes with a scalar key; a batch [B, ...]
with B keys.

Mask convention: :meth:`SolidMark.border_mask` is True on the border, the
region SolidMark asks the model to inpaint. diffusers' ``RePaintPipeline``
uses the opposite convention (1 = keep, 0 = inpaint): its mask image is
``~border_mask``. The RePaint-style loop in :func:`evaluate` uses ``keep =
~border_mask`` internally.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ._hashing import id_bytes, keyed_uniform, sample_seed
from .models.denoiser import Denoiser, model_device
from .models.pipelines import (decode_latents, encode_images, encode_prompts, is_latent_pipeline, is_pipeline,
                               resolve_model)
from .models.schedules import DiscreteSchedule, Schedule, make_schedule
from .retrieval import eidetic_count

__all__ = [
    "SolidMark",
    "SolidMarkDataset",
    "SolidMarkResult",
    "KeyTable",
    "evaluate",
    "save_keys",
    "load_keys",
    "chance_rate",
    "content_id",
    "DEFAULT_DELTAS",
]

#: the eidetic thresholds reported by :func:`evaluate` (key units)
DEFAULT_DELTAS = (0.1, 0.05, 0.01, 0.005, 0.001)

_KEY_PERSON = b"solidmark-key-v1"


# ---------------------------------------------------------------------------
# keys and borders
# ---------------------------------------------------------------------------

def _as_tensor(x, name: str):
    """(tensor, back) for torch tensors and numpy arrays; back restores the kind."""
    if isinstance(x, torch.Tensor):
        return x, (lambda t: t)
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{name} must be a numeric array, got dtype=object")
        return torch.from_numpy(np.ascontiguousarray(x)), (lambda t: t.numpy())
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_keys(keys, name: str = "keys") -> np.ndarray:
    if isinstance(keys, torch.Tensor):
        keys = keys.detach().cpu().numpy()
    try:
        k = np.asarray(keys, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be numbers in [0, 1], got {type(keys).__name__}") from None
    if k.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D sequence, got shape {k.shape}")
    if k.size and (not np.isfinite(k).all() or (k < 0).any() or (k > 1).any()):
        bad = k[~(np.isfinite(k) & (k >= 0) & (k <= 1))]
        raise ValueError(f"{name} must lie in [0, 1] (SolidMark keys are U(0, 1)); got e.g. {bad.ravel()[0]!r}")
    return k


class SolidMark:
    """Keys and borders of SolidMark.

    Args:
        thickness: border width in pixels (the paper: 4 on 32 x 32 CIFAR-10,
            16 on 512 x 512 Stable Diffusion images).
        seed: integer seed of the keys; ``key(id)`` depends on (seed, id) only.
        value_range: (lo, hi), the pixel range of the images the borders go
            into (and of the model's output): (0, 1) for ``ToTensor()`` images,
            (-1, 1) for diffusers-normalised ones, (0, 255) for uint8 arrays.
        check_range: reject images with pixels outside ``value_range`` (the
            sign of a range mismatch between training and evaluation).
    """

    def __init__(self, thickness: int = 4, seed: int = 0, value_range: tuple[float, float] = (0.0, 1.0), *,
                 check_range: bool = True):
        if isinstance(thickness, bool) or not isinstance(thickness, (int, np.integer)) or thickness < 1:
            raise ValueError(f"thickness must be a positive integer (pixels), got {thickness!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise TypeError(f"value_range must be a pair (lo, hi), got {value_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"value_range must be finite with lo < hi, got {value_range!r}")
        self.thickness, self.seed = int(thickness), int(seed)
        self.value_range = (lo, hi)
        self.check_range = bool(check_range)

    def __repr__(self):
        return f"SolidMark(thickness={self.thickness}, seed={self.seed}, value_range={self.value_range})"

    # -- keys ---------------------------------------------------------------
    def key(self, sample_id) -> float:
        """The key of one sample: U(0, 1) from a BLAKE2b hash of the id keyed
        by the seed (deterministic across processes, runs and platforms).
        Ids are integers, strings or bytes (``5`` and ``"5"`` differ)."""
        return keyed_uniform(self.seed, sample_id, _KEY_PERSON)

    def keys(self, ids) -> np.ndarray:
        """Keys [N] float64 of a sequence of ids (or of range(ids) for an int)."""
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
            ids = range(int(ids))
        return np.fromiter((self.key(i) for i in ids), dtype=np.float64)

    def key_to_pixel(self, keys):
        """lo + k (hi - lo): the pixel value of a key in ``value_range``."""
        lo, hi = self.value_range
        return lo + keys * (hi - lo)

    def pixel_to_key(self, values):
        """Inverse of :meth:`key_to_pixel` (no clipping)."""
        lo, hi = self.value_range
        return (values - lo) / (hi - lo)

    # -- borders ------------------------------------------------------------
    def _check_values(self, x: torch.Tensor, name: str) -> None:
        if not self.check_range or x.numel() == 0 or x.dtype == torch.bool:
            return
        lo, hi = self.value_range
        tol = 1e-6 * (hi - lo)
        xmin, xmax = float(x.min()), float(x.max())
        if not (math.isfinite(xmin) and math.isfinite(xmax)):
            raise ValueError(f"{name} contain NaN or inf")
        if xmin < lo - tol or xmax > hi + tol:
            raise ValueError(
                f"{name} have pixels in [{xmin:.4g}, {xmax:.4g}], outside value_range={self.value_range}: "
                "the border key would be written in a different range than the images (pass the "
                "images' own range as value_range, or check_range=False)")

    def augment(self, images, keys):
        """Pad a solid border of width ``thickness`` holding each image's key.

        Args:
            images: one image [..., H, W] with a scalar key, or a batch
                [B, ..., H, W] with B keys (torch or numpy, any real dtype;
                integer dtypes get the rounded key value, which quantises the
                key to 1 / (hi - lo), e.g. 1/255 for uint8 images).
            keys: a number or [B] numbers in [0, 1].

        Returns:
            [..., H + 2t, W + 2t] of the input's kind and dtype; the border
            pixels equal ``key_to_pixel(key)`` in every channel, the interior
            is the input unchanged (``crop(augment(x, k)) == x`` exactly).
        """
        x, back = _as_tensor(images, "images")
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"images must hold real pixel values, got dtype {x.dtype}")
        k = _check_keys(keys)
        if x.dim() < 2:
            raise ValueError(f"images must be [..., H, W], got shape {tuple(x.shape)}")
        if k.ndim == 1:
            if x.dim() < 3 or x.shape[0] != k.shape[0]:
                raise ValueError(f"got {k.shape[0]} keys for images of shape {tuple(x.shape)}: a batch "
                                 "[B, ..., H, W] needs B keys (a single image takes a scalar key)")
        H, W = x.shape[-2:]
        if H < 1 or W < 1:
            raise ValueError(f"images must have H, W >= 1, got shape {tuple(x.shape)}")
        self._check_values(x, "images")
        t = self.thickness
        vals = torch.as_tensor(self.key_to_pixel(k), dtype=torch.float64)
        if not x.is_floating_point():
            info = torch.iinfo(x.dtype)
            vals = vals.round().clamp(info.min, info.max)
        vals = vals.to(x.dtype).to(x.device)
        if k.ndim == 1:
            vals = vals.reshape(-1, *([1] * (x.dim() - 1)))
        out = vals.expand(*x.shape[:-2], H + 2 * t, W + 2 * t).clone()
        out[..., t:t + H, t:t + W] = x
        return back(out)

    def _check_augmented(self, shape, name: str) -> tuple[int, int]:
        if len(shape) < 2:
            raise ValueError(f"{name} must be [..., H, W], got shape {tuple(shape)}")
        H, W = int(shape[-2]), int(shape[-1])
        t = self.thickness
        if H <= 2 * t or W <= 2 * t:
            raise ValueError(f"{name} of size {H} x {W} are too small for a border of thickness {t}: "
                             f"augmented images need H, W > {2 * t} (at least one interior pixel)")
        return H, W

    def border_mask(self, shape) -> torch.Tensor:
        """Boolean mask of the given augmented shape [..., H, W]: True on the
        border (the pixels to inpaint), False on the interior. The keep-mask
        of diffusers' RePaintPipeline (1 = keep) is its complement."""
        shape = tuple(int(s) for s in (shape.shape if hasattr(shape, "shape") else shape))
        H, W = self._check_augmented(shape, "images")
        t = self.thickness
        m = torch.ones(H, W, dtype=torch.bool)
        m[t:H - t, t:W - t] = False
        return m.expand(shape).clone()

    def crop(self, images):
        """Remove the border: [..., H, W] -> [..., H - 2t, W - 2t] (a view)."""
        x, back = _as_tensor(images, "images")
        H, W = self._check_augmented(x.shape, "images")
        t = self.thickness
        return back(x[..., t:H - t, t:W - t])

    def border_values(self, images) -> torch.Tensor:
        """Mean border pixel of each augmented image in key units:
        [B, ..., H, W] -> [B] float64 (a single [..., H, W] image -> 0-d)."""
        x, _ = _as_tensor(images, "images")
        mask = self.border_mask(x.shape[-2:])
        vals = x.to(torch.float64)[..., mask]  # [..., n_border]
        if x.dim() >= 3:
            mean = vals.reshape(x.shape[0], -1).mean(1)
        else:
            mean = vals.mean()
        return self.pixel_to_key(mean)

    def evaluate(self, model, images, keys, **kwargs) -> "SolidMarkResult":
        """:func:`evaluate` with this SolidMark's thickness and value range."""
        return evaluate(model, images, keys, solidmark=self, **kwargs)


# ---------------------------------------------------------------------------
# dataset wrapper and key files
# ---------------------------------------------------------------------------

def content_id(image) -> str:
    """A sample id from the image content (BLAKE2b of dtype, shape and raw
    bytes; PIL images by mode, size and bytes): use ``id_fn="content"`` for
    keys that follow the image whatever its position or file name. Exact
    duplicates then share a key."""
    import hashlib

    h = hashlib.blake2b(digest_size=16, person=b"solidmark-cid")
    if _is_pil(image):
        h.update(f"PIL:{image.mode}:{image.size}".encode())
        h.update(image.tobytes())
    else:
        x, _ = _as_tensor(image, "image")
        arr = np.ascontiguousarray(x.detach().cpu().numpy())
        h.update(f"{arr.dtype.str}:{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _is_pil(x) -> bool:
    return type(x).__module__.split(".")[0] == "PIL" and hasattr(x, "getbands")


_IMAGE_FIELDS = ("pixel_values", "image", "img", "images")


@dataclass
class KeyTable:
    """Keys of a keyed training set: one row per sample.

    Attributes:
        index: [N] int64 positions in the dataset.
        ids: N sample ids (ints, strings or bytes).
        keys: [N] float64 keys in [0, 1].
        thickness, seed, value_range: the SolidMark that produced them.
    """

    index: np.ndarray
    ids: list
    keys: np.ndarray
    thickness: int
    seed: int
    value_range: tuple[float, float]

    def solidmark(self) -> SolidMark:
        return SolidMark(self.thickness, self.seed, self.value_range)

    def __len__(self):
        return len(self.ids)


def save_keys(path, ids: Sequence, keys, solidmark: SolidMark, *, index=None) -> None:
    """Write a key table: Parquet (``.parquet`` / ``.pq``, via pyarrow, the
    SolidMark parameters in the schema metadata) or JSON (``.json``).
    Columns: index (int64), id, key (float64). Parquet needs ids of one kind."""
    ids = list(ids)
    k = _check_keys(keys).reshape(-1)
    if len(ids) != k.shape[0]:
        raise ValueError(f"got {len(ids)} ids and {k.shape[0]} keys")
    idx = np.arange(len(ids), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)
    if idx.shape != k.shape:
        raise ValueError(f"index must have one entry per key, got shape {idx.shape}")
    ids = [int(i) if not isinstance(i, (str, bytes, bytearray)) else i for i in ids]
    meta = {"format": "mmh_fast.solidmark.keys", "version": 1, "thickness": solidmark.thickness,
            "seed": solidmark.seed, "value_range": list(solidmark.value_range)}
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        kinds = {type(i) for i in ids}
        if len(kinds) > 1:
            raise ValueError(f"Parquet key files need ids of one kind, got {sorted(t.__name__ for t in kinds)}")
        table = pa.table({"index": pa.array(idx, pa.int64()), "id": pa.array(ids), "key": pa.array(k, pa.float64())})
        table = table.replace_schema_metadata({b"solidmark": json.dumps(meta).encode()})
        pq.write_table(table, path)
    elif ext == ".json":
        if any(isinstance(i, (bytes, bytearray)) for i in ids):
            raise ValueError("JSON key files cannot hold bytes ids; use Parquet")
        # json writes floats with repr(), so keys round-trip exactly
        with open(path, "w", encoding="utf-8") as f:
            json.dump({**meta, "index": idx.tolist(), "id": ids, "key": k.tolist()}, f)
    else:
        raise ValueError(f"path must end in .parquet, .pq or .json, got {path!r}")


def load_keys(path) -> KeyTable:
    """Read a key table written by :func:`save_keys` (Parquet or JSON)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(b"solidmark")
        if raw is None:
            raise ValueError(f"{path} is not a SolidMark key file (no 'solidmark' schema metadata)")
        meta = json.loads(raw)
        index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
        ids = table.column("id").to_pylist()
        keys = np.asarray(table.column("key").to_numpy(), dtype=np.float64)
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format") != "mmh_fast.solidmark.keys":
            raise ValueError(f"{path} is not a SolidMark key file")
        index = np.asarray(meta["index"], dtype=np.int64)
        ids = list(meta["id"])
        keys = np.asarray(meta["key"], dtype=np.float64)
    else:
        raise ValueError(f"path must end in .parquet, .pq or .json, got {path!r}")
    return KeyTable(index, ids, keys, int(meta["thickness"]), int(meta["seed"]), tuple(meta["value_range"]))


class SolidMarkDataset(torch.utils.data.Dataset):
    """A map-style dataset whose images carry their SolidMark border.

    Wraps any torch ``Dataset`` (or anything with ``__len__`` and
    ``__getitem__``: a list of images, of (image, caption) pairs, a Hugging
    Face ``datasets.Dataset`` of dicts). ``dataset[i]`` may be an image, a
    tuple/list whose first entry is the image (the rest passes through), or a
    dict whose image field is ``image_key`` (default: the first of
    "pixel_values", "image", "img", "images" present).

    Images are tensors / arrays [C, H, W] in ``solidmark.value_range`` (apply
    the border after normalisation, with that range) or PIL images (8-bit
    modes L, RGB, RGBA: the key becomes round(255 k), a quantisation of up to
    1/510 in key units, so deltas below ~0.002 cannot be resolved for 8-bit
    training data).

    Args:
        dataset: the training set.
        solidmark: the :class:`SolidMark` (thickness, seed, value range).
        id_fn: the sample id of item ``i``, called as ``id_fn(i, item)``;
            default: the index ``i`` (keys then follow positions: reordering
            the dataset moves them); ``"content"``: :func:`content_id` of the
            image (keys follow the pixels).
        ids: explicit ids, one per item (overrides ``id_fn``; no item is
            loaded to compute keys).
        image_key: field of dict items holding the image.
    """

    def __init__(self, dataset, solidmark: SolidMark, id_fn: Callable | str | None = None, *,
                 ids: Sequence | None = None, image_key: str | None = None):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"dataset must support len() and indexing (a map-style Dataset or a sequence), "
                            f"got {type(dataset).__name__}")
        if not isinstance(solidmark, SolidMark):
            raise TypeError(f"solidmark must be a SolidMark, got {type(solidmark).__name__}")
        if isinstance(id_fn, str) and id_fn != "content":
            raise ValueError(f"id_fn must be a callable, None or 'content', got {id_fn!r}")
        if id_fn is not None and not isinstance(id_fn, str) and not callable(id_fn):
            raise TypeError(f"id_fn must be callable as id_fn(index, item), got {type(id_fn).__name__}")
        if ids is not None:
            ids = list(ids)
            if len(ids) != len(dataset):
                raise ValueError(f"ids must have one entry per item: {len(ids)} ids for {len(dataset)} items")
            for i in ids:
                id_bytes(i)
        self.dataset, self.solidmark, self.id_fn, self._ids = dataset, solidmark, id_fn, ids
        self.image_key = image_key
        self._warned_pil = False

    def __len__(self):
        return len(self.dataset)

    def _image_field(self, item: dict) -> str:
        if self.image_key is not None:
            if self.image_key not in item:
                raise KeyError(f"item has no field {self.image_key!r}; fields: {sorted(item)}")
            return self.image_key
        for k in _IMAGE_FIELDS:
            if k in item:
                return k
        raise KeyError(f"no image field among {_IMAGE_FIELDS} in item with fields {sorted(item)}; "
                       "pass image_key=")

    def _image_of(self, item):
        if isinstance(item, dict):
            return item[self._image_field(item)]
        if isinstance(item, (tuple, list)):
            return item[0]
        return item

    def sample_id(self, index: int, item=None):
        """The id of item ``index`` (loads the item only when ``id_fn`` needs it)."""
        if self._ids is not None:
            return self._ids[index]
        if self.id_fn is None:
            return int(index)
        if item is None:
            item = self.dataset[index]
        if self.id_fn == "content":
            return content_id(self._image_of(item))
        return self.id_fn(index, item)

    def key(self, index: int) -> float:
        return self.solidmark.key(self.sample_id(index))

    def ids(self) -> list:
        """All sample ids (one pass over the items when ``id_fn`` reads them)."""
        return [self.sample_id(i) for i in range(len(self))]

    def keys(self) -> np.ndarray:
        """All keys [N] float64, aligned with the dataset's indices."""
        return self.solidmark.keys(self.ids())

    def _augment_image(self, image, key: float):
        if _is_pil(image):
            return self._augment_pil(image, key)
        return self.solidmark.augment(image, key)

    def _augment_pil(self, image, key: float):
        from PIL import ImageOps

        v = int(round(255 * key))
        fills = {"L": v, "RGB": (v, v, v), "RGBA": (v, v, v, 255)}
        if image.mode not in fills:
            raise TypeError(f"PIL images must be of mode L, RGB or RGBA, got {image.mode!r}; convert first")
        if not self._warned_pil:
            warnings.warn("SolidMark keys in 8-bit PIL images are quantised to 1/255 (up to 1/510 in key units)",
                          stacklevel=3)
            self._warned_pil = True
        return ImageOps.expand(image, border=self.solidmark.thickness, fill=fills[image.mode])

    def __getitem__(self, index):
        if isinstance(index, slice) or not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        index = int(index)
        if index < 0:
            index += len(self)
        item = self.dataset[index]
        key = self.solidmark.key(self.sample_id(index, item))
        if isinstance(item, dict):
            out = dict(item)
            f = self._image_field(item)
            out[f] = self._augment_image(item[f], key)
            return out
        if isinstance(item, (tuple, list)):
            return type(item)([self._augment_image(item[0], key), *item[1:]]) if isinstance(item, list) else \
                (self._augment_image(item[0], key), *item[1:])
        return self._augment_image(item, key)

    def save_keys(self, path) -> None:
        """Write (index, id, key) of every item with this SolidMark's
        parameters (see :func:`save_keys`)."""
        ids = self.ids()
        save_keys(path, ids, self.solidmark.keys(ids), self.solidmark)

    def load_keys(self, path, *, verify: bool = True) -> KeyTable:
        """Read a key table and (``verify``) check that it agrees with this
        dataset: same SolidMark parameters and, for every row, the key this
        dataset gives the same index. Raises ValueError on disagreement."""
        table = load_keys(path)
        if verify:
            sm = self.solidmark
            if (table.thickness, table.seed, tuple(table.value_range)) != (sm.thickness, sm.seed, sm.value_range):
                raise ValueError(f"key file was written with thickness={table.thickness}, seed={table.seed}, "
                                 f"value_range={tuple(table.value_range)}; this dataset uses {sm!r}")
            if len(table) and (table.index.min() < 0 or table.index.max() >= len(self)):
                raise ValueError(f"key file indexes items up to {int(table.index.max())}, the dataset has {len(self)}")
            mine = np.array([self.key(int(i)) for i in table.index], dtype=np.float64)
            bad = np.flatnonzero(mine != table.keys)
            if bad.size:
                raise ValueError(f"{bad.size} key(s) disagree with this dataset, first at index "
                                 f"{int(table.index[bad[0]])}: the file's ids/order differ from the dataset's")
        return table


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------

def chance_rate(delta) -> np.ndarray | float:
    """P(|k - 0.5| <= delta) for k ~ U(0, 1): min(2 delta, 1), exactly.

    This is the eidetic rate of the constant guess 0.5, the best constant
    guess (any constant c scores |[c - delta, c + delta] & [0, 1]| <= 2 delta):
    a model that ignores the interior cannot beat it on average."""
    d = np.asarray(delta, dtype=np.float64)
    if (d < 0).any() or not np.isfinite(d).all():
        raise ValueError(f"delta must be finite and >= 0, got {delta!r}")
    out = np.minimum(2 * d, 1.0)
    return float(out) if out.ndim == 0 else out


@dataclass
class SolidMarkResult:
    """Output of :func:`evaluate`.

    Attributes:
        l_sm: [N] float64, |key - mean(inpainted border)| in key units.
        predicted_keys: [N] float64, the inpainted border mean in key units
            (not clipped to [0, 1]).
        keys: [N] float64, the true keys.
        table: one dict per delta with ``delta``, ``eidetic_count`` (#{l_SM <=
            delta}), ``eidetic_rate``, ``chance_rate`` (min(2 delta, 1), the
            constant guess 0.5), ``chance_count`` (N * chance_rate) and
            ``p_value`` (binomial P(count >= observed) under chance).
        images: the inpainted images [N, ..., H + 2t, W + 2t] when requested.
    """

    l_sm: np.ndarray
    predicted_keys: np.ndarray
    keys: np.ndarray
    table: list = field(default_factory=list)
    images: torch.Tensor | None = None

    def format_table(self) -> str:
        lines = ["delta     eidetic   rate      chance    chance_n  p_value"]
        for r in self.table:
            lines.append(f"{r['delta']:<9g} {r['eidetic_count']:<9d} {r['eidetic_rate']:<9.4f} "
                         f"{r['chance_rate']:<9.4f} {r['chance_count']:<9.2f} {r['p_value']:.3g}")
        return "\n".join(lines)

    def __str__(self):
        return f"SolidMarkResult(N={self.l_sm.size})\n" + self.format_table()


def eidetic_table(l_sm, deltas: Sequence[float] = DEFAULT_DELTAS) -> list[dict]:
    """The eidetic counts of ``l_sm`` at each delta beside the chance level of
    a constant guess (see :class:`SolidMarkResult`)."""
    from scipy.stats import binom

    l_sm = np.asarray(l_sm, dtype=np.float64)
    n = l_sm.size
    rows = []
    for d in deltas:
        c = int(eidetic_count(l_sm, float(d)))
        p = chance_rate(float(d))
        rows.append({"delta": float(d), "eidetic_count": c, "eidetic_rate": c / n if n else float("nan"),
                     "chance_rate": p, "chance_count": n * p,
                     "p_value": float(binom.sf(c - 1, n, p)) if n else float("nan")})
    return rows


def _time_levels(schedule: Schedule, n: int) -> list[float]:
    """Continuous times of the n noise levels, ascending (level 0 = least noisy).

    Discrete schedules use diffusers' "leading" spacing tau_i = i * (T // n)
    (DDPMScheduler.set_timesteps), other schedules t_i = (i + 1) / n."""
    if isinstance(schedule, DiscreteSchedule):
        T = schedule.num_train_timesteps
        if n > T:
            raise ValueError(f"num_inference_steps={n} exceeds the schedule's {T} training steps")
        step = T // n
        return [i * step / T for i in range(n)]
    return [(i + 1) / n for i in range(n)]


def _level_path(n_levels: int, jump_length: int, resample: int) -> list[int]:
    """Sequence of noise levels the RePaint loop visits, from the top level
    n_levels - 1 down to 0. With ``resample`` r > 1, at every level that is a
    multiple of ``jump_length`` j the loop goes back up j levels (one forward
    noising jump) and down again, r - 1 times, so each j-segment is traversed
    r times (RePaint's resampling schedule)."""
    top = n_levels - 1
    left = {lvl: resample - 1 for lvl in range(0, top - jump_length + 1, jump_length)} if resample > 1 else {}
    path, lvl = [top], top
    while lvl > 0:
        lvl -= 1
        path.append(lvl)
        if left.get(lvl, 0) > 0:
            left[lvl] -= 1
            lvl += jump_length
            path.append(lvl)
    return path


class _Noise:
    """Batch-invariant Gaussian noise: draw j of image i is the counter-based
    (Philox) normal of mmh_fast.ops.hutchinson_probes keyed by (seed, stream),
    sample id i and counter j, so an image's noise depends on (seed, i) only,
    never on the batch it is evaluated in, and is generated on the device."""

    def __init__(self, seed: int, rows: Sequence[int], stream: str):
        self.key = sample_seed(seed, 0, stream)
        self.ids = torch.as_tensor(list(rows), dtype=torch.int64)
        self.counter = 0

    def __call__(self, shape, device, dtype) -> torch.Tensor:
        from .ops import hutchinson_probes

        z = hutchinson_probes((len(self.ids), *shape), 1, probe="gaussian", seed=self.key, sample_ids=self.ids,
                              probe_begin=self.counter, dtype=dtype, device=device)[0]
        self.counter += 1
        return z


def _repaint(den: Denoiser, known: torch.Tensor | None, keep: torch.Tensor | None, times: list[float],
             path: list[int], noise: _Noise, model_kwargs: Callable[[int], dict], guidance_scale,
             paste: Callable | None = None, shape=None):
    """RePaint-style inpainting (Lugmayr et al. 2022) in the continuous-time view.

    Pixel mode (``paste`` None): ``known`` [B, ...] clean known pixels (values
    outside ``keep`` ignored), ``keep`` [...] bool (True = known). Each reverse
    step t -> s (s < t) samples the unknown part from the Gaussian posterior
    q(x_s | x_t, x0_hat), with a = psi_t / psi_s, v = sigma_t^2 - a^2 sigma_s^2:
        mean = a sigma_s^2 / sigma_t^2 x_t + psi_s v / sigma_t^2 x0_hat,
        var  = v sigma_s^2 / sigma_t^2,
    and the known part from the forward kernel psi_s x_known + sigma_s z
    (re-noised to the new level and pasted). Forward jumps t -> t' > t
    (resampling) draw q(x_t' | x_t) = N(a x_t, (sigma_t'^2 - a^2 sigma_t^2) I),
    a = psi_t' / psi_t. Returns x0_hat at the lowest level with the known
    pixels pasted.

    Paste mode (latent inpainting): ``paste(x0_hat) -> x0`` puts the known
    content into every x0 prediction (decode, paste pixels, re-encode), and
    the posterior step then re-noises it to the next level; ``shape`` gives
    the per-sample latent shape. Returns the raw x0_hat of the last level.
    """
    dev, dt = model_device(den.model), torch.float32
    if paste is None:
        known = known.to(device=dev, dtype=dt)
        keepf = keep.to(device=dev, dtype=dt)
        shape = known.shape[1:]
    coeff = [den.coefficients(t, dev) for t in times]
    top = path[0]
    psi, sigma, _ = coeff[top]
    x = sigma * noise(shape, dev, dt)
    if paste is None:
        x = keepf * (psi * known + sigma * noise(shape, dev, dt)) + (1 - keepf) * x

    def x0_of(x, lvl):
        psi, sigma, ts = coeff[lvl]
        eps = den.eps_at(x, psi, sigma, ts, guidance_scale=guidance_scale, **model_kwargs(lvl))
        return (x - sigma * eps.to(dt)) / psi

    for cur, nxt in zip(path[:-1], path[1:]):
        psi_t, sig_t, _ = coeff[cur]
        psi_s, sig_s, _ = coeff[nxt]
        if nxt < cur:
            x0 = x0_of(x, cur)
            if paste is not None:
                x0 = paste(x0)
            a = psi_t / psi_s
            v = max(sig_t**2 - a * a * sig_s**2, 0.0)
            mean = (a * sig_s**2 / sig_t**2) * x + (psi_s * v / sig_t**2) * x0
            x_new = mean + math.sqrt(v * sig_s**2 / sig_t**2) * noise(shape, dev, dt)
            if paste is None:
                x_known = psi_s * known + sig_s * noise(shape, dev, dt)
                x_new = keepf * x_known + (1 - keepf) * x_new
            x = x_new
        else:
            a = psi_s / psi_t
            x = a * x + math.sqrt(max(sig_s**2 - a * a * sig_t**2, 0.0)) * noise(shape, dev, dt)
    x0 = x0_of(x, path[-1])
    if paste is None:
        x0 = keepf * known + (1 - keepf) * x0
    return x0


def evaluate(model, images, keys, *, solidmark: SolidMark | None = None, scheduler=None, prompts=None,
             num_inference_steps: int = 50, seed: int = 0, batch_size: int | None = None,
             augmented: bool = False, resample: int = 1, jump_length: int = 1,
             guidance_scale: float | None = None, model_kwargs: dict | None = None,
             uncond_kwargs: dict | None = None, embedding_key: str = "encoder_hidden_states",
             embedding_transform: Callable | None = None, prompt_transform: Callable | None = None,
             negative_prompt: str = "", deltas: Sequence[float] = DEFAULT_DELTAS, return_images: bool = False,
             progress: bool = False) -> SolidMarkResult:
    """Inpaint the SolidMark border of training images and score the keys.

    For each image x with key k: build the augmented canvas (interior = x,
    border unknown), inpaint the border from the interior, and return
    l_SM = |k - mean(inpainted border)| in key units (SolidMark Sec. 4),
    with the (l_SM, delta)-eidetic counts at ``deltas`` beside the chance
    level of a constant guess (:func:`chance_rate`: exactly 2 delta).

    Models:
      * a pixel network with the diffusers signature ``model(x_t, timestep,
        **kwargs)`` (a ``UNet2DModel``, a closed-form model of
        :mod:`mmh_fast.testing`), or a pipeline with ``.unet`` and
        ``.scheduler`` (``DDPMPipeline``): RePaint-style inpainting over
        mmh_fast's :class:`Schedule` / :class:`Denoiser` (known interior
        re-noised to the current level and pasted every step; resampling
        jumps with ``resample`` r > 1 and ``jump_length``). The network's
        pixel range must be ``solidmark.value_range``.
      * a ``StableDiffusionPipeline``: latent inpainting with the caption as
        prompt: at every step the x0 prediction is decoded by the VAE, the
        known interior pasted in pixel space, re-encoded, and the ancestral
        step taken from that latent (the pasted interior re-noised to the next
        level). Pixels are mapped between ``value_range`` and the VAE's
        [-1, 1] on the way in and out. A latent pipeline without a text
        encoder is inpainted unconditionally (no prompts).

    Mitigations (Somepalli et al.'s GNI, RT, CWR, RNA) live in
    :mod:`mmh_fast.mitigations` as seeded transforms, so the text module and
    user pipeline calls reuse them; pass them as ``embedding_transform`` /
    ``prompt_transform``.

    Args:
        model: see above.
        images: training images [N, C, H, W] in ``solidmark.value_range``,
            without border (or with it when ``augmented=True``: the border is
            then cropped off; its values are never shown to the model).
        keys: [N] true keys in [0, 1].
        solidmark: the :class:`SolidMark` the model was trained with
            (thickness, value range; default ``SolidMark()``).
        scheduler: diffusers scheduler or :class:`Schedule` of the model
            (default: the pipeline's own, else DDPMScheduler() defaults).
        prompts: N captions (Stable Diffusion; required there).
        num_inference_steps: noise levels of the reverse chain.
        seed: the noise of image i depends on (seed, i) only (not on batching).
        batch_size: images per network call (default: all).
        resample, jump_length: RePaint resampling (1 = none).
        guidance_scale: classifier-free guidance scale (None: the
            conditional branch only, no guidance).
        model_kwargs: extra per-image network arguments for pixel models, e.g.
            ``{"class_labels": labels}`` or ``{"encoder_hidden_states": emb}``
            (tensors with leading dimension N are sliced per batch).
        uncond_kwargs: the unconditional branch's arguments for guidance.
        embedding_key: the entry of ``model_kwargs`` that
            ``embedding_transform`` perturbs (pixel models).
        embedding_transform: ``f(embeds, sample_ids) -> embeds`` applied to the
            conditional embeddings, e.g. :class:`mmh_fast.mitigations.GaussianNoiseInjection` (GNI).
        prompt_transform: ``f(prompt, sample_id) -> prompt`` applied to the
            captions (RT / CWR / RNA of :mod:`mmh_fast.mitigations`).
        negative_prompt: the unconditional prompt for SD guidance.
        deltas: eidetic thresholds.
        return_images: keep the inpainted images in the result.

    Returns:
        :class:`SolidMarkResult` (l_sm [N], predicted_keys, keys, table).
    """
    sm = solidmark if solidmark is not None else SolidMark()
    if not isinstance(sm, SolidMark):
        raise TypeError(f"solidmark must be a SolidMark, got {type(sm).__name__}")
    x, _ = _as_tensor(images, "images")
    if augmented:
        x = sm.crop(x)
    if x.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
    k = _check_keys(keys)
    if k.ndim != 1 or k.shape[0] != x.shape[0]:
        raise ValueError(f"need one key per image: {x.shape[0]} images, keys of shape {k.shape}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    sm._check_values(x, "images")
    N = x.shape[0]
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    for name, v in (("resample", resample), ("jump_length", jump_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if jump_length >= num_inference_steps and resample > 1:
        raise ValueError(f"jump_length={jump_length} must be smaller than num_inference_steps={num_inference_steps}")
    bs = N if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")

    if is_latent_pipeline(model) and is_pipeline(model):
        return _evaluate_latent(model, x, k, sm, scheduler=scheduler, prompts=prompts,
                                num_inference_steps=num_inference_steps, seed=seed, bs=bs, resample=resample,
                                jump_length=jump_length, guidance_scale=guidance_scale,
                                embedding_transform=embedding_transform, prompt_transform=prompt_transform,
                                negative_prompt=negative_prompt, deltas=deltas, return_images=return_images,
                                progress=progress)
    if prompts is not None or prompt_transform is not None:
        raise ValueError("prompts / prompt_transform need a text-conditioned pipeline (StableDiffusionPipeline); "
                         "for a pixel network pass its conditioning in model_kwargs")
    if embedding_transform is not None and embedding_key not in (model_kwargs or {}):
        raise ValueError(f"embedding_transform perturbs model_kwargs[{embedding_key!r}], which is not given")
    if guidance_scale is not None and uncond_kwargs is None:
        raise ValueError("guidance_scale needs uncond_kwargs (the unconditional branch) for a pixel network")
    res = resolve_model(model, scheduler=scheduler, cond=model_kwargs, uncond=uncond_kwargs,
                        guidance_scale=guidance_scale, n=N)
    den, dev = res.denoiser, res.device
    times = _time_levels(res.schedule, num_inference_steps)
    path = _level_path(len(times), jump_length, resample)
    canvas_shape = (x.shape[1], x.shape[2] + 2 * sm.thickness, x.shape[3] + 2 * sm.thickness)
    keep = ~sm.border_mask(canvas_shape)

    preds, outs = [], []
    for start in _progress(range(0, N, bs), progress, "SolidMark"):
        ids = list(range(start, min(start + bs, N)))
        known = sm.augment(x[start:ids[-1] + 1], np.full(len(ids), 0.5)).to(dev)  # border never kept
        kw, ukw = res.kwargs_for(torch.tensor(ids), N)
        if embedding_transform is not None:
            kw[embedding_key] = embedding_transform(kw[embedding_key], ids)

        def mkw(_lvl, kw=kw, ukw=ukw):
            return {"cond": kw, "uncond": ukw}

        with torch.no_grad():
            x0 = _repaint(den, known, keep.to(dev), times, path, _Noise(seed, ids, "solidmark"), mkw,
                          res.guidance_scale)
        preds.append(sm.border_values(x0.detach().cpu()))
        if return_images:
            outs.append(x0.detach().cpu())
    return _result(k, torch.cat(preds).numpy(), deltas, torch.cat(outs) if return_images else None)


def _result(k, pred, deltas, images) -> SolidMarkResult:
    l_sm = np.abs(k - pred)
    return SolidMarkResult(l_sm, pred, k, eidetic_table(l_sm, deltas), images)


def _progress(it, on: bool, desc: str):
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc)


def _evaluate_latent(pipe, x: torch.Tensor, k: np.ndarray, sm: SolidMark, *, scheduler, prompts,
                     num_inference_steps, seed, bs, resample, jump_length, guidance_scale, embedding_transform,
                     prompt_transform, negative_prompt, deltas, return_images, progress) -> SolidMarkResult:
    """Latent inpainting for a Stable Diffusion pipeline (see :func:`evaluate`).

    At each reverse step the x0 prediction z0_hat is decoded by the VAE, the
    known interior (the clean training image, mapped from ``value_range`` to
    the VAE's [-1, 1]) is pasted in pixel space, the canvas re-encoded
    (posterior mean times scaling_factor) and the ancestral step taken towards
    that latent, which re-noises the pasted interior to the next level. (The
    VAE only maps clean images, so the paste is done on the x0 prediction;
    noising then happens in latent space.) The last x0 prediction is decoded
    and its border mean, mapped back from [-1, 1], is the predicted key."""
    N = x.shape[0]
    text = getattr(pipe, "text_encoder", None) is not None and getattr(pipe, "tokenizer", None) is not None
    if text:
        if prompts is None:
            raise ValueError("a text-conditioned pipeline needs prompts: the training captions, one per image")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != N or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be {N} strings (one caption per image), got {len(prompts)} entries")
        if prompt_transform is not None:
            prompts = [prompt_transform(p, i) for i, p in enumerate(prompts)]
    elif prompts is not None or prompt_transform is not None or embedding_transform is not None \
            or guidance_scale is not None:
        raise ValueError(f"{type(pipe).__name__} has no text encoder: prompts, prompt/embedding transforms and "
                         "guidance need a text-conditioned pipeline")
    schedule = make_schedule(scheduler if scheduler is not None else pipe.scheduler)
    den = Denoiser(pipe.unet, schedule)
    dev = model_device(pipe.unet)
    times = _time_levels(schedule, num_inference_steps)
    path = _level_path(len(times), jump_length, resample)
    lo, hi = sm.value_range
    t = sm.thickness
    canvas_shape = (x.shape[1], x.shape[2] + 2 * t, x.shape[3] + 2 * t)
    keep = (~sm.border_mask(canvas_shape)).to(dev, torch.float32)
    uncond = None
    if guidance_scale is not None:
        uncond = {"encoder_hidden_states": encode_prompts(pipe, [negative_prompt])}

    preds, outs = [], []
    for start in _progress(range(0, N, bs), progress, "SolidMark"):
        rows = slice(start, min(start + bs, N))
        ids = list(range(rows.start, rows.stop))
        # the canvas in the VAE's [-1, 1]; its border is never used (replaced by the model's)
        canvas = 2 * (sm.augment(x[rows], np.full(len(ids), 0.5)).to(dev, torch.float32) - lo) / (hi - lo) - 1
        cond = {}
        if text:
            emb = encode_prompts(pipe, prompts[rows])
            if embedding_transform is not None:
                emb = embedding_transform(emb, ids)
            cond = {"encoder_hidden_states": emb}
        latent_shape = encode_images(pipe, canvas[:1]).shape[1:]

        def paste(z0, canvas=canvas):
            img = decode_latents(pipe, z0).to(dev)
            return encode_images(pipe, keep * canvas + (1 - keep) * img).to(torch.float32)

        def mkw(_lvl, cond=cond):
            return {"cond": cond, "uncond": uncond}

        with torch.no_grad():
            z0 = _repaint(den, None, None, times, path, _Noise(seed, ids, "solidmark"), mkw, guidance_scale,
                          paste=paste, shape=latent_shape)
            img = decode_latents(pipe, z0).to(dev)
        img = keep * canvas + (1 - keep) * img  # in [-1, 1]
        preds.append((sm.border_values((img.cpu().double() + 1) / 2 * (hi - lo) + lo)))
        if return_images:
            outs.append(((img.cpu() + 1) / 2 * (hi - lo) + lo))
    return _result(k, torch.cat(preds).numpy(), deltas, torch.cat(outs) if return_images else None)
