import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, ScoreSdeVeScheduler

from mmh_fast.models import (Denoiser, DiscreteSchedule, EDMSchedule, VESchedule, VPSDESchedule, check_t,
                             make_schedule)
from mmh_fast.testing import EmpiricalEps, GaussianMixtureEps


def test_discrete_schedule_matches_diffusers_at_integer_steps():
    sch = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = make_schedule(sch)
    assert isinstance(s, DiscreteSchedule)
    for step in [0, 10, 500, 999]:
        psi, sigma = s.psi_sigma(step / 1000)
        ab = float(sch.alphas_cumprod[step])
        assert abs(float(psi) - math.sqrt(ab)) < 1e-12 and abs(float(sigma) - math.sqrt(1 - ab)) < 1e-12
    # linear interpolation of alphas_cumprod between integer steps
    psi, _ = s.psi_sigma(10.25 / 1000)
    ab = 0.75 * float(sch.alphas_cumprod[10]) + 0.25 * float(sch.alphas_cumprod[11])
    assert abs(float(psi) ** 2 - ab) < 1e-12


def test_vpsde_formulas_and_closeness_to_ddpm():
    vp = VPSDESchedule(0.1, 20.0)
    t = 0.3
    B = 0.1 * t + 19.9 * t * t / 2
    psi, sigma = vp.psi_sigma(t)
    assert abs(float(psi) - math.exp(-B / 2)) < 1e-14
    assert abs(float(sigma) ** 2 - (1 - math.exp(-B))) < 1e-14
    ddpm = make_schedule(DDPMScheduler())
    for t in [0.01, 0.05, 0.2, 0.5, 0.9]:  # NOTES: the two match closely
        assert abs(float(vp.psi_sigma(t)[1]) - float(ddpm.psi_sigma(t)[1])) < 0.02


def test_make_schedule_kinds_and_errors():
    assert isinstance(make_schedule(EDMEulerScheduler()), EDMSchedule)
    assert isinstance(make_schedule(ScoreSdeVeScheduler()), VESchedule)
    assert make_schedule(DDIMScheduler(prediction_type="v_prediction")).prediction_type == "v_prediction"
    with pytest.warns(UserWarning, match="DDPMScheduler"):
        import mmh_fast.models.schedules as sm
        sm._warned_default = False
        make_schedule(None)
    with pytest.raises(TypeError, match="no usable schedule"):
        make_schedule(object())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule(torch.tensor([0.5, 1.5]))
    for bad in [0.0, -0.1, 1.5, float("nan")]:
        with pytest.raises(ValueError, match="t0"):
            check_t(bad)
    with pytest.raises(TypeError, match="t0"):
        check_t("a")


def _mixture_logpdf(model: GaussianMixtureEps, x, psi, sigma):
    """Brute-force log density of the noised mixture with full covariances."""
    logs = []
    d = model.dim
    for i in range(len(model.dims)):
        U = model.bases[i]
        cov = psi**2 * model.variances[i] * (U @ U.T) + sigma**2 * torch.eye(d, dtype=torch.float64)
        mvn = torch.distributions.MultivariateNormal(psi * model.means[i], covariance_matrix=cov)
        logs.append(model.log_weights[i] + mvn.log_prob(x))
    return torch.logsumexp(torch.stack(logs), 0)


@pytest.mark.parametrize("t", [0.01, 0.3])
def test_gaussian_mixture_score_matches_autograd_of_density(t):
    m = GaussianMixtureEps.random([0, 1, 3, 6], (8,), separation=3.0, seed=2)
    psi, sigma = (float(v) for v in m.schedule.psi_sigma(t))
    x0, _ = m.sample_x0(16, generator=torch.Generator().manual_seed(1))
    x = (psi * x0 + sigma * torch.randn_like(x0)).requires_grad_(True)
    (g,) = torch.autograd.grad(_mixture_logpdf(m, x, psi, sigma).sum(), x)
    torch.testing.assert_close(m.score(x.detach(), psi, sigma), g, rtol=1e-7, atol=1e-7)


def test_empirical_score_matches_autograd_of_density():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(40, 5, generator=g, dtype=torch.float64)
    for h in [0.0, 0.3]:
        m = EmpiricalEps(train, bandwidth=h, chunk_size=7)
        psi, sigma = 0.9, 0.4
        x = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
        var = psi**2 * h**2 + sigma**2
        logp = torch.logsumexp(-((x[:, None] - psi * train[None]) ** 2).sum(-1) / (2 * var), 1)
        (grad,) = torch.autograd.grad(logp.sum(), x)
        torch.testing.assert_close(m.score(x.detach(), psi, sigma), grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pred", ["sample", "v_prediction"])
def test_denoiser_converts_prediction_types(pred):
    sch = DDPMScheduler()
    ref = GaussianMixtureEps.random([1, 2], (6,), seed=0, scheduler=sch)
    other = GaussianMixtureEps.random([1, 2], (6,), seed=0, scheduler=sch, prediction_type=pred)
    x = torch.randn(5, 6, dtype=torch.float64)
    e_ref = Denoiser(ref, make_schedule(sch)).eps(x, 0.2)
    e = Denoiser(other, make_schedule(sch), prediction_type=pred).eps(x, 0.2)
    torch.testing.assert_close(e, e_ref, rtol=1e-9, atol=1e-9)


def test_denoiser_guidance_combines_branches():
    calls = []

    def model(x, t, encoder_hidden_states=None):
        calls.append(x.shape[0])
        return x * encoder_hidden_states.reshape(-1, 1)

    den = Denoiser(model, make_schedule(DDPMScheduler()))
    x = torch.ones(3, 4)
    c = {"encoder_hidden_states": torch.full((3,), 2.0)}
    u = {"encoder_hidden_states": torch.full((1,), 0.5)}
    e = den.eps(x, 0.1, cond=c, uncond=u, guidance_scale=3.0)
    assert calls == [6]  # one batched call for both branches
    torch.testing.assert_close(e, torch.full((3, 4), 0.5 + 3.0 * 1.5))


def test_denoiser_rejects_wrong_output_shape():
    den = Denoiser(lambda x, t: x[:, :2], make_schedule(DDPMScheduler()))
    with pytest.raises(ValueError, match="shaped like its input"):
        den.eps(torch.zeros(2, 3), 0.1)
    with pytest.raises(TypeError, match="callable"):
        Denoiser(3, make_schedule(DDPMScheduler()))


@pytest.mark.parametrize("k", [0, 2, 5])
def test_flipd_at_mean_closed_form_matches_exact_jacobian(k):
    m = GaussianMixtureEps.random([k], (7,), variances=0.5, seed=3)
    t = 0.05
    psi, sigma = (float(v) for v in m.schedule.psi_sigma(t))
    x = psi * m.means[0].reshape(1, 7)
    J = torch.autograd.functional.jacobian(lambda y: m.score(y, psi, sigma), x).reshape(7, 7)
    s = m.score(x, psi, sigma)
    flipd = 7 + sigma**2 * (torch.trace(J) + (s**2).sum())
    assert abs(float(flipd) - m.flipd_at_mean(0, t)) < 1e-9


def test_small_unet_levels_stop_at_4x4_and_bad_arguments():
    """Levels halve the image while the next level stays a whole size of at least
    4 x 4 (at most 4 levels): 32 -> 16 -> 8 -> 4 is 4 levels, 8 -> 4 is 2, 12 -> 6
    is 2 (12 / 4 = 3 < 4), 4 is 1; the network maps an image to an eps of its shape."""
    from mmh_fast.models.training import small_unet

    for size, levels in ((32, 4), (64, 4), (8, 2), (12, 2), (4, 1)):
        torch.manual_seed(0)
        net = small_unet(size, channels=1, width=8)
        assert net.config.block_out_channels == tuple([8] + [16] * (levels - 1))
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            assert net(x, torch.tensor([3, 5])).sample.shape == x.shape
    net = small_unet(16, width=8, attention=True)
    assert net.config.down_block_types[-1] == "AttnDownBlock2D" and net.config.up_block_types[0] == "AttnUpBlock2D"
    with pytest.raises(ValueError, match="image_size must be >= 4"):
        small_unet(3)
    for w in (4, 12):
        with pytest.raises(ValueError, match="width must be a multiple of 8"):
            small_unet(16, width=w)


def test_pixel_mlp_is_the_mlp_denoiser_it_wraps():
    """Same weights, same eps: the diffusers wrapper adds nothing to the MLP's output
    (its weights come from the global RNG, so they are copied, not re-seeded)."""
    from mmh_fast.models.pixel_mlp import PixelMLP
    from mmh_fast.models.training import MLPDenoiser

    m = PixelMLP(sample_size=4, in_channels=2, hidden=32, depth=2, time_dim=16, seed=3)
    ref = MLPDenoiser((2, 4, 4), hidden=32, depth=2, time_dim=16, seed=3)
    ref.load_state_dict(m.net.state_dict())
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([1, 10, 500])
    with torch.no_grad():
        got, want = m(x, t).sample, ref(x, t).sample
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
