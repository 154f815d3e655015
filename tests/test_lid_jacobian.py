"""jacobian_rank against exact truths: linear and ReLU-masked generators whose
Jacobian ranks are known in closed form, bottleneck MLPs, and a brute-force
per-sample torch.autograd.functional.jacobian + torch.linalg.svdvals."""
import warnings

import numpy as np
import pytest
import torch

import mmh_fast
from mmh_fast.lid import jacobian as jac_mod
from _helpers import DoubleWithoutForwardAD


def orthonormal(rows, cols, g):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


class Linear(torch.nn.Module):
    """G(z) = W z + b reshaped to out_shape; grad G = W everywhere."""

    def __init__(self, W, out_shape):
        super().__init__()
        self.W = torch.nn.Parameter(W.float())
        self.b = torch.nn.Parameter(torch.randn(W.shape[0]))
        self.out_shape = out_shape

    def forward(self, z):
        return (z @ self.W.T + self.b).reshape(z.shape[0], *self.out_shape)


class ReluMasked(torch.nn.Module):
    """G(z) = W relu(z): grad G(z) = W diag(1[z > 0]), of rank #{z_j > 0}
    when W has full column rank."""

    def __init__(self, d, out_shape, g):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(int(np.prod(out_shape)), d, generator=g))
        self.out_shape = out_shape

    def forward(self, z):
        return (torch.relu(z) @ self.W.T).reshape(z.shape[0], *self.out_shape)


def bottleneck_mlp(d, k, D, g):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    return torch.nn.Sequential(torch.nn.Linear(d, k), torch.nn.Tanh(), torch.nn.Linear(k, 128), torch.nn.Tanh(),
                               torch.nn.Linear(128, D)).eval()


def brute_force_singular_values(G, z):
    """Per sample: the full Jacobian by torch.autograd.functional.jacobian, then svdvals (float64)."""
    out = []
    for b in range(z.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zz: G(zz.unsqueeze(0)).reshape(-1), z[b])
        out.append(torch.linalg.svdvals(J.reshape(-1, z[b].numel()).double()))
    return torch.stack(out)


# ------------------------------------------------------------ exact ranks ---

@pytest.mark.parametrize("rank", [0, 1, 5, 24])
def test_linear_generator_of_known_rank_3x32x32(rank):
    g = torch.Generator().manual_seed(rank)
    d, D = 24, 3 * 32 * 32
    s = torch.cat([torch.linspace(2.0, 1.0, rank, dtype=torch.float64), torch.zeros(d - rank, dtype=torch.float64)])
    W = orthonormal(D, d, g) @ torch.diag(s) @ orthonormal(d, d, g).T
    G = Linear(W, (3, 32, 32))
    z = torch.randn(6, d, generator=g)
    ranks, vals = mmh_fast.jacobian_rank(G, z, threshold=1e-3, return_singular_values=True)
    assert ranks.dtype == torch.int64 and ranks.tolist() == [rank] * 6
    assert vals.shape == (6, d)
    torch.testing.assert_close(vals.double(), s.expand(6, d), rtol=1e-5, atol=1e-5)


def test_relu_generator_ranks_per_sample():
    g = torch.Generator().manual_seed(1)
    d = 20
    G = ReluMasked(d, (3, 32, 32), g)
    z = torch.randn(40, d, generator=g)
    want = (z > 0).sum(1)
    ranks = mmh_fast.jacobian_rank(G, z, threshold=1e-2)
    assert ranks.tolist() == want.tolist()
    # chunked: same answer whatever the batch size
    assert mmh_fast.jacobian_rank(G, z, threshold=1e-2, batch_size=7).tolist() == want.tolist()


@pytest.mark.parametrize("k", [1, 3, 8])
def test_bottleneck_mlp(k):
    g = torch.Generator().manual_seed(10 + k)
    d, D = 16, 3 * 8 * 8
    G = bottleneck_mlp(d, k, D, g)
    G2 = lambda z: G(z).reshape(z.shape[0], 3, 8, 8)  # noqa: E731
    z = torch.randn(12, d, generator=g)
    ranks, vals = mmh_fast.jacobian_rank(G2, z, threshold=1e-4, return_singular_values=True)
    assert ranks.tolist() == [k] * 12
    ref = brute_force_singular_values(G2, z)
    torch.testing.assert_close(vals.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.max()))


# ------------------------------------------------------- percentile rule ---

@pytest.mark.parametrize("percentile", [10, 50])
def test_percentile_threshold_matches_brute_force(percentile):
    g = torch.Generator().manual_seed(3)
    d, D = 12, 3 * 8 * 8
    G = bottleneck_mlp(d, 12, D, g)
    z = torch.randn(16, d, generator=g)
    ranks, vals = mmh_fast.jacobian_rank(G, z, percentile=percentile, return_singular_values=True, batch_size=5)
    ref = brute_force_singular_values(G, z)
    tau = np.percentile(ref.numpy(), percentile)
    assert ranks.tolist() == (ref > tau).sum(1).tolist()
    # the paper's default (10th percentile) leaves about 90% of the values above tau
    if percentile == 10:
        assert abs(float(ranks.sum()) / ref.numel() - 0.9) < 1.0 / d


def test_percentile_on_a_known_spectrum():
    # linear generator: every sample has singular values 1..12; the 25th
    # percentile of the batch is that of 1..12 (np.percentile: 3.75), so rank 9
    g = torch.Generator().manual_seed(4)
    d = 12
    s = torch.arange(d, 0, -1, dtype=torch.float64)
    G = Linear(orthonormal(50, d, g) @ torch.diag(s) @ orthonormal(d, d, g).T, (50,))
    z = torch.randn(5, d, generator=g)
    assert mmh_fast.jacobian_rank(G, z, percentile=25).tolist() == [9] * 5


# ---------------------------------------------------------- randomized ---

def test_randomized_and_exact_agree_on_large_latent():
    g = torch.Generator().manual_seed(5)
    d, D = 300, 3 * 16 * 16
    G = bottleneck_mlp(d, 12, D, g)
    z = torch.randn(6, d, generator=g)
    r_exact = mmh_fast.jacobian_rank(G, z, threshold=1e-4, method="exact")
    r_rand, v_rand = mmh_fast.jacobian_rank(G, z, threshold=1e-4, method="randomized",
                                            return_singular_values=True)
    r_auto, v_auto = mmh_fast.jacobian_rank(G, z, threshold=1e-4, return_singular_values=True)
    assert r_exact.tolist() == r_rand.tolist() == r_auto.tolist() == [12] * 6
    # the sketch stayed small (rank_hint 32 + oversample 10 columns), auto chose it
    assert v_rand.shape[1] == 42 and v_auto.shape[1] == 42
    _, v_exact = mmh_fast.jacobian_rank(G, z, threshold=1e-4, method="exact", return_singular_values=True)
    torch.testing.assert_close(v_rand[:, :12], v_exact[:, :12], rtol=1e-4, atol=1e-6)


def test_randomized_grows_and_falls_back_to_exact():
    g = torch.Generator().manual_seed(6)
    d = 40
    G = ReluMasked(d, (3, 8, 8), g)
    z = torch.randn(8, d, generator=g)
    z[0] = -z[0].abs()          # rank 0
    z[1, :3] = z[1, :3].abs()   # rank >= 3
    want = (z > 0).sum(1).tolist()
    r = mmh_fast.jacobian_rank(G, z, threshold=1e-2, method="randomized", rank_hint=2, oversample=2)
    assert r.tolist() == want
    r = mmh_fast.jacobian_rank(G, z, threshold=1e-2, method="randomized", rank_hint=2, oversample=2, batch_size=3)
    assert r.tolist() == want


# ------------------------------------------------------------ fallback ---

class NoForwardModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z):
        return DoubleWithoutForwardAD.apply(self.inner(z))


def test_fallback_to_reverse_mode_when_forward_ad_is_missing():
    g = torch.Generator().manual_seed(7)
    d = 10
    inner = ReluMasked(d, (3, 4, 4), g)
    G = NoForwardModel(inner)
    z = torch.randn(9, d, generator=g)
    want = (z > 0).sum(1).tolist()
    with pytest.raises(RuntimeError):
        mmh_fast.jacobian_rank(G, z, threshold=1e-2, ad="forward")
    with pytest.warns(UserWarning, match="forward-mode AD failed .* using reverse mode"):
        ranks, vals = mmh_fast.jacobian_rank(G, z, threshold=1e-2, return_singular_values=True)
    assert ranks.tolist() == want
    # the Jacobian of 2 W diag(mask) is twice the inner one
    _, inner_vals = mmh_fast.jacobian_rank(inner, z, threshold=1e-2, return_singular_values=True)
    torch.testing.assert_close(vals, 2 * inner_vals, rtol=1e-5, atol=1e-5)
    assert mmh_fast.jacobian_rank(G, z, threshold=1e-2, ad="reverse").tolist() == want
    with pytest.warns(UserWarning, match="forward-mode AD failed"):
        r = mmh_fast.jacobian_rank(G, z, threshold=1e-2, method="randomized", rank_hint=2)
    assert r.tolist() == want


def test_reverse_mode_equals_forward_mode_on_mlp():
    g = torch.Generator().manual_seed(8)
    G = bottleneck_mlp(8, 5, 30, g)
    z = torch.randn(7, 8, generator=g)
    _, vf = mmh_fast.jacobian_rank(G, z, threshold=1e-4, ad="forward", return_singular_values=True)
    _, vr = mmh_fast.jacobian_rank(G, z, threshold=1e-4, ad="reverse", return_singular_values=True)
    torch.testing.assert_close(vf, vr, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- kwargs, shapes, kinds ---

def test_per_sample_generator_kwargs_follow_the_chunks():
    g = torch.Generator().manual_seed(9)
    d = 6
    Ws = torch.stack([orthonormal(20, d, g)[:, :d] @ torch.diag(torch.tensor([1.0] * r + [0.0] * (d - r),
                                                                            dtype=torch.float64))
                      for r in range(d + 1)]).float()

    def G(z, labels, scale=1.0):
        return scale * torch.einsum("bod,bd->bo", Ws[labels], z)

    labels = torch.tensor([0, 3, 6, 2, 5, 1, 4])
    z = torch.randn(7, d, generator=g)
    for bs in (None, 2, 3):
        assert mmh_fast.jacobian_rank(G, z, threshold=1e-3, batch_size=bs, labels=labels,
                                      scale=2.0).tolist() == labels.tolist()


def test_latent_shapes_and_numpy_latents():
    g = torch.Generator().manual_seed(10)
    W = torch.randn(3 * 4 * 4, 2 * 3 * 3, generator=g)
    G = lambda z: (z.reshape(z.shape[0], -1) @ W.T).reshape(z.shape[0], 3, 4, 4)  # noqa: E731
    z = torch.randn(4, 2, 3, 3, generator=g)
    assert mmh_fast.jacobian_rank(G, z, threshold=1e-3).tolist() == [18] * 4
    assert mmh_fast.jacobian_rank(G, z.numpy(), threshold=1e-3).tolist() == [18] * 4


def test_batchnorm_in_training_mode_warns():
    G = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10))
    with pytest.warns(UserWarning, match="BatchNorm layers in training mode"):
        mmh_fast.jacobian_rank(G, torch.randn(5, 4), threshold=1e-3)


# ----------------------------------------------------------- bad input ---

def test_bad_input_errors():
    G = torch.nn.Linear(4, 6)
    z = torch.randn(3, 4)
    with pytest.raises(TypeError, match="generator must be callable"):
        mmh_fast.jacobian_rank("G", z)
    with pytest.raises(ValueError, match="z must be a batch"):
        mmh_fast.jacobian_rank(G, torch.randn(4))
    with pytest.raises(ValueError, match="z must be non-empty"):
        mmh_fast.jacobian_rank(G, torch.randn(0, 4))
    with pytest.raises(TypeError, match="z must be floating point"):
        mmh_fast.jacobian_rank(G, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="z must be a torch.Tensor or numpy.ndarray"):
        mmh_fast.jacobian_rank(G, [[1.0, 2.0]])
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        mmh_fast.jacobian_rank(G, bad)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        mmh_fast.jacobian_rank(G, z, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        mmh_fast.jacobian_rank(G, z, threshold=float("inf"))
    with pytest.raises(ValueError, match="percentile must be a number in"):
        mmh_fast.jacobian_rank(G, z, percentile=150)
    with pytest.raises(ValueError, match="method must be"):
        mmh_fast.jacobian_rank(G, z, method="lanczos")
    with pytest.raises(ValueError, match="ad must be"):
        mmh_fast.jacobian_rank(G, z, ad="finite-differences")
    with pytest.raises(ValueError, match="method='randomized' needs an explicit threshold"):
        mmh_fast.jacobian_rank(G, z, method="randomized")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        mmh_fast.jacobian_rank(G, z, batch_size=0)
    with pytest.raises(ValueError, match="n_iter must be an integer"):
        mmh_fast.jacobian_rank(G, z, n_iter=-1)
    with pytest.raises(TypeError, match="generator must return a tensor"):
        mmh_fast.jacobian_rank(lambda zz: (G(zz),), z)
    with pytest.raises(ValueError, match="generator output must have the batch dimension"):
        mmh_fast.jacobian_rank(lambda zz: G(zz).reshape(-1), z)
    with pytest.raises(ValueError, match="generator output contains NaN"):
        mmh_fast.jacobian_rank(lambda zz: G(zz) * float("nan"), z)


def test_budget_default_batch_size(monkeypatch):
    # the default chunk holds at most JACOBIAN_BUDGET Jacobian entries
    monkeypatch.setattr(jac_mod, "JACOBIAN_BUDGET", 3 * 48 * 10)
    seen = []
    g = torch.Generator().manual_seed(11)
    inner = ReluMasked(10, (48,), g)

    def G(z):
        seen.append(z.shape[0])
        return inner(z)

    z = torch.randn(8, 10, generator=g)
    assert mmh_fast.jacobian_rank(G, z, threshold=1e-2).tolist() == (z > 0).sum(1).tolist()
    assert max(seen) <= 3


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_cuda_matches_cpu(method):
    g = torch.Generator().manual_seed(12)
    d = 40
    G = ReluMasked(d, (3, 8, 8), g)
    z = torch.randn(10, d, generator=g)
    want = (z > 0).sum(1).tolist()
    r_cpu, v_cpu = mmh_fast.jacobian_rank(G, z, threshold=1e-2, method=method, rank_hint=4,
                                          return_singular_values=True)
    r_gpu, v_gpu = mmh_fast.jacobian_rank(G.cuda(), z.cuda(), threshold=1e-2, method=method, rank_hint=4,
                                          return_singular_values=True)
    assert r_gpu.is_cuda and r_gpu.cpu().tolist() == r_cpu.tolist() == want
    torch.testing.assert_close(v_gpu.cpu()[:, :1], v_cpu[:, :1], rtol=1e-4, atol=1e-4)



def _linear_of_rank(rank, d, D, g, *, flat):
    """W [D, d] of exact rank ``rank``: U V^T (all singular values 1) when
    ``flat``, else U diag(s) V^T with s uniform in [1, 3]. Either is far from a
    0.5 threshold on both sides (the zero values compute to ~1e-6 in float32),
    so every correct method must count exactly ``rank``."""
    s = torch.ones(rank, dtype=torch.float64) if flat else 1.0 + 2.0 * torch.rand(rank, generator=g,
                                                                                   dtype=torch.float64)
    W = orthonormal(D, rank, g) @ torch.diag(s) @ orthonormal(d, rank, g).T
    return Linear(W, (D,)).eval()


@pytest.mark.parametrize("rank", [100, 300])
@pytest.mark.parametrize("flat, n_iter", [(True, 1), (False, 0)])
def test_randomized_counts_ranks_far_above_the_initial_sketch(rank, flat, n_iter):
    """Issue 13 item 1: the sketch starts with 42 columns (rank_hint 32 +
    oversample 10); its error probes must be independent of the sketch's
    columns. The old 32-bit probe counter aliased the error probes (index
    2**40) to sketch columns 0..9, whose residual is 0 when Q spans J Omega:
    with no power iteration, or with one when J^T J is a multiple of the
    identity on its range (flat spectrum). The bound was then ~0 and the
    42-column sketch was accepted: rank 42 for both ranks. Rank 100 is decided
    by the grown 168-column sketch, rank 300 (> d / 2) by the exact path after
    three sketches (42, 84, 168 columns)."""
    g = torch.Generator().manual_seed(13)
    d, D = 400, 500
    G = _linear_of_rank(rank, d, D, g, flat=flat)
    z = torch.randn(3, d, generator=g)
    assert mmh_fast.jacobian_rank(G, z, threshold=0.5, method="exact").tolist() == [rank] * 3
    assert mmh_fast.jacobian_rank(G, z, threshold=0.5, n_iter=n_iter).tolist() == [rank] * 3
    r, s = mmh_fast.jacobian_rank(G, z, threshold=0.5, method="randomized", n_iter=n_iter,
                                  return_singular_values=True)
    assert r.tolist() == [rank] * 3
    # rank 100: a sketch's values (168 wide); rank 300: the exact path's min(D, d) = 400
    assert s.shape[1] == (168 if rank == 100 else 400)


# ------------------------------------------------------- out of memory ---

def _oom_error(kind):
    if kind == "torch":
        return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                        "you tried to allocate 21474836480 bytes.")


class _OomInDerivatives(torch.autograd.Function):
    """Identity whose first derivative call (JVP or VJP) runs out of memory and
    whose later ones work: stands in for a network too large for the batched
    Jacobian products of a chunk, where a fallback to smaller products would
    hide the OOM and return a result."""
    generate_vmap_rule = True
    kind = "torch"
    calls = 0

    @staticmethod
    def _derivative(value):
        _OomInDerivatives.calls += 1
        if _OomInDerivatives.calls == 1:
            raise _oom_error(_OomInDerivatives.kind)
        return value

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _OomInDerivatives._derivative(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return _OomInDerivatives._derivative(tangent)


class _OomModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, z):
        return _OomInDerivatives.apply(self.inner(z))


@pytest.mark.parametrize("kind", ["torch", "message"])
@pytest.mark.parametrize("method, ad", [("exact", "auto"), ("randomized", "auto"), ("exact", "reverse"),
                                        ("randomized", "forward")])
def test_out_of_memory_is_raised_not_swallowed(monkeypatch, kind, method, ad):
    """Issue 13 item 4: an OOM inside the Jacobian products propagates; it is
    never taken for missing forward-mode AD (a warning and D backward passes)
    nor for a failed batched VJP (one backward pass per output coordinate).
    kind "message": a RuntimeError saying so, as the CPU allocator raises."""
    monkeypatch.setattr(_OomInDerivatives, "kind", kind)
    monkeypatch.setattr(_OomInDerivatives, "calls", 0)
    g = torch.Generator().manual_seed(9)
    G = _OomModel(ReluMasked(6, (2, 3), g))
    z = torch.randn(4, 6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "forward-mode AD failed" warning either
        with pytest.raises(RuntimeError, match="out of memory|not enough memory") as info:
            mmh_fast.jacobian_rank(G, z, threshold=1e-2, method=method, ad=ad, rank_hint=1, oversample=1)
    assert isinstance(info.value, torch.OutOfMemoryError) == (kind == "torch")
