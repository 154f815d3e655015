import math

import numpy as np
import pytest
import torch

import mmh_fast
from mmh_fast import ops
from mmh_fast.ops import reference as ref


def test_backend_info_reports_native():
    info = mmh_fast.backend_info()
    assert info["native"] is True
    assert isinstance(info["cuda"], bool)
    assert info["version"] == mmh_fast.__version__


def test_philox_known_answer():
    # Published Philox4x32-10 test vectors (Random123 kat_vectors).
    out = ref.philox4x32_10(0, 0, 0, 0, 0, 0)
    assert [int(o) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    out = ref.philox4x32_10(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    assert [int(o) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    out = ref.philox4x32_10(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0)
    assert [int(o) for o in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_probes_match_reference(device, kind, dtype):
    ids = torch.tensor([0, 5, 2**33 + 7], dtype=torch.int64)
    got = ops.hutchinson_probes((3, 2, 7, 5), 4, probe=kind, seed=12345678901, sample_ids=ids,
                                probe_begin=3, dtype=dtype, device=device)
    want = ref.hutchinson_probes(ids, 70, 3, 4, 12345678901, kind, dtype).reshape(4, 3, 2, 7, 5)
    assert got.shape == (4, 3, 2, 7, 5) and got.dtype == dtype
    torch.testing.assert_close(got.cpu(), want, rtol=1e-12 if dtype == torch.float64 else 1e-6,
                               atol=1e-12 if dtype == torch.float64 else 1e-6)


def _words_of_layout(ids, numel, probes, seed, c0_of):
    """Philox words [P, B, blocks, 4] with c1 = p mod 2**32, (c2, c3) = sample
    id, key = seed and c0 = c0_of(block, p): the counter layout written out by hand."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(1, -1, 1)
    p = torch.as_tensor(probes, dtype=torch.int64).reshape(-1, 1, 1)
    blk = torch.arange((numel + 3) // 4, dtype=torch.int64).reshape(1, 1, -1)
    w = ref.philox4x32_10(c0_of(blk, p), p & 0xFFFFFFFF, ids & 0xFFFFFFFF, ids >> 32,
                          seed & 0xFFFFFFFF, seed >> 32)
    return torch.stack(torch.broadcast_tensors(*w), dim=-1)


def _signs(words):
    return torch.where((words >> 31) == 1, -1.0, 1.0).to(torch.float64).reshape(*words.shape[:2], -1)


def test_probe_counter_keeps_low_probe_indices():
    """Probes of index < 2**32 keep the layout c0 = block, c1 = probe: the
    values every earlier result (FLIPD, NB, sample noise) was computed with."""
    ids, seed, probes = [0, 9, 2**40 + 3], 2**63 + 5, [0, 1, 0x4E42_0000, 2**32 - 1]
    want = _signs(_words_of_layout(ids, 24, probes, seed, lambda blk, p: blk))
    for p_i, p in enumerate(probes):
        got = ops.hutchinson_probes((3, 24), 1, seed=seed - 2**64, sample_ids=ids, probe_begin=p,
                                    dtype=torch.float64)
        torch.testing.assert_close(got[0], want[p_i], rtol=0, atol=0)


@pytest.mark.parametrize("probe_begin", [2**32 - 2, 2**33 - 1, 2**34 - 3])
def test_probe_counter_uses_high_probe_bits(device, probe_begin):
    """Issue 13 item 1: the counter once kept only the low 32 bits of the probe
    index, so probe 2**32 + j was probe j again. Kernel, reference and the
    hand-written layout (c0 = block | (p >> 32) << 30) agree, and probe p + 2**32
    differs from probe p."""
    ids, seed, n = torch.tensor([1, 2**35 + 4]), 77, 3
    got = ops.hutchinson_probes((2, 41), n, probe="gaussian", seed=seed, sample_ids=ids, probe_begin=probe_begin,
                                dtype=torch.float64, device=device).cpu()
    want = ref.hutchinson_probes(ids, 41, probe_begin, n, seed, "gaussian", torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    probes = list(range(probe_begin, probe_begin + n))
    hand = _signs(_words_of_layout(ids, 41, probes, seed, lambda blk, p: blk | ((p >> 32) << 30)))[..., :41]
    rad = ops.hutchinson_probes((2, 41), n, seed=seed, sample_ids=ids, probe_begin=probe_begin,
                                dtype=torch.float64, device=device).cpu()
    torch.testing.assert_close(rad, hand, rtol=0, atol=0)
    for j, p in enumerate(probes):  # 82 signs equal by chance with probability 2**-82
        low = ops.hutchinson_probes((2, 41), 1, seed=seed, sample_ids=ids, probe_begin=p % 2**32,
                                    dtype=torch.float64, device=device).cpu()
        assert torch.equal(rad[j], low[0]) == (p < 2**32)
    # the reduction regenerates the same probes
    av = torch.randn(n, 2, 41, dtype=torch.float64)
    fn = getattr(mmh_fast._native.native(), f"hutchinson_reduce_{device.type}")
    _, _, dots = fn(av.to(device), ids.to(device), probe_begin, seed, 1)
    torch.testing.assert_close(dots.cpu(), (want * av).sum(-1), rtol=1e-12, atol=1e-12)


def test_probe_counter_rejects_keys_it_cannot_hold(device):
    """Probe indices >= 2**34 or more than 2**32 elements per probe have no
    counter of their own: refused at every layer, never aliased."""
    C = mmh_fast._native.native()
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    gen, red = getattr(C, f"hutchinson_probes_{device.type}"), getattr(C, f"hutchinson_reduce_{device.type}")
    assert gen(ids, 4, 2**34 - 1, 1, 0, 0, torch.float32).shape == (1, 1, 4)
    with pytest.raises(ValueError, match="must be < 2\\^34"):
        gen(ids, 4, 2**34 - 1, 2, 0, 0, torch.float32)
    with pytest.raises(ValueError, match="must be < 2\\^34"):
        gen(ids, 4, 2**63 - 1, 1, 0, 0, torch.float32)
    with pytest.raises(ValueError, match="numel"):
        gen(ids, 2**32 + 1, 0, 1, 0, 0, torch.float32)
    with pytest.raises(ValueError, match="must be < 2\\^34"):
        red(torch.zeros(2, 1, 4, device=device), ids, 2**34 - 1, 0, 0)
    with pytest.raises(ValueError, match="PROBE_INDEX_LIMIT"):
        ops.hutchinson_probes((1, 4), 2, probe_begin=ops.hutchinson.PROBE_INDEX_LIMIT - 1, device=device)
    with pytest.raises(ValueError, match="PROBE_INDEX_LIMIT"):
        ops.hutchinson_trace(lambda v: v, torch.zeros(1, 4, device=device), 1, probe_begin=2**40)
    with pytest.raises(ValueError, match="PROBE_NUMEL_LIMIT"):
        ops.hutchinson_probes((1, 2**16, 2**16 + 1), 1, device=device)
    with pytest.raises(ValueError, match="probe_begin must be >= 0"):
        ops.hutchinson_probes((1, 4), 1, probe_begin=-1, device=device)
    with pytest.raises(ValueError, match="outside the counter"):
        ref.hutchinson_probes(torch.zeros(1, dtype=torch.int64), 4, 2**34, 1, 0)


def test_probe_streams_of_the_library_fit_the_counter():
    """Every fixed probe stream (offset + the probes it may draw) lies inside
    the counter, and the streams are disjoint: sketch columns [0, d) and
    FLIPD / SolidMark probes from 0, NB and sample noise from their offsets,
    jacobian_rank's error probes from 2**33."""
    from mmh_fast.lid.jacobian import _ERROR_PROBE_OFFSET, _N_ERROR_PROBES
    from mmh_fast.lid.normal_bundle import _NB_STREAM
    from mmh_fast.models.sampling import _NOISE_STREAM
    starts = sorted([_NB_STREAM, _NOISE_STREAM, _ERROR_PROBE_OFFSET])
    assert starts == [_NB_STREAM, _NOISE_STREAM, _ERROR_PROBE_OFFSET]
    # NB draws at most d <= 2**27 probes before the noise stream; the noise
    # stream one per sampler step (< 2**32); the error probes 10
    assert _NOISE_STREAM - _NB_STREAM > 2**27
    assert _ERROR_PROBE_OFFSET - _NOISE_STREAM > 2**32
    assert _ERROR_PROBE_OFFSET + _N_ERROR_PROBES <= ops.hutchinson.PROBE_INDEX_LIMIT


def test_rademacher_values_and_balance():
    v = ops.hutchinson_probes((64, 1000), 2, probe="rademacher", seed=1, dtype=torch.float64)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    # mean of 128,000 +-1 values: |mean| < 5 / sqrt(n)
    assert abs(float(v.mean())) < 5 / math.sqrt(v.numel())


def test_gaussian_moments():
    v = ops.hutchinson_probes((50, 4000), 1, probe="gaussian", seed=3, dtype=torch.float64).flatten()
    n = v.numel()
    assert abs(float(v.mean())) < 5 / math.sqrt(n)
    assert abs(float(v.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((v**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((v**4).mean()) - 3) < 5 * math.sqrt(96 / n)


def test_probes_do_not_depend_on_batch():
    full = ops.hutchinson_probes((8, 33), 3, seed=9, sample_ids=torch.arange(8))
    part = ops.hutchinson_probes((3, 33), 3, seed=9, sample_ids=torch.tensor([6, 1, 4]))
    torch.testing.assert_close(part, full[:, [6, 1, 4]], rtol=0, atol=0)
    # probe streams continue: probes 1..2 equal probes [1:3] of a 3-probe draw
    tail = ops.hutchinson_probes((8, 33), 2, seed=9, probe_begin=1)
    torch.testing.assert_close(tail, full[1:], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reduce_matches_reference(device, dtype):
    ids = torch.tensor([3, 1, 4, 1 << 40])
    av = torch.randn(5, 4, 40000, dtype=torch.float64).to(dtype)
    fn = getattr(mmh_fast._native.native(), f"hutchinson_reduce_{device.type}")
    mean, se, dots = fn(av.to(device), ids.to(device), 2, 77, 1)
    rmean, rse, rdots = ref.hutchinson_reduce(av, ids, 2, 77, "gaussian")
    torch.testing.assert_close(dots.cpu(), rdots, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(mean.cpu(), rmean, rtol=1e-10, atol=1e-8)
    torch.testing.assert_close(se.cpu(), rse, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_trace_within_five_standard_errors(device, kind):
    g = torch.Generator().manual_seed(0)
    B, n = 6, 30
    M = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    A = (M + M.transpose(1, 2)) / 2 + 3 * torch.eye(n, dtype=torch.float64)
    A = A.to(device)
    x = torch.zeros(B, n, dtype=torch.float64, device=device)
    tr, se = ops.hutchinson_trace(lambda v: torch.einsum("bij,bj->bi", A, v), x, n_probes=400,
                                  probe=kind, seed=5, return_stderr=True)
    exact = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    assert tr.dtype == torch.float64 and se.shape == (B,)
    assert bool((se > 0).all())
    assert bool(((tr - exact).abs() < 5 * se).all()), (tr, exact, se)


def test_trace_same_sample_same_value_in_any_batch():
    n = 12
    A = torch.randn(n, n, dtype=torch.float64)
    mv = lambda v: v @ A.T  # noqa: E731
    x = torch.zeros(10, n, dtype=torch.float64)
    full = ops.hutchinson_trace(mv, x, 3, seed=11, sample_ids=torch.arange(10))
    sub = ops.hutchinson_trace(mv, x[:4], 3, seed=11, sample_ids=torch.tensor([7, 2, 9, 0]))
    torch.testing.assert_close(sub, full[[7, 2, 9, 0]], rtol=0, atol=0)


def test_trace_numpy_in_numpy_out():
    x = np.zeros((3, 4), dtype=np.float64)
    out = ops.hutchinson_trace(lambda v: 2 * v, x, 2)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, 8.0)  # Rademacher: v.(2v) = 2 * 4 exactly


def test_bad_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="n_probes"):
        ops.hutchinson_trace(lambda v: v, x, 0)
    with pytest.raises(ValueError, match="probe must be"):
        ops.hutchinson_trace(lambda v: v, x, 1, probe="uniform")
    with pytest.raises(ValueError, match="return_stderr"):
        ops.hutchinson_trace(lambda v: v, x, 1, return_stderr=True)
    with pytest.raises(ValueError, match="matvec must return"):
        ops.hutchinson_trace(lambda v: v[:, :2], x, 1)
    with pytest.raises(ValueError, match="batch"):
        ops.hutchinson_trace(lambda v: v, torch.zeros(0, 3), 1)
    with pytest.raises(TypeError, match="x must be"):
        ops.hutchinson_trace(lambda v: v, [1.0, 2.0], 1)
    with pytest.raises(TypeError, match="floating"):
        ops.hutchinson_trace(lambda v: v, torch.zeros(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="x's device and dtype"):
        ops.hutchinson_trace(lambda v: v.double(), x, 1)
    with pytest.raises(ValueError, match=r"matvec returned NaN or inf values \(samples \[1\]\)"):
        ops.hutchinson_trace(lambda v: v * torch.tensor([[1.0], [float("nan")]]), x, 2)
    with pytest.raises(ValueError, match="x contains NaN"):
        ops.hutchinson_trace(lambda v: v, torch.tensor([[0.0, float("inf"), 0.0]]), 1)
    with pytest.raises(ValueError, match="sample_ids"):
        ops.hutchinson_probes((2, 3), 1, sample_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match="non-negative"):
        ops.hutchinson_probes((2, 3), 1, sample_ids=torch.tensor([1, -1]))


def test_native_checks_raise_value_errors():
    C = mmh_fast._native.native()
    with pytest.raises(ValueError, match="av must be a 3-D"):
        C.hutchinson_reduce_cpu(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), 0, 0, 0)
    with pytest.raises(ValueError, match="probe kind"):
        C.hutchinson_probes_cpu(torch.zeros(2, dtype=torch.int64), 3, 0, 1, 0, 5, torch.float32)


def test_missing_extension_raises_with_build_instructions(monkeypatch):
    """Without the compiled extension, import works, backend_info says so and a
    native call raises NativeExtensionError naming the build command."""
    from mmh_fast import _native

    monkeypatch.setattr(_native, "_C", None)
    monkeypatch.setattr(_native, "_IMPORT_ERROR", ImportError("no module named mmh_fast._C"))
    info = mmh_fast.backend_info()
    assert info["native"] is False and info["cuda"] is False and "mmh_fast._C" in info["error"]
    with pytest.raises(_native.NativeExtensionError, match="pip install --no-build-isolation -e ."):
        ops.hutchinson_trace(lambda v: v, torch.zeros(2, 3), 1)


@pytest.mark.cuda
def test_cuda_probes_bitwise_equal_cpu():
    ids = torch.arange(5)
    a = ops.hutchinson_probes((5, 101), 2, probe="rademacher", seed=4, sample_ids=ids)
    b = ops.hutchinson_probes((5, 101), 2, probe="rademacher", seed=4, sample_ids=ids, device="cuda")
    torch.testing.assert_close(a, b.cpu(), rtol=0, atol=0)
