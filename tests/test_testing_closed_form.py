"""The closed-form test models added for SolidMark: a full-covariance
Gaussian and a conditional memorizer, checked against brute-force densities."""
import pytest
import torch
from diffusers import DDPMScheduler

from mmh_fast.testing import ConditionalEmpiricalEps, EmpiricalEps, GaussianEps


@pytest.mark.parametrize("rank", [6, 3])  # full rank, and singular (a Gaussian on a 3-dim affine subspace)
def test_gaussian_eps_matches_autograd_of_density(rank):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, rank, generator=g, dtype=torch.float64)
    cov = A @ A.T
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    m = GaussianEps(mu, cov, scheduler=DDPMScheduler())
    for t in [0.02, 0.4]:
        psi, sigma = (float(v) for v in m.schedule.psi_sigma(t))
        x = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_(True)
        mvn = torch.distributions.MultivariateNormal(psi * mu, psi**2 * cov + sigma**2 * torch.eye(6, dtype=torch.float64))
        (grad,) = torch.autograd.grad(mvn.log_prob(x).sum(), x)
        torch.testing.assert_close(m.score(x.detach(), psi, sigma), grad, rtol=1e-8, atol=1e-8)


def test_gaussian_fit_and_errors():
    g = torch.Generator().manual_seed(1)
    data = torch.randn(500, 2, 2, generator=g, dtype=torch.float64)
    m = GaussianEps.fit(data)
    flat = data.reshape(500, 4)
    torch.testing.assert_close(m.mean, flat.mean(0))
    V, lam = m.eigenvectors, m.eigenvalues
    torch.testing.assert_close(V @ torch.diag(lam) @ V.T, torch.cov(flat.T), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianEps(torch.zeros(2), -torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[4, 4\]"):
        GaussianEps(torch.zeros(4), torch.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        GaussianEps.fit(torch.zeros(1, 3))


def test_conditional_memorizer_matches_autograd_of_density():
    g = torch.Generator().manual_seed(2)
    train = torch.randn(30, 4, generator=g, dtype=torch.float64)
    emb = torch.randn(30, 3, generator=g, dtype=torch.float64)
    tau, h = 0.7, 0.2
    m = ConditionalEmpiricalEps(train, emb, cond_scale=tau, bandwidth=h, chunk_size=8)
    ts = torch.tensor(300.0)
    psi, sigma = (float(v) for v in m.schedule.psi_sigma_from_timestep(ts))
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    var = psi**2 * h**2 + sigma**2
    logp = torch.logsumexp(-((x[:, None] - psi * train[None]) ** 2).sum(-1) / (2 * var)
                           - ((c[:, None] - emb[None]) ** 2).sum(-1) / (2 * tau**2), 1)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    eps = m(x.detach(), ts, encoder_hidden_states=c).sample
    torch.testing.assert_close(-eps / sigma, grad, rtol=1e-9, atol=1e-9)
    # without a condition it is the unconditional memorizer
    plain = EmpiricalEps(train, bandwidth=h, chunk_size=8)
    torch.testing.assert_close(m(x.detach(), ts).sample, plain(x.detach(), ts).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one embedding per training image"):
        ConditionalEmpiricalEps(train, emb[:3])
    with pytest.raises(ValueError, match="features per item"):
        m(x.detach(), ts, encoder_hidden_states=torch.zeros(5, 2))
