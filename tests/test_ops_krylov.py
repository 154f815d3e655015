"""ops.krylov_eigenvalues beyond tests/test_text_sharpness.py: the symmetric
answer against eigvalsh of the symmetric part, batch invariance, input errors."""
import pytest
import torch

from mmh_fast.ops.krylov import krylov_eigenvalues


def _batched(A):
    return lambda v: torch.einsum("bij,bj->bi", A, v)


def test_symmetric_full_krylov_space_gives_the_spectrum_of_the_symmetric_part():
    # k = d: Q_d is an orthonormal basis, so the Rayleigh-Ritz values are the
    # eigenvalues of (A + A^T) / 2 up to rounding (A itself is not symmetric)
    A = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = torch.zeros(3, 12, dtype=torch.float64)
    got = krylov_eigenvalues(_batched(A), x, 12)
    assert got.dtype == torch.float64
    for b in range(3):
        want = torch.linalg.eigvalsh((A[b] + A[b].T) / 2)
        want = want[want.abs().argsort(descending=True)]
        torch.testing.assert_close(got[b], want, rtol=1e-9, atol=1e-11)


def test_a_samples_ritz_values_do_not_depend_on_its_batch():
    # no restart (distinct eigenvalues, k < d): the start vector is keyed by (seed, sample id) alone
    A = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    A = A + A.transpose(1, 2)
    x = torch.zeros(3, 16, dtype=torch.float64)
    ids = torch.tensor([4, 9, 11])
    both = krylov_eigenvalues(_batched(A), x, 5, seed=3, sample_ids=ids)
    alone = krylov_eigenvalues(_batched(A[1:2]), x[1:2], 5, seed=3, sample_ids=ids[1:2])
    torch.testing.assert_close(both[1:2], alone, rtol=1e-12, atol=0)


def test_a_samples_ritz_values_after_a_restart_do_not_depend_on_its_batch():
    # diag(1, 1, 2, 2): K_2 is invariant, the restart vector r lies in its complement and the third
    # Ritz value is r's Rayleigh quotient, which depends on r; 3 I restarts at the first step
    A0 = torch.diag(torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64))
    A = torch.stack([3 * torch.eye(4, dtype=torch.float64), A0])
    x = torch.zeros(2, 4, dtype=torch.float64)
    both = krylov_eigenvalues(_batched(A), x, 3, sample_ids=torch.tensor([5, 7]))
    alone = krylov_eigenvalues(_batched(A[1:]), x[1:], 3, sample_ids=torch.tensor([7]))
    torch.testing.assert_close(both[1:], alone, rtol=1e-12, atol=0)


def test_x_must_be_a_floating_batch():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        krylov_eigenvalues(lambda v: v, torch.zeros(2, 4, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        krylov_eigenvalues(lambda v: v, torch.zeros(0, 4), 2)
    with pytest.raises(ValueError, match="k must be"):
        krylov_eigenvalues(lambda v: v, torch.zeros(2, 4), 0)
