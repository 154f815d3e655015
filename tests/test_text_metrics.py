"""mmh_fast.text metrics (A^CFG, A^{s CFG}, A^FLIPD) and token attributions:
closed forms of the planted memorizer, agreement with mmh_fast.flipd, finite
differences of the gradients, and the guidance direction during attribution."""
import warnings

import pytest
import torch

import mmh_fast
from mmh_fast.models.pipelines import encode_prompts
from mmh_fast.models.sampling import ddim_grid, sample_noise
from mmh_fast.text import memorization_score, token_attributions
from text_fixtures import MEM, OTHERS, planted, tiny_sd

LAM = 7.5


def _gate(P, prompt):
    with torch.no_grad():
        return float(P.model.gate(encode_prompts(P.pipe, prompt), 1))


def _closed_terms(m, x, psi, sigma, g_c, lam=LAM):
    """(A^CFG, A^sCFG, FLIPD~^CFG) terms at points x [R, d] of the planted model."""
    var = psi ** 2 * m.variance + sigma ** 2
    eps = lambda g: sigma * (g * (x - psi * m.memorized) / sigma ** 2 + (1 - g) * x / var)  # noqa: E731
    prec = lambda g: g / sigma ** 2 + (1 - g) / var  # noqa: E731
    e_u, e_c = eps(0.0), eps(g_c)
    e = e_u + lam * (e_c - e_u)
    d = x.shape[1]
    tr = sigma * d * ((1 - lam) * prec(0.0) + lam * prec(g_c))  # tr d eps^CFG / d x
    return lam ** 2 * (e_c - e_u).pow(2).sum(1), e.pow(2).sum(1), d - sigma * tr + e.pow(2).sum(1)


@pytest.mark.parametrize("metric,col", [("cfg", 0), ("score", 1), ("flipd", 2)])
def test_metrics_equal_their_closed_forms_on_the_planted_model(metric, col):
    P = planted()
    prompts = [MEM, OTHERS[0]]
    states = {}
    got = memorization_score(P.pipe, prompts, metric=metric, num_images=2,
                             callback=lambda i, t, x: states.__setitem__(i, x.detach().double().flatten(1)))
    g = ddim_grid(P.pipe.scheduler, 50)
    lo, hi = {"flipd": (0, 0.2)}.get(metric, (0, 1))
    steps = [i for i in range(50) if lo < g.times[i] <= hi]
    assert len(steps) == (10 if metric == "flipd" else 50) and max(states) == steps[-1]
    want = torch.zeros(2, dtype=torch.float64)
    gates = [_gate(P, prompt) for prompt in prompts]
    for i in steps:
        for p in range(2):
            x = states[i][2 * p:2 * p + 2]
            want[p] += _closed_terms(P.model, x, g.psi[i], g.sigma[i], gates[p])[col].mean()
    want /= len(steps)
    assert got.shape == (2,) and got.dtype == torch.float64  # the planted model is a float64 network
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    if metric == "flipd":  # low LID_theta(. | c) along the memorized prompt's samples
        assert float(got[0]) < 0 < 0.5 * P.model.dim < float(got[1])
    else:
        assert float(got[0]) > float(got[1])


def test_flipd_metric_is_mmh_flipd_of_the_cfg_score_at_the_trajectory_points():
    pipe = tiny_sd()
    g = ddim_grid(pipe.scheduler, 10)
    i = 7  # timestep 201: the only step with t in (0.15, 0.25]
    assert g.timesteps[i] == 201
    states = {}
    got = memorization_score(pipe, ["a red car", "a dog"], metric="flipd", num_images=2, num_inference_steps=10,
                             t_range=(0.15, 0.25), n_probes=2, seed=4,
                             callback=lambda k, t, x: states.__setitem__(k, x.detach().clone()))
    x = states[i]
    want = []
    for p, prompt in enumerate(["a red car", "a dog"]):
        v = mmh_fast.flipd(pipe, x[2 * p:2 * p + 2] / g.psi[i], g.times[i], cond=prompt, guidance_scale=LAM,
                           encode=False, n_probes=2, seed=4, sample_ids=[0 * 10 + i, 1 * 10 + i], trace="hutchinson")
        want.append(float(v.mean()))
    torch.testing.assert_close(got, torch.tensor(want), rtol=2e-4, atol=2e-2)


@pytest.mark.parametrize("metric", ["cfg", "score", "flipd"])
def test_gradients_match_finite_differences(metric):
    pipe = tiny_sd(dtype=torch.float64)
    kw = dict(metric=metric, num_images=2, num_inference_steps=5, t_range=(0.7, 1.0), seed=2)  # step 0 only
    e = encode_prompts(pipe, "a photo of a zebra").detach()
    leaf = e.clone().requires_grad_(True)
    a = memorization_score(pipe, leaf[0], **kw)
    assert a.dim() == 0 and a.requires_grad
    (grad,) = torch.autograd.grad(a, leaf)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().max()) > 0
    v = torch.randn(e.shape, generator=torch.Generator().manual_seed(0), dtype=e.dtype)
    h = 1e-4
    with torch.no_grad():
        fd = (memorization_score(pipe, e + h * v, **kw) - memorization_score(pipe, e - h * v, **kw)) / (2 * h)
    assert float(fd) == pytest.approx(float((grad * v).sum()), rel=1e-3, abs=1e-6)


def test_gradient_flows_only_when_asked_and_values_agree():
    pipe = tiny_sd()
    kw = dict(metric="cfg", num_images=1, num_inference_steps=4, max_timesteps=2)
    a = memorization_score(pipe, "a dog", **kw)
    assert a.dim() == 0 and not a.requires_grad
    e = encode_prompts(pipe, ["a dog", "a red car"]).requires_grad_(True)
    b = memorization_score(pipe, e, **kw)
    assert b.shape == (2,) and b.requires_grad
    torch.testing.assert_close(b[0].detach(), a, rtol=1e-5, atol=1e-7)
    b.sum().backward()
    assert bool(torch.isfinite(e.grad).all()) and float(e.grad[:, 1:].abs().sum()) > 0


def test_token_attributions_put_the_weight_on_the_planted_token():
    P = planted()
    for metric in ("flipd", "cfg", "score"):
        att = token_attributions(P.pipe, MEM, metric=metric, num_images=2, num_inference_steps=10)
        toks = [t for t, _ in att]
        vals = torch.tensor([v for _, v in att])
        assert toks == ["a", "photo", "of", "mona", "lisa"]
        assert float(vals.sum()) == pytest.approx(1.0) and bool((vals >= 0).all())
        assert toks[int(vals.argmax())] == "mona" and float(vals[3]) > 0.99, (metric, att)


def test_guidance_during_attribution_moves_samples_to_the_prompt():
    """The memorized prompt's trajectories end on the memorized latent with the
    library's CFG; swapped branches (eps_c + lam (eps_u - eps_c), i.e. guidance 1 - lam)
    push them away from it, as does no guidance (the unconditional model)."""
    P = planted()
    g = ddim_grid(P.pipe.scheduler, 50)

    def end(gs):
        last = {}
        token_attributions(P.pipe, MEM, metric="cfg", num_images=3, guidance_scale=gs,
                           callback=lambda i, t, x: last.__setitem__("x", x.detach().double()))
        return (last["x"] / g.psi[-1] - P.latent.double()).flatten(1).norm(dim=1) / P.latent.double().norm()

    ours = end(LAM)  # the state before the last step (sigma = 0.04): relative distance 0.002
    assert float(ours.max()) < 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert float(end(1 - LAM).min()) > 10 * float(ours.max())
        assert float(end(0.0).min()) > 10 * float(ours.max())


def test_token_attributions_on_the_unet_equal_the_first_step_gradient():
    pipe = tiny_sd()
    g = ddim_grid(pipe.scheduler, 5)
    att = token_attributions(pipe, "a red car", metric="cfg", num_images=2, num_inference_steps=5,
                             t_range=(0.7, 1.0), seed=1)
    e = encode_prompts(pipe, "a red car").requires_grad_(True)
    x = sample_noise((2, 4, 4, 4), seed=1)
    u = encode_prompts(pipe, "")
    out = pipe.unet(torch.cat([x, x]), torch.tensor(float(g.timesteps[0])),
                    encoder_hidden_states=torch.cat([u.expand(2, -1, -1), e.expand(2, -1, -1)])).sample
    eu, ec = out.chunk(2)
    val = (LAM ** 2 * (ec - eu).flatten(1).pow(2).sum(1)).mean()
    (gr,) = torch.autograd.grad(val, e)
    norms = gr[0].norm(dim=-1)[1:4]  # the three tokens after BOS
    torch.testing.assert_close(torch.tensor([v for _, v in att]), (norms / norms.sum()).float(), rtol=1e-4,
                               atol=1e-6)
    assert [t for t, _ in att] == ["a", "red", "car"]
    again = token_attributions(pipe, "a red car", metric="cfg", num_images=2, num_inference_steps=5,
                               t_range=(0.7, 1.0), seed=1)
    assert again == att  # deterministic under a seed


def test_attributions_fp16_and_flipd_metric_are_finite():
    pipe = tiny_sd()
    kw = dict(num_images=1, num_inference_steps=10, max_timesteps=1)
    ref = token_attributions(pipe, "a cat painting", metric="flipd", **kw)
    assert len(ref) == 3 and sum(v for _, v in ref) == pytest.approx(1.0)
    try:
        half = tiny_sd(dtype=torch.float16)
        got = token_attributions(half, "a cat painting", metric="cfg", **kw)
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(f"float16 not supported on this CPU torch: {e}")
    want = token_attributions(pipe, "a cat painting", metric="cfg", **kw)
    assert [t for t, _ in got] == [t for t, _ in want]
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]),
                               rtol=0, atol=5e-2)


def test_attribution_edge_cases():
    P = planted()
    with pytest.warns(RuntimeWarning, match="uniform"):  # the gate is shut: the metric ignores the prompt
        att = token_attributions(P.pipe, OTHERS[1], metric="cfg", num_images=1, num_inference_steps=4)
    assert [v for _, v in att] == [pytest.approx(1 / 3)] * 3
    pipe = tiny_sd()
    long = " ".join(["red"] * 30)
    with pytest.warns(UserWarning, match="truncated"):
        att = token_attributions(pipe, long, metric="cfg", num_images=1, num_inference_steps=4, max_timesteps=1)
    assert len(att) == 14  # 16 positions minus BOS and EOS
    with pytest.raises(ValueError, match="no tokens"):
        token_attributions(pipe, "", metric="cfg", num_inference_steps=4)
    with pytest.raises(TypeError, match="prompt must be a string"):
        token_attributions(pipe, ["a dog"])


def test_bad_metric_inputs():
    pipe = tiny_sd()
    with pytest.raises(ValueError, match="metric must be one of"):
        memorization_score(pipe, "a dog", metric="lid")
    with pytest.raises(ValueError, match="t_range"):
        memorization_score(pipe, "a dog", t_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="no step"):
        memorization_score(pipe, "a dog", t_range=(0.95, 0.96), num_inference_steps=10)
    with pytest.raises(ValueError, match="prompts is empty|prompt_or_embeds is empty"):
        memorization_score(pipe, [])
    with pytest.raises(ValueError, match="hidden states"):
        memorization_score(pipe, torch.zeros(16))
    with pytest.raises(ValueError, match="hidden size"):
        memorization_score(pipe, torch.zeros(16, 7))
    with pytest.raises(ValueError, match="n_probes"):
        memorization_score(pipe, "a dog", metric="flipd", n_probes=0)
    with pytest.raises(ValueError, match="max_timesteps"):
        memorization_score(pipe, "a dog", max_timesteps=0)
    with pytest.raises(TypeError, match="text encoder"):
        from mmh_fast.testing import tiny_ddpm_pipeline
        memorization_score(tiny_ddpm_pipeline(), "a dog")
