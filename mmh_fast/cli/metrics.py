"""The metric registry of ``mmh-fast scan``: name -> a function giving one value per image.

A metric is a function ``fn(batch, ctx)`` returning one number per image of the
batch (a tensor, array or sequence of length ``len(batch)``). ``batch`` is a
:class:`MetricBatch` (the images at the model's resolution, their captions,
keys and per-sample seeds) and ``ctx`` a :class:`MetricContext` (the loaded
model, the device and the scan's options: t0, probes, seed). A metric declares
what it needs (``needs_model``, ``needs_captions``) and which way memorization
points (``lower_is_memorized``: True for LID-like metrics, where low values flag
memorization; False for scores such as the CFG norm), which the report uses to
orient ROC curves.

Register your own with :func:`register_metric` — in a module passed to
``mmh-fast scan --plugin MODULE`` (or named in ``MMH_FAST_PLUGINS``)::

    from mmh_fast.cli.metrics import register_metric

    @register_metric("mean_brightness", lower_is_memorized=False)
    def mean_brightness(batch, ctx):
        return batch.images.float().mean(dim=(1, 2, 3))
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import UserError

__all__ = ["Metric", "MetricBatch", "MetricContext", "register_metric", "get_metric", "available_metrics",
           "resolve_metrics", "load_plugins", "as_values", "effective_settings", "check_options", "FALLBACK_T0",
           "MetricValues", "split_values"]


@dataclass(frozen=True)
class Metric:
    """A registered metric. ``fn(batch, ctx)`` returns ``len(batch)`` values."""

    name: str
    fn: Callable[["MetricBatch", "MetricContext"], Any]
    needs_model: bool = False
    needs_captions: bool = False
    needs_conditional_model: bool = False
    lower_is_memorized: bool = True
    dtype: str = "float64"
    description: str = ""
    options: tuple = ()
    defaults: dict = field(default_factory=dict)
    per_image: bool = False
    uses_t0: bool = True
    columns: dict = field(default_factory=dict)


@dataclass
class MetricValues:
    """A metric's output with per-image side columns (``Metric.columns``): ``values``
    as :func:`as_values` takes them, ``columns`` name -> ``len(batch)`` values."""

    values: Any
    columns: dict


def split_values(out, n: int, metric: "Metric") -> tuple[np.ndarray, dict]:
    """(values float64 [n], {column: numpy [n]}) of a metric's output; a metric that
    declares ``columns`` must return a :class:`MetricValues` holding exactly those."""
    if not metric.columns:
        return as_values(out, n, metric.name), {}
    if not isinstance(out, MetricValues) or set(out.columns) != set(metric.columns):
        got = sorted(out.columns) if isinstance(out, MetricValues) else type(out).__name__
        raise ValueError(f"metric {metric.name!r} declares the columns {sorted(metric.columns)} and must return "
                         f"MetricValues(values, {{column: values}}) with them; got {got}")
    cols = {}
    for name, v in out.columns.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().numpy()
        v = np.asarray(v).reshape(-1)
        if v.shape[0] != n:
            raise ValueError(f"metric {metric.name!r} returned {v.shape[0]} values of column {name!r} for a batch "
                             f"of {n}")
        cols[name] = v
    return as_values(out.values, n, metric.name), cols


@dataclass
class MetricBatch:
    """One batch of decoded images.

    Attributes:
        pixels: uint8 tensor [B, 3, H, W] on the CPU (as decoded).
        keys: the samples' keys; ``sample_ids`` int64 tensor [B] derived from them
            (the per-sample seeds of randomized estimators).
        captions: list of str (None where the source has no caption).
        device: where :attr:`images` lives; ``dtype``: the model's precision (for
            metrics that feed the network directly; estimators cast themselves).
    """

    pixels: torch.Tensor
    keys: list
    captions: list
    sample_ids: torch.Tensor
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    _images: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def images(self) -> torch.Tensor:
        """float32 tensor [B, 3, H, W] in [-1, 1] on ``device`` (the diffusers convention)."""
        if self._images is None:
            x = self.pixels.to(self.device, non_blocking=True)
            self._images = x.to(torch.float32) / 127.5 - 1.0
        return self._images

    def subset(self, idx: Sequence[int]) -> "MetricBatch":
        idx = list(idx)
        t = torch.as_tensor(idx, dtype=torch.long)
        sub = MetricBatch(self.pixels[t], [self.keys[i] for i in idx], [self.captions[i] for i in idx],
                          self.sample_ids[t], self.device, self.dtype)
        if self._images is not None:
            sub._images = self._images[t.to(self._images.device)]
        return sub


@dataclass
class MetricContext:
    """What a metric may use besides the batch.

    Each metric gets its own context: ``t0`` and ``options`` are the metric's
    effective settings (see :func:`effective_settings`).

    Attributes:
        model: the :class:`~mmh_fast.cli.models.LoadedModel` (None for model-free scans).
        t0: the metric's diffusion time: ``--option NAME.t0``, else ``--t0``, else
            the metric's own default (the paper's), else 0.01.
        n_probes, seed: the scan's ``--n-probes`` and ``--seed``.
        options: the metric's option values (``--option``, else its defaults),
            parsed as JSON where they parse.
    """

    model: Any = None
    device: torch.device = torch.device("cpu")
    t0: float = 0.01
    n_probes: int = 1
    seed: int = 0
    options: dict = field(default_factory=dict)


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, fn: Callable | None = None, *, needs_model: bool = False,
                    needs_captions: bool = False, needs_conditional_model: bool = False,
                    lower_is_memorized: bool = True, dtype: str = "float64", description: str = "",
                    options: Sequence[str] = (), overwrite: bool = False, defaults: dict | None = None,
                    per_image: bool = False, uses_t0: bool = True, columns: dict | None = None):
    """Register ``fn`` as metric ``name`` (usable as a decorator when ``fn`` is omitted).

    Args:
        name: the column name and ``--metrics`` entry (letters, digits, ``_``).
        needs_model: the metric uses ``ctx.model``; a scan without --model refuses it.
        needs_captions: samples without a caption get an error row for this metric.
        needs_conditional_model: the model must be text-conditioned (Stable Diffusion).
        lower_is_memorized: low values flag memorization (LID); False for scores.
        dtype: "float64" or "int64", the Parquet column type.
        options: names of the ``--option NAME=VALUE`` settings the metric reads from
            ``ctx.options`` (a scan refuses options no selected metric reads).
        overwrite: replace an existing registration instead of raising ValueError.
        defaults: the metric's default settings (``t0`` and options), recorded with
            the results; ``t0`` here is the metric's own diffusion time.
        per_image: run one image per call and report progress after each (for
            metrics that take seconds per image, e.g. nb).
        uses_t0: False for a model metric that has no diffusion time of its own
            (the caption-level detectors, which start from pure noise): no ``t0``
            setting is recorded for it and ``--option NAME.t0`` is refused.
        columns: per-image side columns written beside the metric's, name ->
            (dtype "bool" | "int64" | "float64", what the column says); ``fn`` then
            returns a :class:`MetricValues`. A "bool" column's False count is
            summarised in one line at the end of the scan (e.g. ``nb_determined``).
    """
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or name[0].isdigit():
        raise ValueError(f"metric name must be an identifier (letters, digits, _), got {name!r}")
    if dtype not in ("float64", "int64"):
        raise ValueError(f"dtype must be 'float64' or 'int64', got {dtype!r}")
    columns = dict(columns or {})
    for col, spec in columns.items():
        if not (isinstance(spec, tuple) and len(spec) == 2 and spec[0] in ("bool", "int64", "float64")):
            raise ValueError(f"columns[{col!r}] must be (dtype, description) with dtype bool, int64 or float64, "
                             f"got {spec!r}")

    def deco(f):
        if not callable(f):
            raise TypeError(f"metric {name!r}: fn must be callable as fn(batch, ctx)")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"metric {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = Metric(name, f, needs_model, needs_captions or needs_conditional_model,
                                 needs_conditional_model, lower_is_memorized, dtype,
                                 description or (f.__doc__ or "").strip().split("\n")[0], tuple(options),
                                 dict(defaults or {}), bool(per_image), bool(uses_t0), columns)
        return f

    return deco if fn is None else deco(fn)


def unregister_metric(name: str) -> None:
    _REGISTRY.pop(name, None)


def available_metrics() -> list[str]:
    return sorted(_REGISTRY)


def get_metric(name: str) -> Metric:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown metric {name!r}; available: {', '.join(available_metrics()) or 'none'}"
                        ) from None


def resolve_metrics(names: Sequence[str]) -> list[Metric]:
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError("no metrics given (--metrics)")
    if len(set(names)) != len(names):
        raise UserError(f"--metrics lists a metric twice: {','.join(names)}")
    return [get_metric(n) for n in names]


_LOADED_FILES: set = set()


def load_plugins(specs: Sequence[str]) -> None:
    """Import plugin modules (dotted names or paths to .py files) so they can register
    metrics. A file is executed once per process, like an imported module."""
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        try:
            if spec.endswith(".py") or os.sep in spec:
                path = os.path.abspath(spec)
                if not os.path.isfile(path):
                    raise UserError(f"plugin file {spec!r} does not exist")
                if path in _LOADED_FILES:
                    continue
                name = "mmh_fast_plugin_" + os.path.splitext(os.path.basename(path))[0]
                mspec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mspec)
                mspec.loader.exec_module(module)
                _LOADED_FILES.add(path)
            else:
                importlib.import_module(spec)
        except ImportError as exc:
            raise UserError(f"cannot import plugin {spec!r}: {exc}") from None


def as_values(out, n: int, name: str) -> np.ndarray:
    """A metric's output as a float64 numpy array of length n."""
    if isinstance(out, torch.Tensor):
        out = out.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(out, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"metric {name!r} returned {arr.shape[0]} values for a batch of {n}")
    return arr


#: t0 of a metric that needs a model and names no default of its own (a plugin)
FALLBACK_T0 = 0.01


def effective_settings(metric: Metric, *, t0: float | None, options: dict) -> dict:
    """The settings ``metric`` runs with, every one with its value.

    Precedence: ``--option NAME.SETTING=V`` (this metric only) over ``--t0`` /
    ``--option SETTING=V`` (every metric that has the setting) over the metric's
    defaults. ``t0`` is a setting of metrics that need a model (their default
    from ``defaults``, else :data:`FALLBACK_T0`)."""
    eff = dict(metric.defaults)
    if metric.needs_model and metric.uses_t0:
        eff.setdefault("t0", FALLBACK_T0)
    if t0 is not None and "t0" in eff:
        eff["t0"] = t0
    eff.update({key: value for key, value in options.items() if "." not in key and key in metric.options})
    for key, value in options.items():
        prefix, dot, setting = key.rpartition(".")
        if dot and prefix == metric.name:
            eff[setting] = value
    return eff


def check_options(metrics: Sequence[Metric], options: dict) -> None:
    """UserError for an ``--option`` no selected metric reads (``SETTING`` or ``NAME.SETTING``)."""
    by_name = {m.name: m for m in metrics}
    read = {o for m in metrics for o in m.options}
    bad = []
    for key in options:
        prefix, dot, setting = key.rpartition(".")
        if not dot:
            if key not in read:
                bad.append(key)
            continue
        m = by_name.get(prefix)
        if m is None or not (setting in m.options or (setting == "t0" and m.needs_model and m.uses_t0)):
            bad.append(key)
    if bad:
        names = ", ".join(m.name for m in metrics)
        per = "; ".join(f"{m.name}: "
                        f"{', '.join((['t0'] if m.needs_model and m.uses_t0 else []) + list(m.options)) or 'none'}"
                        for m in metrics)
        raise UserError(f"--option {', '.join(bad)}: not an option of the selected metrics ({names}; "
                        f"settings per metric: {per}; NAME.SETTING sets one metric's, SETTING every metric's)")


def _library_defaults(fn, names) -> dict:
    """The defaults of the keyword arguments ``names`` of the library function ``fn``."""
    import inspect

    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names if n in params
            and params[n].default is not inspect.Parameter.empty}


# --------------------------------------------------------------------------- built-in metrics
# Each calls the library's public estimator with the scan's options. Per-sample
# ids from the keys make randomized estimates independent of batching and ranks.
_FLIPD_OPTIONS = ("trace", "method", "probe", "guidance_scale")


def _pick(options: dict, names) -> dict:
    return {k: options[k] for k in names if k in options}


from .. import flipd as _lib_flipd, normal_bundle as _lib_nb  # noqa: E402
from ..text import cfg_norm_train as _lib_cfg_norm_train  # noqa: E402
from ..text import cross_attention_entropy as _lib_entropy  # noqa: E402
from ..text import hessian_score_difference_norm as _lib_sharpness  # noqa: E402
from ..text import norm_alignment_score as _lib_norm_alignment  # noqa: E402

# The paper's settings (MMH App. C): FLIPD at t0 = 0.05, NB at t0 = 0.1, the
# training-set CFG norm at t0 = 0.01 after 3 Euler steps; the rest are the
# library functions' own defaults, read from their signatures.
_FLIPD_DEFAULTS = {"t0": 0.05, **_library_defaults(_lib_flipd, ("trace", "method", "probe"))}


@register_metric("flipd", needs_model=True, options=_FLIPD_OPTIONS, defaults=_FLIPD_DEFAULTS,
                 description="FLIPD LID_theta(x) at t0 (Eq. 6; default t0 0.05, the paper's); unconditional (empty "
                             "prompt) for text models")
def _flipd(batch, ctx):
    from .. import flipd

    cond = "" if ctx.model.conditional else None
    return flipd(ctx.model.pipeline, batch.images, ctx.t0, cond=cond, n_probes=ctx.n_probes, seed=ctx.seed,
                 sample_ids=batch.sample_ids, **_pick(ctx.options, ("trace", "method", "probe")))


@register_metric("flipd_cond", needs_model=True, needs_conditional_model=True, options=_FLIPD_OPTIONS,
                 defaults={**_FLIPD_DEFAULTS, **_library_defaults(_lib_flipd, ("guidance_scale",))},
                 description="FLIPD LID_theta(x | caption) at t0 (Sec. 4.1; default t0 0.05); CFG score with "
                             "guidance_scale (Eq. 26)")
def _flipd_cond(batch, ctx):
    from .. import flipd

    return flipd(ctx.model.pipeline, batch.images, ctx.t0, cond=list(batch.captions), n_probes=ctx.n_probes,
                 seed=ctx.seed, sample_ids=batch.sample_ids, **_pick(ctx.options, _FLIPD_OPTIONS))


@register_metric("png", dtype="int64",
                 description="PNG length in bytes at compression level 9 (image complexity, App. C.2) of the image "
                             "as scanned (resized with --image-size or a model); needs no model")
def _png(batch, ctx):
    from .. import png_complexity

    return png_complexity(batch.pixels, channels_last=False, num_workers=1)


_NB_OPTIONS = ("n_samples", "rule", "threshold", "min_ratio", "guidance_scale")


#: the nb metric's side column: normal_bundle's determined mask, per image
NB_DETERMINED = "nb_determined"


@register_metric("nb", needs_model=True, dtype="int64", options=_NB_OPTIONS, per_image=True,
                 defaults={"t0": 0.1, **_library_defaults(_lib_nb, _NB_OPTIONS[:-1])},
                 columns={NB_DETERMINED: ("bool", "the score spectrum has no significant gap (or the rank sits at "
                                                  "the n_samples cap): the nb value there is a guess, not a "
                                                  "measurement")},
                 description="normal-bundle LID_theta(x) = d - rank of the score matrix at t0 (Eq. 7-8; default t0 "
                             "0.1, the paper's); costs 4d network calls per image (d = pixel or latent entries: "
                             "~44 s per 32x32 RGB image on a 2-core CPU) unless nb.n_samples is set; writes "
                             "nb_determined (False where the spectrum decides no rank)")
def _nb(batch, ctx):
    from .. import normal_bundle

    cond = "" if ctx.model.conditional else None
    # the determined mask goes to its own column, counted once at the end of the scan,
    # instead of one "undetermined" warning per image
    d = normal_bundle(ctx.model.pipeline, batch.images, ctx.t0, cond=cond, seed=ctx.seed, sample_ids=batch.sample_ids,
                      undetermined="ignore", return_details=True, **_pick(ctx.options, _NB_OPTIONS[:-1]))
    return MetricValues(d.lid, {NB_DETERMINED: d.determined})


@register_metric("cfg_norm_train", needs_model=True, needs_captions=True, needs_conditional_model=True,
                 lower_is_memorized=False, options=("n_euler",),
                 defaults={"t0": 0.01, **_library_defaults(_lib_cfg_norm_train, ("n_euler",))},
                 description="CFG-vector norm |s(x_t0, t0, caption) - s(x_t0, t0, '')| of the training image with "
                             "its caption after n_euler conditional ODE steps to t0 (App. C, Fig. 6); high = memorized")
def _cfg_norm_train(batch, ctx):
    from ..text import cfg_norm_train

    caps = ["" if c is None else str(c) for c in batch.captions]
    return cfg_norm_train(ctx.model.pipeline, batch.images, caps, t0=ctx.t0,
                          **{k: int(v) for k, v in _pick(ctx.options, ("n_euler",)).items()})


# Caption-level detectors of issue 16: prompt-level scores, so a training image's
# value is its caption's score as a prompt (the pixels are not read). Each
# distinct caption of a batch is scored once; the library keys its latents by
# (seed, image index), so a caption's score does not depend on the batch.
_SHARPNESS_OPTIONS = ("num_images", "num_inference_steps", "guidance_scale")
_NORM_ALIGNMENT_OPTIONS = ("num_images", "norm_weight", "alignment_weight", "alignment_step", "num_inference_steps")
_ENTROPY_OPTIONS = ("num_images", "num_inference_steps", "guidance_scale")
_INT_OPTIONS = ("num_images", "num_inference_steps", "alignment_step")


def _number(value, name: str, *, integer: bool):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (integer and float(value) != int(value)):
        raise UserError(f"--option {name}: expected {'an integer' if integer else 'a finite number'}, got {value!r}")
    return int(value) if integer else float(value)


def _per_caption(fn, batch, ctx, names):
    caps = ["" if c is None else str(c) for c in batch.captions]
    distinct = list(dict.fromkeys(caps))
    opts = {k: _number(v, k, integer=k in _INT_OPTIONS) for k, v in _pick(ctx.options, names).items()}
    s = torch.as_tensor(fn(ctx.model.pipeline, distinct, seed=ctx.seed, **opts), dtype=torch.float64).reshape(-1)
    at = {c: i for i, c in enumerate(distinct)}
    return s[torch.tensor([at[c] for c in caps])]


def _register_caption_detector(name, lib_fn, options, description):
    def fn(batch, ctx):
        return _per_caption(lib_fn, batch, ctx, options)

    fn.__name__ = f"_{name}"
    register_metric(name, fn, needs_model=True, needs_captions=True, needs_conditional_model=True,
                    lower_is_memorized=False, uses_t0=False, options=options,
                    defaults=_library_defaults(lib_fn, options), description=description)


_register_caption_detector(
    "sharpness", _lib_sharpness, _SHARPNESS_OPTIONS,
    "initial-stage sharpness |(H_c - H_u)(s_c - s_u)| of the caption as a prompt, first DDIM step from pure noise "
    "(Jeon et al., ICML 2025, Sec. 4.2; text.hessian_score_difference_norm); high = memorized; costs about 11 UNet "
    "forward passes per latent (num_images = 4: about 43 per distinct caption; 130 ms per caption on the quick "
    "lab, 9x the one-step cfg_norm)")
_register_caption_detector(
    "norm_alignment", _lib_norm_alignment, _NORM_ALIGNMENT_OPTIONS,
    "norm + alignment score gamma_1 |eps_c - eps_u| + gamma_2 cos(eps_u, eps_c - eps_u) of the caption as a prompt, "
    "on pure noise (Asthana and Belagiannis, ICLR 2026; text.norm_alignment_score; SD 1.4 weights 1 and 2); "
    "high = memorized; about 3 UNet forward passes per latent")
_register_caption_detector(
    "attention_entropy", _lib_entropy, _ENTROPY_OPTIONS,
    "entropy of the conditional cross-attention over the caption's tokens at the first DDIM step (Ren et al., "
    "ECCV 2024, Sec. 4; text.cross_attention_entropy); high = memorized; about 2 UNet forward passes per latent; "
    "needs diffusers attention processors")
