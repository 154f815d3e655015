"""jacobian_rank vs the per-sample loop a user writes today:
torch.autograd.functional.jacobian + torch.linalg.svdvals for each sample,
then the paper's threshold (10th percentile of all singular values).
Issue 4: at least 5x faster at B = 64, latent 64, output 3 x 32 x 32.

The generator is an MLP (64 -> 256 -> 512 -> 3072, ReLU, tanh output) with
random weights, reshaped to 3 x 32 x 32. The anchor's cost is D = 3072
backward passes per sample (torch.autograd.functional.jacobian's default,
vectorize=False); jacobian_rank runs d = 64 forward-mode passes for the whole
batch at once, then one batched Gram + eigh.
"""
import numpy as np
import pytest
import torch
from _harness import compare

import mmh_fast


def mlp_generator(latent=64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(latent, 256), torch.nn.ReLU(), torch.nn.Linear(256, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 3 * 32 * 32), torch.nn.Tanh(), torch.nn.Unflatten(1, (3, 32, 32)),
    ).eval()


def loop_ranks(G, z, vectorize):
    vals = []
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zz: G(zz.unsqueeze(0)).reshape(-1), z[b],
                                               vectorize=vectorize)
        vals.append(torch.linalg.svdvals(J))
    S = torch.stack(vals)
    tau = np.percentile(S.numpy(), 10)
    return (S > tau).sum(1)


@pytest.mark.tier("quick", "full")
def test_jacobian_rank_vs_autograd_jacobian_loop(benchmark, tier):
    B = 4 if tier == "quick" else 64
    G = mlp_generator()
    z = torch.randn(B, 64, generator=torch.Generator().manual_seed(1))
    out = {}

    def ours():
        return mmh_fast.jacobian_rank(G, z)

    def anchor():
        out["ranks"] = loop_ranks(G, z, vectorize=False)

    ranks = compare(benchmark, ours, anchor,
                    anchor_name="per-sample torch.autograd.functional.jacobian + torch.linalg.svdvals",
                    rounds=2, warmup=0, target=">= 5x faster (speedup >= 5) at B=64, latent 64, 3x32x32",
                    batch=B, latent=64, output=[3, 32, 32])
    agree = float((ranks == out["ranks"]).double().mean())
    benchmark.extra_info["same_rank_fraction"] = agree
    assert agree == 1.0


def linear_generator_of_rank(rank=300, d=400, D=500, seed=0):
    """G(z) = W z with W = U V^T [D, d] of exact rank ``rank`` (all singular
    values 1): the case where the sketch's error probes must be independent of
    its columns (issue 13 item 1: the randomized path once returned 42)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    W = (U @ V.T).float()
    return lambda z: z @ W.T


@pytest.mark.tier("quick", "full")
def test_jacobian_rank_randomized_above_the_sketch(benchmark):
    """Default method (randomized with threshold 0.5) on a rank-300 Jacobian,
    d = 400: three sketches (42, 84, 168 columns) are rejected by their error
    bounds, then the exact path. Anchor: method="exact" alone. The ratio is the
    price of trying sketches on a Jacobian of nearly full rank."""
    G = linear_generator_of_rank()
    z = torch.randn(3, 400, generator=torch.Generator().manual_seed(1))
    ranks = compare(benchmark, lambda: mmh_fast.jacobian_rank(G, z, threshold=0.5),
                    lambda: mmh_fast.jacobian_rank(G, z, threshold=0.5, method="exact"),
                    anchor_name='jacobian_rank(method="exact")', rounds=3, warmup=1,
                    target="the exact rank (300), not the sketch width")
    assert ranks.tolist() == [300] * 3
