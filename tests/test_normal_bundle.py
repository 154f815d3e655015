"""Normal-bundle LID against closed-form mixtures and a brute-force statement."""
import warnings

import pytest
import torch
from diffusers import DDPMScheduler

import mmh_fast
from mmh_fast.lid.normal_bundle import _NB_STREAM
from mmh_fast.models import make_schedule
from mmh_fast.testing import GaussianMixtureEps, tiny_stable_diffusion_pipeline, tiny_unet2d

DDPM = DDPMScheduler()


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny networks: see conftest


@pytest.mark.parametrize("dims,shape", [([0, 1, 4, 9, 15], (24,)), ([0, 2, 7, 23, 40, 63], (4, 4, 4))])
def test_exact_dimension_of_every_mixture_component(dims, shape):
    m = GaussianMixtureEps.random(dims, shape, separation=25.0, seed=3, scheduler=DDPM)
    x, comp = m.sample_x0(18, generator=torch.Generator().manual_seed(1))
    lid = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM)
    assert lid.dtype == torch.int64 and lid.shape == (18,)
    assert torch.equal(lid, torch.tensor(dims)[comp]), (lid, comp)


def test_reference_rules_behave_as_documented():
    dims = [0, 1, 4, 9]
    m = GaussianMixtureEps.random(dims, (16,), separation=20.0, seed=4, scheduler=DDPM)
    x, comp = m.sample_x0(16, generator=torch.Generator().manual_seed(2))
    want = torch.tensor(dims)[comp]
    pos = comp > 0  # the absolute-gap rule is exact away from point masses (NOTES)
    gap = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="gap")
    assert torch.equal(gap[pos], want[pos])
    # threshold between the normal singular values (~sqrt(K)/sigma) and the tangent ones (~sqrt(K) sigma)
    K = 64
    thr = K ** 0.5
    got = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, threshold=thr, center=True)
    assert torch.equal(got, want)
    per_point = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, threshold=torch.full((16,), thr), center=True)
    assert torch.equal(per_point, want)


def test_batch_invariance_and_grouping():
    m = GaussianMixtureEps.random([0, 3, 8], (12,), separation=20.0, seed=5, scheduler=DDPM)
    x, _ = m.sample_x0(9, generator=torch.Generator().manual_seed(3))
    full, sv = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, return_singular_values=True)
    for kw in (dict(batch_size=7), dict(max_elements=48 * 12 * 2), dict(max_elements=1, batch_size=100)):
        l2, sv2 = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, return_singular_values=True, **kw)
        assert torch.equal(l2, full)
        torch.testing.assert_close(sv2, sv, rtol=1e-9, atol=1e-9)
    perm = torch.tensor([4, 0, 8, 2, 6, 1, 3, 7, 5])
    _, svp = mmh_fast.normal_bundle(m, x[perm], 0.01, scheduler=DDPM, sample_ids=perm, return_singular_values=True)
    torch.testing.assert_close(svp, sv[perm], rtol=1e-9, atol=1e-9)


def test_matches_brute_force_on_a_unet():
    """Same noise, direct network calls, a dense SVD and the ratio rule written out."""
    unet = tiny_unet2d(sample_size=4, channels=(8, 16))
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    t0, K = 0.05, 60
    lid, sv = mmh_fast.normal_bundle(unet, x, t0, scheduler=DDPM, n_samples=K, return_singular_values=True)
    s = make_schedule(DDPM)
    psi, sigma = (float(v) for v in s.psi_sigma(t0))
    ts = float(s.timestep(t0))
    e = mmh_fast.ops.hutchinson_probes((2, 48), K, probe="gaussian", probe_begin=_NB_STREAM)  # [K, 2, 48]
    for b in range(2):
        y = (psi * x[b].reshape(1, 48) + sigma * e[:, b]).reshape(K, 3, 4, 4)
        with torch.no_grad():
            S = -unet(y, torch.full((K,), ts)).sample.reshape(K, 48) / sigma
        S = (S - S.mean(0)).double()
        want_sv = torch.linalg.svdvals(S)
        torch.testing.assert_close(sv[b].double(), want_sv, rtol=2e-3, atol=2e-3 * float(want_sv[0]))
        r = want_sv[:-1] / want_sv[1:].clamp_min(want_sv[0] * 1e-6)
        rank = int(r.argmax()) + 1 if float(r.max()) > 3.0 else 48
        assert int(lid[b]) == 48 - rank


def test_pipeline_and_unet_paths_run():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_stable_diffusion_pipeline(image_size=4)
    img = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    a = mmh_fast.normal_bundle(pipe, img, 0.05, cond=["a cat", "a dog"], n_samples=24)
    b = mmh_fast.normal_bundle(pipe, img, 0.05, cond=["a cat", "a dog"], n_samples=24, batch_size=5)
    assert torch.equal(a, b) and bool(((a >= 0) & (a <= 16)).all())
    g = mmh_fast.normal_bundle(pipe, img, 0.05, cond="a cat", guidance_scale=3.0, n_samples=24)
    assert g.shape == (2,)


def test_bad_inputs():
    m = GaussianMixtureEps.random([1], (6,), seed=0, scheduler=DDPM)
    x = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="x contains"):
        mmh_fast.normal_bundle(m, torch.full((2, 6), float("nan")), 0.01, scheduler=DDPM)
    with pytest.raises(ValueError, match="t0"):
        mmh_fast.normal_bundle(m, x, 0.0, scheduler=DDPM)
    with pytest.raises(ValueError, match="rule"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="elbow")
    with pytest.raises(ValueError, match="needs a threshold"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="threshold")
    with pytest.raises(ValueError, match="only used"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="gap", threshold=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, n_samples=1)
    with pytest.raises(ValueError, match="features"):
        mmh_fast.normal_bundle(m, torch.zeros(2, 5), 0.01, scheduler=DDPM)
    with pytest.raises(ValueError, match="shaped like its input"):
        mmh_fast.normal_bundle(lambda y, t: y[:, :2], x, 0.01, scheduler=DDPM)
    with pytest.raises(TypeError, match="no usable schedule"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=object())
