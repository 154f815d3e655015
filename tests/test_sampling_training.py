"""DDIM sampler and denoiser trainer: checked against exact scores of closed-form models."""
import math
import warnings

import pytest
import torch
from diffusers import DDPMScheduler, EDMEulerScheduler

import mmh_fast
from mmh_fast.models import Denoiser, make_schedule
from mmh_fast.models.sampling import ddim_sample, sample_noise
from mmh_fast.models.training import MLPDenoiser, train_denoiser
from mmh_fast.testing import GaussianMixtureEps, tiny_stable_diffusion_pipeline

DDPM = DDPMScheduler()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny networks: see conftest


def test_ddim_with_exact_score_lands_on_point_masses():
    m = GaussianMixtureEps.random([0, 0, 0], (5,), separation=6.0, seed=1, scheduler=DDPM)
    x = ddim_sample(m, 40, sample_shape=(5,), scheduler=DDPM, num_steps=60, dtype=torch.float64)
    d = torch.cdist(x, m.means)  # [40, 3]
    assert float(d.min(1).values.max()) < 1e-2
    assert len(set(d.argmin(1).tolist())) == 3  # every component is visited


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_a_gaussian_with_the_right_moments(eta):
    d = 4
    basis = torch.eye(d, dtype=torch.float64)
    mean = torch.tensor([[1.0, -2.0, 0.5, 0.0]], dtype=torch.float64)
    m = GaussianMixtureEps(mean, [basis], variances=0.5, scheduler=DDPM)
    n = 1500
    # 200 steps: the discretisation bias of the variance is < 0.03 then (40 steps: ~0.06 / ~0.1 for eta 0 / 1)
    x = ddim_sample(m, n, sample_shape=(d,), scheduler=DDPM, num_steps=200, eta=eta, dtype=torch.float64, seed=3)
    se_mean = math.sqrt(0.5 / n)
    assert float((x.mean(0) - mean[0]).abs().max()) < 4 * se_mean
    var = x.var(0).mean()  # standard error of the pooled variance: 0.5 sqrt(2 / (4 n)) ~ 0.009
    assert abs(float(var) - 0.5) < 0.03 + 4 * 0.009, var


def test_sampler_is_batch_invariant_and_calls_back():
    m = GaussianMixtureEps.random([1, 2], (6,), seed=2, scheduler=DDPM)
    kw = dict(sample_shape=(6,), scheduler=DDPM, num_steps=8, eta=0.5, seed=9)
    full = ddim_sample(m, 6, **kw)
    torch.testing.assert_close(ddim_sample(m, 6, batch_size=4, **kw), full)
    torch.testing.assert_close(ddim_sample(m, 2, sample_ids=[4, 1], **kw), full[[4, 1]])
    steps = []
    ddim_sample(m, 3, callback=lambda i, t, x, e, rows: steps.append((i, t, x.shape, rows.tolist())), **kw)
    assert [s[0] for s in steps] == list(range(8)) and steps[0][1] == 1.0 and steps[-1][3] == [0, 1, 2]
    z = sample_noise((3, 4), seed=1, sample_ids=[7, 8, 9])
    torch.testing.assert_close(sample_noise((1, 4), seed=1, sample_ids=[8])[0], z[1])
    with pytest.raises(ValueError, match="num_steps"):
        ddim_sample(m, 2, num_steps=0, **{k: v for k, v in kw.items() if k != "num_steps"})
    with pytest.raises(ValueError, match="n must"):
        ddim_sample(m, 0, **kw)
    with pytest.raises(ValueError, match="sample_shape"):
        ddim_sample(lambda x, t: x, 2, scheduler=DDPM)


def test_sampler_with_text_pipeline_and_cfg():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_stable_diffusion_pipeline(image_size=8)
    img = ddim_sample(pipe, 2, cond=["a cat", "a dog"], guidance_scale=5.0, num_steps=3, decode=True)
    assert img.shape == (2, 3, 8, 8) and float(img.abs().max()) <= 1.0
    lat = ddim_sample(pipe, 2, cond="a cat", guidance_scale=5.0, num_steps=3)
    assert lat.shape == (2, 4, 4, 4)
    lat1 = ddim_sample(pipe, 2, cond="a cat", guidance_scale=1.0, num_steps=3)
    lat2 = ddim_sample(pipe, 2, cond="a cat", num_steps=3)
    torch.testing.assert_close(lat1, lat2, rtol=1e-4, atol=1e-4)  # lambda = 1 is the conditional model


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_trained_mlp_learns_the_gaussian_denoiser(pred):
    g = torch.Generator().manual_seed(0)
    data = 0.5 * torch.randn(1024, 2, generator=g)  # N(0, 0.25 I)
    sched = DDPMScheduler(prediction_type=pred)
    torch.manual_seed(0)
    net = MLPDenoiser((2,), hidden=64, depth=2)
    losses = train_denoiser(net, data, scheduler=sched, steps=400, batch_size=256, lr=3e-3, seed=1)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50
    den = Denoiser(net, make_schedule(sched))
    for t in (0.3, 0.6):
        psi, sigma = (float(v) for v in make_schedule(sched).psi_sigma(t))
        x_t = torch.randn(256, 2, generator=g) * math.sqrt(psi ** 2 * 0.25 + sigma ** 2)
        with torch.no_grad():
            eps = den.eps(x_t, t)
        want = sigma * x_t / (psi ** 2 * 0.25 + sigma ** 2)  # optimal eps of N(0, 0.25 I)
        err = float((eps - want).norm() / want.norm())
        assert err < 0.15, (t, err)


def test_mlp_supports_forward_ad_and_trainer_rejects_bad_input():
    net = MLPDenoiser((1, 3, 3), hidden=32, depth=1, fourier=4)
    x = torch.randn(3, 1, 3, 3)
    a = mmh_fast.flipd(net, x, 0.1, scheduler=DDPM, trace="exact")
    b = mmh_fast.flipd(net, x, 0.1, scheduler=DDPM, trace="exact", method="jvp")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="EDM"):
        train_denoiser(net, x, scheduler=EDMEulerScheduler(), steps=1)
    with pytest.raises(ValueError, match="NaN"):
        train_denoiser(net, torch.full((2, 1, 3, 3), float("nan")), scheduler=DDPM, steps=1)
    with pytest.raises(ValueError, match="t_power"):
        train_denoiser(net, x, scheduler=DDPM, steps=1, t_power=0)
    with pytest.raises(ValueError, match="features"):
        net(torch.zeros(2, 5), torch.zeros(2))
