"""ops.svd_rank against exact truths: matrices built as U diag(s) V^T with
known singular values (hence known ranks under every rule), torch.linalg.svdvals
in float64, and the plain-PyTorch reference rules."""
import math

import numpy as np
import pytest
import torch

import mmh_fast
from mmh_fast import ops
from mmh_fast.ops import reference as ref


def orthonormal(rows, cols, g):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=g))
    return q


def spectrum(rank, k, g, top=(1.0, 1.5), tail=0.0):
    """Descending singular values: `rank` values in `top`, then tail values in
    [tail/2, tail] (0 gives an exactly low-rank matrix)."""
    hi = torch.empty(rank, dtype=torch.float64).uniform_(*top, generator=g)
    lo = torch.empty(k - rank, dtype=torch.float64).uniform_(0.5, 1.0, generator=g) * tail
    return torch.cat([hi, lo]).sort(descending=True).values


def gapped(ranks, m, n, dtype=torch.float64, tail=0.0, seed=0, top=(1.0, 1.5)):
    """[B, m, n] with known singular values; returns (A, s [B, k] float64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    mats, svals = [], []
    for r in ranks:
        s = spectrum(r, k, g, top, tail)
        mats.append(orthonormal(m, k, g) @ torch.diag(s) @ orthonormal(n, k, g).T)
        svals.append(s)
    return torch.stack(mats).to(dtype), torch.stack(svals)


RULE_ARGS = {
    "gap": {},
    "threshold": {"threshold": 0.1},
    "ratio": {},
}


# ----------------------------------------------------------------- values ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 50, 30), (5, 30, 50), (3, 64, 64), (4, 1, 9), (2, 9, 1)])
def test_exact_singular_values_match_svdvals(device, dtype, shape):
    A = torch.randn(*shape, dtype=torch.float64).to(dtype)
    ranks, s = ops.svd_rank(A.to(device), method="exact")
    want = torch.linalg.svdvals(A.to(torch.float64))
    assert s.dtype == dtype and s.shape == want.shape and ranks.dtype == torch.int64
    tol = 1e-6 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(s.cpu().to(torch.float64), want, rtol=tol, atol=tol * float(want.max()))
    # the ranks are those of the reference rule on the exact values
    torch.testing.assert_close(ranks.cpu(), ref.svd_rank(A, rule="gap")[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_values_of_ill_conditioned_matrices_fall_back_to_svd(dtype):
    # values spanning 12 decades: the Gram eigenvalues cannot resolve the small
    # ones; the threshold sits among them, so the rank needs the SVD fallback
    g = torch.Generator().manual_seed(1)
    s = torch.logspace(0, -12, 20, dtype=torch.float64)
    A = (orthonormal(40, 20, g) @ torch.diag(s) @ orthonormal(20, 20, g).T).unsqueeze(0)
    ranks, _ = ops.svd_rank(A, threshold=3e-9, rule="threshold", method="exact")
    want = ref.svd_rank(A, threshold=3e-9, rule="threshold")[0]
    assert int(ranks[0]) == int(want[0])
    assert int(want[0]) == int((torch.linalg.svdvals(A[0]) > 3e-9).sum())


def test_randomized_values_are_the_top_singular_values(device):
    A, s_true = gapped([12, 20], 300, 200, tail=1e-4, seed=2)
    ranks, s = ops.svd_rank(A.to(device), method="randomized", rank_hint=24, oversample=8)
    assert ranks.tolist() == [12, 20]
    assert s.shape[1] == 32
    for b, r in enumerate([12, 20]):
        torch.testing.assert_close(s[b, :r].cpu(), s_true[b, :r], rtol=1e-8, atol=1e-10)
        # sketch estimates never exceed the true values (projection)
        assert bool((s[b].cpu() <= s_true[b, :32] + 1e-12).all())


# ------------------------------------------------------------------ ranks ---

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["gap", "threshold", "ratio"])
@pytest.mark.parametrize("tail", [0.0, 1e-4])
@pytest.mark.parametrize("shape", [(60, 40), (40, 60)])
def test_exact_ranks_on_gapped_matrices(device, dtype, rule, tail, shape):
    known = [1, 3, 7, 12, 20, 39]
    A, s_true = gapped(known, *shape, dtype=dtype, tail=tail, seed=3)
    ranks, _ = ops.svd_rank(A.to(device), rule=rule, method="exact", **RULE_ARGS[rule])
    assert ranks.cpu().tolist() == known
    assert ranks.cpu().tolist() == ref.svd_rank(A, rule=rule, **RULE_ARGS[rule])[0].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", ["gap", "threshold", "ratio"])
@pytest.mark.parametrize("tail", [0.0, 1e-4])
def test_randomized_ranks_on_gapped_matrices(device, dtype, rule, tail):
    # ranks from below to far above the initial sketch (8 + 4 columns): the
    # sketch must grow, and past half of k the exact path takes over
    known = [1, 5, 11, 30, 90, 150]
    A, _ = gapped(known, 300, 200, dtype=dtype, tail=tail, seed=4)
    ranks, s = ops.svd_rank(A.to(device), rule=rule, method="randomized", rank_hint=8, oversample=4,
                            **RULE_ARGS[rule])
    assert ranks.cpu().tolist() == known
    exact, _ = ops.svd_rank(A.to(device), rule=rule, method="exact", **RULE_ARGS[rule])
    assert ranks.cpu().tolist() == exact.cpu().tolist()
    # each matrix's row of values is a finite prefix, NaN after it
    finite = torch.isfinite(s.cpu())
    lengths = finite.sum(1)
    assert bool((finite == (torch.arange(s.shape[1]) < lengths[:, None])).all())
    assert bool((lengths >= torch.tensor(known)).all())


@pytest.mark.parametrize("rule", ["gap", "threshold"])
def test_randomized_equals_exact_on_1024_by_4096(rule):
    g = torch.Generator().manual_seed(5)
    m, n, r = 1024, 4096, 50
    U, V = orthonormal(m, r, g), orthonormal(n, r, g)
    s = torch.linspace(2.0, 1.0, r, dtype=torch.float64)
    noise = torch.randn(m, n, generator=g, dtype=torch.float64) * (1e-3 / math.sqrt(n))
    A = ((U * s) @ V.T + noise).to(torch.float32).unsqueeze(0)
    args = {"threshold": 0.5} if rule == "threshold" else {}
    rnd, s_rnd = ops.svd_rank(A, rule=rule, method="randomized", **args)
    ex, s_ex = ops.svd_rank(A, rule=rule, method="exact", **args)
    assert rnd.tolist() == ex.tolist() == [r]
    torch.testing.assert_close(s_rnd[0, :r], s_ex[0, :r], rtol=1e-5, atol=1e-6)
    # auto picks the randomized path at this size (same sketch, same values)
    auto, s_auto = ops.svd_rank(A, rule=rule, **args)
    assert auto.tolist() == [r] and s_auto.shape == s_rnd.shape


def test_ratio_rule_full_rank_and_zero(device):
    g = torch.Generator().manual_seed(6)
    gauss = torch.randn(16, 96, 24, generator=g, dtype=torch.float64)  # NB shape, K = 4d
    ortho = torch.stack([orthonormal(30, 30, g) for _ in range(3)])     # all s_i = 1
    for A in (gauss, ortho, gauss.float()):
        ranks, _ = ops.svd_rank(A.to(device), rule="ratio")
        assert ranks.cpu().tolist() == [min(A.shape[1:])] * A.shape[0]
    zero = torch.zeros(3, 20, 10, device=device)
    for rule in ("gap", "ratio", "threshold"):
        for method in ("exact", "randomized"):
            ranks, s = ops.svd_rank(zero, rule=rule, method=method, **RULE_ARGS[rule])
            assert ranks.cpu().tolist() == [0, 0, 0]
            assert bool(torch.isfinite(s).all())


def test_exact_zeros_give_no_nan(device):
    # exactly rank-deficient by construction: zero columns; the ratio to the
    # zero singular values is infinite and decides the rank
    g = torch.Generator().manual_seed(7)
    A = torch.zeros(4, 30, 12, dtype=torch.float64)
    for b, r in enumerate([1, 4, 6, 11]):
        A[b, :, :r] = torch.randn(30, r, generator=g, dtype=torch.float64)
    for method in ("exact", "randomized"):
        ranks, s = ops.svd_rank(A.to(device), rule="ratio", method=method, rank_hint=2, oversample=1)
        assert ranks.cpu().tolist() == [1, 4, 6, 11]
        assert not bool(torch.isnan(s[:, :1]).any())
    s = torch.tensor([[2.0, 1.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    for rtol in (0.0, 1e-6):  # x / 0 = inf, 0 / 0 = 1 without a floor; s_1 / floor with one
        assert ref.rank_from_singular_values(s, "ratio", rtol=rtol).tolist() == [2, 0, 4]
        assert ref.rank_from_singular_values(s, "gap", rtol=rtol).tolist() == [2, 0, 1]
        C = mmh_fast._native.native()
        z = torch.zeros(3, dtype=torch.float64)
        for code, rule in ((0, "gap"), (2, "ratio")):
            r, c = C.rank_rule_cpu(s, s, z, rtol * s[:, 0], z, 4, code, 3.0, True)
            assert r.tolist() == ref.rank_from_singular_values(s, rule, rtol=rtol).tolist()


def test_nb_like_matrices_ratio_rule():
    # a centred normal-bundle score matrix of a component of dimension j in
    # d = 24: d - j normal directions at O(1/sigma), j tangent ones at O(1)
    g = torch.Generator().manual_seed(8)
    d, K, sigma = 24, 96, 0.1
    mats, want = [], []
    for j in (0, 1, 4, 9, 15, 24):
        scale = torch.cat([torch.full((d - j,), 1 / sigma), torch.full((j,), 1.0)]).to(torch.float64)
        basis = orthonormal(d, d, g)
        S = torch.randn(K, d, generator=g, dtype=torch.float64) * scale @ basis.T
        mats.append(S - S.mean(0))
        want.append(d - j)
    ranks, _ = ops.svd_rank(torch.stack(mats), rule="ratio")
    assert ranks.tolist()[:-1] == want[:-1]
    # j = d (no normal directions, the whole space is tangent) is again flat: full rank
    assert ranks.tolist()[-1] == d


# ---------------------------------------------------------- the rule kernel ---

def _rule(lo, hi, tail, k, rule, floor=None, thr=None, min_ratio=3.0, exact=False):
    C = mmh_fast._native.native()
    lo = torch.tensor(lo, dtype=torch.float64).reshape(1, -1)
    hi = torch.tensor(hi, dtype=torch.float64).reshape(1, -1)
    f = torch.tensor([0.0 if floor is None else floor], dtype=torch.float64)
    t = torch.tensor([0.0 if thr is None else thr], dtype=torch.float64)
    r, c = C.rank_rule_cpu(lo, hi, torch.tensor([tail], dtype=torch.float64), f, t, k, rule,
                           min_ratio, exact)
    return int(r[0]), bool(c[0])


def test_rank_rule_kernel_on_exact_values_matches_reference():
    g = torch.Generator().manual_seed(9)
    C = mmh_fast._native.native()
    for k in (1, 2, 5, 17):
        s = torch.rand(200, k, generator=g, dtype=torch.float64) ** 4
        s[::7, k // 2:] = 0.0          # exact zeros
        s[::11] = 0.0                  # zero matrices
        s[::13, 1:] = s[::13, :1]      # ties (flat spectra)
        s = s.sort(dim=1, descending=True).values
        floor = 1e-3 * s[:, 0]
        thr = torch.full((200,), 0.3, dtype=torch.float64)
        zeros = torch.zeros(200, dtype=torch.float64)
        for rule, code in (("gap", 0), ("threshold", 1), ("ratio", 2)):
            r, c = C.rank_rule_cpu(s, s, zeros, floor, thr, k, code, 3.0, True)
            want = ref.rank_from_singular_values(s, rule, thr, 3.0, 1e-3)
            assert bool(c.all())
            assert r.tolist() == want.tolist(), (k, rule)


def test_rank_rule_kernel_certification():
    # threshold: an interval straddling the threshold, or a tail above it, is undecided
    assert _rule([2.0, 1.0], [2.0, 1.0], 0.0, 2, 1, thr=0.5) == (2, True)
    assert _rule([2.0, 0.4], [2.0, 0.6], 0.0, 2, 1, thr=0.5)[1] is False
    assert _rule([2.0, 1.0], [2.0, 1.0], 0.4, 5, 1, thr=0.5) == (2, True)
    assert _rule([2.0, 1.0], [2.0, 1.0], 0.6, 5, 1, thr=0.5)[1] is False
    # gap: decided when the best gap's lower bound beats every other upper bound
    assert _rule([3.0, 2.9, 0.1], [3.0, 2.95, 0.1], 0.05, 10, 0) == (2, True)
    assert _rule([3.0, 2.9, 0.1], [3.0, 2.95, 0.1], 2.9, 10, 0)[1] is False  # tail may hold a bigger gap
    assert _rule([3.0, 1.5, 0.1], [3.0, 1.6, 0.1], 0.0, 3, 0)[1] is False    # 1.4..1.5 vs 1.4..1.5
    # ratio: the unseen tail may hide a large ratio unless it is at the noise floor
    assert _rule([3.0, 2.9, 0.01], [3.0, 2.9, 0.01], 0.0, 10, 2) == (3, True)  # 0.01 / 0 = inf
    assert _rule([3.0, 2.9, 0.01], [3.0, 2.9, 0.01], 1e-4, 10, 2, floor=1e-3) == (2, True)
    assert _rule([3.0, 2.9, 0.01], [3.0, 2.9, 0.01], 1e-4, 10, 2)[1] is False
    # ratio, full rank: every ratio's upper bound at most min_ratio
    assert _rule([3.0, 2.0, 1.5], [3.0, 2.0, 1.5], 0.0, 3, 2) == (3, True)
    assert _rule([3.0, 2.0, 0.5], [3.0, 2.0, 1.5], 0.0, 3, 2)[1] is False  # 2 / 0.5 = 4 possible


# ------------------------------------------------------ determinism, kinds ---

def test_randomized_is_deterministic_and_batch_independent():
    A, _ = gapped([3, 9, 14, 6], 120, 80, tail=1e-3, seed=10)
    r1, s1 = ops.svd_rank(A, method="randomized", rank_hint=4, seed=123)
    r2, s2 = ops.svd_rank(A, method="randomized", rank_hint=4, seed=123)
    assert r1.tolist() == r2.tolist() == [3, 9, 14, 6]
    torch.testing.assert_close(s1, s2, rtol=0, atol=0, equal_nan=True)
    # a matrix alone, keyed by its id, gets the same sketch as in the batch
    r3, s3 = ops.svd_rank(A[2:3], method="randomized", rank_hint=4, seed=123, sample_ids=[2])
    assert r3.tolist() == [14]
    n3 = int(torch.isfinite(s3[0]).sum())
    torch.testing.assert_close(s3[0, :n3], s1[2, :n3], rtol=1e-12, atol=1e-14)
    gen = torch.Generator().manual_seed(5)
    r4, _ = ops.svd_rank(A, method="randomized", rank_hint=4, generator=gen)
    assert r4.tolist() == [3, 9, 14, 6]


def test_input_kinds_and_dtypes():
    A, _ = gapped([4], 30, 20, seed=11)
    r, s = ops.svd_rank(A[0].numpy())
    assert isinstance(r, np.ndarray) and isinstance(s, np.ndarray)
    assert r.tolist() == [4] and s.shape == (1, 20) and s.dtype == np.float64
    r, s = ops.svd_rank(A.to(torch.float16))
    assert r.tolist() == [4] and s.dtype == torch.float32
    r, s = ops.svd_rank(A.to(torch.bfloat16))
    assert r.tolist() == [4] and s.dtype == torch.float32
    r, _ = ops.svd_rank(A, threshold=torch.tensor([0.5]), rule="threshold")
    assert r.tolist() == [4]


# -------------------------------------------------------------- bad input ---

def test_bad_input_errors():
    A = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="A must be a"):
        ops.svd_rank(torch.randn(5))
    with pytest.raises(ValueError, match="A must be a"):
        ops.svd_rank(torch.randn(2, 2, 5, 4))
    with pytest.raises(ValueError, match="A must be non-empty"):
        ops.svd_rank(torch.randn(0, 5, 4))
    with pytest.raises(ValueError, match="A must be non-empty"):
        ops.svd_rank(torch.randn(2, 0, 4))
    bad = A.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="A contains 1 NaN or inf"):
        ops.svd_rank(bad)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="A contains 1 NaN or inf"):
        ops.svd_rank(bad)
    with pytest.raises(TypeError, match="A must hold real floating-point"):
        ops.svd_rank(torch.ones(2, 5, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="A must hold real floating-point"):
        ops.svd_rank(torch.ones(2, 5, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        ops.svd_rank([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(ValueError, match="rule must be one of"):
        ops.svd_rank(A, rule="largest")
    with pytest.raises(ValueError, match="method must be one of"):
        ops.svd_rank(A, method="lanczos")
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        ops.svd_rank(A, threshold=-1.0, rule="threshold")
    with pytest.raises(ValueError, match="threshold must be finite"):
        ops.svd_rank(A, threshold=float("nan"), rule="threshold")
    with pytest.raises(ValueError, match="rule='threshold' needs a threshold"):
        ops.svd_rank(A, rule="threshold")
    with pytest.raises(ValueError, match="threshold is only used by rule='threshold'"):
        ops.svd_rank(A, threshold=0.1)
    with pytest.raises(ValueError, match="threshold must be a number or have one entry per matrix"):
        ops.svd_rank(A, threshold=torch.tensor([0.1, 0.2, 0.3]), rule="threshold")
    with pytest.raises(ValueError, match="min_ratio must be >= 1"):
        ops.svd_rank(A, rule="ratio", min_ratio=0.5)
    with pytest.raises(ValueError, match="rtol must be in"):
        ops.svd_rank(A, rtol=1.5)
    with pytest.raises(TypeError, match="rank_hint must be an integer"):
        ops.svd_rank(A, rank_hint=2.5)
    with pytest.raises(ValueError, match="n_iter must be >= 0"):
        ops.svd_rank(A, n_iter=-1)
    with pytest.raises(ValueError, match="max_sketch_fraction must be in"):
        ops.svd_rank(A, max_sketch_fraction=0.0)
    with pytest.raises(ValueError, match="sample_ids has 3 entries"):
        ops.svd_rank(A, sample_ids=[0, 1, 2])
    # the native layer checks too (last line of defence, same wording)
    C = mmh_fast._native.native()
    with pytest.raises(ValueError, match="A must be a 3-D tensor"):
        C.svd_rank_cpu(torch.randn(5, 4), torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int64),
                       0, 0, 3.0, 0.0, 8, 1, 0.5, 0)
    with pytest.raises(ValueError, match="A contains NaN or inf values"):
        C.svd_rank_cpu(bad, torch.zeros(2, dtype=torch.float64), torch.arange(2), 0, 0, 3.0, 0.0, 8, 1, 0.5, 0)
    with pytest.raises(ValueError, match="rule code"):
        C.svd_rank_cpu(A, torch.zeros(2, dtype=torch.float64), torch.arange(2), 7, 0, 3.0, 0.0, 8, 1, 0.5, 0)


# ------------------------------------------------------------------- CUDA ---

@pytest.mark.cuda
@pytest.mark.parametrize("rule", ["gap", "threshold", "ratio"])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_cuda_matches_cpu(rule, method):
    A, _ = gapped([2, 9, 17, 40], 150, 100, dtype=torch.float32, tail=1e-4, seed=12)
    r_cpu, s_cpu = ops.svd_rank(A, rule=rule, method=method, rank_hint=8, **RULE_ARGS[rule])
    r_gpu, s_gpu = ops.svd_rank(A.cuda(), rule=rule, method=method, rank_hint=8, **RULE_ARGS[rule])
    assert r_gpu.is_cuda and r_gpu.cpu().tolist() == r_cpu.tolist() == [2, 9, 17, 40]
    n = min(s_cpu.shape[1], s_gpu.shape[1])
    torch.testing.assert_close(s_gpu.cpu()[:, :2], s_cpu[:, :2], rtol=1e-5, atol=1e-6)
    assert n >= 2
