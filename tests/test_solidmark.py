"""SolidMark: keys, borders, dataset wrapper, key files and the inpainting
evaluation, checked against closed-form models with known answers (a perfect
memorizer recovers the keys, a generalising Gaussian scores at chance)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy import stats

from mmh_fast.mitigations import GaussianNoiseInjection
from mmh_fast.models import Denoiser, make_schedule
from mmh_fast.solidmark import (DEFAULT_DELTAS, SolidMark, SolidMarkDataset, _level_path, _Noise, _repaint,
                                _time_levels, chance_rate, content_id, eidetic_table, evaluate, load_keys,
                                save_keys)
from mmh_fast.testing import ConditionalEmpiricalEps, EmpiricalEps, GaussianEps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's 8x8 digits (real images, no download) in [0, 1], [1797, 1, 8, 8]."""
    from sklearn.datasets import load_digits

    return torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]


def _upsample(x, f):
    return x.repeat_interleave(f, 2).repeat_interleave(f, 3)


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------

def test_keys_are_uniform_deterministic_and_typed():
    sm = SolidMark(seed=3)
    k = sm.keys(20000)
    assert k.dtype == np.float64 and ((k > 0) & (k < 1)).all()
    assert stats.kstest(k, "uniform").pvalue > 1e-3  # U(0, 1)
    assert sm.key(5) == sm.key(np.int64(5)) == sm.key(torch.tensor(5)) == k[5]
    assert sm.key(5) != sm.key("5") != sm.key(b"5")
    assert SolidMark(seed=4).key(5) != sm.key(5)
    assert np.array_equal(sm.keys(["a", "b"]), [sm.key("a"), sm.key("b")])
    # keys depend only on (seed, id): not on thickness or value range
    assert SolidMark(thickness=1, seed=3, value_range=(-1, 1)).key("a") == sm.key("a")
    for bad in [1.5, None, True]:
        with pytest.raises(TypeError, match="sample ids"):
            sm.key(bad)


def test_keys_identical_across_processes():
    ids = [0, 1, 17, "img_003.png", 2**40]
    code = ("import json; from mmh_fast.solidmark import SolidMark; sm = SolidMark(seed=11); "
            f"print(json.dumps([sm.key(i).hex() for i in {ids!r}]))")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT)
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    sm = SolidMark(seed=11)
    assert theirs == [sm.key(i).hex() for i in ids]


def test_keys_follow_samples_across_dataset_orders():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(1, 6, 6, generator=g) for _ in range(12)]
    caps = [f"caption {i}" for i in range(12)]
    perm = torch.randperm(12, generator=g).tolist()
    sm = SolidMark(thickness=2, seed=7)
    a = SolidMarkDataset(list(zip(imgs, caps)), sm, id_fn=lambda i, item: item[1])
    b = SolidMarkDataset([(imgs[p], caps[p]) for p in perm], sm, id_fn=lambda i, item: item[1])
    ka, kb = a.keys(), b.keys()
    assert np.array_equal(kb, ka[perm])
    for j, p in enumerate(perm):  # the border of each sample carries the same key in both orders
        assert torch.equal(b[j][0], a[p][0]) and b[j][1] == caps[p]
    c = SolidMarkDataset([imgs[p] for p in perm], sm, id_fn="content")
    d = SolidMarkDataset(imgs, sm, id_fn="content")
    assert np.array_equal(c.keys(), d.keys()[perm])
    assert c.sample_id(0) == content_id(imgs[perm[0]]) != content_id(imgs[perm[0]].double())
    # default ids are positions: they do move with the order
    assert not np.array_equal(SolidMarkDataset(imgs, sm).keys()[perm],
                              SolidMarkDataset([imgs[p] for p in perm], sm).keys())


# ---------------------------------------------------------------------------
# borders
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["torch32", "torch64", "numpy", "uint8"])
def test_augment_then_crop_is_exact_and_border_holds_the_key(kind):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 5, 7, generator=g)
    keys = np.array([0.0, 0.3337, 1.0])
    sm = SolidMark(thickness=2, value_range=(0, 1))
    if kind == "torch64":
        x = x.double()
    elif kind == "numpy":
        x = x.numpy()
    elif kind == "uint8":
        x = (x * 255).to(torch.uint8)
        sm = SolidMark(thickness=2, value_range=(0, 255))
    a = sm.augment(x, keys)
    assert type(a) is type(x) and a.dtype == x.dtype and tuple(a.shape) == (3, 3, 9, 11)
    c = sm.crop(a)
    assert (np.array_equal(c, x) if kind == "numpy" else torch.equal(c, x))
    at = torch.as_tensor(a)
    mask = sm.border_mask(at.shape)
    assert int(mask[0, 0].sum()) == 9 * 11 - 5 * 7
    for i, k in enumerate(keys):
        want = torch.tensor(round(255 * k) if kind == "uint8" else k, dtype=torch.float64).to(at.dtype)
        assert torch.all(at[i][mask[i]] == want)
    if kind == "torch64":
        np.testing.assert_allclose(sm.border_values(a), keys, rtol=0, atol=1e-15)


def test_value_range_maps_keys_both_ways():
    sm = SolidMark(thickness=1, value_range=(-1, 1))
    x = torch.zeros(2, 3, 4, 4)
    a = sm.augment(x, [0.25, 0.75])
    assert float(a[0, 1, 0, 0]) == -0.5 and float(a[1, 2, -1, -1]) == 0.5
    np.testing.assert_allclose(sm.border_values(a), [0.25, 0.75], rtol=0, atol=1e-7)
    single = sm.augment(torch.zeros(4, 4), 0.5)  # one image, scalar key
    assert single.shape == (6, 6) and float(single[0, 0]) == 0.0
    # images outside the declared range: the range mismatch of the public code is refused
    with pytest.raises(ValueError, match="outside value_range"):
        SolidMark(value_range=(0, 1)).augment(torch.full((1, 1, 4, 4), -0.5), [0.5])


def test_border_mask_convention():
    sm = SolidMark(thickness=1)
    m = sm.border_mask((2, 1, 4, 5))
    assert m.dtype == torch.bool and m.shape == (2, 1, 4, 5)
    expect = torch.ones(4, 5, dtype=torch.bool)
    expect[1:3, 1:4] = False  # interior: RePaint's "keep" (1 = keep) is ~mask
    assert torch.equal(m[1, 0], expect)


def test_bad_inputs_raise_clear_errors():
    sm = SolidMark(thickness=4)
    with pytest.raises(ValueError, match="too small for a border of thickness 4"):
        sm.crop(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        sm.border_mask((3, 9, 8))
    with pytest.raises(ValueError, match=r"keys must lie in \[0, 1\]"):
        sm.augment(torch.zeros(2, 1, 4, 4), [0.5, 1.2])
    with pytest.raises(ValueError, match=r"keys must lie in \[0, 1\]"):
        sm.augment(torch.zeros(2, 1, 4, 4), [0.5, float("nan")])
    with pytest.raises(ValueError, match="got 3 keys"):
        sm.augment(torch.zeros(2, 1, 4, 4), [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="thickness"):
        SolidMark(thickness=0)
    with pytest.raises(ValueError, match="lo < hi"):
        SolidMark(value_range=(1, 0))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        sm.augment([[0.0]], 0.5)
    model = EmpiricalEps(torch.zeros(1, 1, 10, 10))
    with pytest.raises(ValueError, match="one key per image"):
        evaluate(model, torch.zeros(3, 1, 2, 2), [0.1, 0.2], solidmark=SolidMark(thickness=4))
    with pytest.raises(ValueError, match=r"keys must lie in \[0, 1\]"):
        evaluate(model, torch.zeros(1, 1, 2, 2), [-0.1], solidmark=SolidMark(thickness=4))
    with pytest.raises(ValueError, match="too small"):  # augmented canvas too small to crop
        evaluate(model, torch.zeros(1, 1, 8, 8), [0.1], solidmark=sm, augmented=True)
    with pytest.raises(ValueError, match="prompts"):
        evaluate(model, torch.zeros(1, 1, 2, 2), [0.1], solidmark=sm, prompts=["a"])
    with pytest.raises(ValueError, match="num_inference_steps"):
        evaluate(model, torch.zeros(1, 1, 2, 2), [0.1], solidmark=sm, num_inference_steps=0)
    for bad in ({"resample": 0}, {"jump_length": 0}, {"resample": 2.0}, {"batch_size": 0}, {"batch_size": True}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            evaluate(model, torch.zeros(1, 1, 2, 2), [0.1], solidmark=sm, num_inference_steps=10, **bad)
    with pytest.raises(ValueError, match="jump_length=10 must be smaller than num_inference_steps=10"):
        evaluate(model, torch.zeros(1, 1, 2, 2), [0.1], solidmark=sm, num_inference_steps=10, jump_length=10)


# ---------------------------------------------------------------------------
# dataset wrapper and key files
# ---------------------------------------------------------------------------

def test_dataset_wrapper_item_kinds():
    from PIL import Image

    sm = SolidMark(thickness=2, seed=1)
    img = torch.rand(3, 4, 4)
    ds = SolidMarkDataset([img, (img, "cap", 3), {"image": img, "text": "t"}], sm)
    a0, (a1, cap, lab), d2 = ds[0], ds[1], ds[2]
    assert a0.shape == (3, 8, 8) and float(a0[0, 0, 0]) == pytest.approx(sm.key(0), abs=1e-7)
    assert a1.shape == (3, 8, 8) and cap == "cap" and lab == 3
    assert d2["text"] == "t" and d2["image"].shape == (3, 8, 8) and torch.equal(sm.crop(d2["image"]), img)
    assert float(ds[-1]["image"][0, 0, 0]) == pytest.approx(sm.key(2), abs=1e-7)
    pil = Image.fromarray(np.full((4, 5, 3), 7, dtype=np.uint8))
    with pytest.warns(UserWarning, match="quantised"):
        out = SolidMarkDataset([pil], sm)[0]
    arr = np.asarray(out)
    assert arr.shape == (8, 9, 3) and (arr[0, 0] == round(255 * sm.key(0))).all() and (arr[2:6, 2:7] == 7).all()
    with pytest.raises(TypeError, match="len"):
        SolidMarkDataset(iter([img]), sm)
    with pytest.raises(ValueError, match="one entry per item"):
        SolidMarkDataset([img], sm, ids=[1, 2])


@pytest.mark.parametrize("ext", [".json", ".parquet"])
def test_key_files_round_trip_and_verify(tmp_path, ext):
    sm = SolidMark(thickness=3, seed=9, value_range=(-1, 1))
    ds = SolidMarkDataset([torch.zeros(1, 2, 2)] * 5, sm, ids=[f"f{i}" for i in range(5)])
    path = tmp_path / f"keys{ext}"
    ds.save_keys(path)
    table = ds.load_keys(path)
    assert table.ids == [f"f{i}" for i in range(5)] and np.array_equal(table.keys, ds.keys())  # exact
    assert table.solidmark().value_range == (-1.0, 1.0) and table.thickness == 3 and table.seed == 9
    other = SolidMarkDataset([torch.zeros(1, 2, 2)] * 5, SolidMark(thickness=3, seed=10, value_range=(-1, 1)),
                             ids=[f"f{i}" for i in range(5)])
    with pytest.raises(ValueError, match="seed=9"):
        other.load_keys(path)
    reordered = SolidMarkDataset([torch.zeros(1, 2, 2)] * 5, sm, ids=[f"f{i}" for i in (1, 0, 2, 3, 4)])
    with pytest.raises(ValueError, match="disagree"):
        reordered.load_keys(path)
    save_keys(tmp_path / "ints.json", [3, 4], sm.keys([3, 4]), sm)
    assert load_keys(tmp_path / "ints.json").ids == [3, 4]
    with pytest.raises(ValueError, match=".parquet, .pq or .json"):
        save_keys(tmp_path / "k.csv", [1], [0.5], sm)


# ---------------------------------------------------------------------------
# chance level, RePaint schedule, the loop's reverse step
# ---------------------------------------------------------------------------

def test_chance_rate_is_the_constant_guess_rate():
    keys = SolidMark(seed=5).keys(200000)
    rows = eidetic_table(np.abs(keys - 0.5))
    for r in rows:
        assert r["chance_rate"] == pytest.approx(2 * r["delta"], rel=1e-12)
        se = np.sqrt(r["chance_rate"] * (1 - r["chance_rate"]) / keys.size)
        assert abs(r["eidetic_rate"] - r["chance_rate"]) < 5 * se
    # any other constant guess does no better
    assert np.mean(np.abs(keys - 0.05) <= 0.1) < 0.2
    assert chance_rate(0.7) == 1.0 and [r["delta"] for r in rows] == list(DEFAULT_DELTAS)
    with pytest.raises(ValueError, match="delta"):
        chance_rate(-0.1)


def test_level_path_resampling_schedule():
    assert _level_path(5, 1, 1) == [4, 3, 2, 1, 0]
    p = _level_path(10, 3, 4)
    assert p[0] == 9 and p[-1] == 0 and max(p) == 9 and min(p) == 0
    steps = np.diff(p)
    assert set(steps.tolist()) <= {-1, 3}  # one level down, or one jump of jump_length up
    # every jump point (0, 3, 6 < 9 - 3 + 1) is left upward resample - 1 = 3 times
    ups = [a for a, b in zip(p[:-1], p[1:]) if b > a]
    assert sorted(ups) == sorted([0, 3, 6] * 3)


def _chain_moments(schedule, times, m, v, path=None):
    """Exact mean and variance of the chain's output along ``path`` (default:
    straight down) for data N(m, v) per coordinate with the exact denoiser:
    every step is linear Gaussian, x0_hat = m + psi v / (psi^2 v + sigma^2)
    (x_t - psi m); a downward step is the Gaussian posterior step, an upward
    jump t -> t' the forward kernel x_t' = a x_t + sqrt(sigma_t'^2 - a^2
    sigma_t^2) z, a = psi_t' / psi_t."""
    coeff = [tuple(float(c) for c in schedule.psi_sigma(t)) for t in times]
    path = list(range(len(times) - 1, -1, -1)) if path is None else path
    psi, sig = coeff[path[0]]
    mu, var = torch.zeros_like(m), torch.full_like(v, sig**2)  # x_T = sigma_T z

    def x0_lin(psi, sig):
        g = psi * v / (psi**2 * v + sig**2)
        return g, m - g * psi * m  # x0_hat = g x + h

    for cur, nxt in zip(path[:-1], path[1:]):
        (psi_t, sig_t), (psi_s, sig_s) = coeff[cur], coeff[nxt]
        if nxt < cur:
            a = psi_t / psi_s
            w = sig_t**2 - a * a * sig_s**2
            c1, c2 = a * sig_s**2 / sig_t**2, psi_s * w / sig_t**2
            g, h = x0_lin(psi_t, sig_t)
            mu, var = (c1 + c2 * g) * mu + c2 * h, (c1 + c2 * g) ** 2 * var + w * sig_s**2 / sig_t**2
        else:
            a = psi_s / psi_t
            mu, var = a * mu, a * a * var + (sig_s**2 - a * a * sig_t**2)
    g, h = x0_lin(*coeff[path[-1]])
    return g * mu + h, g * g * var


@pytest.mark.parametrize("scheduler", ["ddpm", "vpsde"])
def test_reverse_chain_samples_a_gaussian(scheduler):
    """With nothing known the loop is ancestral sampling. With the exact eps
    of N(m, diag(v)) its samples follow the chain's exact linear-Gaussian
    moments, and those converge to (m, v) as the grid is refined."""
    from mmh_fast.models import VPSDESchedule

    sched = DDPMScheduler() if scheduler == "ddpm" else VPSDESchedule()
    m = torch.tensor([0.7, -0.3], dtype=torch.float64)
    v = torch.tensor([0.25, 0.04], dtype=torch.float64)
    model = GaussianEps(m, torch.diag(v), scheduler=sched)
    schedule = make_schedule(sched)
    den = Denoiser(model, schedule)
    n = 4000
    times = _time_levels(schedule, 40)
    x = _repaint(den, torch.zeros(n, 2), torch.zeros(2, dtype=torch.bool), times, _level_path(len(times), 1, 1),
                 _Noise(0, range(n), "t"), lambda lvl: {"cond": None, "uncond": None}, None).double()
    mean, var = _chain_moments(schedule, times, m, v)
    assert torch.all((x.mean(0) - mean).abs() < 4 * (var / n).sqrt())
    assert torch.all((x.var(0) / var - 1).abs() < 4 * (2 / n) ** 0.5)
    # coarse grids under-disperse (ancestral sampling with the posterior mean); fine grids are exact
    mean_f, var_f = _chain_moments(schedule, _time_levels(schedule, 1000), m, v)
    torch.testing.assert_close(mean_f, m, rtol=0, atol=0.01)
    torch.testing.assert_close(var_f, v, rtol=0.05, atol=0)
    assert bool((var < var_f).all())


def _inpainting_moments(schedule, times, path, m, C, known_value):
    """Exact mean and variance of the unknown coordinate of the inpainting
    chain for data N(m, C) in 2-D, coordinate 0 known (= ``known_value``),
    coordinate 1 inpainted, with the exact denoiser. The state x_t is jointly
    Gaussian along the whole path: a downward step maps x_t linearly (the
    posterior step with x0_hat = m + psi C (psi^2 C + sigma^2 I)^-1 (x_t - psi m))
    plus noise and then replaces coordinate 0 by the fresh psi_s c + sigma_s z;
    an upward jump is the forward kernel on both coordinates."""
    coeff = [tuple(float(c) for c in schedule.psi_sigma(t)) for t in times]
    eye = torch.eye(2, dtype=torch.float64)

    def x0_lin(psi, sig):
        G = psi * C @ torch.linalg.inv(psi**2 * C + sig**2 * eye)
        return G, m - psi * G @ m  # x0_hat = G x + h

    def paste(mu, S, psi, sig):  # coordinate 0 <- psi c + sig z, independent of the rest
        mu, S = mu.clone(), S.clone()
        mu[0], S[0, :], S[:, 0] = psi * known_value, 0.0, 0.0
        S[0, 0] = sig**2
        return mu, S

    psi, sig = coeff[path[0]]
    mu, S = paste(torch.zeros(2, dtype=torch.float64), sig**2 * eye, psi, sig)
    for cur, nxt in zip(path[:-1], path[1:]):
        (psi_t, sig_t), (psi_s, sig_s) = coeff[cur], coeff[nxt]
        if nxt < cur:
            a = psi_t / psi_s
            w = sig_t**2 - a * a * sig_s**2
            G, h = x0_lin(psi_t, sig_t)
            A = a * sig_s**2 / sig_t**2 * eye + psi_s * w / sig_t**2 * G
            mu, S = A @ mu + psi_s * w / sig_t**2 * h, A @ S @ A.T + w * sig_s**2 / sig_t**2 * eye
            mu, S = paste(mu, S, psi_s, sig_s)
        else:
            a = psi_s / psi_t
            mu, S = a * mu, a * a * S + (sig_s**2 - a * a * sig_t**2) * eye
    G, h = x0_lin(*coeff[path[-1]])
    return float((G @ mu + h)[1]), float((G @ S @ G.T)[1, 1])


@pytest.mark.parametrize("jump_length,resample", [(1, 1), (3, 3), (5, 5)])
def test_inpainting_and_resampling_follow_the_exact_chain(jump_length, resample):
    """The inpainting loop, resampling jumps included, against the exact
    moments of the same chain on a correlated 2-D Gaussian (one coordinate
    known). Those moments differ between the settings by far more than the
    sampling error (unknown-coordinate mean 1.39 plain, 1.79 with (5, 5); the
    exact conditional is 1.9): a jump with a wrong coefficient or noise, or
    a jump that does nothing, fails."""
    sched = DDPMScheduler()
    schedule = make_schedule(sched)
    m = torch.zeros(2, dtype=torch.float64)
    C = torch.tensor([[1.0, 0.95], [0.95, 1.0]], dtype=torch.float64)
    den = Denoiser(GaussianEps(m, C, scheduler=sched), schedule)
    n, c = 4000, 2.0
    times = _time_levels(schedule, 50)
    path = _level_path(len(times), jump_length, resample)
    known = torch.zeros(n, 2)
    known[:, 0] = c
    x = _repaint(den, known, torch.tensor([True, False]), times, path, _Noise(0, range(n), "t"),
                 lambda lvl: {"cond": None, "uncond": None}, None).double()
    mean, var = _inpainting_moments(schedule, times, path, m, C, c)
    assert torch.all(x[:, 0] == c)  # the known coordinate is pasted back
    # 4 standard errors of the sample mean / variance of n Gaussian draws
    assert abs(float(x[:, 1].mean()) - mean) < 4 * (var / n) ** 0.5, (float(x[:, 1].mean()), mean)
    assert abs(float(x[:, 1].var()) / var - 1) < 4 * (2 / n) ** 0.5, (float(x[:, 1].var()), var)
    plain, _ = _inpainting_moments(schedule, times, _level_path(len(times), 1, 1), m, C, c)
    if resample > 1:  # resampling harmonises: closer to the exact conditional mean 1.9
        assert abs(mean - 1.9) < abs(plain - 1.9) - 20 * (var / n) ** 0.5, (plain, mean)


# ---------------------------------------------------------------------------
# evaluation on closed-form models
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_digits(digits):
    """300 digits upsampled 4x (32 x 32) with a 1-pixel keyed border."""
    x = _upsample(digits[:300], 4)
    sm = SolidMark(thickness=1, seed=0)
    keys = sm.keys(300)
    return x, sm, keys, sm.augment(x, keys)


def _binomial_upper(p, n, z=5.0):
    """p + z binomial standard errors: a rate above it is not chance (z = 5:
    one-sided tail below 3e-7 by the normal approximation)."""
    return p + z * (p * (1 - p) / n) ** 0.5


def test_perfect_memorizer_recovers_keys_with_the_default_resampling(keyed_digits):
    x, sm, all_keys, train = keyed_digits
    x, keys = x[:150], all_keys[:150]  # 150 of the 300 training images, to keep the test short
    model = EmpiricalEps(train, scheduler=DDPMScheduler())
    res = evaluate(model, x, keys, solidmark=sm, scheduler=DDPMScheduler())  # the defaults: 50 steps, (5, 5)
    plain = evaluate(model, x, keys, solidmark=sm, scheduler=DDPMScheduler(), resample=1)
    rate, rate_plain = np.mean(res.l_sm <= 0.01), np.mean(plain.l_sm <= 0.01)
    # chance at delta 0.01 is 2 delta = 0.02; 5 binomial SEs above it is 0.077 for n = 150
    assert rate_plain > _binomial_upper(0.02, 150) and rate > _binomial_upper(0.02, 150)
    # measured on 600 digits (docstring of evaluate): 0.84 plain, 0.955 with (5, 5); the gain is
    # paired (same images and noise), and a resampling that does nothing gives exactly 0
    assert rate >= 0.9 and rate - rate_plain >= 0.05, (rate_plain, rate)
    row = {r["delta"]: r for r in res.table}[0.01]
    assert row["eidetic_count"] == int(np.sum(res.l_sm <= 0.01)) and row["p_value"] < 1e-50
    # failures lock onto another training image: their prediction is that image's key
    fail = res.l_sm >= 0.01
    if fail.any():
        nearest_other = np.abs(res.predicted_keys[fail][:, None] - all_keys[None]).min(1)
        assert np.median(nearest_other) < 1e-3


def test_generalising_gaussian_scores_at_chance(digits):
    """A Gaussian fitted to the keyed training set cannot tie a key to its
    image: its predicted key p_i is a draw of the border given the interior,
    independent of k_i ~ U(0, 1). Given the predictions, the eidetic rate
    then has expectation c(delta) = mean_i |[p_i - delta, p_i + delta] & [0, 1]|
    (<= 2 delta, the constant-guess chance level) and binomial-size error;
    the observed rate must lie within 4 standard errors of it at every delta
    (at n = 1797 and delta = 0.1 that is +-0.04 around about 0.2)."""
    sm = SolidMark(thickness=1, seed=0)
    x = _upsample(digits, 2)
    keys = sm.keys(len(x))
    model = GaussianEps.fit(sm.augment(x, keys), scheduler=DDPMScheduler())
    # no resampling: the question here is independence, not recovery (5x faster)
    res = evaluate(model, x, keys, solidmark=sm, scheduler=DDPMScheduler(), num_inference_steps=25, resample=1)
    p, n = res.predicted_keys, len(keys)
    for r in res.table:
        d = r["delta"]
        c = float(np.mean(np.clip(p + d, 0, 1) - np.clip(p - d, 0, 1)))
        assert c <= r["chance_rate"] + 1e-12
        assert abs(r["eidetic_rate"] - c) <= 4 * (c * (1 - c) / n) ** 0.5 + 1e-12, (d, r["eidetic_rate"], c)
    # and the predictions do vary (a constant 0.5 would also sit at chance): a border draw
    # has about the spread of the keys, sqrt(1/12) = 0.29
    assert 0.15 < p.std() < 0.4


def test_gni_lowers_the_eidetic_count_of_a_conditional_memorizer(digits):
    n = 200
    x = digits[:n]
    sm = SolidMark(thickness=1, seed=0)
    keys = sm.keys(n)
    emb = torch.randn(n, 16, generator=torch.Generator().manual_seed(0))
    model = ConditionalEmpiricalEps(sm.augment(x, keys), emb, cond_scale=0.5, scheduler=DDPMScheduler())
    counts = []
    for lam in [0.0, 1.0, 2.0, 4.0]:
        res = evaluate(model, x, keys, solidmark=sm, scheduler=DDPMScheduler(), num_inference_steps=25,
                       model_kwargs={"encoder_hidden_states": emb},
                       embedding_transform=GaussianNoiseInjection(lam, seed=1))
        counts.append({r["delta"]: r["eidetic_count"] for r in res.table})
    c01 = [c[0.01] for c in counts]
    assert c01[0] >= 0.95 * n  # the condition alone identifies the image
    assert all(a >= b for a, b in zip(c01[:-1], c01[1:])), c01
    assert c01[-1] <= 0.75 * c01[0], c01
    assert counts[-1][0.001] < counts[0][0.001]


@pytest.fixture
def twelve(digits):
    """12 digits, their keys, the memorizer of the keyed 12 and evaluate's settings."""
    x = digits[:12]
    sm = SolidMark(thickness=1, seed=2)
    keys = sm.keys(12)
    model = EmpiricalEps(sm.augment(x, keys), scheduler=DDPMScheduler())
    return x, sm, keys, model, dict(solidmark=sm, scheduler=DDPMScheduler(), num_inference_steps=10, seed=4)


def test_evaluate_is_batch_invariant_and_never_sees_the_border(twelve):
    x, sm, keys, model, kw = twelve
    a = evaluate(model, x, keys, **kw)
    b = evaluate(model, x, keys, batch_size=5, **kw)
    np.testing.assert_array_equal(a.l_sm, b.l_sm)
    # augmented input with the true keys (or garbage) in the border: same result
    c = evaluate(model, sm.augment(x, keys), keys, augmented=True, **kw)
    d = evaluate(model, sm.augment(x, np.zeros(12)), keys, augmented=True, return_images=True, **kw)
    np.testing.assert_array_equal(a.l_sm, c.l_sm)
    np.testing.assert_array_equal(a.l_sm, d.l_sm)
    assert torch.equal(sm.crop(d.images), x)  # the known interior is pasted back exactly
    # the resampling path too (its values are checked in test_inpainting_and_resampling_follow_the_exact_chain)
    e = evaluate(model, x, keys, resample=3, jump_length=2, **kw)
    np.testing.assert_array_equal(evaluate(model, x, keys, resample=3, jump_length=2, batch_size=5, **kw).l_sm,
                                  e.l_sm)
    # recovered keys far above chance: P(>= 5 of 12 | rate 2 delta = 0.02) = 2.5e-6 (measured: 10 of 12)
    assert np.sum(e.l_sm <= 0.01) >= 5


class _OOMAbove(torch.nn.Module):
    """A network that raises CUDA's out-of-memory error on batches larger
    than ``limit`` and otherwise is ``inner``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []
        self.prediction_type = inner.prediction_type

    def forward(self, sample, timestep, **kwargs):
        self.sizes.append(sample.shape[0])
        if sample.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(sample, timestep, **kwargs)


def test_out_of_memory_halves_the_chunks_and_keeps_the_values(twelve):
    x, sm, keys, inner, kw = twelve
    want = evaluate(inner, x, keys, **kw)  # one chunk of 12 (no parameters: the default takes all)
    net = _OOMAbove(inner, limit=4)
    with pytest.warns(UserWarning, match="ran in chunks of 3"):
        got = evaluate(net, x, keys, **kw)  # 12 -> 6 -> 3
    np.testing.assert_array_equal(got.l_sm, want.l_sm)
    assert max(net.sizes) == 12 and net.sizes[-1] == 3
    np.testing.assert_array_equal(evaluate(net, x, keys, batch_size=4, **kw).l_sm, want.l_sm)  # no retry
    # other errors are not retried
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate(_Broken(inner), x, keys, **kw)


class _Broken(_OOMAbove):
    def __init__(self, inner):
        super().__init__(inner, limit=0)

    def forward(self, sample, timestep, **kwargs):
        raise RuntimeError("shape mismatch")


def test_evaluate_keeps_one_pixel_range_end_to_end(digits):
    """A model trained on [-1, 1] images: keys come back in key units."""
    x = digits[:40] * 2 - 1
    sm = SolidMark(thickness=1, seed=0, value_range=(-1, 1))
    keys = sm.keys(40)
    model = EmpiricalEps(sm.augment(_upsample(x, 2), keys), scheduler=DDPMScheduler())
    res = evaluate(model, _upsample(x, 2), keys, solidmark=sm, scheduler=DDPMScheduler(), num_inference_steps=20)
    assert np.mean(res.l_sm < 0.01) >= 0.8
    assert res.predicted_keys.min() > -0.05 and res.predicted_keys.max() < 1.05
    via_method = sm.evaluate(model, _upsample(x, 2)[:3], keys[:3], scheduler=DDPMScheduler(), num_inference_steps=20)
    np.testing.assert_array_equal(via_method.keys, keys[:3])


# ---------------------------------------------------------------------------
# Stable Diffusion path (latent inpainting with captions)
# ---------------------------------------------------------------------------

class _ShuffleVAE(torch.nn.Module):
    """An exactly invertible stand-in for a VAE with diffusers' interface:
    latents = pixel_unshuffle(x, 2) (4x the channels, half the size)."""

    def __init__(self, channels):
        super().__init__()
        import types

        self.config = types.SimpleNamespace(in_channels=channels, block_out_channels=(1, 1), scaling_factor=1.0,
                                            shift_factor=None)
        self.register_buffer("_anchor", torch.zeros(()))

    def encode(self, x):
        import types

        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=torch.nn.functional.pixel_unshuffle(x, 2)))

    def decode(self, z):
        import types

        return types.SimpleNamespace(sample=torch.nn.functional.pixel_shuffle(z, 2))


@pytest.fixture(scope="module")
def tiny_sd():
    from mmh_fast.testing import tiny_stable_diffusion_pipeline

    return tiny_stable_diffusion_pipeline()


@pytest.fixture(scope="module")
def latent_memorizer(digits, tiny_sd):
    """A text-conditioned perfect memorizer in a latent space: the exact
    conditional denoiser of the VAE latents of the keyed training images,
    conditioned on the text-encoder embeddings of their captions, inside a
    pipeline with the tiny SD text encoder / tokenizer / scheduler."""
    import types

    from mmh_fast.models.pipelines import encode_prompts

    n = 60
    x = digits[:n]  # [60, 1, 8, 8] -> canvas 10 x 10 -> latents [4, 5, 5]
    sm = SolidMark(thickness=1, seed=0)
    keys = sm.keys(n)
    caps = [f"img {i}" for i in range(n)]
    latents = torch.nn.functional.pixel_unshuffle(sm.augment(x, keys) * 2 - 1, 2)  # VAE range [-1, 1]
    emb = encode_prompts(tiny_sd, caps)
    # cond_scale well below the typical caption-embedding distance (~6): the caption is decisive
    unet = ConditionalEmpiricalEps(latents, emb, cond_scale=0.3, scheduler=tiny_sd.scheduler)
    pipe = types.SimpleNamespace(unet=unet, vae=_ShuffleVAE(1), text_encoder=tiny_sd.text_encoder,
                                 tokenizer=tiny_sd.tokenizer, scheduler=tiny_sd.scheduler)
    return pipe, x, sm, keys, caps


def test_latent_inpainting_recovers_keys_and_mitigations_lower_the_count(latent_memorizer):
    from mmh_fast.mitigations import RandomNumberAddition, RandomTokenAddition

    pipe, x, sm, keys, caps = latent_memorizer
    n = len(keys)
    kw = dict(solidmark=sm, prompts=caps, num_inference_steps=20)
    base = evaluate(pipe, x, keys, **kw)
    assert np.mean(base.l_sm < 0.01) >= 0.9, base.format_table()
    c01 = {r["delta"]: r["eidetic_count"] for r in base.table}[0.01]
    gni = evaluate(pipe, x, keys, embedding_transform=GaussianNoiseInjection(3.0), **kw)
    rna = evaluate(pipe, x, keys, prompt_transform=RandomNumberAddition(1), **kw)
    rt = evaluate(pipe, x, keys, prompt_transform=RandomTokenAddition(1, vocabulary=["the", "on", "an"]), **kw)
    for res in (gni, rna, rt):  # measured 60 -> 41 (GNI 3), 32 (RNA), 31 (RT, random strings)
        assert {r["delta"]: r["eidetic_count"] for r in res.table}[0.01] <= 0.9 * c01
    # the [-1, 1] of the VAE and the (0, 1) of the keys stay apart: predictions are in key units
    assert base.predicted_keys.min() > -0.05 and base.predicted_keys.max() < 1.05
    small = evaluate(pipe, x[:5], keys[:5], batch_size=2, **{**kw, "prompts": caps[:5]})
    np.testing.assert_array_equal(small.l_sm, base.l_sm[:5])
    assert n == 60


class _NaNFor(torch.nn.Module):
    """``inner``, except that the prediction is NaN for the images whose
    class label (their position, passed as model_kwargs) is in ``bad``."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad = inner, torch.tensor(bad)
        self.prediction_type = inner.prediction_type

    def forward(self, sample, timestep, class_labels=None, **kwargs):
        out = self.inner(sample, timestep).sample.clone()
        out[torch.isin(class_labels, self.bad)] = float("nan")
        return out


def test_non_finite_network_output_names_the_images(twelve):
    from mmh_fast.models.batching import NonFiniteOutputError

    x, sm, keys, model, kw = twelve
    with pytest.raises(NonFiniteOutputError, match="inpainted canvas") as err:
        evaluate(_NaNFor(model, [7, 9]), x, keys, batch_size=5, model_kwargs={"class_labels": torch.arange(12)},
                 **kw)
    assert err.value.positions == [7, 9]


class _OOMShuffleVAE(_ShuffleVAE):
    """The shuffle VAE, out of memory when decoding more than 16 latents."""

    def decode(self, z):
        if z.shape[0] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return super().decode(z)


def test_latent_path_halves_chunks_on_vae_out_of_memory(latent_memorizer):
    import types

    pipe, x, sm, keys, caps = latent_memorizer
    kw = dict(solidmark=sm, prompts=caps, num_inference_steps=10)
    want = evaluate(pipe, x, keys, **kw)  # 60 images in one chunk
    oom = types.SimpleNamespace(**{**vars(pipe), "vae": _OOMShuffleVAE(1)})
    with pytest.warns(UserWarning, match="ran in chunks of 15"):  # 60 -> 30 -> 15
        got = evaluate(oom, x, keys, **kw)
    np.testing.assert_array_equal(got.l_sm, want.l_sm)


def test_tiny_stable_diffusion_pipeline_path(tiny_sd):
    g = torch.Generator().manual_seed(0)
    sm = SolidMark(thickness=2, seed=1, value_range=(0, 1))
    x = torch.rand(2, 3, 12, 12, generator=g)  # canvas 16 x 16, latents 8 x 8
    keys = sm.keys(2)
    caps = ["a red fox", "the snow"]
    kw = dict(solidmark=sm, prompts=caps, num_inference_steps=3)
    a = evaluate(tiny_sd, x, keys, return_images=True, **kw)
    assert a.images.shape == (2, 3, 16, 16) and torch.allclose(sm.crop(a.images), x, atol=1e-6)
    assert np.isfinite(a.l_sm).all() and ((a.predicted_keys >= 0) & (a.predicted_keys <= 1)).all()
    np.testing.assert_allclose(a.l_sm, np.abs(keys - sm.border_values(a.images).numpy()), atol=1e-6)
    b = evaluate(tiny_sd, x, keys, batch_size=1, **kw)
    np.testing.assert_allclose(b.l_sm, a.l_sm, rtol=0, atol=1e-5)
    c = evaluate(tiny_sd, x, keys, guidance_scale=5.0, resample=2, jump_length=1, **{**kw, "num_inference_steps": 2})
    assert np.isfinite(c.l_sm).all()
    with pytest.raises(ValueError, match="captions"):
        evaluate(tiny_sd, x, keys, solidmark=sm, num_inference_steps=2)
    with pytest.raises(ValueError, match="2 strings"):
        evaluate(tiny_sd, x, keys, solidmark=sm, prompts=caps[:1], num_inference_steps=2)
    with pytest.raises(ValueError, match="multiples of 2"):
        evaluate(tiny_sd, x[:, :, :11, :11], keys, solidmark=sm, prompts=caps, num_inference_steps=2)
