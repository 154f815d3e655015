"""mmh_fast.text.anisotropy (Asthana and Belagiannis, ICLR 2026): the
norm + alignment detector on pure noise against a planted memorizer's closed
form (alignment exactly 1 where the guidance vector and the unconditional
eps are collinear by construction) and against direct calls of the tiny
diffusers UNet; the prompt-adaptation mitigation."""
import warnings

import pytest
import torch

from mmh_fast.models.pipelines import encode_images, encode_prompts
from mmh_fast.models.sampling import ddim_grid, sample_noise
from mmh_fast.testing import PlantedMemorizer, tiny_stable_diffusion_pipeline, word_merges
from mmh_fast.text.anisotropy import adapt_prompt_embedding, norm_alignment_score
from text_fixtures import MEM, OTHERS, TRIGGER, WORDS, planted, tiny_sd


def _planted_eps(m, x, psi, sigma, g):
    var = psi ** 2 * m.variance + sigma ** 2
    return sigma * (g * (x - psi * m.memorized) / sigma ** 2 + (1 - g) * x / var)


def _gate(pipe, model, prompt):
    with torch.no_grad():
        return float(model.gate(encode_prompts(pipe, prompt), 1))


def _channel_cos(a, b):  # [B, C, h, w] -> [B], written out independently
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for n in range(a.shape[0]):
        vals = []
        for i in range(a.shape[2]):
            for j in range(a.shape[3]):
                u, v = a[n, :, i, j], b[n, :, i, j]
                d = float(u.norm() * v.norm())
                vals.append(float(u @ v) / d if d > 0 else 0.0)
        out[n] = sum(vals) / len(vals)
    return out


@pytest.fixture(scope="module")
def zero_memorizer():
    """A planted memorizer of the zero latent: eps_c - eps_u = sigma g (1/sigma^2 - 1/var) x and
    eps_u = sigma x / var are positive multiples of x, collinear at every position."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_stable_diffusion_pipeline(image_size=16, merges=word_merges(WORDS))
    model = PlantedMemorizer.calibrate(pipe, MEM, TRIGGER, torch.zeros(4, 8, 8), reference_prompts=OTHERS)
    pipe.unet = model
    return pipe, model


def test_alignment_is_exactly_one_where_collinear_by_construction(zero_memorizer):
    pipe, model = zero_memorizer
    got = norm_alignment_score(pipe, [MEM] + OTHERS[:2], num_images=3, seed=4, return_components=True)
    assert float((got.alignment[0] - 1).abs()) < 1e-12
    assert bool((got.alignment[1:] == 0).all()) and bool((got.norm[1:] == 0).all())  # the gate is shut
    g = ddim_grid(pipe.scheduler, 50)
    psi, sigma = g.psi[0], g.sigma[0]
    var = psi ** 2 + sigma ** 2
    gate = _gate(pipe, model, MEM)
    x = sample_noise((3, 4, 8, 8), seed=4, dtype=torch.float64).reshape(3, -1)
    want_norm = sigma * gate * (1 / sigma ** 2 - 1 / var) * x.norm(dim=1)
    assert float(got.norm[0]) == pytest.approx(float(want_norm.mean()), rel=1e-10)
    torch.testing.assert_close(got.score, got.norm + 2 * got.alignment, rtol=1e-12, atol=0)


def test_norm_and_alignment_match_the_planted_closed_form():
    P = planted()
    got = norm_alignment_score(P.pipe, [MEM, OTHERS[0]], num_images=2, seed=1, norm_weight=0.5,
                               alignment_weight=3.0, return_components=True)
    g = ddim_grid(P.pipe.scheduler, 50)
    gate = _gate(P.pipe, P.model, MEM)
    x = sample_noise((2,) + tuple(P.latent.shape), seed=1, dtype=torch.float64)
    flat = x.reshape(2, -1)
    e_c = _planted_eps(P.model, flat, g.psi[0], g.sigma[0], gate)
    e_u = _planted_eps(P.model, flat, g.psi[0], g.sigma[0], 0.0)
    assert float(got.norm[0]) == pytest.approx(float((e_c - e_u).norm(dim=1).mean()), rel=1e-10)
    lo = len(g) - 3  # timesteps[-3]
    l_c = _planted_eps(P.model, flat, g.psi[lo], g.sigma[lo], gate).reshape(x.shape)
    l_u = _planted_eps(P.model, flat, g.psi[lo], g.sigma[lo], 0.0).reshape(x.shape)
    assert float(got.alignment[0]) == pytest.approx(float(_channel_cos(l_u, l_c - l_u).mean()), rel=1e-10)
    assert float(got.score[0]) == pytest.approx(0.5 * float(got.norm[0]) + 3 * float(got.alignment[0]), rel=1e-12)
    assert float(got.score[1]) == 0


def test_norm_alignment_on_the_unet_equals_direct_calls_and_is_batch_independent():
    pipe = tiny_sd()
    prompts = ["a red car", "a dog", "the blue sky"]
    got = norm_alignment_score(pipe, prompts, num_images=2, seed=2, num_inference_steps=10, return_components=True)
    sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sch.set_timesteps(10)
    e = encode_prompts(pipe, prompts + [""])
    x = sample_noise((2, 4, 4, 4), seed=2)
    for p in range(3):
        ehs = torch.cat([e[3:].expand(2, -1, -1), e[p:p + 1].expand(2, -1, -1)])
        with torch.no_grad():
            eu, ec = pipe.unet(torch.cat([x, x]), sch.timesteps[0], encoder_hidden_states=ehs).sample.chunk(2)
            lu, lc = pipe.unet(torch.cat([x, x]), sch.timesteps[-3], encoder_hidden_states=ehs).sample.chunk(2)
        assert float(got.norm[p]) == pytest.approx(float((ec - eu).flatten(1).double().norm(dim=1).mean()),
                                                   rel=1e-5)
        assert float(got.alignment[p]) == pytest.approx(float(_channel_cos(lu.double(), (lc - lu).double()).mean()),
                                                        rel=1e-4, abs=1e-6)
    kw = dict(num_images=2, seed=2, num_inference_steps=10)
    torch.testing.assert_close(norm_alignment_score(pipe, prompts, batch_size=1, **kw), got.score,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm_alignment_score(pipe, prompts[::-1], **kw), got.score.flip(0),
                               rtol=1e-5, atol=1e-6)


def test_adapt_prompt_embedding_lowers_the_score_and_stops_at_target():
    P = planted()
    emb, hist = adapt_prompt_embedding(P.pipe, MEM, iters=15, lr=0.05, return_history=True)
    assert hist[-1] < 0.5 * hist[0]
    # the returned embedding is the one scored last
    from mmh_fast.text.anisotropy import _terms
    from mmh_fast.text._core import text_pipeline
    tp = text_pipeline(P.pipe)
    g = tp.grid(50)
    with torch.no_grad():
        n_, a_ = _terms(tp, g, tp.initial_latents([0], 0), emb, tp.uncond(), len(g) - 3)
    assert float(n_ + 2 * a_) == pytest.approx(hist[-1], rel=1e-9)
    _, h2 = adapt_prompt_embedding(P.pipe, MEM, iters=15, lr=0.05, target=hist[0] * 0.9, return_history=True)
    assert h2[-1] <= hist[0] * 0.9 and len(h2) < len(hist)
    # a prompt the model does not memorize scores 0 and is left as it is
    e0 = encode_prompts(P.pipe, OTHERS[0])
    same, h3 = adapt_prompt_embedding(P.pipe, OTHERS[0], iters=3, target=0.0, return_history=True)
    assert h3 == [0.0] and torch.equal(same, e0)


def test_bad_input_names_the_argument():
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="unexpected keyword argument 'gamma'"):
        norm_alignment_score(pipe, "a dog", gamma=1.0)
    with pytest.raises(TypeError, match="prompts must be strings"):
        norm_alignment_score(pipe, ["a dog", None])
    with pytest.raises(ValueError, match="alignment_step must index"):
        norm_alignment_score(pipe, "a dog", alignment_step=50)
    with pytest.raises(ValueError, match="alignment_weight must be a finite number"):
        norm_alignment_score(pipe, "a dog", alignment_weight=float("nan"))
    with pytest.raises(ValueError, match="takes one prompt"):
        adapt_prompt_embedding(pipe, ["a dog", "a cat"])


def test_nan_scores_raise_naming_the_prompt():
    from test_text_sharpness import _NaNNet, _fresh_sd

    pipe = _fresh_sd()
    pipe.unet = _NaNNet(pipe.unet.config)
    with pytest.raises(FloatingPointError, match=r"prompts\[0\] = 'a dog'"):
        norm_alignment_score(pipe, ["a dog"])
    with pytest.raises(FloatingPointError, match="NaN"):
        adapt_prompt_embedding(pipe, "a dog", iters=1)


def test_default_chunks_come_from_the_model_not_the_whole_batch(monkeypatch):
    """The geometry detectors split the user's (prompt, image) rows into the
    UNet's default chunk size (TextPipeline.batch_size), never one call for the
    whole batch, and the scores do not depend on the chunking."""
    from mmh_fast.text._core import TextPipeline

    pipe = tiny_sd()
    prompts = ["a dog", "a cat", "a red car"]
    whole = norm_alignment_score(pipe, prompts, num_images=2, batch_size=6)
    sizes = []
    forward = pipe.unet.forward

    def counting(sample, *a, **k):
        sizes.append(sample.shape[0])
        return forward(sample, *a, **k)

    monkeypatch.setattr(TextPipeline, "batch_size", lambda self, **kw: 2)
    monkeypatch.setattr(pipe.unet, "forward", counting)
    chunked = norm_alignment_score(pipe, prompts, num_images=2)
    assert sizes and max(sizes) <= 2 * 2  # 2 rows x 2 CFG branches per call, not 6 rows
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)


def test_non_finite_scores_are_the_librarys_error_listing_every_prompt():
    from test_text_sharpness import _NaNNet, _fresh_sd

    from mmh_fast.models.batching import NonFiniteOutputError

    pipe = _fresh_sd()
    pipe.unet = _NaNNet(pipe.unet.config)
    with pytest.raises(NonFiniteOutputError) as e:
        norm_alignment_score(pipe, ["a dog", "a cat"])
    assert e.value.positions == [0, 1]
