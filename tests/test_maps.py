"""mmh_fast.text.maps (Kim and Lee, ICML 2026): coordinate-wise curvature
difference and score-difference maps against the closed form of a planted
memorizer that memorizes only a region of the latent (a partial copy), central
finite differences of the tiny diffusers UNet with the same keyed probes, and
the localisation scores against brute force."""
import warnings

import pytest
import torch

from mmh_fast.models.pipelines import encode_prompts
from mmh_fast.models.sampling import ddim_grid, sample_noise
from mmh_fast.ops.hutchinson import hutchinson_probes
from mmh_fast.testing import PlantedMemorizer, tiny_stable_diffusion_pipeline, word_merges
from mmh_fast.text._core import text_pipeline
from mmh_fast.text.maps import curvature_difference_map, map_localization, score_difference_map
from text_fixtures import MEM, OTHERS, TRIGGER, WORDS, tiny_sd


class RegionMemorizer(PlantedMemorizer):
    """PlantedMemorizer whose memorizing branch acts on a region of latent positions only:
    eps = sigma (g m (x - psi x_mem) / sigma^2 + (1 - g m) x / var), m the region's 0/1 indicator
    (all channels). d eps_Delta / d x = sigma g m (1 / sigma^2 - 1 / var): diagonal, zero off the region."""

    region: torch.Tensor

    def eps_flat(self, x, psi, sigma, g):
        var = psi ** 2 * self.variance + sigma ** 2
        gm = g * self.region
        return sigma * (gm * (x - psi * self.memorized) / sigma ** 2 + (1 - gm) * x / var)


@pytest.fixture(scope="module")
def partial():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_stable_diffusion_pipeline(image_size=16, merges=word_merges(WORDS))
    mem = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = RegionMemorizer.calibrate(pipe, MEM, TRIGGER, mem, reference_prompts=OTHERS)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:5, 1:6] = True  # the pasted patch, in latent positions
    model.region = region.to(torch.float64).expand(4, 8, 8).reshape(1, -1)
    pipe.unet = model
    return pipe, model, region


def _gate(pipe, model, prompts, k=0):
    """The gate of prompts[k] encoded in the same batch as the function under test encodes it
    (prompts + [""]): the calibrated gate is steep enough to see float32 batch rounding."""
    with torch.no_grad():
        return float(model.gate(encode_prompts(pipe, list(prompts) + [""])[k:k + 1], 1))


def test_curvature_map_is_the_closed_form_on_a_partial_copy(partial):
    pipe, model, region = partial
    got = curvature_difference_map(pipe, [MEM, OTHERS[0]], num_images=2, n_probes=3, upsample=False,
                                   num_inference_steps=10)
    assert got.shape == (2, 2, 8, 8) and got.dtype == torch.float64
    g = ddim_grid(pipe.scheduler, 10)
    psi, sigma = g.psi[-1], g.sigma[-1]
    var = psi ** 2 * model.variance + sigma ** 2
    # 4 channels; every probe is exact since J_Delta is diagonal (v * (c v) = c for v = +-1)
    c = 4 * sigma * _gate(pipe, model, [MEM, OTHERS[0]]) * (1 / sigma ** 2 - 1 / var)
    want = region.to(torch.float64) * c
    for n in range(2):
        torch.testing.assert_close(got[0, n], want, rtol=1e-9, atol=1e-12)
    assert bool((got[1] == 0).all())
    loc = map_localization(got[0], region)
    assert bool((loc["auc"] == 1).all()) and bool((loc["iou"] == 1).all())
    # image resolution: the VAE halves 16 px to 8 latents. Bilinear x2 (align_corners=False) weighs the
    # two nearest latents 3/4 and 1/4 per axis, so pixels of the patch get >= (3/4)^2 c and pixels
    # outside <= c / 4: the upsampled map still separates the pasted pixels perfectly
    up = curvature_difference_map(pipe, MEM, n_probes=1, num_inference_steps=10)
    assert up.shape == (1, 1, 16, 16)
    px = region.repeat_interleave(2, 0).repeat_interleave(2, 1)
    loc = map_localization(up[0, 0], px)
    assert float(loc["auc"]) == 1 and float(loc["iou"]) == 1
    assert float(up[0, 0][px].min()) >= 9 / 16 * c * (1 - 1e-12) and float(up[0, 0][~px].max()) <= c / 4 * (1 + 1e-12)
    assert float(up.max()) == pytest.approx(c, rel=1e-9)


def test_score_difference_map_is_the_closed_form_on_a_partial_copy(partial):
    pipe, model, region = partial
    got = score_difference_map(pipe, [MEM, OTHERS[0]], num_images=2, upsample=False, num_inference_steps=10,
                               seed=3)
    g = ddim_grid(pipe.scheduler, 10)
    gate = _gate(pipe, model, [MEM, OTHERS[0]])
    # the point at the last step: the CFG DDIM trajectory of the closed form
    x = sample_noise((2, 4, 8, 8), seed=3, dtype=torch.float64).reshape(2, -1)
    for i in range(len(g)):
        ps, sg = (torch.tensor(v, dtype=torch.float64) for v in (g.psi[i], g.sigma[i]))
        e_c, e_u = model.eps_flat(x, ps, sg, gate), model.eps_flat(x, ps, sg, 0.0)
        if i == len(g) - 1:
            break
        x = g.step(i, x, e_u + 7.5 * (e_c - e_u))
    want = (((e_c - e_u) / g.sigma[-1]) ** 2).reshape(2, 4, 8, 8).sum(1)
    torch.testing.assert_close(got[0], want, rtol=1e-9, atol=1e-12)
    assert bool((got[0][:, ~region] == 0).all()) and bool((got[1] == 0).all())


def test_curvature_map_equals_finite_differences_of_the_unet_with_the_same_probes():
    pipe = tiny_sd(dtype=torch.float64)
    got = curvature_difference_map(pipe, ["a red car", "a dog"], num_images=2, n_probes=2, step=5,
                                   num_inference_steps=10, seed=4, upsample=False)
    tp = text_pipeline(pipe)
    grid = tp.grid(10)
    e = tp.embed(["a red car", "a dog", ""])
    h = 1e-5
    for p in range(2):
        c = e[p:p + 1].expand(2, -1, -1)
        x = sample_noise((2, 4, 4, 4), seed=4, dtype=torch.float64)
        with torch.no_grad():
            for i in range(5):
                u, cc = tp.pair(x, grid, i, c, e[2:])
                x = grid.step(i, x, u + 7.5 * (cc - u))

        def delta(z):
            with torch.no_grad():
                u, cc = tp.pair(z, grid, 5, c, e[2:])
            return cc - u
        diag = torch.zeros_like(x)
        for q in range(2):
            v = hutchinson_probes((2, 4, 4, 4), 1, seed=4, sample_ids=[0, 1], probe_begin=q,
                                  dtype=torch.float64)[0]
            diag += v * (delta(x + h * v) - delta(x - h * v)) / (2 * h)
        want = (diag.sum(1) / 2).clamp_min(0)
        torch.testing.assert_close(got[p], want, rtol=1e-6, atol=1e-8)
    # batch independence
    again = curvature_difference_map(pipe, ["a dog"], num_images=2, n_probes=2, step=5, num_inference_steps=10,
                                     seed=4, upsample=False, batch_size=1)
    torch.testing.assert_close(again[0], got[1], rtol=1e-10, atol=1e-12)


def test_maps_are_upsampled_to_the_image_for_latent_pipelines():
    pipe = tiny_sd()
    m = score_difference_map(pipe, "a dog", num_inference_steps=5)
    assert m.shape == (1, 1, 8, 8)  # 8 px images, 4 x 4 latents
    small = score_difference_map(pipe, "a dog", num_inference_steps=5, upsample=False)
    assert small.shape == (1, 1, 4, 4)
    # bilinear upsampling preserves the mean of each 2x2 block's interior structure: block means bracket it
    assert float(m.min()) >= float(small.min()) - 1e-9 and float(m.max()) <= float(small.max()) + 1e-9


def test_map_localization_against_brute_force():
    gen = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (3, 6, 6), generator=gen).to(torch.float64)  # ties on purpose
    masks = torch.rand(3, 6, 6, generator=gen) < 0.3
    got = map_localization(maps, masks)
    for b in range(3):
        pos, neg = maps[b][masks[b]], maps[b][~masks[b]]
        wins = (pos[:, None] > neg[None]).double().sum() + 0.5 * (pos[:, None] == neg[None]).double().sum()
        assert float(got["auc"][b]) == pytest.approx(float(wins) / (len(pos) * len(neg)), rel=1e-12)
    with pytest.raises(ValueError, match="some but not all"):
        map_localization(maps, torch.zeros(6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not broadcast"):
        map_localization(maps, torch.ones(5, 5, dtype=torch.bool))


def test_bad_input_names_the_argument():
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="unexpected keyword argument 'probes'"):
        curvature_difference_map(pipe, "a dog", probes=2)
    with pytest.raises(TypeError, match="prompts must be strings"):
        score_difference_map(pipe, [b"a dog"])
    with pytest.raises(ValueError, match="step must index"):
        score_difference_map(pipe, "a dog", step=50)
    with pytest.raises(ValueError, match="n_probes must be >= 1"):
        curvature_difference_map(pipe, "a dog", n_probes=0)
    with pytest.raises(TypeError, match="upsample must be True or False"):
        score_difference_map(pipe, "a dog", upsample=1)
    from test_text_sharpness import _NaNNet, _fresh_sd

    bad = _fresh_sd()
    bad.unet = _NaNNet(bad.unet.config)
    with pytest.raises(FloatingPointError, match=r"prompts\[0\] = 'a dog'"):
        score_difference_map(bad, "a dog", num_inference_steps=2)
    with pytest.raises(FloatingPointError, match=r"prompts\[0\] = 'a dog'"):
        curvature_difference_map(bad, "a dog", num_inference_steps=2, n_probes=1)


def test_map_overlay_blends_red_by_the_normalised_map():
    from mmh_fast.text.maps import map_overlay

    img = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m = torch.zeros(2, 4, 4)
    m[0, 1, 2] = 5.0  # the maximum: full alpha
    m[0, 0, 0] = 2.5  # half of it
    out = map_overlay(img, m, alpha=0.8)
    red = torch.tensor([1.0, -1.0, -1.0])
    torch.testing.assert_close(out[0, :, 1, 2], 0.2 * img[0, :, 1, 2] + 0.8 * red)
    torch.testing.assert_close(out[0, :, 0, 0], 0.6 * img[0, :, 0, 0] + 0.4 * red)
    keep = m[0] == 0
    torch.testing.assert_close(out[0][:, keep], img[0][:, keep])
    torch.testing.assert_close(out[1], img[1])  # an all-zero map draws nothing
    with pytest.raises(ValueError, match="do not match images"):
        map_overlay(img, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="non-negative"):
        map_overlay(img, -torch.ones(2, 4, 4))
