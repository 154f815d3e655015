"""The scheduler-grid DDIM of mmh_fast.models.sampling (ddim_grid,
ddim_trajectory) against diffusers' pipeline and scheduler."""
import pytest
import torch
from diffusers import DDIMScheduler

from mmh_fast.models import Denoiser, make_schedule
from mmh_fast.models.pipelines import encode_prompts
from mmh_fast.models.sampling import ddim_grid, ddim_trajectory, sample_noise
from mmh_fast.testing import tiny_stable_diffusion_pipeline
from text_fixtures import tiny_sd


@pytest.mark.parametrize("spacing,offset,to_one", [("leading", 1, False), ("trailing", 0, True),
                                                   ("linspace", 0, True), ("leading", 0, True)])
def test_grid_matches_diffusers_ddim_timesteps(spacing, offset, to_one):
    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing,
                        steps_offset=offset, set_alpha_to_one=to_one)
    for n in (1, 7, 50):
        g = ddim_grid(sch, n)
        sch.set_timesteps(n)
        assert list(g.timesteps) == sch.timesteps.tolist()
        ac = sch.alphas_cumprod.double()
        assert g.times == tuple(t / 1000 for t in g.timesteps)
        torch.testing.assert_close(torch.tensor(g.psi, dtype=torch.float64) ** 2, ac[list(g.timesteps)])
        final = 1.0 if to_one else float(ac[0])
        assert g.psi_next[-1] ** 2 == pytest.approx(final) and g.sigma_next[-1] ** 2 == pytest.approx(1 - final)
        assert g.psi_next[:-1] == g.psi[1:]
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_grid(sch, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_grid(sch, 1001)
    with pytest.raises(TypeError, match="num_inference_steps"):
        ddim_grid(sch, 2.5)
    with pytest.raises(ValueError, match="spacing"):
        ddim_grid(sch, 5, spacing="karras")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cfg_ddim_reproduces_the_stable_diffusion_pipeline(prediction_type):
    pipe = tiny_sd() if prediction_type == "epsilon" else \
        tiny_stable_diffusion_pipeline(image_size=8, prediction_type=prediction_type)
    x = sample_noise((2, 4, 4, 4), seed=3)
    den = Denoiser(pipe.unet, make_schedule(pipe.scheduler))
    e = encode_prompts(pipe, ["a red car", ""])
    with torch.no_grad():
        ours = ddim_trajectory(den, x, ddim_grid(pipe.scheduler, 8), cond={"encoder_hidden_states": e[:1]},
                           uncond={"encoder_hidden_states": e[1:]}, guidance_scale=7.5)
        ref = pipe(["a red car"] * 2, num_inference_steps=8, guidance_scale=7.5, latents=x.clone(),
                   output_type="latent").images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_ddim_steps_compose_and_callback_sees_every_state():
    pipe = tiny_sd()
    den = Denoiser(pipe.unet, make_schedule(pipe.scheduler))
    g = ddim_grid(pipe.scheduler, 6)
    e = encode_prompts(pipe, ["a dog"])
    x = sample_noise((1, 4, 4, 4), seed=0, sample_ids=[5])
    seen = []
    with torch.no_grad():
        full = ddim_trajectory(den, x, g, cond={"encoder_hidden_states": e},
                               callback=lambda i, t, xi: seen.append((i, t)))
        half = ddim_trajectory(den, x, g, cond={"encoder_hidden_states": e}, stop=3)
        rest = ddim_trajectory(den, half, g, cond={"encoder_hidden_states": e}, start=3)
    torch.testing.assert_close(rest, full)
    assert seen == [(i, g.times[i]) for i in range(6)]
    with pytest.raises(ValueError, match="start"):
        ddim_trajectory(den, x, g, start=4, stop=2)
