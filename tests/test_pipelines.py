"""Pipeline adapters (VAE encoding, prompt encoding, model resolution) and the
tiny diffusers builders of mmh_fast.testing."""
import warnings

import pytest
import torch
from diffusers import DDPMScheduler

from mmh_fast.models.forward_ad import forward_ad_safe
from mmh_fast.models.pipelines import (decode_latents, encode_images, encode_prompts, is_latent_pipeline, is_pipeline,
                                       resolve_model, select_rows, tokenize_prompts)
from mmh_fast.testing import (GaussianMixtureEps, tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline, tiny_unet2d,
                              write_tiny_clip_tokenizer)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny networks: see conftest



@pytest.fixture(scope="module")
def sd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_stable_diffusion_pipeline(image_size=8, max_length=12)


def test_encode_images_is_scaled_posterior_mean(sd):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = encode_images(sd, x, batch_size=2)
    with torch.no_grad():
        want = sd.vae.encode(x).latent_dist.mean * sd.vae.config.scaling_factor
    assert z.shape == (3, 4, 4, 4) and z.dtype == torch.float32
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
    assert encode_images(sd, x.double()).dtype == torch.float64
    img = decode_latents(sd, z, batch_size=2)
    assert img.shape == x.shape and float(img.abs().max()) <= 1.0
    with torch.no_grad():
        torch.testing.assert_close(img, sd.vae.decode(z / sd.vae.config.scaling_factor).sample.clamp(-1, 1))
    with pytest.raises(ValueError, match="multiples of 2"):
        encode_images(sd, torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        encode_images(sd, torch.zeros(3, 8, 8))


def test_encode_prompts_matches_text_encoder_and_dedupes(sd):
    prompts = ["a red car", "", "a red car", "the dog on the mat"]
    emb = encode_prompts(sd, prompts)
    assert emb.shape == (4, 12, 32)
    ids = sd.tokenizer(prompts, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = sd.text_encoder(ids)[0]
    torch.testing.assert_close(emb, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encode_prompts(sd, "a red car")[0], emb[0])
    calls = []
    h = sd.text_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        encode_prompts(sd, prompts)
    finally:
        h.remove()
    assert calls == [3]  # three distinct captions, one call
    with pytest.raises(TypeError, match="string"):
        encode_prompts(sd, [1, 2])
    with pytest.raises(TypeError, match="tokenizer"):
        encode_prompts(tiny_ddpm_pipeline(), "x")


def test_long_prompts_are_truncated_with_a_warning(sd):
    long = "a photograph of a very large red car parked beside the old stone house"
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask, cut = tokenize_prompts(sd, [long, "short"])
    assert ids.shape == (2, 12) and cut.tolist() == [True, False]
    assert int(ids[0, -1]) == sd.tokenizer.eos_token_id  # the pipeline's convention: EOS kept at the end
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_prompts(sd, ["short"])


def test_tokenizer_builder_round_trips(tmp_path):
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=20)
    ids = tok("The Cat, on the mat! 42")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # every byte is in the vocabulary
    assert tok.decode(ids, skip_special_tokens=True) == "the cat , on the mat ! 4 2"


def test_tiny_pipelines_generate(sd):
    assert is_pipeline(sd) and is_latent_pipeline(sd)
    ddpm = tiny_ddpm_pipeline()
    assert is_pipeline(ddpm) and not is_latent_pipeline(ddpm) and not is_pipeline(ddpm.unet)
    out = sd("a red car", num_inference_steps=2, height=8, width=8, output_type="pt").images
    assert out.shape == (1, 3, 8, 8) and bool(torch.isfinite(out).all())
    img = ddpm(batch_size=1, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 8, 8, 3)


def test_resolve_model_conditions(sd):
    r = resolve_model(sd, cond=["a", "b"], guidance_scale=3, n=2)
    assert r.pipeline is sd and r.guidance_scale == 3.0 and r.n_cond == 2
    assert r.cond["encoder_hidden_states"].shape == (2, 12, 32)
    torch.testing.assert_close(r.uncond["encoder_hidden_states"], encode_prompts(sd, ""))
    assert resolve_model(sd).cond["encoder_hidden_states"].shape[0] == 1  # "" by default
    with pytest.raises(ValueError, match="rows"):
        resolve_model(sd, cond=["a", "b", "c"], n=2)
    with pytest.raises(TypeError, match="guidance_scale"):
        resolve_model(sd, cond="a", guidance_scale="high")
    with pytest.raises(TypeError, match="neither"):
        resolve_model(lambda x, t: x, scheduler=DDPMScheduler(), cond=torch.zeros(1, 3))
    m = GaussianMixtureEps.random([1], (4,), seed=0)  # takes **kwargs: a tensor goes to encoder_hidden_states
    assert "encoder_hidden_states" in resolve_model(m, scheduler=DDPMScheduler(), cond=torch.zeros(1, 3)).cond
    cond, _ = r.kwargs_for(torch.tensor([1]), 2)
    torch.testing.assert_close(cond["encoder_hidden_states"][0], r.cond["encoder_hidden_states"][1])


def test_select_rows_indexes_broadcasts_and_passes_through():
    kw = {"a": torch.arange(4.0), "b": torch.zeros(1, 3), "c": "keep", "d": torch.tensor(2.0)}
    out = select_rows(kw, torch.tensor([3, 1]), 4)
    assert out["a"].tolist() == [3.0, 1.0] and out["b"].shape == (2, 3) and out["c"] == "keep"
    assert float(out["d"]) == 2.0
    assert select_rows(None, torch.tensor([0]), 1) == {}


def test_forward_ad_safe_is_temporary():
    unet = tiny_unet2d()
    gn = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    with forward_ad_safe(unet):
        assert all(len(m._forward_pre_hooks) == 1 for m in gn)
    assert all(len(m._forward_pre_hooks) == 0 for m in gn)
