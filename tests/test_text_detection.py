"""mmh_fast.text detection: cfg_norm (Wen et al.), cfg_norm_train (App. C) and
the conditional / unconditional LID through mmh_fast.flipd (Sec. 4.1), checked
against closed forms of a planted memorizer and against diffusers' own DDIM loop."""
import types
import warnings

import pytest
import torch

import mmh_fast
from mmh_fast.models.pipelines import encode_images, encode_prompts
from mmh_fast.models.sampling import sample_noise
from mmh_fast.testing import tiny_ddpm_pipeline
from mmh_fast.text import cfg_norm, cfg_norm_train
from text_fixtures import MEM, OTHERS, planted, tiny_sd


def _abar(pipe, t):
    return float(pipe.scheduler.alphas_cumprod.double()[t])


def _planted_eps(m, x, psi, sigma, g):
    """The planted model's eps written out (float64): the geometric mixture's."""
    var = psi ** 2 * m.variance + sigma ** 2
    return sigma * (g * (x - psi * m.memorized) / sigma ** 2 + (1 - g) * x / var)


def _gate(P, prompt):
    with torch.no_grad():
        return float(P.model.gate(encode_prompts(P.pipe, prompt), 1))


# ----------------------------------------------------------------------------- cfg_norm

def test_cfg_norm_flags_the_planted_prompt_with_the_closed_form_value():
    P = planted()
    got = cfg_norm(P.pipe, [MEM] + OTHERS, num_images=3, seed=5)
    assert got.shape == (1 + len(OTHERS),) and got.dtype == torch.float64  # a float64 network
    assert bool((got[1:] == 0).all())  # the gate is exactly shut: both branches are the same Gaussian
    # step 0 by hand: x_T keyed by (seed, n), eps_c - eps_u = sigma g (s_gauss - s_mem) terms
    t = 981  # the first timestep of the 50-step "leading" grid with steps_offset 1
    a = _abar(P.pipe, t)
    psi, sigma = a ** 0.5, (1 - a) ** 0.5
    x = sample_noise((3, 4, 8, 8), seed=5, dtype=torch.float64).reshape(3, -1)
    g = _gate(P, MEM)
    diff = _planted_eps(P.model, x, psi, sigma, g) - _planted_eps(P.model, x, psi, sigma, 0.0)
    assert float(got[0]) == pytest.approx(float(diff.norm(dim=1).mean()), rel=1e-5)
    more = cfg_norm(P.pipe, [MEM, OTHERS[0]], steps=(0, 10), num_images=2)
    assert float(more[0]) > 0 and float(more[1]) == 0


def test_cfg_norm_matches_diffusers_ddim_loop_and_is_batch_invariant():
    pipe = tiny_sd()
    prompts = ["a red car", "the blue sky", "a photo of a zebra"]
    got = cfg_norm(pipe, prompts, num_images=2, steps=(1, 4), num_inference_steps=10, seed=3)
    # reference: diffusers' DDIMScheduler.step with CFG, norms at steps 1..3
    sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sch.set_timesteps(10)
    e = encode_prompts(pipe, prompts + [""])
    want = []
    for p in range(3):
        x = sample_noise((2, 4, 4, 4), seed=3)
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i, t in enumerate(sch.timesteps[:4]):
                ehs = torch.cat([e[3:].expand(2, -1, -1), e[p:p + 1].expand(2, -1, -1)])
                out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=ehs).sample
                eu, ec = out.chunk(2)
                if i >= 1:
                    tot += (ec - eu).flatten(1).double().norm(dim=1)
                x = sch.step(eu + 7.5 * (ec - eu), t, x).prev_sample
        want.append(float(tot.mean()) / 3)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-4, atol=1e-6)
    # a prompt's score depends on nothing but the prompt: not the batch, the order, the neighbours
    kw = dict(num_images=2, steps=(1, 4), num_inference_steps=10, seed=3)
    torch.testing.assert_close(cfg_norm(pipe, prompts, batch_size=1, **kw), got, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cfg_norm(pipe, prompts[2], **kw), got[2:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cfg_norm(pipe, prompts[::-1], **kw), got.flip(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cfg_norm(pipe, prompts, **kw), got, rtol=0, atol=0)  # deterministic
    assert not torch.allclose(cfg_norm(pipe, prompts, **{**kw, "seed": 4}), got)


def test_any_scheduler_with_alphas_cumprod_gives_the_same_ddim_trajectory():
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    pipe = tiny_sd()
    kw = dict(num_images=2, steps=(0, 3), num_inference_steps=10)
    want = cfg_norm(pipe, ["a red car", "a dog"], **kw)
    for cls in (EulerDiscreteScheduler, PNDMScheduler):  # the grid follows the config's timestep spacing
        sch = cls.from_config(pipe.scheduler.config, timestep_spacing="leading", steps_offset=1)
        other = type(pipe)(**{**pipe.components, "scheduler": sch})
        torch.testing.assert_close(cfg_norm(other, ["a red car", "a dog"], **kw), want)


class _Counter:
    def __init__(self, module):
        self.calls, self.rows = 0, 0
        self.h = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        self.rows += int(args[0].shape[0])


def test_cfg_norm_runs_no_step_beyond_the_last_one_needed():
    pipe = tiny_sd()
    c = _Counter(pipe.unet)
    try:
        cfg_norm(pipe, ["a dog", "a red car"], num_images=3)
        assert (c.calls, c.rows) == (1, 12)  # one two-branch call: 2 prompts x 3 images x 2 branches
        c.calls = c.rows = 0
        cfg_norm(pipe, ["a dog"], num_images=1, steps=(2, 5), num_inference_steps=20)
        assert c.calls == 5
        c.calls = 0
        cfg_norm(pipe, ["a dog", "a red car"], num_images=3, batch_size=4)
        assert c.calls == 2
    finally:
        c.h.remove()


# ----------------------------------------------------------------------------- cfg_norm_train

def test_cfg_norm_train_flags_the_memorized_image_with_the_closed_form_value():
    P = planted()
    imgs = torch.cat([P.image, P.other_images[:3]])
    caps = [MEM] + OTHERS[:3]
    got = cfg_norm_train(P.pipe, imgs, caps)
    assert got.shape == (4,) and got.dtype == torch.float64
    assert float(got[0]) > 0.1 and bool((got[1:] == 0).all())
    # closed form: Euler from the clean latent (psi 1, sigma 0) over t = 0, t0/3, 2t0/3, t0,
    # then |eps_c - eps_u| / sigma
    ac = P.pipe.scheduler.alphas_cumprod.double()

    def coef(t):  # the continuous time's interpolated alphas_cumprod, as mmh_fast.models.schedules
        tau = t * 1000
        lo = int(tau)
        w = tau - lo
        a = float(ac[lo] * (1 - w) + ac[min(lo + 1, 999)] * w)
        return a ** 0.5, (1 - a) ** 0.5

    g = _gate(P, MEM)
    x = encode_images(P.pipe, P.image).double().reshape(1, -1)
    times = [0.0, 0.01 / 3, 0.02 / 3, 0.01]
    state = [(1.0, 0.0)] + [coef(t) for t in times[1:]]
    for k in range(3):
        psi_n, sig_n = coef(times[k])
        eps = _planted_eps(P.model, x, psi_n, sig_n, g)
        x = state[k + 1][0] * (x - state[k][1] * eps) / state[k][0] + state[k + 1][1] * eps
    psi, sigma = coef(0.01)
    want = (_planted_eps(P.model, x, psi, sigma, g) - _planted_eps(P.model, x, psi, sigma, 0.0)).norm() / sigma
    assert float(got[0]) == pytest.approx(float(want), rel=1e-4)
    # one shared caption; batching does not matter
    torch.testing.assert_close(cfg_norm_train(P.pipe, imgs, caps, batch_size=3), got)
    same = cfg_norm_train(P.pipe, torch.cat([P.image, P.image]), MEM)
    torch.testing.assert_close(same, got[:1].expand(2), rtol=1e-6, atol=0)


def test_cfg_norm_train_is_the_cfg_vector_at_the_euler_endpoint():
    pipe = tiny_sd()
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    caps = ["a red car", "the blue sky"]
    got = cfg_norm_train(pipe, img, caps, t0=0.02, n_euler=1)
    z = encode_images(pipe, img)
    e = encode_prompts(pipe, caps + [""])
    a1 = _abar(pipe, 20)
    with torch.no_grad():
        eps0 = pipe.unet(z, torch.zeros(2), encoder_hidden_states=e[:2]).sample
        x1 = a1 ** 0.5 * z + (1 - a1) ** 0.5 * eps0  # one Euler step from (psi, sigma) = (1, 0)
        out = pipe.unet(torch.cat([x1, x1]), torch.full((4,), 20.0),
                        encoder_hidden_states=torch.cat([e[2:].expand(2, -1, -1), e[:2]])).sample
    eu, ec = out.chunk(2)
    want = (ec - eu).flatten(1).norm(dim=1) / (1 - a1) ** 0.5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert bool(torch.isfinite(cfg_norm_train(pipe, img, caps)).all())


# ----------------------------------------------------------------------------- LID through flipd (Sec. 4.1)

def test_conditional_and_unconditional_lid_through_flipd():
    """mmh_fast.flipd(pipe, images, t0, cond=captions) is LID_theta(x | c) and
    cond="" LID_theta(x): exact here since the planted score's Jacobian is a
    multiple of I (every Rademacher probe gives the exact trace)."""
    P = planted()
    t0 = 0.05
    cond = mmh_fast.flipd(P.pipe, P.image, t0, cond=MEM)
    unc = mmh_fast.flipd(P.pipe, P.image, t0, cond="")
    torch.testing.assert_close(unc, mmh_fast.flipd(P.pipe, P.image, t0))
    a = 0.5 * (_abar(P.pipe, 50) + _abar(P.pipe, 50))
    psi, sigma = a ** 0.5, (1 - a) ** 0.5
    d = P.model.dim
    x = psi * encode_images(P.pipe, P.image).double().reshape(1, -1)

    def closed(g):
        eps = _planted_eps(P.model, x, psi, sigma, g)
        prec = g / sigma ** 2 + (1 - g) / (psi ** 2 * P.model.variance + sigma ** 2)
        return d - sigma ** 2 * d * prec + float(eps.pow(2).sum())

    assert float(cond) == pytest.approx(closed(_gate(P, MEM)), abs=1e-2)
    assert float(unc) == pytest.approx(closed(0.0), rel=1e-4)
    assert float(cond) < 1 < 0.9 * d < float(unc)  # LID(x | c) ~ 0 (memorized) << LID(x) ~ d
    other = mmh_fast.flipd(P.pipe, P.other_images[:2], t0, cond=OTHERS[:2])
    torch.testing.assert_close(other, mmh_fast.flipd(P.pipe, P.other_images[:2], t0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad input, precision

def test_bad_inputs_raise_clear_errors():
    pipe = tiny_sd()
    img = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="prompts is empty"):
        cfg_norm(pipe, [])
    with pytest.raises(TypeError, match="prompts must be"):
        cfg_norm(pipe, ["a dog", 3])
    with pytest.raises(ValueError, match="steps must satisfy"):
        cfg_norm(pipe, "a dog", steps=(3, 3))
    with pytest.raises(ValueError, match="steps must satisfy"):
        cfg_norm(pipe, "a dog", steps=(0, 11), num_inference_steps=10)
    with pytest.raises(ValueError, match="num_images"):
        cfg_norm(pipe, "a dog", num_images=0)
    with pytest.raises(TypeError, match="text encoder"):
        cfg_norm(tiny_ddpm_pipeline(), "a dog")
    no_text = types.SimpleNamespace(unet=pipe.unet, scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                                    text_encoder=None)
    with pytest.raises(TypeError, match="text encoder"):
        cfg_norm_train(no_text, img, "a dog")
    with pytest.raises(TypeError, match="text-to-image pipeline"):
        cfg_norm(pipe.unet, "a dog")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        cfg_norm_train(pipe, img + 255, "a dog")
    with pytest.raises(ValueError, match="multiples of 2"):
        cfg_norm_train(pipe, torch.zeros(1, 3, 7, 8), "a dog")
    with pytest.raises(ValueError, match="multiples of 2"):  # latents 3 x 3: the UNet halves them
        cfg_norm_train(pipe, torch.zeros(1, 3, 6, 6), "a dog")
    with pytest.raises(ValueError, match="channels"):
        cfg_norm_train(pipe, torch.zeros(1, 4, 8, 8), "a dog")
    with pytest.raises(ValueError, match="one caption per image"):
        cfg_norm_train(pipe, torch.zeros(2, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(TypeError, match="torch.Tensor"):
        cfg_norm_train(pipe, img.numpy(), "a dog")
    with pytest.raises(ValueError, match="NaN"):
        cfg_norm_train(pipe, img * float("nan"), "a dog")
    with pytest.raises(ValueError, match="t0"):
        cfg_norm_train(pipe, img, "a dog", t0=0)
    with pytest.raises(ValueError, match="n_euler"):
        cfg_norm_train(pipe, img, "a dog", n_euler=0)


def test_over_long_prompts_are_truncated_with_a_warning():
    pipe = tiny_sd()
    long = "a photo of " + " ".join(["red"] * 40) + " zebra"
    with pytest.warns(UserWarning, match="truncated"):
        a = cfg_norm(pipe, [long])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = "a photo of " + " ".join(["red"] * 11)  # what fits in 16 tokens with BOS / EOS
        torch.testing.assert_close(a, cfg_norm(pipe, [kept]))


def test_low_precision_pipeline_agrees_with_float32():
    ref = tiny_sd()
    try:
        half = tiny_sd(dtype=torch.float16)
        got = cfg_norm(half, ["a red car", "a dog"], num_images=2, steps=(0, 3), num_inference_steps=10)
    except RuntimeError as e:  # pragma: no cover - torch builds without CPU half kernels
        pytest.skip(f"float16 not supported on this CPU torch: {e}")
    want = cfg_norm(ref, ["a red car", "a dog"], num_images=2, steps=(0, 3), num_inference_steps=10)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=3e-2, atol=1e-3)
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(cfg_norm_train(half, img, ["a red car", "a dog"]),
                               cfg_norm_train(ref, img, ["a red car", "a dog"]), rtol=5e-2, atol=1e-2)
