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

The package, by responsibility: :mod:`.keys` (keys and borders),
:mod:`.keyfiles` (key tables on disk), :mod:`.dataset` (the training-set
wrapper), :mod:`.results` (scores and chance levels), :mod:`.repaint` (the
inpainting loop), :mod:`.inpaint` (:func:`evaluate`, pixel models) and
:mod:`.latent` (latent inpainting for Stable Diffusion pipelines).
"""
from .dataset import SolidMarkDataset, content_id
from .inpaint import evaluate
from .keyfiles import KeyTable, load_keys, save_keys
from .keys import SolidMark
from .repaint import _level_path, _Noise, _repaint, _time_levels  # noqa: F401 (tests drive the loop directly)
from .results import DEFAULT_DELTAS, SolidMarkResult, chance_rate, eidetic_table  # noqa: F401

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
