"""Model loading for ``mmh-fast scan``: a local diffusers pipeline directory or a
built-in toy model.

A pipeline directory (one with ``model_index.json``) is loaded with
``local_files_only=True`` — nothing is downloaded — in the requested dtype and
moved to the device. Stable Diffusion 1.x/2.x (text-conditioned, latent) and
unconditional DDPM/DDIM pixel pipelines are recognised; any pipeline with a
``unet`` and a ``scheduler`` is accepted.

Built-in toy models are random-initialised from a fixed seed (the same weights
in every process and rank), for trying the command line without weights:

* ``toy-ddpm``: an unconditional DDPMPipeline with a small UNet2DModel on
  32 x 32 RGB images (:func:`mmh_fast.testing.tiny_ddpm_pipeline`);
* ``toy-sd``: a tiny StableDiffusionPipeline (VAE, CLIP text encoder, conditional
  UNet) on 32 x 32 images, 16 x 16 latents
  (:func:`mmh_fast.testing.tiny_stable_diffusion_pipeline`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .errors import UserError

__all__ = ["LoadedModel", "load_model", "TOY_MODELS", "parse_dtype", "resolve_device"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A loaded model and what the scan needs to know about it.

    Attributes:
        pipeline: the diffusers pipeline (``.unet``, ``.scheduler``, and for latent
            models ``.vae``; ``.text_encoder``/``.tokenizer`` when conditional).
        name: the MODEL argument as given; ``kind``: "toy", "pipeline".
        conditional: whether the model takes text prompts.
        image_size: the native pixel resolution (UNet sample size x VAE factor).
        fingerprint: a digest of the configs (recorded with the results).
    """

    pipeline: Any
    name: str
    kind: str
    conditional: bool
    image_size: int
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    class_name: str

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "class": self.class_name,
                "conditional": self.conditional, "image_size": self.image_size,
                "dtype": str(self.dtype).replace("torch.", ""), "fingerprint": self.fingerprint}


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
        if name == "cuda":  # one device per torchrun process on a node
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name != "cpu":
        raise UserError(f"--device must be cuda, cuda:N or cpu, got {name!r}")
    return torch.device("cpu")


def _toy_ddpm():
    from ..testing import tiny_ddpm_pipeline

    return tiny_ddpm_pipeline(sample_size=32, seed=0)


def _toy_sd():
    import tempfile

    from ..testing import tiny_stable_diffusion_pipeline

    # The tokenizer reads its files when built: a private directory, removed after.
    with tempfile.TemporaryDirectory(prefix="mmh_toy_clip_") as d:
        return tiny_stable_diffusion_pipeline(image_size=32, seed=0, tokenizer_dir=d)


TOY_MODELS: dict[str, Callable[[], Any]] = {"toy-ddpm": _toy_ddpm, "toy-sd": _toy_sd}
_TOY_SIZES = {"toy-ddpm": 32, "toy-sd": 32}


def _fingerprint(pipe) -> str:
    """A digest of the components' configs and of a sample of every weight tensor
    (its first and last values), enough to tell checkpoints apart cheaply."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        comp = getattr(pipe, name, None)
        cfg = getattr(comp, "config", None)
        if cfg is not None:
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)  # transformers / diffusers configs
            public = {k: v for k, v in cfg.items() if not k.startswith("_")}
            h.update(name.encode())
            h.update(json.dumps(public, sort_keys=True, default=str).encode())
        if isinstance(comp, torch.nn.Module):
            for pname, t in comp.state_dict().items():
                flat = t.detach().reshape(-1)
                sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float64).numpy()
                h.update(f"{pname}{tuple(t.shape)}".encode())
                h.update(sample.round(4).tobytes())
    return h.hexdigest()[:16]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def native_image_size(spec: str) -> int | None:
    """The pixel resolution of MODEL without loading it (from the configs); None
    when it cannot be read, in which case :func:`load_model` reports the problem."""
    if spec in TOY_MODELS:
        return _TOY_SIZES[spec]
    unet = _read_json(os.path.join(spec, "unet", "config.json"))
    if not unet or "sample_size" not in unet:
        return None
    sample = unet["sample_size"]
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    vae = _read_json(os.path.join(spec, "vae", "config.json"))
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae and "block_out_channels" in vae else 1
    return int(sample) * factor


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a pipeline is quiet: transformers' warnings about optional packages
    (torchvision), diffusers' notices (e.g. about accelerate) and both libraries'
    per-component loading bars are noise on a scan's console, which shows its own
    progress. Verbosity and bars are restored afterwards."""
    libs = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            libs.append(importlib.import_module(name))
        except ImportError:
            pass
    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, level, bars in saved:
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def load_model(spec: str, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load MODEL (a pipeline directory or a toy name) onto ``device`` in ``dtype``."""
    with _quiet_transformers():
        return _load_model(spec, device=device, dtype=dtype)


def _load_model(spec: str, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    if spec in TOY_MODELS:
        # The toy's weights come from a fixed seed, without touching the caller's RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = TOY_MODELS[spec]()
        kind = "toy"
    elif os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "model_index.json")):
            raise UserError(f"model directory {spec!r} has no model_index.json: "
                            "expected a diffusers pipeline saved with save_pretrained()")
        index = _read_json(os.path.join(spec, "model_index.json")) or {}
        for entry in index.values():
            # diffusers loads a component of a custom module only once that module is imported;
            # ours (mmh-fast train --arch mlp saves mmh_fast.models.pixel_mlp.PixelMLP) are safe to import
            if isinstance(entry, list) and entry and isinstance(entry[0], str) and entry[0].startswith("mmh_fast."):
                importlib.import_module(entry[0])
        try:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the diffusers pipeline in {spec!r}: {exc}") from None
        kind = "pipeline"
    else:
        toys = ", ".join(TOY_MODELS)
        raise UserError(f"model {spec!r} is neither a directory holding a diffusers pipeline nor a built-in "
                        f"model ({toys})")
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "scheduler", None) is None:
        raise UserError(f"model {spec!r} ({type(pipe).__name__}) has no unet and scheduler; "
                        "scan supports diffusion pipelines (Stable Diffusion, DDPM, DDIM)")
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None  # never generates here; spares memory
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        comp = getattr(pipe, name, None)
        if isinstance(comp, torch.nn.Module):
            # from_pretrained(torch_dtype=...) has set the precision (keeping the modules a
            # model pins to float32); only the toy, built in float32, is cast here.
            comp.to(device=device)
            if kind == "toy" and dtype != torch.float32:
                comp.to(dtype=dtype)
            comp.eval()
            comp.requires_grad_(False)
    sample = unet.config.sample_size
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample
    vae = getattr(pipe, "vae", None)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    conditional = getattr(pipe, "text_encoder", None) is not None
    return LoadedModel(pipe, spec, kind, conditional, int(sample) * factor, device, dtype, _fingerprint(pipe),
                       type(pipe).__name__)
