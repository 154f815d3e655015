"""``build``: train the lab and write it to disk (or reuse what is there)."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import LabData, make_data, png_bytes, vocabulary, write_tokenizer
from .training import (LabConfig, latent_means, make_text_encoder, make_unet, make_vae, refine_decoder,
                       sampling_scheduler, set_threads, train_denoiser, train_vae)

BUILD_FILE = "build.json"
FORMAT = 1


@dataclass
class Lab:
    """A built lab: ``pipeline_dir`` (a StableDiffusionPipeline saved with
    save_pretrained), ``prompts`` and ``train`` (the rows of prompts.parquet and
    train.parquet as lists of dicts), the recipe and the build record."""

    out_dir: str
    config: LabConfig
    seed: int
    size: str
    record: dict

    @property
    def pipeline_dir(self) -> str:
        return os.path.join(self.out_dir, "pipeline")

    def load_pipeline(self, *, dtype=torch.float32):
        """The pipeline through diffusers alone (local files only), progress bars off."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(self.pipeline_dir, local_files_only=True, torch_dtype=dtype,
                                                       safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompts(self) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(os.path.join(self.out_dir, "prompts.parquet")).to_pylist()

    def train(self) -> list[dict]:
        import pyarrow.parquet as pq

        return pq.read_table(os.path.join(self.out_dir, "train.parquet")).to_pylist()

    def train_images(self) -> np.ndarray:
        """[N, 3, H, W] float32 in [-1, 1]: the distinct training images, in train.parquet order,
        decoded from the stored PNGs (so anyone can check the ground truth from the files)."""
        import io

        from PIL import Image

        rows = self.train()
        out = []
        for r in rows:
            a = np.asarray(Image.open(io.BytesIO(r["png"])).convert("L"), dtype=np.float32) / 127.5 - 1
            out.append(np.repeat(a[None], 3, axis=0))
        return np.stack(out)


def _progress_factory(enabled: bool):
    def progress(it, desc):
        if not enabled:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, desc=desc, file=sys.stderr, mininterval=2.0)

    return progress


def _write_tokenizer(directory: str, words: list[str], max_length: int):
    tok, bad = write_tokenizer(directory, words, max_length)
    if bad:
        raise RuntimeError(f"lab tokenizer: the words {bad} are not single tokens")
    return tok


def _expected(size: str, seed: int, config: LabConfig) -> dict:
    return {"format": FORMAT, "size": size, "seed": int(seed), "config": config.to_dict()}


def _load_existing(out_dir: str, want: dict) -> dict | None:
    path = os.path.join(out_dir, BUILD_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rec = json.load(f)
    if {k: rec.get(k) for k in want} != want:
        return None
    need = ["prompts.parquet", "train.parquet", os.path.join("pipeline", "model_index.json")]
    if not all(os.path.exists(os.path.join(out_dir, n)) for n in need):
        return None
    return rec


def build(out_dir, *, size: str = "full", seed: int = 0, config: LabConfig | None = None, threads: int | None = 1,
          progress: bool = True, force: bool = False) -> Lab:
    """Build and train the memorization lab into ``out_dir`` (or reuse it).

    Writes ``out_dir/pipeline`` (a diffusers StableDiffusionPipeline:
    AutoencoderKL, CLIPTextModel, CLIPTokenizer with the lab's vocabulary,
    UNet2DConditionModel, DDIMScheduler), ``prompts.parquet`` (prompt, kind,
    train_keys, trigger, split, digit), ``train.parquet`` (key, caption, png,
    kind, digit, dataset_count, stream_count) and ``build.json`` (the recipe,
    seed, timings, losses). A second call with the same ``size``, ``seed`` and
    ``config`` returns the lab on disk without training (``force=True``
    retrains).

    Args:
        out_dir: directory (created).
        size: "full" (the README's lab) or "quick" (the tests').
        seed: seeds the data draw, the weights and the training stream.
        config: a recipe overriding ``size``'s (:class:`LabConfig`).
        threads: torch threads while training (None: leave torch's setting).
        progress: progress bars on stderr.
    """
    if size not in ("full", "quick"):
        raise ValueError(f"size must be 'full' or 'quick', got {size!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    cfg = config if config is not None else LabConfig.for_size(size)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    want = _expected(size, seed, cfg)
    if not force:
        rec = _load_existing(out_dir, want)
        if rec is not None:
            return Lab(out_dir=out_dir, config=cfg, seed=int(seed), size=size, record=rec)
    rec = _train_and_record(out_dir, cfg, int(seed), threads, progress, want)
    return Lab(out_dir=out_dir, config=cfg, seed=int(seed), size=size, record=rec)


def _train_and_record(out_dir: str, cfg: LabConfig, seed: int, threads: int | None, progress: bool, want: dict,
                      **train_kw) -> dict:
    """:func:`_train` on ``threads`` torch threads, then build.json (the record plus ``want``,
    what a later call compares to reuse the directory)."""
    old_threads = torch.get_num_threads()
    set_threads(threads)
    try:
        rec = _train(out_dir, cfg, seed, _progress_factory(progress), **train_kw)
    finally:
        torch.set_num_threads(old_threads)
    rec.update(want)
    rec = json.loads(json.dumps(rec))  # the record as a later reuse reads it back (lists, not tuples)
    with open(os.path.join(out_dir, BUILD_FILE), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def _train(out_dir: str, cfg: LabConfig, seed: int, progress, *, data: LabData | None = None,
           train_columns: dict | None = None, prompt_columns: dict | None = None, pipeline_dir: str | None = None,
           tables: bool = True) -> dict:
    """Train every component on ``data`` (default: ``cfg``'s :func:`make_data`) and write the
    pipeline (to ``pipeline_dir``, default ``out_dir/pipeline``) and, unless ``tables`` is False,
    the tables (``train_columns`` / ``prompt_columns``: extra columns, one value per row)."""
    from diffusers import StableDiffusionPipeline

    t0 = time.time()
    if data is None:
        data = make_data(n_dd=cfg.n_dd, dd_copies=cfg.dd_copies, n_od=cfg.n_od, od_boost=cfg.od_boost,
                         n_generic=cfg.n_generic, image_size=cfg.image_size, seed=seed)
    pdir = pipeline_dir if pipeline_dir is not None else os.path.join(out_dir, "pipeline")
    with tempfile.TemporaryDirectory(prefix="mmh_lab_tok_") as tdir:
        tok = _write_tokenizer(tdir, vocabulary(data), cfg.max_length)
    images = torch.from_numpy(data.images)
    vae = make_vae(cfg, seed)
    vae_stats = train_vae(vae, images, cfg, seed=seed + 1, progress=progress)
    t_vae = time.time() - t0
    lat = latent_means(vae, images) * vae.config.scaling_factor
    text = make_text_encoder(cfg, tok, seed + 2)
    unet = make_unet(cfg, seed + 3)
    enc = tok(data.captions, padding="max_length", max_length=cfg.max_length, truncation=True, return_tensors="pt")
    empty = tok([""], padding="max_length", max_length=cfg.max_length, return_tensors="pt").input_ids[0]

    tr = train_denoiser(unet, text, lat, enc.input_ids, empty, data.stream_weight, cfg,
                        seed=seed + 4, progress=progress)
    vae_stats.update(refine_decoder(vae, images, cfg, seed=seed + 5, progress=progress))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(pdir, safe_serialization=True)
    # vocab.json and merges.txt beside the tokenizer.json that save_pretrained writes, so that
    # CLIPTokenizer loads the lab's vocabulary with any transformers version
    _write_tokenizer(os.path.join(pdir, "tokenizer"), vocabulary(data), cfg.max_length)
    if tables:
        _write_tables(out_dir, data, tr["stream_count"], train_columns=train_columns, prompt_columns=prompt_columns)
    return {"vae": vae_stats, "loss_curve": tr["loss_curve"], "seconds": {"vae": t_vae,
                                                                           "denoiser": tr["train_seconds"],
                                                                           "total": time.time() - t0},
            "threads": torch.get_num_threads(),
            "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                           "text_encoder": sum(p.numel() for p in text.parameters()),
                           "vae": sum(p.numel() for p in vae.parameters())}}


def _write_tables(out_dir: str, data: LabData, stream_count: np.ndarray, *, train_columns: dict | None = None,
                  prompt_columns: dict | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "key": data.keys, "caption": data.captions, "png": [png_bytes(x) for x in data.images],
        "kind": data.kinds, "digit": [int(d) for d in data.digits],
        "dataset_count": [int(c) for c in data.dataset_count], "stream_count": [int(c) for c in stream_count],
        **(train_columns or {}),
    }), os.path.join(out_dir, "train.parquet"))
    pr = data.prompts
    pq.write_table(pa.table({
        "prompt": [p["prompt"] for p in pr], "kind": [p["kind"] for p in pr],
        "train_keys": pa.array([p["train_keys"] for p in pr], type=pa.list_(pa.string())),
        "trigger": pa.array([p["trigger"] for p in pr], type=pa.string()), "split": [p["split"] for p in pr],
        "digit": [p["digit"] for p in pr], **(prompt_columns or {}),
    }), os.path.join(out_dir, "prompts.parquet"))


CHECKPOINT_FILES = ("build.json", "prompts.parquet", "train.parquet")


def save_checkpoint(lab: Lab, directory, *, command: str | None = None) -> None:
    """A compact copy of a built lab: the pipeline with float16 weights (about half
    the bytes), the tables and build.json (plus ``command``, how it was built,
    in CHECKPOINT.txt). :func:`load_checkpoint` turns it back into a lab directory."""
    import shutil

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    pipe = lab.load_pipeline()
    pipe.to(torch.float16)
    pipe.save_pretrained(os.path.join(directory, "pipeline"), safe_serialization=True)
    _copy_vocab_files(lab.pipeline_dir, os.path.join(directory, "pipeline"))
    for name in CHECKPOINT_FILES:
        shutil.copy(os.path.join(lab.out_dir, name), os.path.join(directory, name))
    if command:
        with open(os.path.join(directory, "CHECKPOINT.txt"), "w") as f:
            f.write("Built with:\n\n    " + command + "\n\nthen mmh_fast.lab.save_checkpoint (float16 weights).\n")


def load_checkpoint(directory, out_dir) -> Lab:
    """The lab saved by :func:`save_checkpoint`, written to ``out_dir`` as an
    ordinary lab (float32 pipeline, so that diffusers alone loads and runs it on
    CPU). Its ground truth must be verified again: float16 rounding changes the
    weights slightly, so nothing measured on the original is carried over."""
    import shutil

    from diffusers import StableDiffusionPipeline

    directory, out_dir = os.fspath(directory), os.fspath(out_dir)
    with open(os.path.join(directory, "build.json")) as f:
        rec = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(directory, "pipeline"), local_files_only=True,
                                                   torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.save_pretrained(os.path.join(out_dir, "pipeline"), safe_serialization=True)
    _copy_vocab_files(os.path.join(directory, "pipeline"), os.path.join(out_dir, "pipeline"))
    for name in CHECKPOINT_FILES:
        shutil.copy(os.path.join(directory, name), os.path.join(out_dir, name))
    cfg = LabConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec["config"].items()})
    return Lab(out_dir=out_dir, config=cfg, seed=int(rec["seed"]), size=rec["size"], record=rec)


def _copy_vocab_files(src_pipeline: str, dst_pipeline: str) -> None:
    import shutil

    for name in ("vocab.json", "merges.txt"):
        src = os.path.join(src_pipeline, "tokenizer", name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(dst_pipeline, "tokenizer", name))
