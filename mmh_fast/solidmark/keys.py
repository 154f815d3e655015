"""SolidMark keys and borders: the per-image key k_x ~ U(0, 1) and the solid
border of width ``thickness`` that carries it (SolidMark paper, Sec. 4).
See :mod:`mmh_fast.solidmark` for the conventions (value range, layout, mask)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .._hashing import keyed_uniform

_KEY_PERSON = b"solidmark-key-v1"


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

    def evaluate(self, model, images, keys, **kwargs):
        """:func:`mmh_fast.solidmark.evaluate` with this SolidMark's thickness
        and value range (returns a :class:`SolidMarkResult`)."""
        from .inpaint import evaluate  # the evaluation sits above the keys

        return evaluate(model, images, keys, solidmark=self, **kwargs)
