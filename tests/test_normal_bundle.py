"""Normal-bundle LID against closed-form mixtures and a brute-force statement."""
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from _batching_helpers import CorruptRows, OOMAbove

import mmh_fast
from mmh_fast.lid.normal_bundle import _NB_STREAM
from mmh_fast.models import make_schedule
from mmh_fast.models.batching import NonFiniteOutputError
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
    gap = mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="gap", return_details=True, undetermined="ignore")
    assert torch.equal(gap.lid[pos], want[pos])
    # ... and its arbitrary answers at the point masses are flagged undetermined (the flat raw
    # spectrum has no decisive cut), its exact ones determined
    assert torch.equal(gap.determined, pos)
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
    lid, sv = mmh_fast.normal_bundle(unet, x, t0, scheduler=DDPM, n_samples=K, return_singular_values=True,
                                     undetermined="ignore")  # an untrained network: undetermined, see below
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


def _brute_nb_spectrum(eps_fn, z, t0, K, sched, *, center=True):
    """Singular values of the NB score matrix written out: the same keyed noise,
    direct network calls, a dense float64 SVD."""
    s = make_schedule(sched)
    psi, sigma = (float(v) for v in s.psi_sigma(t0))
    ts = float(s.timestep(t0))
    B, d = z.shape[0], z[0].numel()
    e = mmh_fast.ops.hutchinson_probes((B, d), K, probe="gaussian", probe_begin=_NB_STREAM)  # [K, B, d]
    out = []
    for b in range(B):
        y = (psi * z[b].reshape(1, d) + sigma * e[:, b]).reshape((K,) + tuple(z.shape[1:]))
        with torch.no_grad():
            S = -eps_fn(y, torch.full((K,), ts), b).reshape(K, d).double() / sigma
        if center:
            S = S - S.mean(0)
        out.append(torch.linalg.svdvals(S))
    return torch.stack(out)


def _ratio_rule(sv, d, min_ratio=3.0):
    r = sv[:, :-1] / sv[:, 1:].clamp_min(1e-300)
    rank = torch.where(r.max(1).values > min_ratio, r.argmax(1) + 1, torch.full((sv.shape[0],), sv.shape[1]))
    return d - rank


@pytest.fixture(scope="module")
def sd_pipe():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_stable_diffusion_pipeline(image_size=4)


def test_pipeline_paths_match_brute_force_on_latents(sd_pipe):
    """Pipeline in: the VAE posterior mean x scaling factor, the caption embeddings
    of the text encoder, and (with guidance) eps_u + lambda (eps_c - eps_u), all
    written out here with direct calls of the pipeline's parts."""
    pipe = sd_pipe
    img = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        z = pipe.vae.encode(img).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(["a cat", "a dog", ""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0]
    K, t0, d = 24, 0.05, 16

    def eps_c(y, t, b):
        return pipe.unet(y, t, encoder_hidden_states=emb[b:b + 1].expand(len(y), -1, -1)).sample

    def eps_g(y, t, b, lam=3.0):
        u = pipe.unet(y, t, encoder_hidden_states=emb[2:3].expand(len(y), -1, -1)).sample
        c = pipe.unet(y, t, encoder_hidden_states=emb[0:1].expand(len(y), -1, -1)).sample
        return u + lam * (c - u)

    for kw, fn in ((dict(cond=["a cat", "a dog"]), eps_c), (dict(cond="a cat", guidance_scale=3.0), eps_g)):
        want_sv = _brute_nb_spectrum(fn, z, t0, K, pipe.scheduler)
        det = mmh_fast.normal_bundle(pipe, img, t0, n_samples=K, return_details=True, undetermined="ignore", **kw)
        torch.testing.assert_close(det.singular_values.double(), want_sv, rtol=2e-3,
                                   atol=2e-3 * float(want_sv.max()))
        assert torch.equal(det.lid, _ratio_rule(want_sv, d))
        b = mmh_fast.normal_bundle(pipe, img, t0, n_samples=K, batch_size=5, undetermined="ignore", **kw)
        assert torch.equal(b, det.lid)


# ----------------------------------------------------------------------------- undetermined spectra (issue 13)


def test_untrained_network_is_undetermined_not_point_mass():
    """An untrained UNet has no structure: its centred score spectrum is flat
    (largest consecutive ratio 1.2-1.7 at t0 = 0.01-0.1 over 3 seeds x 16 points) and
    tiny (smallest singular value x sigma / sqrt(K) <= 0.03; a point mass of a
    closed-form model gives 0.44-0.49, the Marchenko-Pastur edge 1 - sqrt(d/K) = 0.5).
    The old rule read that as LID 0, the strongest memorization reading."""
    unet = tiny_unet2d(sample_size=4, channels=(8, 16))
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with pytest.warns(UserWarning, match=r"6 of 6 point\(s\) undetermined"):
        lid = mmh_fast.normal_bundle(unet, x, 0.05, scheduler=DDPM)
    assert lid.dtype == torch.int64
    det = mmh_fast.normal_bundle(unet, x, 0.05, scheduler=DDPM, return_details=True, undetermined="ignore")
    assert not bool(det.determined.any())
    assert bool((det.decisiveness < 1).all())
    nan = mmh_fast.normal_bundle(unet, x, 0.05, scheduler=DDPM, undetermined="nan")
    assert nan.dtype == torch.float64 and bool(nan.isnan().all())
    with pytest.raises(ValueError, match="undetermined"):
        mmh_fast.normal_bundle(unet, x, 0.05, scheduler=DDPM, undetermined="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmh_fast.normal_bundle(unet, x, 0.05, scheduler=DDPM, undetermined="ignore")


@pytest.mark.parametrize("t0", [0.01, 0.1])
def test_point_masses_and_subspaces_are_determined(t0):
    dims = [0, 1, 4, 9, 15]
    m = GaussianMixtureEps.random(dims, (24,), separation=25.0, seed=3, scheduler=DDPM)
    x, comp = m.sample_x0(15, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = mmh_fast.normal_bundle(m, x, t0, scheduler=DDPM, return_details=True)
    assert torch.equal(det.lid, torch.tensor(dims)[comp])
    assert bool(det.determined.all()) and bool((det.decisiveness > 1).all())
    sv = det.singular_values.double()
    rank = 24 - det.lid
    # decisiveness written out: cut ratio / min_ratio inside the spectrum, the smallest
    # normal value against half the Marchenko-Pastur edge at full rank (point masses)
    s = make_schedule(DDPM)
    sigma = float(s.psi_sigma(t0)[1])
    K = 96
    for i in range(15):
        r = int(rank[i])
        if r < 24:
            want = float(sv[i, r - 1] / sv[i, r]) / 3.0
        else:
            want = float(sv[i, -1]) * sigma / (K - 1) ** 0.5 / (0.5 * (1 - (24 / (K - 1)) ** 0.5))
        assert abs(float(det.decisiveness[i]) - want) <= 1e-6 * want, i


def test_percentile_rule_is_the_papers_threshold():
    """rule="percentile": tau = the 10th percentile of all singular values of the
    batch (or of a calibration set), LID = #{s_i <= tau} (App. C.1, Fig. 5c, 8a)."""
    m = GaussianMixtureEps.random([0, 2, 7], (12,), separation=20.0, seed=5, scheduler=DDPM)
    x, comp = m.sample_x0(9, generator=torch.Generator().manual_seed(3))
    det = mmh_fast.normal_bundle(m, x, 0.1, scheduler=DDPM, rule="percentile", return_details=True,
                                 undetermined="ignore")
    _, raw = mmh_fast.normal_bundle(m, x, 0.1, scheduler=DDPM, rule="gap", return_singular_values=True,
                                    undetermined="ignore")
    tau = float(np.percentile(raw.double().numpy(), 10))
    assert det.threshold == pytest.approx(tau, rel=1e-12)
    assert torch.equal(det.lid, (raw.double() <= tau).sum(1))
    # a calibration set fixes tau: the batch then does not move it
    calib = raw[:4]
    tau_c = float(np.percentile(calib.double().numpy(), 25))
    got = mmh_fast.normal_bundle(m, x[5:], 0.1, scheduler=DDPM, rule="percentile", percentile=25,
                                 calibration=calib, sample_ids=range(5, 9), undetermined="ignore")
    assert torch.equal(got, (raw[5:].double() <= tau_c).sum(1))
    with pytest.raises(ValueError, match="percentile"):
        mmh_fast.normal_bundle(m, x, 0.1, scheduler=DDPM, rule="percentile", percentile=101)
    with pytest.raises(ValueError, match="calibration"):
        mmh_fast.normal_bundle(m, x, 0.1, scheduler=DDPM, rule="gap", calibration=calib)


def test_fewer_copies_than_dimensions_warns_and_flags_the_cap():
    """K < d: the rank cannot exceed K - 1 (centred), so LID >= d - K + 1 for every
    point, a bound and not a measurement (issue 13: d - 63 for every image at K = 64)."""
    m = GaussianMixtureEps.random([0, 2], (48,), separation=20.0, seed=2, scheduler=DDPM)
    x, _ = m.sample_x0(4, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="n_samples=16 < d=48"):
        det = mmh_fast.normal_bundle(m, x, 0.05, scheduler=DDPM, n_samples=16, return_details=True)
    capped = det.lid == 48 - 15
    assert bool(capped.all())  # every rank at the cap: the normal space has 48 - LID >= 46 directions
    assert not bool(det.determined.any())


# ----------------------------------------------------------------------------- non-finite outputs, OOM (issue 13)


def test_non_finite_network_output_names_the_points():
    m = GaussianMixtureEps.random([0, 2], (12,), separation=20.0, seed=2, scheduler=DDPM)
    x = torch.full((3, 12), -3.0, dtype=torch.float64)
    x[1] = 3.0  # CorruptRows hits the copies of point 1 only (input mean > 1.5)
    with pytest.raises(NonFiniteOutputError, match=r"noise prediction at t0=0.05.* position\(s\) 1\b") as info:
        mmh_fast.normal_bundle(CorruptRows(m, above=1.5), x, 0.05, scheduler=DDPM, n_samples=30)
    assert info.value.positions == [1]
    with pytest.raises(NonFiniteOutputError) as info:
        mmh_fast.normal_bundle(CorruptRows(m, above=1.5, scale=1e300), x, 0.05, scheduler=DDPM, n_samples=30)
    assert info.value.positions == [1]


def test_out_of_memory_halves_rows_and_keeps_values():
    m = GaussianMixtureEps.random([0, 3, 8], (12,), separation=20.0, seed=5, scheduler=DDPM)
    x, _ = m.sample_x0(5, generator=torch.Generator().manual_seed(3))
    want, sv = mmh_fast.normal_bundle(m, x, 0.05, scheduler=DDPM, return_singular_values=True)
    net = OOMAbove(m, limit=40)
    with pytest.warns(UserWarning, match="out of memory"):
        got, sv2 = mmh_fast.normal_bundle(net, x, 0.05, scheduler=DDPM, return_singular_values=True, batch_size=200)
    assert max(net.calls) <= 40
    assert torch.equal(got, want)
    torch.testing.assert_close(sv2, sv, rtol=1e-12, atol=1e-12)


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
    with pytest.raises(ValueError, match="undetermined must be one of"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, undetermined="maybe")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="point_mass_floor must be a number in"):
            mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, point_mass_floor=bad)
    for bad in (-1, True, "10"):
        with pytest.raises(ValueError, match="percentile must be a number in"):
            mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="percentile", percentile=bad)
    with pytest.raises(ValueError, match="calibration holds no finite"):
        mmh_fast.normal_bundle(m, x, 0.01, scheduler=DDPM, rule="percentile", calibration=[float("nan")])


def test_trained_network_against_its_training_set():
    """A denoiser trained on 200 points of a 2-plane in R^8 plus one point repeated
    100 times (memorized): NB reads LID 2 on the plane and 0 at the duplicate, all
    determined at t0 = 0.05; at t0 = 0.1 no wrong answer is reported as determined
    (1000 steps: one plane point reads 0 there, with decisiveness 0.35)."""
    from mmh_fast.models.training import MLPDenoiser, train_denoiser

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(8, 2, generator=g))[0]
    plane = torch.randn(200, 2, generator=g) @ basis.T
    dup = torch.randn(1, 8, generator=g) * 2
    net = MLPDenoiser((8,))
    train_denoiser(net, torch.cat([plane, dup.repeat(100, 1)]), scheduler=DDPM, steps=1000, t_power=2.0)
    x = torch.cat([plane[:5], dup])
    truth = torch.tensor([2, 2, 2, 2, 2, 0])
    det = mmh_fast.normal_bundle(net, x, 0.05, scheduler=DDPM, return_details=True)
    assert torch.equal(det.lid, truth) and bool(det.determined.all())
    det = mmh_fast.normal_bundle(net, x, 0.1, scheduler=DDPM, return_details=True, undetermined="ignore")
    assert not bool((det.determined & (det.lid != truth)).any())
