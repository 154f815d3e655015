"""The dataset wrapper that gives every training image its keyed border,
and content-based sample ids."""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from .._hashing import id_bytes
from .keyfiles import KeyTable, load_keys, save_keys
from .keys import SolidMark, _as_tensor


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
