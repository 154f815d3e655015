"""encode_images / decode_latents chunk the VAE by its own estimate and halve
the chunk on out-of-memory, with the values of one all-at-once VAE call."""
import warnings

import pytest
import torch

from mmh_fast.models import batching
from mmh_fast.models.pipelines import decode_latents, encode_images
from mmh_fast.testing import tiny_stable_diffusion_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def sd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_stable_diffusion_pipeline(image_size=8, max_length=12).to(torch.float64)


def _oom_above(module, limit: int) -> list:
    """Out of memory (as CUDA raises it) on calls of more than ``limit`` rows; the row counts let through."""
    rows = []

    def hook(m, args):
        if args[0].shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {args[0].shape[0]} rows (fake)")
        rows.append(int(args[0].shape[0]))

    module.register_forward_pre_hook(hook)
    return rows


def test_encode_and_decode_halve_on_oom_and_equal_one_call(sd):
    x = torch.rand(7, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z_ref = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
        img_ref = sd.vae.decode(z_ref / sd.vae.config.scaling_factor).sample.clamp(-1, 1).float()
    enc_rows = _oom_above(sd.vae.encoder, 3)
    dec_rows = _oom_above(sd.vae.decoder, 2)
    with pytest.warns(UserWarning, match=r"encode_images \(VAE encoder\).*chunks of 3"):
        z = encode_images(sd, x, batch_size=7)
    with pytest.warns(UserWarning, match=r"decode_latents \(VAE decoder\).*chunks of 1"):
        img = decode_latents(sd, z, batch_size=7)
    assert max(enc_rows) <= 3 and sum(enc_rows) == 7 and max(dec_rows) <= 2 and sum(dec_rows) == 7
    # float64 convolutions in other batch shapes: ~1e-16 per op
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(img, img_ref, rtol=1e-6, atol=1e-6)


def test_default_chunk_is_the_vae_estimate(sd, monkeypatch):
    """With a budget of 2 images of the VAE's activations, the default call runs 2 images per call."""
    per = batching.per_sample_bytes(sd.vae, (3, 8, 8))
    monkeypatch.setattr(batching, "CPU_BUDGET_BYTES", 2 * per)
    rows = _oom_above(sd.vae.encoder, 10 ** 6)
    encode_images(sd, torch.zeros(5, 3, 8, 8, dtype=torch.float64))
    assert rows == [2, 2, 1]


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_batch_size_is_named(sd, bad):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 or None"):
        encode_images(sd, torch.zeros(2, 3, 8, 8, dtype=torch.float64), batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1 or None"):
        decode_latents(sd, torch.zeros(2, 4, 4, 4, dtype=torch.float64), batch_size=bad)
