"""Image complexity by PNG compression length, and the complexity-normalised
LID of the MMH paper (App. C.2): LID_theta is correlated with image complexity,
so simple images get low LID without being memorized; dividing LID by the
PNG length (a proxy for complexity, after Kamkari et al. 2024b) removes part
of that confound.

The paper encodes with OpenCV (cv2.imencode, compression level 9). Here
Pillow's PNG encoder with ``compress_level=9`` is used (zlib level 9 in both;
the encoders choose row filters differently and OpenCV stores colour as BGR,
so lengths differ from the paper's by a few percent while the ordering of
images by complexity, which is what the normalisation uses, is preserved).
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

__all__ = ["png_complexity", "png_bytes", "png_normalized_lid", "to_uint8_images"]

_CHANNELS = (1, 3, 4)


def _to_numpy(images, name: str) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        return images
    raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(images).__name__}")


def _channels_last(a: np.ndarray, channels_last: bool | None) -> np.ndarray:
    """[B, H, W] or [B, H, W, C] view of a batch given as [B, H, W],
    [B, C, H, W] or [B, H, W, C] (C in 1, 3, 4)."""
    if a.ndim == 3:
        if channels_last is not None:
            raise ValueError("channels_last applies to 4-D batches; a 3-D batch is [B, H, W] grayscale")
        return a
    if a.ndim != 4:
        raise ValueError(f"images must be [B, H, W], [B, C, H, W] or [B, H, W, C], got shape {a.shape}")
    first, last = a.shape[1] in _CHANNELS, a.shape[3] in _CHANNELS
    if channels_last is None:
        if first and last:
            raise ValueError(f"images of shape {a.shape} could be channels-first or channels-last; "
                             "pass channels_last=True or False")
        if not (first or last):
            raise ValueError(f"images of shape {a.shape} have no channel axis of size 1, 3 or 4 "
                             "(position 1 or 3)")
        channels_last = last
    c = a.shape[3] if channels_last else a.shape[1]
    if c not in _CHANNELS:
        raise ValueError(f"images must have 1, 3 or 4 channels, got {c} (shape {a.shape}, "
                         f"channels_last={channels_last})")
    out = a if channels_last else np.moveaxis(a, 1, 3)
    return out[..., 0] if c == 1 else out


def to_uint8_images(images, *, value_range=None, channels_last: bool | None = None) -> np.ndarray:
    """Batch -> uint8 [B, H, W] or [B, H, W, C] (channels last), as encoded.

    uint8 passes through (integer dtypes must lie in [0, 255]). Floats are
    mapped from ``value_range`` = (lo, hi) to [0, 255] and rounded; with
    value_range=None the range is detected over the whole batch: [0, 1] if
    every value is in [0, 1], else [-1, 1] if every value is in [-1, 1], else
    a ValueError asks for value_range. (Detection is per batch, not per image,
    so that a [-1, 1] image that happens to be non-negative is not rescaled
    differently from its neighbours; a [-1, 1] batch that is entirely
    non-negative is read as [0, 1]: pass value_range=(-1, 1) to be sure.)
    """
    a = _to_numpy(images, "images")
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise TypeError(f"images must be uint8 or floating point, got dtype {a.dtype}")
    if a.ndim < 3 or a.shape[0] == 0 or any(s == 0 for s in a.shape):
        raise ValueError(f"images must be a non-empty batch [B, H, W], [B, C, H, W] or [B, H, W, C], "
                         f"got shape {a.shape}")
    a = _channels_last(a, channels_last)
    if a.dtype.kind in "biu":
        if value_range is not None and tuple(value_range) != (0, 255):
            raise ValueError("value_range applies to float images; integer images must be in [0, 255]")
        if a.dtype == np.uint8:
            return np.ascontiguousarray(a)
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"integer images must lie in [0, 255], got values in [{a.min()}, {a.max()}]")
        return np.ascontiguousarray(a.astype(np.uint8))
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"images contain {int((~np.isfinite(a)).sum())} NaN or inf value(s)")
    vmin, vmax = float(a.min()), float(a.max())
    if value_range is None:
        if vmin >= 0.0 and vmax <= 1.0:
            lo, hi = 0.0, 1.0
        elif vmin >= -1.0 and vmax <= 1.0:
            lo, hi = -1.0, 1.0
        else:
            raise ValueError(f"float images have values in [{vmin:.4g}, {vmax:.4g}], which fit neither "
                             "[0, 1] nor [-1, 1]; pass value_range=(lo, hi)")
    else:
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"value_range must be a pair (lo, hi), got {value_range!r}") from exc
        if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
            raise ValueError(f"value_range must be finite with lo < hi, got {value_range!r}")
        tol = 1e-6 * (hi - lo)
        if vmin < lo - tol or vmax > hi + tol:
            raise ValueError(f"images have values in [{vmin:.4g}, {vmax:.4g}], outside value_range "
                             f"({lo:.4g}, {hi:.4g})")
    scaled = np.rint((a - lo) * (255.0 / (hi - lo)))
    return np.ascontiguousarray(np.clip(scaled, 0, 255).astype(np.uint8))


def _encode(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def _map(fn, items, num_workers):
    # zlib (inside Pillow's encoder) releases the GIL, so threads scale
    workers = min(len(items), num_workers or min(8, os.cpu_count() or 1))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def png_bytes(images, *, value_range=None, channels_last: bool | None = None,
              num_workers: int | None = None) -> list[bytes]:
    """PNG files (compression level 9) of a batch, as a list of bytes; see
    :func:`png_complexity` for the accepted inputs."""
    u8 = to_uint8_images(images, value_range=value_range, channels_last=channels_last)
    return _map(_encode, list(u8), num_workers)


def png_complexity(images, *, value_range=None, channels_last: bool | None = None,
                   num_workers: int | None = None) -> np.ndarray:
    """PNG length in bytes of each image at compression level 9 (MMH paper App. C.2).

    Args:
        images: a batch, numpy array or torch tensor (any device), shaped
            [B, H, W] (grayscale), [B, C, H, W] or [B, H, W, C] with C in
            {1, 3, 4} (1: grayscale, 3: RGB, 4: RGBA); the channel axis is
            detected, ``channels_last`` settles shapes where both fit.
            uint8 in [0, 255], or float in [0, 1] or [-1, 1] (detected over
            the batch; ``value_range=(lo, hi)`` states it explicitly). See
            :func:`to_uint8_images`.
        num_workers: encoding threads (default min(8, CPU count)).

    Returns:
        [B] int64 numpy array of PNG file lengths in bytes (Pillow's
        encoder, ``compress_level=9``; the paper used OpenCV: see the module
        docstring).
    """
    return np.asarray([len(b) for b in png_bytes(images, value_range=value_range,
                                                  channels_last=channels_last,
                                                  num_workers=num_workers)], dtype=np.int64)


def png_normalized_lid(lid, images_or_lengths, *, value_range=None,
                       channels_last: bool | None = None) -> np.ndarray:
    """Complexity-normalised LID (MMH paper App. C.2): LID / PNG length.

    Args:
        lid: [B] LID estimates (numpy, torch or a sequence of numbers).
        images_or_lengths: either the images themselves (a batch accepted by
            :func:`png_complexity`) or their PNG lengths [B] (positive numbers,
            e.g. from an earlier :func:`png_complexity` call).

    Returns:
        [B] float64 numpy array lid / png_length (units: LID per byte).
    """
    if isinstance(lid, torch.Tensor):
        lid = lid.detach().cpu().numpy()
    lid = np.asarray(lid)
    if lid.dtype == object or lid.dtype.kind not in "biuf":
        raise TypeError(f"lid must hold real numbers, got dtype {lid.dtype}")
    if lid.ndim != 1 or lid.size == 0:
        raise ValueError(f"lid must be a non-empty 1-D array (one LID per image), got shape {lid.shape}")
    lid = lid.astype(np.float64)
    if not np.isfinite(lid).all():
        raise ValueError("lid contains NaN or inf values")
    x = images_or_lengths
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 1:
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError(f"PNG lengths must be numbers, got dtype {arr.dtype}")
        lengths = arr.astype(np.float64)
        if not np.isfinite(lengths).all() or (lengths <= 0).any():
            raise ValueError("PNG lengths must be finite and positive")
    else:
        lengths = png_complexity(x, value_range=value_range, channels_last=channels_last).astype(np.float64)
    if lengths.shape[0] != lid.shape[0]:
        raise ValueError(f"lid has {lid.shape[0]} values but there are {lengths.shape[0]} images / lengths")
    return lid / lengths
