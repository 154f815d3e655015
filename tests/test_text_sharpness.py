"""mmh_fast.text.sharpness (Jeon, Kim and No, ICML 2025): the initial-stage
sharpness metric, the Hessian spectrum by Arnoldi / Lanczos and SAIL, against
closed forms (PlantedMemorizer, GaussianEps: exact scores and Hessians) and
central finite differences of the real tiny diffusers UNet (float64)."""
import warnings

import pytest
import torch

from mmh_fast.models.pipelines import encode_prompts
from mmh_fast.models.sampling import ddim_grid, sample_noise
from mmh_fast.ops.krylov import krylov_eigenvalues
from mmh_fast.testing import GaussianEps, tiny_stable_diffusion_pipeline, word_merges
from mmh_fast.text import generate
from mmh_fast.text._core import text_pipeline
from mmh_fast.text._geometry import eps_pair_jvp
from mmh_fast.text.sharpness import (generate_sail, hessian_eigenvalues, hessian_score_difference_norm,
                                     optimize_initial_noise)
from text_fixtures import MEM, OTHERS, WORDS, planted, tiny_sd


def _coef(pipe, i=0, n=50):
    g = ddim_grid(pipe.scheduler, n)
    return g.psi[i], g.sigma[i]


def _gate(P, prompt):
    with torch.no_grad():
        return float(P.model.gate(encode_prompts(P.pipe, prompt), 1))


def _planted_eps(m, x, psi, sigma, g):
    var = psi ** 2 * m.variance + sigma ** 2
    return sigma * (g * (x - psi * m.memorized) / sigma ** 2 + (1 - g) * x / var)


class _NaNNet(torch.nn.Module):
    """A UNet stand-in whose output is NaN (config like the tiny pipeline's UNet)."""

    def __init__(self, config):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.config = config

    def forward(self, sample, timestep, encoder_hidden_states=None, **kw):
        return (sample * self.w * float("nan"),)


def _fresh_sd(dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_stable_diffusion_pipeline(image_size=8, merges=word_merges(WORDS))
        return pipe if dtype == torch.float32 else pipe.to(dtype)


# ----------------------------------------------------------------------------- the sharpness metric

def test_sharpness_matches_its_closed_form_on_the_planted_memorizer():
    P = planted()
    got = hessian_score_difference_norm(P.pipe, [MEM] + OTHERS[:3], num_images=3, seed=5)
    assert got.dtype == torch.float64 and got.shape == (4,)
    assert bool((got[1:] == 0).all())  # the gate is shut: H_c = H_u and s_c = s_u
    # eps is linear in x: J_c - J_u = sigma g (1 / sigma^2 - 1 / var) I, so the metric is
    # g (1 / sigma^2 - 1 / var) |eps_c - eps_u| / sigma at x_T keyed by (seed, n)
    psi, sigma = _coef(P.pipe)
    var = psi ** 2 * P.model.variance + sigma ** 2
    g = _gate(P, MEM)
    x = sample_noise((3,) + tuple(P.latent.shape), seed=5, dtype=torch.float64).reshape(3, -1)
    diff = _planted_eps(P.model, x, psi, sigma, g) - _planted_eps(P.model, x, psi, sigma, 0.0)
    want = g * (1 / sigma ** 2 - 1 / var) * diff.norm(dim=1) / sigma
    assert float(got[0]) == pytest.approx(float(want.mean()), rel=1e-9)
    # later steps: the same formula at the CFG trajectory's points and sigmas, averaged
    two = hessian_score_difference_norm(P.pipe, MEM, num_images=1, steps=(0, 2), seed=5)
    g_ = ddim_grid(P.pipe.scheduler, 50)
    xs, tot = x[:1], 0.0
    for i in range(2):
        ps, sg = g_.psi[i], g_.sigma[i]
        va = ps ** 2 * P.model.variance + sg ** 2
        e_c, e_u = _planted_eps(P.model, xs, ps, sg, g), _planted_eps(P.model, xs, ps, sg, 0.0)
        tot += g * (1 / sg ** 2 - 1 / va) * float((e_c - e_u).norm()) / sg
        xs = g_.step(i, xs, e_u + 7.5 * (e_c - e_u))
    assert float(two) == pytest.approx(tot / 2, rel=1e-9)


def test_sharpness_equals_finite_differences_of_the_unet_and_is_batch_independent():
    pipe = tiny_sd(dtype=torch.float64)
    prompts = ["a red car", "a dog", "the blue sky"]
    got = hessian_score_difference_norm(pipe, prompts, num_images=2, seed=1)
    assert got.dtype == torch.float64
    tp = text_pipeline(pipe)
    grid = tp.grid(50)
    sigma = grid.sigma[0]
    e = tp.embed(prompts + [""])
    h = 1e-5  # central differences: error O(h^2 |f'''|) ~ 1e-10, rounding ~ 1e-16 / h ~ 1e-11
    want = []
    for p in range(3):
        x = sample_noise((2, 4, 4, 4), seed=1, dtype=torch.float64)
        c = e[p:p + 1].expand(2, -1, -1)

        def delta(z):
            with torch.no_grad():
                u, cc = tp.pair(z, grid, 0, c, e[-1:])
            return cc - u
        d = delta(x)
        fd = (delta(x + h * d) - delta(x - h * d)) / (2 * h)
        want.append(float((fd.reshape(2, -1).norm(dim=1) / sigma ** 2).mean()))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    kw = dict(num_images=2, seed=1)
    torch.testing.assert_close(hessian_score_difference_norm(pipe, prompts, batch_size=1, **kw), got,
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(hessian_score_difference_norm(pipe, prompts[::-1], **kw), got.flip(0),
                               rtol=1e-10, atol=0)


def test_the_two_branch_jvp_equals_central_differences_on_the_unet():
    pipe = tiny_sd(dtype=torch.float64)
    tp = text_pipeline(pipe)
    grid = tp.grid(20)
    e = tp.embed(["a red car", ""])
    x = sample_noise((2, 4, 4, 4), seed=3, dtype=torch.float64)
    v = sample_noise((2, 4, 4, 4), seed=4, dtype=torch.float64)
    for i in (0, 10, 19):  # high, middle and low noise
        (_, _), (j_u, j_c) = eps_pair_jvp(tp, grid, i, x, v, e[:1].expand(2, -1, -1), e[1:])
        h = 1e-5
        with torch.no_grad():
            up = tp.pair(x + h * v, grid, i, e[:1].expand(2, -1, -1), e[1:])
            dn = tp.pair(x - h * v, grid, i, e[:1].expand(2, -1, -1), e[1:])
        torch.testing.assert_close(j_u, (up[0] - dn[0]) / (2 * h), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(j_c, (up[1] - dn[1]) / (2 * h), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- the Hessian spectrum

def _gaussian_pipe(eigs, seed=0):
    pipe = _fresh_sd(torch.float64)
    d = 64
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    cov = q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ q.T
    mean = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    model = GaussianEps(mean, (cov + cov.T) / 2, scheduler=pipe.scheduler)
    model.config = {"in_channels": 4, "sample_size": 4, "cross_attention_dim": 32}
    pipe.unet = model
    return pipe


def test_hessian_eigenvalues_are_exact_on_a_gaussian():
    eigs = torch.linspace(0.01, 5.0, 64, dtype=torch.float64) ** 2
    pipe = _gaussian_pipe(eigs)
    for step in (0, 40):
        g = ddim_grid(pipe.scheduler, 50)
        psi, sigma = g.psi[step], g.sigma[step]
        exact = -1 / (psi ** 2 * eigs + sigma ** 2)  # H = -(psi^2 Sigma + sigma^2 I)^-1, any point
        got = hessian_eigenvalues(pipe, ["a dog", "a red car"], k=64, num_images=2, step=step)
        assert got.shape == (2, 2, 64) and got.dtype == torch.float64
        want = exact[exact.abs().argsort(descending=True)]
        for row in got.reshape(-1, 64):
            torch.testing.assert_close(row, want, rtol=1e-9, atol=1e-12)
    # Arnoldi (non-symmetric path): the same values, zero imaginary parts
    ga = hessian_eigenvalues(pipe, "a dog", k=64, symmetric=False, step=40)
    assert ga.dtype == torch.complex128
    torch.testing.assert_close(ga.real[0, 0], want, rtol=1e-8, atol=1e-10)
    assert float(ga.imag.abs().max()) < 1e-8


def test_few_krylov_steps_find_the_extreme_eigenvalue_and_repeated_ones_exactly():
    # three distinct eigenvalues: K_3 is invariant, the iteration restarts in its (invariant) orthogonal
    # complement, whose K_3 is invariant again: after 3 blocks of 3 steps every Ritz value is exact
    eigs = torch.tensor([4.0] * 20 + [1.0] * 20 + [0.0] * 24, dtype=torch.float64)
    pipe = _gaussian_pipe(eigs, seed=2)
    psi, sigma = _coef(pipe, 45)
    distinct = torch.tensor([-1 / sigma ** 2, -1 / (psi ** 2 + sigma ** 2), -1 / (4 * psi ** 2 + sigma ** 2)],
                            dtype=torch.float64)
    got = hessian_eigenvalues(pipe, "a dog", k=9, step=45)[0, 0]
    assert float(got[0]) == pytest.approx(float(distinct[0]), rel=1e-10)  # the sharpest direction
    gap = (got[:, None] - distinct[None]).abs().min(1).values
    assert float(gap.max()) < 1e-9 * float(distinct.abs().max())


def test_planted_memorizer_hessian_is_minus_its_precision():
    P = planted()
    psi, sigma = _coef(P.pipe)
    var = psi ** 2 * P.model.variance + sigma ** 2
    g = _gate(P, MEM)
    pc, pu = g / sigma ** 2 + (1 - g) / var, 1 / var
    got = hessian_eigenvalues(P.pipe, [MEM, OTHERS[0]], k=4, num_images=2)
    torch.testing.assert_close(got[0], torch.full((2, 4), -pc, dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(got[1], torch.full((2, 4), -pu, dtype=torch.float64), rtol=1e-10, atol=0)
    dif = hessian_eigenvalues(P.pipe, MEM, k=3, branch="difference")
    torch.testing.assert_close(dif, torch.full((1, 1, 3), -(pc - pu), dtype=torch.float64), rtol=1e-8, atol=0)
    unc = hessian_eigenvalues(P.pipe, MEM, k=3, branch="uncond")
    torch.testing.assert_close(unc, torch.full((1, 1, 3), -pu, dtype=torch.float64), rtol=1e-10, atol=0)


def test_hessian_eigenvalues_of_the_unet_match_its_finite_difference_jacobian():
    pipe = tiny_sd(dtype=torch.float64)
    tp = text_pipeline(pipe)
    grid = tp.grid(50)
    step = 0
    e = tp.embed(["a red car"])
    x = sample_noise((1, 4, 4, 4), seed=0, dtype=torch.float64)
    h = 1e-5
    cols = []
    for j in range(64):
        v = torch.zeros(1, 64, dtype=torch.float64)
        v[0, j] = 1
        v = v.reshape(1, 4, 4, 4)
        with torch.no_grad():
            up = tp.denoiser.eps_at(x + h * v, grid.psi[step], grid.sigma[step], grid.timestep(step),
                                    cond={"encoder_hidden_states": e})
            dn = tp.denoiser.eps_at(x - h * v, grid.psi[step], grid.sigma[step], grid.timestep(step),
                                    cond={"encoder_hidden_states": e})
        cols.append(((up - dn) / (2 * h)).reshape(64))
    H = -torch.stack(cols, 1) / grid.sigma[step]
    want = torch.linalg.eigvalsh((H + H.T) / 2)
    want = want[want.abs().argsort(descending=True)]
    got = hessian_eigenvalues(pipe, "a red car", k=64, seed=0)[0, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # fewer steps: Rayleigh-Ritz values of (H + H^T) / 2 on a subspace interlace its spectrum (Cauchy)
    few = hessian_eigenvalues(pipe, "a red car", k=8)[0, 0]
    assert float(few.max()) <= float(want.max()) + 1e-9 and float(few.min()) >= float(want.min()) - 1e-9


def test_krylov_eigenvalues_of_an_explicit_matrix_and_its_errors():
    A = torch.randn(2, 10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.zeros(2, 10, dtype=torch.float64)
    got = krylov_eigenvalues(lambda v: torch.einsum("bij,bj->bi", A, v), x, 10, symmetric=False)
    for b in range(2):
        want = torch.linalg.eigvals(A[b])
        want = want[want.abs().argsort(descending=True)]
        torch.testing.assert_close(got[b].abs(), want.abs(), rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="k must be"):
        krylov_eigenvalues(lambda v: v, x, 11)
    with pytest.raises(ValueError, match="shaped like x"):
        krylov_eigenvalues(lambda v: v[:1], x, 2)
    with pytest.raises(FloatingPointError, match="NaN"):
        krylov_eigenvalues(lambda v: v * float("nan"), x, 2)


# ----------------------------------------------------------------------------- SAIL

def test_sail_lowers_its_objective_whose_value_is_the_closed_form():
    P = planted()
    res = optimize_initial_noise(P.pipe, [MEM, OTHERS[0]], num_images=2, max_steps=5, seed=2)
    assert res.latents.shape == (4,) + tuple(P.latent.shape)
    assert bool((res.loss <= res.initial_loss).all()) and bool((res.loss[:2] < res.initial_loss[:2]).all())
    psi, sigma = _coef(P.pipe)
    g = _gate(P, MEM)

    def loss(x, gate):
        x = x.reshape(x.shape[0], -1).double()
        d = _planted_eps(P.model, x, psi, sigma, gate) - _planted_eps(P.model, x, psi, sigma, 0.0)
        n = d.norm(dim=1, keepdim=True)
        u = torch.where(n > 0, d / n.clamp_min(1e-300), torch.zeros_like(d))
        y = x + u
        d2 = _planted_eps(P.model, y, psi, sigma, gate) - _planted_eps(P.model, y, psi, sigma, 0.0)
        return d2.norm(dim=1) + 0.05 * x.norm(dim=1)
    torch.testing.assert_close(res.loss[:2], loss(res.latents[:2], g), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.loss[2:], loss(res.latents[2:], 0.0), rtol=1e-10, atol=1e-12)
    x0 = sample_noise((2,) + tuple(P.latent.shape), seed=2, dtype=torch.float64)
    torch.testing.assert_close(res.initial_loss[:2], loss(x0, g), rtol=1e-10, atol=1e-12)
    # rows are optimised independently of their batch
    one = optimize_initial_noise(P.pipe, [MEM], num_images=2, max_steps=5, seed=2, batch_size=1)
    torch.testing.assert_close(one.latents, res.latents[:2], rtol=1e-10, atol=1e-12)
    # a threshold every iterate passes keeps the seeded noise; an unreachable one keeps the best
    keep = optimize_initial_noise(P.pipe, MEM, num_images=2, max_steps=5, seed=2, threshold=1e9)
    assert bool((keep.iterations == 0).all())
    torch.testing.assert_close(keep.latents, x0)
    best = optimize_initial_noise(P.pipe, MEM, num_images=2, max_steps=5, seed=2, threshold=-1.0)
    torch.testing.assert_close(best.latents, res.latents[:2])


def test_generate_sail_without_steps_is_the_plain_sampler():
    pipe = tiny_sd()
    kw = dict(num_images=2, num_inference_steps=4, seed=3)
    torch.testing.assert_close(generate_sail(pipe, ["a dog", "a red car"], max_steps=0, **kw),
                               generate(pipe, ["a dog", "a red car"], **kw))
    moved = generate_sail(pipe, "a dog", max_steps=2, lr=0.5, output="latents", **kw)
    assert moved.shape == (2, 4, 4, 4)
    assert not torch.allclose(moved, generate(pipe, "a dog", output="latents", **kw))


# ----------------------------------------------------------------------------- bad input

def test_bad_input_names_the_argument():
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="unexpected keyword argument 'n_images'"):
        hessian_score_difference_norm(pipe, "a dog", n_images=2)
    with pytest.raises(TypeError, match="prompts must be strings"):
        hessian_score_difference_norm(pipe, ["a dog", 3])
    with pytest.raises(TypeError, match="pipe must be"):
        hessian_eigenvalues(object(), "a dog")
    with pytest.raises(ValueError, match="branch must be one of"):
        hessian_eigenvalues(pipe, "a dog", branch="both")
    with pytest.raises(ValueError, match="k must be <= the latent size 64"):
        hessian_eigenvalues(pipe, "a dog", k=65)
    with pytest.raises(ValueError, match="step must be <"):
        hessian_eigenvalues(pipe, "a dog", step=50)
    with pytest.raises(ValueError, match="steps must satisfy"):
        hessian_score_difference_norm(pipe, "a dog", steps=(1, 1))
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        optimize_initial_noise(pipe, "a dog", lr=0)
    with pytest.raises(TypeError, match="unknown option"):
        generate_sail(pipe, "a dog", gama=0.1)


def test_nan_scores_raise_naming_the_prompt():
    pipe = _fresh_sd()
    pipe.unet = _NaNNet(pipe.unet.config)
    with pytest.raises(FloatingPointError, match=r"prompts\[0\] = 'a dog'"):
        hessian_score_difference_norm(pipe, ["a dog", "a cat"], num_images=1)
    with pytest.raises(FloatingPointError, match="NaN"):
        hessian_eigenvalues(pipe, "a dog", k=2)
    with pytest.raises(FloatingPointError, match=r"prompts\[0\]"):
        optimize_initial_noise(pipe, "a dog", num_images=1, max_steps=1)
