"""Retrieval metrics against brute-force numpy: calibrated l2 (whole images,
tiled, streamed), nearest neighbours with embedders and cosine distance, and
the eidetic / percentile summaries."""
import warnings

import numpy as np
import pytest
import torch

from mmh_fast.retrieval import (calibrated_l2, eidetic_count, eidetic_rate, load_torchscript_embedder,
                                nearest_neighbors, percentile_score)


def _brute_calibrated(gen, train, n, alpha, dist=None):
    """Carlini's calibrated l2 from the full distance matrix, in float64 numpy."""
    g = gen.reshape(len(gen), -1).astype(np.float64)
    x = train.reshape(len(train), -1).astype(np.float64)
    d = np.sqrt(((g[:, None] - x[None]) ** 2).sum(-1)) if dist is None else dist
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), d.shape), d), axis=1)  # by (distance, index)
    nn = np.take_along_axis(d, order[:, :n], 1)
    return nn[:, 0] / (alpha * nn.mean(1)), order[:, 0]


def _brute_tiled(gen, train, th, tw):
    """max over non-overlapping th x tw tiles of the tile l2 distances, [M, N]."""
    M, N = len(gen), len(train)
    H, W = gen.shape[-2:]
    out = np.zeros((M, N))
    for i in range(0, H, th):
        for j in range(0, W, tw):
            a = gen[..., i:i + th, j:j + tw].reshape(M, -1).astype(np.float64)
            b = train[..., i:i + th, j:j + tw].reshape(N, -1).astype(np.float64)
            out = np.maximum(out, np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1)))
    return out


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    train = rng.random((300, 3, 8, 8)).astype(np.float32)
    gen = rng.random((40, 3, 8, 8)).astype(np.float32)
    gen[:5] = train[[3, 50, 50, 120, 299]] + 0.01 * rng.standard_normal((5, 3, 8, 8)).astype(np.float32)  # near copies
    return gen, train


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_calibrated_l2_matches_brute_force(data, dtype):
    gen, train = (a.astype(dtype) for a in data)
    want, nearest = _brute_calibrated(gen, train, 50, 0.5)
    got, idx = calibrated_l2(gen, train, return_indices=True)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (40,)
    np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == np.float32 else 1e-12)
    np.testing.assert_array_equal(idx, nearest)
    assert (got[:5] < 0.1).all() and (got[5:] > 1.5).all()  # near copies stand out (random pairs give ~2)
    got_t = calibrated_l2(torch.from_numpy(gen), torch.from_numpy(train), n=7, alpha=0.3)
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_allclose(got_t.numpy(), _brute_calibrated(gen, train, 7, 0.3)[0], rtol=1e-5)


@pytest.mark.parametrize("precision", ["auto", "full", "bf16"])
def test_calibrated_l2_every_precision_is_exact(precision, monkeypatch):
    # CIFAR-shaped rows (D = 768 here), where "auto" screens in bf16 on CPUs
    # with bf16 instructions: the scores and nearest indices are the float64
    # brute force's in every mode, streamed in several chunks too
    import mmh_fast.retrieval as retrieval

    rng = np.random.default_rng(1)
    train = rng.random((700, 3, 16, 16), dtype=np.float32)
    gen = rng.random((60, 3, 16, 16), dtype=np.float32)
    gen[:6] = train[[0, 10, 10, 99, 500, 699]] + 0.01 * rng.standard_normal((6, 3, 16, 16)).astype(np.float32)
    want, nearest = _brute_calibrated(gen, train, 50, 0.5)
    got, idx = calibrated_l2(gen, train, return_indices=True, precision=precision)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_array_equal(idx, nearest)
    monkeypatch.setattr(retrieval, "_CHUNK_BYTES", 200 * 768 * 2)  # chunks of 200 or 100 rows
    got_s = calibrated_l2(gen, iter([train[:350], train[350:]]), precision=precision)
    np.testing.assert_allclose(got_s, want, rtol=1e-5)
    np.testing.assert_allclose(calibrated_l2(gen, train, precision=precision), want, rtol=1e-5)
    d, i = nearest_neighbors(gen, train, k=5, precision=precision)
    np.testing.assert_array_equal(i[:, 0], nearest)


def test_calibrated_l2_tiled_matches_brute_force(data):
    gen, train = data
    dist = _brute_tiled(gen, train, 4, 2)
    want, nearest = _brute_calibrated(gen, train, 20, 0.5, dist=dist)
    got, idx = calibrated_l2(gen, train, n=20, tiles=(4, 2), return_indices=True, batch_size=16)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(idx, nearest)
    # one tile covering the image is the plain distance
    np.testing.assert_allclose(calibrated_l2(gen, train, n=20, tiles=(8, 8)), calibrated_l2(gen, train, n=20),
                               rtol=1e-5)


@pytest.mark.parametrize("tiles", [None, (4, 4)])
def test_streaming_equals_in_memory(data, tmp_path, tiles, monkeypatch):
    gen, train = data
    want = calibrated_l2(gen, train, n=30, tiles=tiles, return_indices=True)
    # an iterator of batches of uneven sizes
    batches = (train[i:i + 37] for i in range(0, len(train), 37))
    got = calibrated_l2(gen, batches, n=30, tiles=tiles, return_indices=True)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # a memory-mapped array read in chunks smaller than n
    path = tmp_path / "train.npy"
    np.save(path, train)
    mm = np.load(path, mmap_mode="r")
    got = calibrated_l2(gen, mm, n=30, tiles=tiles, chunk_rows=16, return_indices=True)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # a tensor cut into row views
    got = calibrated_l2(torch.from_numpy(gen), torch.from_numpy(train), n=30, tiles=tiles, chunk_rows=45,
                        return_indices=True)
    np.testing.assert_array_equal(got[1].numpy(), want[1])
    # tiled: training tiles smaller than the set (exact merge across GEMM tiles)
    import mmh_fast.retrieval as r

    monkeypatch.setattr(r, "_TILED_ROWS", 50)
    got = calibrated_l2(gen, train, n=30, tiles=tiles, return_indices=True)
    np.testing.assert_array_equal(got[1], want[1])


def test_ties_and_exact_copies():
    train = np.zeros((60, 4), dtype=np.float32)
    train[30:] = 1.0
    gen = np.zeros((2, 4), dtype=np.float32)
    gen[1] = 1.0
    s, idx = calibrated_l2(gen, train, n=50, return_indices=True)
    np.testing.assert_array_equal(s, [0.0, 0.0])  # exact copies: d_1 = 0
    np.testing.assert_array_equal(idx, [0, 30])  # ties go to the lowest index
    d, i = nearest_neighbors(gen, (train[j:j + 7] for j in range(0, 60, 7)), k=3)
    np.testing.assert_array_equal(i, [[0, 1, 2], [30, 31, 32]])


def test_bad_inputs(data):
    gen, train = data
    with pytest.raises(ValueError, match="fewer than n=50"):
        calibrated_l2(gen, train[:49])
    with pytest.raises(ValueError, match="fewer than n=50"):
        calibrated_l2(gen, iter([train[:20], train[20:40]]))
    with pytest.raises(ValueError, match="fewer than n=50"):
        calibrated_l2(gen, train[:49], tiles=(4, 4))
    with pytest.raises(ValueError, match="must divide"):
        calibrated_l2(gen, train, tiles=(3, 4))
    with pytest.raises(ValueError, match="alpha"):
        calibrated_l2(gen, train, alpha=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        calibrated_l2(gen, train, n=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        calibrated_l2(gen, train, precision="half")
    with pytest.raises(ValueError, match="precision must be one of"):
        nearest_neighbors(gen, train, precision="half")
    with pytest.raises(ValueError, match="values"):
        calibrated_l2(gen, train.reshape(300, -1)[:, :10])
    with pytest.raises(ValueError, match="chunk_rows"):
        calibrated_l2(gen, train, chunk_rows=0)
    with pytest.raises(TypeError, match="iterable of batches"):
        calibrated_l2(gen, 3)
    with pytest.raises(ValueError, match="NaN"):
        gen2 = gen.copy()
        gen2[0, 0, 0, 0] = np.nan
        calibrated_l2(gen2, train)
    with pytest.raises(ValueError, match="metric"):
        nearest_neighbors(gen, train, metric="l1")
    with pytest.raises(ValueError, match="fewer than k=5"):
        nearest_neighbors(gen, train[:4], k=5)


class _Proj(torch.nn.Module):
    """A tiny stand-in for an SSCD model: a fixed linear projection of the image."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(192, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_nearest_neighbors_with_a_torchscript_embedder_and_cosine(data, tmp_path):
    gen, train = data

    path = tmp_path / "embedder.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(_Proj(), torch.zeros(2, 3, 8, 8)), str(path))
    emb = load_torchscript_embedder(path)
    w = _Proj().w.detach().numpy().astype(np.float64)
    eg, et = gen.reshape(40, -1) @ w, train.reshape(300, -1) @ w
    eg /= np.linalg.norm(eg, axis=1, keepdims=True)
    et /= np.linalg.norm(et, axis=1, keepdims=True)
    cos_d = 1 - eg @ et.T
    d, i = nearest_neighbors(gen, train, k=4, embed=emb, metric="cosine", batch_size=7)
    order = np.argsort(cos_d, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(i, order)
    np.testing.assert_allclose(d, np.take_along_axis(cos_d, order, 1), atol=1e-5)
    # l2 without embedder against numpy; torch in, torch out
    d2, i2 = nearest_neighbors(torch.from_numpy(gen), torch.from_numpy(train), k=2)
    full = np.sqrt(((gen.reshape(40, 1, -1).astype(np.float64) - train.reshape(1, 300, -1)) ** 2).sum(-1))
    np.testing.assert_array_equal(i2.numpy(), np.argsort(full, axis=1, kind="stable")[:, :2])
    np.testing.assert_allclose(d2.numpy(), np.sort(full, axis=1)[:, :2], rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="local file"):
        load_torchscript_embedder(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript model"):
        load_torchscript_embedder(bad)


def test_eidetic_counts_rates_and_percentiles():
    rng = np.random.default_rng(1)
    d = rng.random(1000)
    for delta in [0.0, 0.01, 0.5, 1.0]:
        assert eidetic_count(d, delta) == int(np.sum(d <= delta))
    np.testing.assert_array_equal(eidetic_count(torch.from_numpy(d), [0.1, 0.2]), [np.sum(d <= 0.1), np.sum(d <= 0.2)])
    assert eidetic_count([0.1, 0.2, 0.3], 0.2) == 2  # "below a threshold" includes equality (l <= delta)
    assert eidetic_rate(d, 0.25) == np.sum(d <= 0.25) / 1000
    assert percentile_score(d, 95) == pytest.approx(np.percentile(d, 95))
    assert percentile_score([1, 2, 3, 4, 5], 50) == 3.0
    with pytest.raises(ValueError, match="empty"):
        eidetic_rate([], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        eidetic_count([0.1, float("nan")], 0.1)
    with pytest.raises(ValueError, match="q must lie"):
        percentile_score(d, 101)
