"""GPU tier (``--tier gpu``; skipped without CUDA): the CUDA kernels beside
their CPU and plain-PyTorch counterparts, and the models at Stable Diffusion
scale (issue 8).

- kNN (N = 200,000, D = 64, k = 100): native CUDA vs a plain-PyTorch tiled
  ``torch.cdist`` + ``torch.topk`` on the same GPU; the CPU kernel's time on
  the same data is recorded beside it.
- Local PCA / lpca(rule="fo") at N = 1,000,000, D = 64, k = 100 vs a
  plain-PyTorch chunked pipeline (cdist + topk, gather, covariance by bmm,
  eigvalsh) on the same GPU.
- svd_rank randomized vs ``torch.linalg.svdvals`` on CUDA (16 x 1024 x 4096, rank 50).
- Hutchinson probe generation vs ``torch.randn`` of the same size.
- FLIPD (1 probe) on a randomly initialised SD-1.5-sized UNet2DConditionModel
  at 64 x 64 latents in fp16: images/s and the ratio to plain forward throughput.
- cfg_norm (steps (0, 1)) prompts/s and token_attributions seconds per call on
  an SD-1.5-sized UNet + text encoder (random weights; nothing downloaded).

Run: ``make bench BENCH_TIER=gpu`` on a machine with CUDA (after building with
CUDA kernels). The figures go to bench/README.md with the machine named.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from _harness import best_time, compare

import mmh_fast
from mmh_fast import ops

pytestmark = pytest.mark.tier("gpu")

CUDA = torch.device("cuda")


def _sync(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _torch_knn(x: torch.Tensor, k: int, chunk: int = 4096):
    """Plain-PyTorch exact kNN (self excluded): cdist tiles + topk."""
    n = x.shape[0]
    out_d = torch.empty(n, k, device=x.device, dtype=x.dtype)
    out_i = torch.empty(n, k, device=x.device, dtype=torch.long)
    for s in range(0, n, chunk):
        q = x[s:s + chunk]
        d = torch.cdist(q, x)
        d[torch.arange(q.shape[0], device=x.device), torch.arange(s, s + q.shape[0], device=x.device)] = float("inf")
        v, i = torch.topk(d, k, dim=1, largest=False)
        out_d[s:s + chunk], out_i[s:s + chunk] = v, i
    return out_d, out_i


def _torch_lpca_fo(x: torch.Tensor, k: int, alpha: float = 0.05, chunk: int = 512):
    """Plain-PyTorch local PCA with the FO rule: the anchor at 1M points."""
    n = x.shape[0]
    out = torch.empty(n, dtype=torch.long, device=x.device)
    for s in range(0, n, chunk):
        q = x[s:s + chunk]
        d = torch.cdist(q, x)
        d[torch.arange(q.shape[0], device=x.device), torch.arange(s, s + q.shape[0], device=x.device)] = float("inf")
        idx = torch.topk(d, k, dim=1, largest=False).indices
        nb = x[idx]  # [c, k, D]
        nb = nb - nb.mean(1, keepdim=True)
        cov = nb.transpose(1, 2) @ nb / (k - 1)
        ev = torch.linalg.eigvalsh(cov.double())
        out[s:s + chunk] = (ev > alpha * ev[:, -1:]).sum(1)
    return out


def test_gpu_knn(benchmark):
    g = torch.Generator().manual_seed(0)
    x_cpu = torch.randn(200_000, 64, generator=g)
    x = x_cpu.to(CUDA)
    dist, _ = compare(benchmark, _sync(lambda: ops.knn(x, k=100, progress=False)),
                      _sync(lambda: _torch_knn(x, 100)), anchor_name="torch cdist+topk (CUDA)", rounds=3,
                      target="faster than plain PyTorch on the same GPU")
    ref, _ = _torch_knn(x, 100)
    torch.testing.assert_close(dist, ref, rtol=1e-4, atol=1e-4)
    cpu_s = best_time(lambda: ops.knn(x_cpu[:20_000], k=100, progress=False), rounds=1, warmup=0)
    benchmark.extra_info["cpu_kernel_s_at_20k"] = cpu_s


def test_gpu_lpca_one_million(benchmark):
    g = torch.Generator().manual_seed(1)
    # points near a union of low-dimensional patches so that the FO counts vary
    basis = torch.linalg.qr(torch.randn(64, 8, generator=g))[0]
    x = (torch.randn(1_000_000, 8, generator=g) @ basis.T + 0.01 * torch.randn(1_000_000, 64, generator=g)).to(CUDA)
    lid = compare(benchmark, _sync(lambda: mmh_fast.lpca(x, k=100, rule="fo", progress=False)),
                  _sync(lambda: _torch_lpca_fo(x, 100)), anchor_name="torch cdist+topk+bmm+eigvalsh (CUDA)",
                  rounds=1, warmup=0, target="N = 1,000,000, D = 64 runs on one GPU")
    benchmark.extra_info["points_per_s"] = 1_000_000 / benchmark.stats.stats.min
    assert lid.shape == (1_000_000,)


def test_gpu_svd_rank_randomized(benchmark):
    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(16, 1024, 50, generator=g))[0]
    V = torch.linalg.qr(torch.randn(16, 4096, 50, generator=g))[0]
    A = (U @ V.transpose(1, 2) + 1e-6 * torch.randn(16, 1024, 4096, generator=g)).to(CUDA)
    ranks, _ = compare(benchmark, _sync(lambda: ops.svd_rank(A, rule="gap", method="randomized")),
                       _sync(lambda: torch.linalg.svdvals(A)), anchor_name="torch.linalg.svdvals (CUDA)",
                       rounds=3, target=">= 5x faster, same rank")
    assert bool((ranks.cpu() == 50).all())


def test_gpu_hutchinson_probes(benchmark):
    shape = (64, 4, 64, 64)
    compare(benchmark, _sync(lambda: ops.hutchinson_probes(shape, 8, probe="rademacher", device=CUDA)),
            _sync(lambda: torch.randint(0, 2, (8,) + shape, device=CUDA).float() * 2 - 1),
            anchor_name="torch.randint Rademacher (CUDA, not batch-invariant)", rounds=5)


def _sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    return unet.to(CUDA, torch.float16).eval()


@pytest.fixture(scope="module")
def sd15_unet():
    return _sd15_unet()


def test_gpu_flipd_sd15_unet_fp16(benchmark, sd15_unet):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    B = 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 4, 64, 64, generator=g).to(CUDA, torch.float16)
    emb = torch.randn(B, 77, 768, generator=g).to(CUDA, torch.float16)
    ts = torch.full((B,), 10, device=CUDA)

    def forward():
        with torch.no_grad():
            return sd15_unet(x, ts, encoder_hidden_states=emb).sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = compare(benchmark,
                      _sync(lambda: mmh_fast.flipd(sd15_unet, x, 0.01, scheduler=sched,
                                                   cond={"encoder_hidden_states": emb}, n_probes=1)),
                      _sync(forward), anchor_name="one plain fp16 forward (same batch)", rounds=3,
                      target="flipd with 1 probe <= 2.5x one forward")
    benchmark.extra_info["images_per_s"] = B / benchmark.stats.stats.min
    benchmark.extra_info["forward_images_per_s"] = B / benchmark.extra_info["anchor_s"]
    assert torch.isfinite(out).all()


def _sd15_pipeline(unet):
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mmh_fast.testing import write_tiny_clip_tokenizer

    tdir = tempfile.mkdtemp(prefix="mmh_sd15_tok_")
    write_tiny_clip_tokenizer(tdir)
    tok = CLIPTokenizer.from_pretrained(tdir, model_max_length=77)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = CLIPTextModel(cfg).to(CUDA, torch.float16).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=32).to(CUDA, torch.float16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_gpu_cfg_norm_sd15(benchmark, sd15_unet):
    from mmh_fast import text

    pipe = _sd15_pipeline(sd15_unet)
    prompts = ["the cat on the mat", "an old photo of a ship"] * 4
    B = len(prompts)
    x = torch.randn(4 * B, 4, 64, 64, device=CUDA, dtype=torch.float16)
    emb = torch.randn(8 * B, 77, 768, device=CUDA, dtype=torch.float16)
    ts = torch.full((8 * B,), 999, device=CUDA)

    def two_branch_calls():
        with torch.no_grad():
            return sd15_unet(torch.cat([x, x]), ts, encoder_hidden_states=emb).sample

    compare(benchmark, _sync(lambda: text.cfg_norm(pipe, prompts, num_images=4, steps=(0, 1))),
            _sync(two_branch_calls), anchor_name="one two-branch UNet call per image (fp16)", rounds=3,
            target="<= 1.2x one two-branch UNet call per image")
    benchmark.extra_info["prompts_per_s"] = B / benchmark.stats.stats.min


def test_gpu_token_attributions_sd15(benchmark, sd15_unet):
    from mmh_fast import text

    pipe = _sd15_pipeline(sd15_unet)
    compare(benchmark, _sync(lambda: text.token_attributions(pipe, "the cat on the mat", metric="cfg",
                                                              num_images=1)),
            None, anchor_name="none (seconds per call)", rounds=1, warmup=0)
    benchmark.extra_info["seconds_per_call"] = benchmark.stats.stats.min
