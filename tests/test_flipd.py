"""FLIPD against closed-form truth (Gaussians on subspaces), brute-force
Jacobians of real diffusers networks, and the batch-invariance contract."""
import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from _batching_helpers import CorruptRows, OOMAbove
from _helpers import DoubleWithoutForwardAD

import mmh_fast
from mmh_fast.models import VESchedule, VPSDESchedule, make_schedule
from mmh_fast.models.batching import NonFiniteOutputError
from mmh_fast.models.pipelines import encode_images, encode_prompts
from mmh_fast.testing import (GaussianMixtureEps, tiny_ddpm_pipeline, tiny_stable_diffusion_pipeline, tiny_unet2d,
                              tiny_unet2d_condition)

DDPM = DDPMScheduler()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny networks: see conftest


# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("sched,pred", [(DDPM, None), (VPSDESchedule(0.1, 20.0), None),
                                        (VESchedule(0.01, 50.0), "epsilon")])
@pytest.mark.parametrize("k", [0, 1, 3, 7])
@pytest.mark.parametrize("t0", [0.01, 0.05, 0.3])
def test_exact_trace_matches_single_gaussian_closed_form(sched, pred, k, t0):
    m = GaussianMixtureEps.random([k], (2, 4, 2), variances=0.7, seed=k, scheduler=sched)
    x = m.means.reshape(1, 2, 4, 2).repeat(2, 1, 1, 1)
    for method in ("vjp", "jvp"):
        got = mmh_fast.flipd(m, x, t0, scheduler=sched, trace="exact", method=method, prediction_type=pred)
        assert got.dtype == torch.float64 and got.shape == (2,)
        assert torch.allclose(got, torch.full_like(got, m.flipd_at_mean(0, t0)), rtol=0, atol=1e-6), (method, got)


class _EDMNetwork(torch.nn.Module):
    """The exact F-network of EDM's preconditioning around a closed-form mixture:
    input c_in x, timestep log(sigma) / 4, output F with D = c_skip x + c_out F = x - sigma eps."""

    def __init__(self, mixture, sigma_data=0.5):
        super().__init__()
        self.m, self.sd = mixture, sigma_data

    def forward(self, x_in, timestep):
        sigma = torch.exp(4 * torch.as_tensor(timestep, dtype=torch.float64)).reshape(-1, *[1] * (x_in.dim() - 1))
        x = x_in * torch.sqrt(sigma ** 2 + self.sd ** 2)
        eps = self.m(x, timestep).sample
        c_skip = self.sd ** 2 / (sigma ** 2 + self.sd ** 2)
        c_out = sigma * self.sd / torch.sqrt(sigma ** 2 + self.sd ** 2)
        return ((x - sigma * eps) - c_skip * x) / c_out


def test_edm_schedule_exact_flipd_matches_closed_form():
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler()
    m = GaussianMixtureEps.random([3], (10,), variances=0.7, seed=2, scheduler=sched)
    x = m.means.reshape(1, 10)
    for t0 in (0.05, 0.2):
        got = mmh_fast.flipd(_EDMNetwork(m), x, t0, scheduler=sched, trace="exact")
        # 1e-5: the network timestep log(sigma) / 4 travels in float32 (Denoiser.coefficients)
        assert abs(float(got[0]) - m.flipd_at_mean(0, t0)) < 1e-5


@pytest.mark.parametrize("pred", ["sample", "v_prediction"])
def test_prediction_types_give_the_same_flipd(pred):
    ref = GaussianMixtureEps.random([2, 5], (12,), seed=1, scheduler=DDPM)
    other = GaussianMixtureEps.random([2, 5], (12,), seed=1, scheduler=DDPM, prediction_type=pred)
    x, _ = ref.sample_x0(4, generator=torch.Generator().manual_seed(0))
    a = mmh_fast.flipd(ref, x, 0.05, scheduler=DDPM, trace="exact")
    b = mmh_fast.flipd(other, x, 0.05, scheduler=DDPMScheduler(prediction_type=pred), trace="exact")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_mixture_flipd_rounds_to_component_dimension_at_small_t0():
    dims = [0, 1, 4, 9, 15]
    m = GaussianMixtureEps.random(dims, (24,), separation=20.0, seed=3, scheduler=DDPM)
    x, comp = m.sample_x0(40, generator=torch.Generator().manual_seed(1))
    got = mmh_fast.flipd(m, x, 0.01, scheduler=DDPM)  # d = 24 <= 64: exact trace by default
    want = torch.tensor(dims, dtype=torch.float64)[comp]
    assert torch.equal(got.round(), want), (got, want)
    assert float((got - want).abs().max()) < 0.2


def test_hutchinson_within_four_standard_errors_of_exact():
    m = GaussianMixtureEps.random([2, 6, 11], (32,), separation=4.0, seed=5, scheduler=DDPM)
    x, _ = m.sample_x0(12, generator=torch.Generator().manual_seed(2))
    exact = mmh_fast.flipd(m, x, 0.1, scheduler=DDPM, trace="exact")
    for probe in ("rademacher", "gaussian"):
        est, se = mmh_fast.flipd(m, x, 0.1, scheduler=DDPM, trace="hutchinson", n_probes=48, probe=probe,
                                 return_stderr=True, seed=11)
        assert bool((se > 0).all())
        z = (est - exact).abs() / se
        assert float(z.max()) < 4.0, (probe, z)
    # the exact path reports zero standard error
    _, se0 = mmh_fast.flipd(m, x, 0.1, scheduler=DDPM, trace="exact", return_stderr=True)
    assert torch.equal(se0, torch.zeros_like(se0))


def test_hutchinson_is_batch_composition_invariant():
    m = GaussianMixtureEps.random([1, 3], (80,), seed=4, scheduler=DDPM)  # d > 64: auto -> hutchinson
    x, _ = m.sample_x0(7, generator=torch.Generator().manual_seed(3))
    kw = dict(scheduler=DDPM, n_probes=3, seed=5)
    full = mmh_fast.flipd(m, x, 0.05, **kw)
    for bs in (1, 2, 5):
        torch.testing.assert_close(mmh_fast.flipd(m, x, 0.05, batch_size=bs, **kw), full, rtol=0, atol=1e-10)
    perm = torch.tensor([3, 6, 0, 2, 5, 1, 4])
    got = mmh_fast.flipd(m, x[perm], 0.05, sample_ids=perm, **kw)
    torch.testing.assert_close(got, full[perm], rtol=0, atol=1e-10)
    sub = mmh_fast.flipd(m, x[2:5], 0.05, sample_ids=[2, 3, 4], **kw)
    torch.testing.assert_close(sub, full[2:5], rtol=0, atol=1e-10)
    # jvp with its replicated rows uses the same probes
    for pb in (1, 2):
        torch.testing.assert_close(mmh_fast.flipd(m, x, 0.05, method="jvp", probe_batch=pb, **kw), full,
                                   rtol=0, atol=1e-9)
    # another seed gives other probes
    assert not torch.allclose(mmh_fast.flipd(m, x, 0.05, scheduler=DDPM, n_probes=3, seed=6), full)


def test_flipd_curve_matches_pointwise_and_numpy_round_trip():
    m = GaussianMixtureEps.random([2, 4], (10,), seed=6, scheduler=DDPM)
    x, _ = m.sample_x0(3, generator=torch.Generator().manual_seed(4))
    t0s = [0.01, 0.1, 0.5]
    curve = mmh_fast.flipd_curve(m, x, t0s, scheduler=DDPM, trace="exact")
    assert curve.shape == (3, 3)
    for j, t in enumerate(t0s):
        torch.testing.assert_close(curve[:, j], mmh_fast.flipd(m, x, t, scheduler=DDPM, trace="exact"))
    c, se = mmh_fast.flipd_curve(m, x, t0s, scheduler=DDPM, trace="hutchinson", n_probes=2, return_stderr=True)
    assert c.shape == se.shape == (3, 3)
    out = mmh_fast.flipd(m, x.numpy(), 0.1, scheduler=DDPM)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, mmh_fast.flipd(m, x, 0.1, scheduler=DDPM).numpy())


def test_float32_input_gives_float32():
    m = GaussianMixtureEps.random([2], (6,), seed=0, scheduler=DDPM)
    x = m.means.reshape(1, 6).float()
    out = mmh_fast.flipd(m, x, 0.05, scheduler=DDPM)
    assert out.dtype == torch.float32
    assert abs(float(out[0]) - m.flipd_at_mean(0, 0.05)) < 1e-4


# ----------------------------------------------------------------------------- real networks


def _fd_flipd(eps_fn, x_t, sigma, vecs=None, h=1e-5):
    """Truth by central finite differences in float64, independent of autograd:
    d - sigma tr(J_eps) + |eps|^2 for one sample x_t [1, ...]; the trace is the
    sum over basis vectors (exact) or the mean of v^T J v over the given probes
    vecs [P, d]. All difference quotients go through the network as one batch."""
    d = x_t.numel()
    V = torch.eye(d, dtype=torch.float64) if vecs is None else vecs.to(torch.float64)
    V = V.reshape(-1, *x_t.shape[1:])
    E = eps_fn(torch.cat([x_t + h * V, x_t - h * V, x_t]))
    P = V.shape[0]
    quad = (((E[:P] - E[P:2 * P]) / (2 * h)) * V).flatten(1).sum(1)
    tr = quad.sum() if vecs is None else quad.mean()
    return d - sigma * tr + (E[2 * P:] ** 2).sum()


def _coeffs(sched, t0):
    s = make_schedule(sched)
    psi, sigma = (float(v) for v in s.psi_sigma(t0))
    return psi, sigma, float(s.timestep(t0))


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_unet2d_exact_flipd_matches_finite_differences(pred):
    unet = tiny_unet2d(sample_size=4, channels=(8, 16), dtype=torch.float64)
    sched = DDPMScheduler(prediction_type=pred)
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    t0 = 0.1
    psi, sigma, ts = _coeffs(sched, t0)

    def eps_fn(y):  # the prediction-type conversion written out independently of Denoiser
        out = unet(y, torch.full((y.shape[0],), ts)).sample
        if pred == "epsilon":
            return out
        if pred == "v_prediction":
            return sigma * y + psi * out
        return (y - psi * out) / sigma

    want = torch.stack([_fd_flipd(eps_fn, psi * x[i:i + 1], sigma) for i in range(2)])
    for method in ("vjp", "jvp") if pred == "epsilon" else ("vjp",):
        got = mmh_fast.flipd(unet, x, t0, scheduler=sched, trace="exact", method=method)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_unet2d_hutchinson_matches_finite_differences_on_the_same_probes():
    unet = tiny_unet2d(dtype=torch.float64)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    t0, P, seed = 0.05, 3, 7
    psi, sigma, ts = _coeffs(DDPM, t0)
    probes = mmh_fast.ops.hutchinson_probes(x.shape, P, seed=seed, dtype=torch.float64)  # [P, B, ...]

    def eps_fn(y):
        return unet(y, torch.full((y.shape[0],), ts)).sample

    want = torch.stack([_fd_flipd(eps_fn, psi * x[i:i + 1], sigma, probes[:, i].reshape(P, -1)) for i in range(3)])
    kw = dict(scheduler=DDPM, n_probes=P, seed=seed)
    v = mmh_fast.flipd(unet, x, t0, **kw)
    torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mmh_fast.flipd(unet, x, t0, method="jvp", **kw), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(mmh_fast.flipd(unet, x, t0, batch_size=2, **kw), want, rtol=1e-6, atol=1e-6)


def test_unet2d_condition_cond_and_cfg_match_finite_differences():
    unet = tiny_unet2d_condition(sample_size=4, channels=(8, 16), cross_attention_dim=8, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    c = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    u = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    t0, lam = 0.05, 4.0
    psi, sigma, ts = _coeffs(DDPM, t0)

    def eps(y, e):
        return unet(y, torch.full((y.shape[0],), ts), encoder_hidden_states=e.expand(y.shape[0], -1, -1)).sample

    want_c = torch.stack([_fd_flipd(lambda y: eps(y, c[i:i + 1]), psi * z[i:i + 1], sigma) for i in range(2)])
    want_g = torch.stack([_fd_flipd(lambda y: eps(y, u) + lam * (eps(y, c[i:i + 1]) - eps(y, u)), psi * z[i:i + 1],
                                    sigma) for i in range(2)])
    got_c = mmh_fast.flipd(unet, z, t0, scheduler=DDPM, cond=c, trace="exact")
    torch.testing.assert_close(got_c, want_c, rtol=1e-6, atol=1e-6)
    for method in ("vjp", "jvp"):
        got_g = mmh_fast.flipd(unet, z, t0, scheduler=DDPM, cond={"encoder_hidden_states": c}, uncond=u,
                               guidance_scale=lam, trace="exact", method=method)
        torch.testing.assert_close(got_g, want_g, rtol=1e-6, atol=1e-6)
    # a shared condition (1 row) equals the same condition repeated per sample
    a = mmh_fast.flipd(unet, z, t0, scheduler=DDPM, cond=u, n_probes=2, trace="hutchinson")
    b = mmh_fast.flipd(unet, z, t0, scheduler=DDPM, cond=u.repeat(2, 1, 1), n_probes=2, trace="hutchinson",
                       batch_size=1)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pred", ["v_prediction", "sample"])
def test_unet2d_condition_prediction_types_match_finite_differences(pred):
    unet = tiny_unet2d_condition(sample_size=4, channels=(8, 16), cross_attention_dim=8, dtype=torch.float64)
    sched = DDPMScheduler(prediction_type=pred)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    c = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    t0 = 0.1
    psi, sigma, ts = _coeffs(sched, t0)

    def eps_fn(y, e):
        out = unet(y, torch.full((y.shape[0],), ts), encoder_hidden_states=e.expand(y.shape[0], -1, -1)).sample
        return sigma * y + psi * out if pred == "v_prediction" else (y - psi * out) / sigma

    want = torch.stack([_fd_flipd(lambda y: eps_fn(y, c[i:i + 1]), psi * z[i:i + 1], sigma) for i in range(2)])
    got = mmh_fast.flipd(unet, z, t0, scheduler=sched, cond=c, trace="exact")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_low_precision_conditional_network_agrees_with_float32():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 8, 8, generator=g)
    c = torch.randn(3, 5, 8, generator=g)
    kw = dict(scheduler=DDPM, cond=c, n_probes=2)
    ref = mmh_fast.flipd(tiny_unet2d_condition(cross_attention_dim=8), z, 0.05, **kw)
    try:
        low = tiny_unet2d_condition(cross_attention_dim=8, dtype=torch.float16)
        got = mmh_fast.flipd(low, z, 0.05, **kw)
    except RuntimeError as e:  # pragma: no cover - torch builds without CPU half kernels
        pytest.skip(f"float16 not supported on this CPU torch: {e}")
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_networks_agree_with_float32(dtype):
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ref = mmh_fast.flipd(tiny_unet2d(), x, 0.05, scheduler=DDPM, n_probes=2)
    try:
        low = tiny_unet2d(dtype=dtype)
        got = mmh_fast.flipd(low, x, 0.05, scheduler=DDPM, n_probes=2)
    except RuntimeError as e:  # pragma: no cover - torch builds without CPU half kernels
        pytest.skip(f"{dtype} not supported on this CPU torch: {e}")
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=0)
    if dtype == torch.float16:
        j = mmh_fast.flipd(low, x, 0.05, scheduler=DDPM, n_probes=2, method="jvp")
        torch.testing.assert_close(j, ref, rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def sd_pipe():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_stable_diffusion_pipeline(image_size=8)


def test_stable_diffusion_pipeline_flipd_is_latent_flipd(sd_pipe):
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = encode_images(sd_pipe, img)
    assert z.shape == (2, 4, 4, 4)
    kw = dict(n_probes=2, seed=1)
    e0 = encode_prompts(sd_pipe, "")
    ec = encode_prompts(sd_pipe, ["a red car", "the dog"])
    unc = mmh_fast.flipd(sd_pipe, img, 0.05, **kw)
    torch.testing.assert_close(unc, mmh_fast.flipd(sd_pipe, img, 0.05, cond="", **kw))
    torch.testing.assert_close(unc, mmh_fast.flipd(sd_pipe.unet, z, 0.05, scheduler=sd_pipe.scheduler, cond=e0, **kw))
    cap = mmh_fast.flipd(sd_pipe, img, 0.05, cond=["a red car", "the dog"], **kw)
    torch.testing.assert_close(cap, mmh_fast.flipd(sd_pipe.unet, z, 0.05, scheduler=sd_pipe.scheduler, cond=ec, **kw))
    assert not torch.allclose(cap, unc)  # the caption changes the score
    # latents in, no encoding
    torch.testing.assert_close(cap, mmh_fast.flipd(sd_pipe, z, 0.05, cond=["a red car", "the dog"], encode=False,
                                                   **kw))
    # CFG: lambda = 1 is the conditional score, lambda = 0 the unconditional one
    torch.testing.assert_close(mmh_fast.flipd(sd_pipe, img, 0.05, cond=["a red car", "the dog"], guidance_scale=1.0,
                                              **kw), cap, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(mmh_fast.flipd(sd_pipe, img, 0.05, cond=["a red car", "the dog"], guidance_scale=0.0,
                                              **kw), unc, rtol=1e-5, atol=1e-3)


def test_pipeline_chunks_give_the_same_values(sd_pipe, monkeypatch):
    """VAE encoding and network calls in chunks of 1 (default_batch_size forced
    to 1) give the values of one chunk."""
    import importlib

    fl = importlib.import_module("mmh_fast.lid.flipd")
    img = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * 2 - 1
    kw = dict(cond=["a red car", "the dog", ""], guidance_scale=2.0, n_probes=2, seed=1)
    whole = mmh_fast.flipd(sd_pipe, img, 0.05, **kw)
    sizes = []
    monkeypatch.setattr(fl, "default_batch_size", lambda net, shape, **k: sizes.append(tuple(shape)) or 1)
    torch.testing.assert_close(mmh_fast.flipd(sd_pipe, img, 0.05, **kw), whole, rtol=1e-5, atol=1e-4)
    assert (3, 8, 8) in sizes and (4, 4, 4) in sizes  # the VAE's images and the UNet's latents


def test_ddpm_and_ddim_pipelines_are_pixel_space():
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    for ddim in (False, True):
        pipe = tiny_ddpm_pipeline(ddim=ddim)
        got = mmh_fast.flipd(pipe, img, 0.05, n_probes=2)
        torch.testing.assert_close(got, mmh_fast.flipd(pipe.unet, img, 0.05, scheduler=pipe.scheduler, n_probes=2))


class _VToEps(torch.nn.Module):
    """A v-prediction network turned into an eps-prediction one, written out:
    eps = sigma x_t + psi v (psi^2 + sigma^2 = 1), psi and sigma from the
    scheduler's alphas_cumprod at the (integer) timestep."""

    def __init__(self, net, alphas_cumprod):
        super().__init__()
        self.net, self.ac = net, alphas_cumprod.double()

    def forward(self, x, t):
        a = self.ac[t.long()].reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * x + a.sqrt() * self.net(x, t).sample


def test_v_prediction_pipeline_equals_the_converted_eps_network():
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    pipe = tiny_ddpm_pipeline(prediction_type="v_prediction")
    eps_net = _VToEps(pipe.unet, pipe.scheduler.alphas_cumprod)
    eps_sched = DDPMScheduler(prediction_type="epsilon")  # same default betas as the pipeline's
    for kw in (dict(n_probes=2, seed=3), dict(trace="exact")):
        got = mmh_fast.flipd(pipe, img, 0.05, **kw)  # t0 = 0.05: timestep 50, an integer
        want = mmh_fast.flipd(eps_net, img, 0.05, scheduler=eps_sched, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    # and it is not the eps-prediction reading of the same network
    assert not torch.allclose(mmh_fast.flipd(pipe.unet, img, 0.05, scheduler=eps_sched, trace="exact"), want,
                              rtol=0, atol=1.0)


# ----------------------------------------------------------------------------- non-finite outputs, OOM (issue 13)


@pytest.mark.parametrize("kw", [dict(trace="exact"), dict(trace="hutchinson", n_probes=2),
                                dict(trace="exact", method="jvp")])
def test_non_finite_network_output_names_positions(kw):
    m = GaussianMixtureEps.random([1, 3], (12,), separation=5.0, seed=2, scheduler=DDPM)
    x = torch.full((3, 12), -2.0, dtype=torch.float64)
    x[1] = 2.0  # CorruptRows hits sample 1 (input mean > 1) only
    with pytest.raises(NonFiniteOutputError, match=r"noise prediction at t0=0.05.* position\(s\) 1\b") as info:
        mmh_fast.flipd(CorruptRows(m, above=1.0), x, 0.05, scheduler=DDPM, **kw)
    assert info.value.positions == [1]


def test_overflowing_result_raises_instead_of_inf():
    """Outputs x 1e30 on one row: |eps|^2 ~ 1e61 is finite in float64 but not in
    the float32 result (issue 13 found inf there)."""
    net = tiny_unet2d(sample_size=4, channels=(8, 16))
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5 - 1
    x[2] = x[2] + 1.5  # input mean > 0: scaled
    with pytest.raises(NonFiniteOutputError, match=r"FLIPD at t0=0.05.*position\(s\) 2\b") as info:
        mmh_fast.flipd(CorruptRows(net, above=0.0, scale=1e30), x, 0.05, scheduler=DDPM)
    assert info.value.positions == [2]
    with pytest.raises(NonFiniteOutputError) as info:  # positions are those of the caller's x under chunking
        mmh_fast.flipd(CorruptRows(net, above=0.0, value=float("inf")), x, 0.05, scheduler=DDPM, batch_size=2)
    assert info.value.positions == [2]


def test_out_of_memory_halves_and_keeps_values():
    net = tiny_unet2d(sample_size=4, channels=(8, 16))
    x = torch.rand(7, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    kw = dict(scheduler=DDPM, trace="hutchinson", n_probes=2, seed=4)
    want = mmh_fast.flipd(net, x, 0.05, **kw)
    small = OOMAbove(net, limit=3)
    with pytest.warns(UserWarning, match="out of memory"):
        got = mmh_fast.flipd(small, x, 0.05, batch_size=7, **kw)
    assert max(small.calls) <= 3
    # one sample's value does not depend on its batch up to float32 rounding of the convolutions
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # the replicated rows of the exact trace (12 basis vectors per sample) halve too
    m = GaussianMixtureEps.random([1, 3], (12,), seed=2, scheduler=DDPM)
    xm, _ = m.sample_x0(5, generator=torch.Generator().manual_seed(0))
    exact = mmh_fast.flipd(m, xm, 0.05, scheduler=DDPM, trace="exact")
    wrapped = OOMAbove(m, limit=30)
    with pytest.warns(UserWarning, match="out of memory"):
        torch.testing.assert_close(mmh_fast.flipd(wrapped, xm, 0.05, scheduler=DDPM, trace="exact"), exact,
                                   rtol=0, atol=1e-10)
    assert max(wrapped.calls) <= 30


def test_default_chunk_comes_from_the_model_and_input_size(monkeypatch):
    import importlib

    fl = importlib.import_module("mmh_fast.lid.flipd")  # the package re-exports the function under this name

    seen = []

    def fake(net, shape, **kw):
        seen.append((tuple(shape), kw))
        return 2

    monkeypatch.setattr(fl, "default_batch_size", fake)
    net = tiny_unet2d(sample_size=4, channels=(8, 16))
    x = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    guard = OOMAbove(net, limit=2)  # would raise (and warn) on a chunk of more than 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = mmh_fast.flipd(guard, x, 0.05, scheduler=DDPM, trace="hutchinson", n_probes=2, seed=4)
    assert guard.calls and max(guard.calls) <= 2
    assert seen[0][0] == (3, 4, 4) and seen[0][1]["backward"] is True
    torch.testing.assert_close(got, mmh_fast.flipd(net, x, 0.05, scheduler=DDPM, trace="hutchinson", n_probes=2,
                                                   seed=4, batch_size=5), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    m = GaussianMixtureEps.random([1], (6,), seed=0, scheduler=DDPM)
    x = torch.zeros(2, 6, dtype=torch.float64)
    kw = dict(scheduler=DDPM)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(ValueError, match="x contains"):
            mmh_fast.flipd(m, y, 0.05, **kw)
    for t0 in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="t0"):
            mmh_fast.flipd(m, x, t0, **kw)
    with pytest.raises(ValueError, match="t0s"):
        mmh_fast.flipd_curve(m, x, [0.1, 2.0], **kw)
    with pytest.raises(ValueError, match="features"):
        mmh_fast.flipd(m, torch.zeros(2, 7, dtype=torch.float64), 0.05, **kw)
    for n in (0, -1, 1.5):
        with pytest.raises(ValueError, match="n_probes"):
            mmh_fast.flipd(m, x, 0.05, n_probes=n, **kw)
    with pytest.raises(ValueError, match="n_probes >= 2"):
        mmh_fast.flipd(m, x, 0.05, trace="hutchinson", return_stderr=True, **kw)
    with pytest.raises(ValueError, match="trace"):
        mmh_fast.flipd(m, x, 0.05, trace="fast", **kw)
    with pytest.raises(ValueError, match="method"):
        mmh_fast.flipd(m, x, 0.05, method="fd", **kw)
    with pytest.raises(ValueError, match="probe"):
        mmh_fast.flipd(m, x, 0.05, probe="uniform", **kw)
    with pytest.raises(TypeError, match="no usable schedule"):
        mmh_fast.flipd(m, x, 0.05, scheduler=object())
    with pytest.raises(TypeError, match="floating"):
        mmh_fast.flipd(m, torch.zeros(2, 6, dtype=torch.int64), 0.05, **kw)
    with pytest.raises(ValueError, match="non-empty"):
        mmh_fast.flipd(m, torch.zeros(0, 6), 0.05, **kw)
    with pytest.raises(TypeError, match="x must be"):
        mmh_fast.flipd(m, [[0.0] * 6], 0.05, **kw)
    with pytest.raises(ValueError, match="sample_ids"):
        mmh_fast.flipd(m, x, 0.05, sample_ids=[0], **kw)
    with pytest.raises(ValueError, match="non-negative"):
        mmh_fast.flipd(m, x, 0.05, sample_ids=[0, -1], **kw)
    with pytest.raises(ValueError, match="batch_size"):
        mmh_fast.flipd(m, x, 0.05, batch_size=0, **kw)
    with pytest.raises(TypeError, match="model must be"):
        mmh_fast.flipd("unet", x, 0.05, **kw)
    with pytest.raises(ValueError, match="shaped like its input"):
        mmh_fast.flipd(lambda y, t: y[:, :3], x, 0.05, **kw)
    with pytest.raises(ValueError, match="guidance_scale needs"):
        mmh_fast.flipd(m, x, 0.05, guidance_scale=3.0, **kw)
    with pytest.raises(TypeError, match="text"):
        mmh_fast.flipd(m, x, 0.05, cond="a caption", **kw)


def test_bad_network_inputs():
    unet = tiny_unet2d()
    with pytest.raises(ValueError, match=r"takes \[B, 3, H, W\]"):
        mmh_fast.flipd(unet, torch.zeros(2, 4, 8, 8), 0.05, scheduler=DDPM)
    with pytest.raises(ValueError, match="does x fit the model"):
        mmh_fast.flipd(lambda y, t: y @ torch.ones(5, 5), torch.zeros(2, 6), 0.05, scheduler=DDPM)
    cunet = tiny_unet2d_condition(sample_size=4, channels=(8, 16), cross_attention_dim=8)
    with pytest.raises(ValueError, match="needs cond"):
        mmh_fast.flipd(cunet, torch.zeros(1, 4, 4, 4), 0.05, scheduler=DDPM)
    with pytest.raises(ValueError, match="needs uncond"):
        mmh_fast.flipd(cunet, torch.zeros(1, 4, 4, 4), 0.05, scheduler=DDPM, cond=torch.zeros(1, 3, 8),
                       guidance_scale=2.0)
    with pytest.raises(ValueError, match="rows"):
        mmh_fast.flipd(cunet, torch.zeros(2, 4, 4, 4), 0.05, scheduler=DDPM, cond=torch.zeros(3, 3, 8))


def test_pipeline_rejects_images_outside_unit_range(sd_pipe):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        mmh_fast.flipd(sd_pipe, torch.full((1, 3, 8, 8), 200.0), 0.05)
    with pytest.raises(ValueError, match="channels"):
        mmh_fast.flipd(sd_pipe, torch.zeros(1, 1, 8, 8), 0.05)


def test_jvp_without_forward_ad_says_so_and_vjp_works():
    def model(x, t):
        return DoubleWithoutForwardAD.apply(x)

    x = torch.ones(2, 4)
    with pytest.raises(RuntimeError, match="method='vjp'"):
        mmh_fast.flipd(model, x, 0.05, scheduler=DDPM, method="jvp")
    s = make_schedule(DDPM)
    sigma = float(s.psi_sigma(0.05)[1])
    psi = float(s.psi_sigma(0.05)[0])
    got = mmh_fast.flipd(model, x, 0.05, scheduler=DDPM)  # eps = 2 x_t: J = 2 I
    want = 4 - sigma * 8 + (2 * psi) ** 2 * 4
    torch.testing.assert_close(got, torch.full((2,), want, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_default_scheduler_warns_once():
    import mmh_fast.models.schedules as sm

    sm._warned_default = False
    m = GaussianMixtureEps.random([1], (4,), seed=0)
    x = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="DDPMScheduler"):
        mmh_fast.flipd(m, x, 0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmh_fast.flipd(m, x, 0.05)
    assert math.isfinite(float(mmh_fast.flipd(m, x, 0.05, scheduler=DDIMScheduler())[0]))
