"""Peak memory of `mmh_fast.flipd` on a Stable-Diffusion-1.5-sized pipeline on CPU
(issue 13, item 10).

A StableDiffusionPipeline with SD-1.5's shapes and random weights (UNet
860M parameters, the SD VAE 84M, a 12-layer CLIP text encoder 123M; a small
byte-level tokenizer, nothing downloaded) is built in a child process, saved
with ``save_pretrained`` and reloaded here with ``from_pretrained``, then
``flipd`` (1 Hutchinson probe, default chunking) runs on N random images of
SIZE x SIZE in [-1, 1]. Printed as one JSON line:

- ``rss_after_load_gib``: resident memory with the pipeline loaded;
- ``peak_rss_gib``: the process's peak resident memory (ru_maxrss) at the end,
  loading included (the build and save run in the child, not counted);
- ``flipd_s``, ``encode_s``: seconds for the flipd call and for the VAE
  encoding alone; ``forward_s``: one plain UNet forward on one latent, and
  ``flipd_over_forward``: flipd seconds per image, VAE excluded, over it;
- the chunk sizes that ``default_batch_size`` chose.

Usage (heavy: minutes and ~8 GiB on a 2-core CPU at 16 x 512 x 512):

    nice -n 5 .venv/bin/python bench/sd_memory.py --images 16 --size 512
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

GIB = 1 << 30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_and_save(path: str) -> None:
    """SD-1.5-sized pipeline with random weights -> save_pretrained(path)."""
    from _harness import sd15_scheduler, sd15_text_encoder, sd15_unet
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    unet = sd15_unet(0)  # seeds torch: the VAE and text encoder below follow from seed 0 too
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512)
    tok, text = sd15_text_encoder()
    sched = sd15_scheduler()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dir", default=None, help="where the pipeline is saved (default: a temporary directory)")
    args = ap.parse_args(argv)
    path = args.dir or tempfile.mkdtemp(prefix="mmh_sd15_")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        subprocess.run([sys.executable, __file__, "--build-only", path], check=True)

    import torch
    from diffusers import StableDiffusionPipeline

    import mmh_fast
    from mmh_fast.models.batching import default_batch_size
    from mmh_fast.models.pipelines import encode_images, encode_prompts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rss_load = _rss_bytes()
    x = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    h = args.size // 8
    chunks = {"unet_flipd": default_batch_size(pipe.unet, (4, h, h), backward=True),
              "vae_encode": default_batch_size(pipe.vae, (3, args.size, args.size))}

    t = time.perf_counter()
    z = encode_images(pipe, x[:1])
    encode_s = (time.perf_counter() - t) * args.images  # one image, scaled: the flipd call encodes them all
    emb = encode_prompts(pipe, "")
    ts = torch.full((1,), 50.0)
    with torch.no_grad():
        pipe.unet(z, ts, encoder_hidden_states=emb)  # warm-up
        t = time.perf_counter()
        pipe.unet(z, ts, encoder_hidden_states=emb)
        forward_s = time.perf_counter() - t

    t = time.perf_counter()
    vals = mmh_fast.flipd(pipe, x, 0.05, n_probes=1)
    flipd_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"images": args.images, "size": args.size, "threads": torch.get_num_threads(),
           "rss_after_load_gib": round(rss_load / GIB, 2), "peak_rss_gib": round(peak / GIB, 2),
           "flipd_s": round(flipd_s, 1), "encode_s_estimate": round(encode_s, 1), "forward_s": round(forward_s, 2),
           "flipd_over_forward": round((flipd_s - encode_s) / args.images / forward_s, 2),
           "default_chunks": chunks, "finite": bool(torch.isfinite(vals).all()),
           "load_avg_1min": round(os.getloadavg()[0], 2), "torch": torch.__version__}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build-only":
        build_and_save(sys.argv[2])
    else:
        main()
