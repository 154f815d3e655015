"""``mmh-fast train``: a small unconditional diffusion model on the user's own images.

For users who have no model of their data: it trains a diffusers denoiser
(``--arch unet``: a small ``UNet2DModel``; ``--arch mlp``: the
:class:`~mmh_fast.models.pixel_mlp.PixelMLP`, much cheaper on tiny images) with
a ``DDPMScheduler`` by denoising score matching
(:func:`mmh_fast.models.training.train_denoiser`, eps-prediction), and saves a
``DDPMPipeline`` with ``save_pretrained`` so that ``mmh-fast scan --model DIR``
measures LID_theta with it.

``--captions`` trains a caption-conditioned ``StableDiffusionPipeline`` instead,
with the memorization lab's training code (:func:`mmh_fast.lab.build._train`:
VAE, then UNet and CLIP text encoder jointly with caption dropout, then the
decoder refined) on the captions the scan reads, its tokenizer's vocabulary
built so that each caption word is one token; CPU only.

The images are read from any source the scan reads (folder, WebDataset
shards, Parquet/CSV), decoded as the scan decodes them (RGB, resized and
centre-cropped to ``--image-size``) and scaled to [-1, 1]; they are held in
memory (N x 3 x S x S float32: 10,000 images at 32 px are 123 MB). The keys are
the scan's keys, so ``--weights`` (a CSV/Parquet of key -> weight) makes some
images appear more often in the training stream than in the data
(oversampling without duplicating files): an image of weight w is drawn as
often as w copies of it would be.

Meaningful for small datasets (up to some 10^4 images at 32 px on a GPU, a few
thousand tiny images on a CPU), to study how duplication or oversampling in
one's own data drives memorization. Not a substitute for the model actually
under study: a model trained here says nothing about what Stable Diffusion
memorized of LAION.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import UserError

__all__ = ["TrainConfig", "run_train", "read_images", "load_weights"]


@dataclass
class TrainConfig:
    """Settings of ``mmh-fast train`` (the command-line options, same names)."""

    data: str
    out: str
    arch: str = "unet"
    image_size: int = 32
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    width: int = 64
    t_power: float = 2.0
    weights: str | None = None
    device: str | None = None
    seed: int = 0
    limit: int | None = None
    image_column: str | None = None
    key_column: str | None = None
    progress: str = "auto"
    quiet: bool = False
    overwrite: bool = False
    captions: bool = False
    caption_column: str | None = None
    vae_steps: int = 600


def read_images(spec: str, *, image_size: int, limit: int | None = None, image_column=None, key_column=None,
                warn=None, caption_column=None, captions: list | None = None):
    """Decode every image of a scan source to ``(keys [N], uint8 [N, 3, S, S])``.

    Unreadable images are skipped (``warn`` is called with a message naming the
    first few); keys are the scan's keys of the same source. ``captions``: a list
    that receives each kept image's caption as the scan reads it (None where
    the source has none)."""
    from .sources import decode_image, open_source

    src = open_source(spec, limit=limit, image_column=image_column, key_column=key_column,
                      caption_column=caption_column)
    keys, arrays, bad = [], [], []
    for unit in src.units:
        for raw in src.iter_unit(unit):
            if raw.error is not None or raw.data is None:
                bad.append((raw.key, raw.error or "no image"))
                continue
            try:
                arr, _, _ = decode_image(raw.data, image_size)
            except Exception as exc:  # a corrupt file is skipped, as the scan makes it an error row
                bad.append((raw.key, f"{type(exc).__name__}: {exc}"))
                continue
            keys.append(raw.key)
            arrays.append(arr)
            if captions is not None:
                captions.append(raw.caption)
    if bad and warn is not None:
        first = "; ".join(f"{k} ({e})" for k, e in bad[:3])
        warn(f"{len(bad)} images could not be read and are left out of training: {first}"
             + (" ..." if len(bad) > 3 else ""))
    if not arrays:
        raise UserError(f"--data {spec!r}: no image could be read")
    return keys, np.stack(arrays)


def load_weights(path: str, keys: list[str]) -> np.ndarray:
    """[N] sampling weights of ``keys`` from a CSV/Parquet with 'key' and 'weight' columns
    (or, lacking those names, its first two); keys it does not list get weight 1."""
    from .report import read_table

    t = read_table(path, what="--weights")
    names = t.column_names
    kc, wc = ("key", "weight") if {"key", "weight"} <= set(names) else (names[0], names[1]) if len(names) >= 2 \
        else (None, None)
    if kc is None:
        raise UserError(f"--weights {path!r} needs a key and a weight column; found {names}")
    given = {}
    for k, w in zip(t.column(kc).to_pylist(), t.column(wc).to_pylist()):
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise UserError(f"--weights {path!r}: weight of {k!r} is {w!r}, expected a number >= 0") from None
        if not math.isfinite(w) or w < 0:
            raise UserError(f"--weights {path!r}: weight of {k!r} is {w}, expected a finite number >= 0")
        given[str(k)] = w
    known = set(keys)
    unknown = [k for k in given if k not in known]
    if len(unknown) == len(given):
        raise UserError(f"--weights {path!r}: no key matches an image of --data (weights keys: "
                        f"{', '.join(list(given)[:3])}; data keys: {', '.join(keys[:3])})")
    w = np.array([given.get(k, 1.0) for k in keys], dtype=np.float64)
    if not w.sum() > 0:
        raise UserError(f"--weights {path!r}: every weight is 0")
    return w


def _build(cfg: TrainConfig, channels: int):
    from ..models.training import small_unet

    if cfg.arch == "unet":
        return small_unet(cfg.image_size, channels=channels, width=cfg.width)
    from ..models.pixel_mlp import PixelMLP

    return PixelMLP(sample_size=cfg.image_size, in_channels=channels, hidden=cfg.width, seed=cfg.seed)


def _check(cfg: TrainConfig) -> None:
    if cfg.arch not in ("unet", "mlp"):
        raise UserError(f"--arch must be unet or mlp, got {cfg.arch!r}")
    for name in ("image_size", "steps", "batch_size", "width"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
    if cfg.arch == "unet" and (cfg.width % 8 or cfg.image_size < 4):
        raise UserError(f"--arch unet needs --width a multiple of 8 and --image-size >= 4, got {cfg.width}, "
                        f"{cfg.image_size}")
    if not cfg.lr > 0 or not cfg.t_power > 0:
        raise UserError(f"--lr and --t-power must be > 0, got {cfg.lr}, {cfg.t_power}")
    if os.path.isfile(os.path.join(cfg.out, "model_index.json")) and not cfg.overwrite:
        raise UserError(f"--out {cfg.out!r} already holds a model; pass --overwrite to replace it")


def caption_words(captions: list[str]) -> list[list[str]]:
    """Each caption split into the words a CLIP tokenizer sees (lowercased; punctuation marks
    and digits are words of their own), by tokenizing with a merge-free byte-level vocabulary:
    a word ends at each token marked ``</w>``."""
    import tempfile

    from transformers import CLIPTokenizer

    from ..testing import write_tiny_clip_tokenizer

    with tempfile.TemporaryDirectory(prefix="mmh_train_tok_") as tdir:
        tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tdir, merges=()))
    out = []
    for c in captions:
        words, cur = [], ""
        for piece in tok.tokenize(c):
            if piece.endswith("</w>"):
                words.append(cur + piece[:-4])
                cur = ""
            else:
                cur += piece
        out.append(words)
    return out


def caption_vocabulary(words: list[str]) -> list[str]:
    """The distinct ``words`` in an order whose BPE merge chains make each one token.

    A word's chain can be cut by another word's earlier-ranked merge of two of its
    inner characters; such words are moved to the front (their chains then rank
    first) and the check repeated. Raises UserError naming the words that stay
    split (non-ASCII letters are not supported by the byte-level chains)."""
    import tempfile

    from ..lab.data import write_tokenizer

    order = sorted(set(words), key=lambda w: (-len(w), w))  # longer chains first resolves most collisions
    bad: list[str] = []
    for _ in range(20):
        with tempfile.TemporaryDirectory(prefix="mmh_train_tok_") as tdir:
            _, bad = write_tokenizer(tdir, order, 77)
        if not bad:
            return order
        order = bad + [w for w in order if w not in set(bad)]
    raise UserError(f"--captions: the caption words {bad[:10]} cannot each be made one token of the model's "
                    "small tokenizer (non-ASCII letters are not supported); edit those captions")


def _captions_config(cfg: TrainConfig, max_length: int):
    from ..lab.training import LabConfig

    # the lab's recipe at the user's size and budget: VAE (3 levels, latents S/4) then UNet and text
    # encoder jointly, then the decoder refined for twice the VAE steps (the lab's 600 / 1200 ratio)
    return LabConfig(image_size=cfg.image_size, vae_steps=cfg.vae_steps, decoder_steps=2 * cfg.vae_steps,
                     unet_channels=(cfg.width // 2, cfg.width), max_length=max_length, steps=cfg.steps,
                     batch_size=cfg.batch_size, lr=cfg.lr, warmup=min(100, cfg.steps // 10))


def _check_captions(cfg: TrainConfig) -> None:
    if cfg.caption_column is not None and not cfg.captions:
        raise UserError("--caption-column needs --captions (a caption-conditioned model)")
    if not cfg.captions:
        return
    if cfg.arch != "unet":
        raise UserError(f"--captions trains a Stable-Diffusion-like latent model; --arch {cfg.arch} is for the "
                        "unconditional model only")
    if cfg.t_power != 2.0:
        raise UserError("--t-power applies to the unconditional model only; --captions draws t uniformly "
                        "(the lab's training)")
    if cfg.image_size % 8:
        raise UserError(f"--captions needs --image-size a multiple of 8 (VAE latents of S/4, one UNet "
                        f"downsampling), got {cfg.image_size}")
    if cfg.width % 32:
        raise UserError(f"--captions needs --width a multiple of 32 (UNet channels width/2, width in groups "
                        f"of 16), got {cfg.width}")
    if not isinstance(cfg.vae_steps, int) or cfg.vae_steps < 1:
        raise UserError(f"--vae-steps must be an integer >= 1, got {cfg.vae_steps!r}")


def _stage_progress(mode: str, say):
    """The lab's per-stage progress: a tqdm bar ("bar"), a log line every tenth of a stage ("log")."""
    from ..lab.build import _progress_factory

    if mode != "log":
        return _progress_factory(mode == "bar")

    def progress(it, desc):
        n = len(it)
        every = max(1, n // 10)
        for i, v in enumerate(it):
            yield v
            if (i + 1) % every == 0 or i + 1 == n:
                say(f"{desc}: step {i + 1}/{n}")

    return progress


def _run_captions(cfg: TrainConfig, keys, u8, captions, weights, device, say, warn, t_start) -> dict:
    """Train a StableDiffusionPipeline with the lab's code (:func:`mmh_fast.lab.build._train`) on the
    images and their captions, and save it into ``cfg.out``."""
    from ..lab.build import _train
    from ..lab.data import LabData
    from .scan import _progress_mode

    missing = [k for k, c in zip(keys, captions) if c is None or not c.strip()]
    if missing:
        raise UserError(f"--captions: {len(missing)} of {len(keys)} images of --data {cfg.data!r} have no or an "
                        f"empty caption (first: {', '.join(missing[:3])}); folders: a .txt beside each image, "
                        "WebDataset: .txt/.json, tables: --caption-column")
    words = caption_words(captions)
    longest = max(len(w) for w in words)
    if longest + 2 > 77:
        raise UserError(f"--captions: the longest caption has {longest} words; at most 75 (CLIP's 77 tokens)")
    vocab = caption_vocabulary([w for ws in words for w in ws])
    lab_cfg = _captions_config(cfg, longest + 2)
    if cfg.device is not None and device.type != "cpu":
        warn(f"--captions trains on the CPU (the lab's training code), not on --device {cfg.device}")
    n = len(keys)
    data = LabData(images=u8.astype(np.float32) / 127.5 - 1.0, keys=list(keys),
                   captions=[" ".join(ws) for ws in words], kinds=["image"] * n, digits=np.full(n, -1),
                   dataset_count=np.ones(n, np.int64),
                   stream_weight=weights if weights is not None else np.ones(n, np.float64), words=vocab)
    say(f"caption-conditioned: {len(vocab)} words, captions of up to {longest} words; VAE {lab_cfg.vae_steps} + "
        f"decoder {lab_cfg.decoder_steps} steps, UNet + text encoder {cfg.steps} steps of {cfg.batch_size}")
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rec = _train(cfg.out, lab_cfg, cfg.seed, _stage_progress(_progress_mode(cfg.progress, cfg.quiet), say),
                 data=data, pipeline_dir=cfg.out, tables=False)
    curve = rec["loss_curve"]
    final = float(curve[-1][1])
    if not math.isfinite(final):
        raise UserError(f"training diverged (loss {final}); lower --lr (now {cfg.lr})")
    info = {"settings": asdict(cfg), "images": n, "captioned": True, "lab_config": lab_cfg.to_dict(),
            "parameters": rec["parameters"], "vae": rec["vae"], "loss_curve": curve, "first_loss": float(curve[0][1]),
            "final_loss": final, "seconds": round(time.perf_counter() - t_start, 2)}
    if weights is not None:
        info["weighted_keys"] = {k: float(w) for k, w in zip(keys, weights) if w != 1.0}
    with open(os.path.join(cfg.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    say(f"saved a StableDiffusionPipeline to {cfg.out} (loss {info['first_loss']:.4f} -> {final:.4f}, "
        f"{info['seconds']:.0f} s); next: mmh-fast scan --model {cfg.out} --data {cfg.data} --out SCAN_DIR "
        "--metrics cfg_norm_train")
    return info


def run_train(cfg: TrainConfig) -> dict:
    """Train and save; returns what is written to ``DIR/train.json``."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ..models.training import train_denoiser
    from .loader import resolve_device
    from .scan import _progress_mode

    _check(cfg)
    _check_captions(cfg)
    device = resolve_device(cfg.device)

    def say(msg):
        if not cfg.quiet:
            print(f"mmh-fast train: {msg}", file=sys.stderr, flush=True)

    def warn(msg):
        print(f"mmh-fast train: warning: {msg}", file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    captions = [] if cfg.captions else None
    keys, u8 = read_images(cfg.data, image_size=cfg.image_size, limit=cfg.limit, image_column=cfg.image_column,
                           key_column=cfg.key_column, warn=warn, caption_column=cfg.caption_column,
                           captions=captions)
    weights = load_weights(cfg.weights, keys) if cfg.weights else None
    if cfg.captions:
        return _run_captions(cfg, keys, u8, captions, weights, device, say, warn, t_start)
    # the scan feeds models images in [-1, 1] (uint8 / 127.5 - 1): train on the same scale
    x = torch.from_numpy(u8).float().div_(127.5).sub_(1.0)
    say(f"{len(keys)} images at {cfg.image_size} x {cfg.image_size} from {cfg.data}"
        + (f", sampling weights from {cfg.weights} (total {weights.sum():.6g})" if weights is not None else ""))

    torch.manual_seed(cfg.seed)
    net = _build(cfg, x.shape[1]).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    n_params = sum(p.numel() for p in net.parameters())
    say(f"{cfg.arch}: {n_params / 1e6:.2f} M parameters, {cfg.steps} steps of {cfg.batch_size} on {device}")

    mode = _progress_mode(cfg.progress, cfg.quiet)
    bar, last = None, [time.monotonic()]
    if mode == "bar":
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, unit="step", dynamic_ncols=True, desc="train", file=sys.stderr)
    every = max(1, cfg.steps // 10)

    def callback(step, loss):
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        elif mode == "log" and ((step + 1) % every == 0 or time.monotonic() - last[0] > 30):
            last[0] = time.monotonic()
            say(f"step {step + 1}/{cfg.steps}, loss {loss:.4f}")

    try:
        losses = train_denoiser(net, x, scheduler=scheduler, steps=cfg.steps, batch_size=cfg.batch_size,
                                lr=cfg.lr, t_power=cfg.t_power, lr_warmup=min(100, cfg.steps // 10),
                                seed=cfg.seed, callback=callback, weights=weights)
    finally:
        if bar is not None:
            bar.close()
    final = float(np.mean(losses[-max(1, min(50, len(losses) // 10)):]))
    if not math.isfinite(final):
        raise UserError(f"training diverged (loss {final}); lower --lr (now {cfg.lr})")

    os.makedirs(cfg.out, exist_ok=True)
    net.to("cpu")
    DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(cfg.out)
    info = {"settings": asdict(cfg), "images": len(keys), "parameters": int(n_params),
            "final_loss": final, "first_loss": float(np.mean(losses[:min(50, len(losses))])),
            "seconds": round(time.perf_counter() - t_start, 2)}
    if weights is not None:
        info["weighted_keys"] = {k: float(w) for k, w in zip(keys, weights) if w != 1.0}
    with open(os.path.join(cfg.out, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    say(f"saved to {cfg.out} (loss {info['first_loss']:.4f} -> {final:.4f}, {info['seconds']:.0f} s); "
        f"next: mmh-fast scan --model {cfg.out} --data {cfg.data} --out SCAN_DIR")
    return info
