"""mmh_fast.text on faulty networks, under chunking and with step-wise
gradients (issue 13 items 3, 10, 11):

- a UNet that returns NaN (or huge values) for one prompt's rows makes every
  text entry point raise NonFiniteOutputError naming the output and the prompt;
- a UNet that runs out of memory above a batch size is run in halved chunks,
  and chunked results (values and gradients) equal the unchunked call;
- the gradient of A^FLIPD w.r.t. a prompt embedding equals the all-at-once
  gradient written out here, and the autograd graph kept alive does not grow
  with the number of evaluated steps or probes."""
import contextlib
import gc
import warnings
import weakref

import pytest
import torch

from mmh_fast.models import batching
from mmh_fast.models.batching import NonFiniteOutputError
from mmh_fast.models.forward_ad import math_attention
from mmh_fast.models.pipelines import encode_prompts
from mmh_fast.models.sampling import ddim_grid
from mmh_fast.ops.hutchinson import hutchinson_probes
from mmh_fast.text import (cfg_norm, cfg_norm_train, generate, memorization_score, optimize_prompt_embedding,
                           token_attributions)
from text_fixtures import faulty_sd, tiny_sd

PROMPTS = ["a red car", "a dog", "the blue sky"]
BAD = 1  # PROMPTS[BAD] is the poisoned prompt
LAM = 7.5


def _images(n=3, seed=0):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _calls(pipe):
    """Every entry point on ``pipe`` with PROMPTS (or PROMPTS[BAD] alone); (name, thunk, position of BAD)."""
    emb = encode_prompts(pipe, PROMPTS).detach()
    kw = dict(num_images=2, num_inference_steps=5, max_timesteps=2)
    return [
        ("cfg_norm", lambda: cfg_norm(pipe, PROMPTS, num_images=2, num_inference_steps=5), BAD),
        # the NaN arises at step 0, which is not measured: it must not reach the later steps unseen
        ("cfg_norm later steps", lambda: cfg_norm(pipe, PROMPTS, num_images=2, steps=(1, 3),
                                                  num_inference_steps=5), BAD),
        ("A^CFG", lambda: memorization_score(pipe, PROMPTS, metric="cfg", **kw), BAD),
        ("A^sCFG", lambda: memorization_score(pipe, PROMPTS, metric="score", **kw), BAD),
        ("A^FLIPD", lambda: memorization_score(pipe, PROMPTS, metric="flipd", **kw), BAD),
        ("A^FLIPD differentiable", lambda: memorization_score(pipe, emb.clone().requires_grad_(True),
                                                              metric="flipd", **kw), BAD),
        ("cfg_norm_train", lambda: cfg_norm_train(pipe, _images(), PROMPTS), BAD),
        ("token_attributions", lambda: token_attributions(pipe, PROMPTS[BAD], **kw), 0),
        ("optimize_prompt_embedding", lambda: optimize_prompt_embedding(pipe, PROMPTS[BAD], iters=1, **kw), 0),
        ("generate", lambda: generate(pipe, PROMPTS, num_inference_steps=3), BAD),
    ]


@pytest.mark.parametrize("k", range(10))
def test_a_nan_row_raises_naming_the_output_and_the_prompt(k):
    pipe = faulty_sd(poison_prompt=PROMPTS[BAD], mode="nan")
    name, call, pos = _calls(pipe)[k]
    with pytest.raises(NonFiniteOutputError, match="UNet") as info:
        call()
    assert info.value.positions == [pos], (name, str(info.value))
    assert f"position(s) {pos}" in str(info.value)


@pytest.mark.parametrize("k", range(10))
def test_the_other_prompts_run_on_the_faulty_network(k):
    """The fault is confined to its prompt: without it the same calls succeed
    (the poison test above is about the bad prompt, not a broken pipeline)."""
    pipe = faulty_sd(poison_prompt="an old man", mode="nan")
    name, call, _ = _calls(pipe)[k]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = call()
    flat = out[0] if isinstance(out, tuple) else out
    if isinstance(flat, torch.Tensor):
        assert bool(torch.isfinite(flat).all()), name


def test_huge_outputs_raise_instead_of_inf():
    """A UNet output scaled by 1e30 is finite, but A^CFG (lambda^2 |eps_c - eps_u|^2
    ~ 1e62) overflows float32, and the DDIM state it produces (~1e30) makes the
    next UNet call overflow: both used to come back as inf / NaN."""
    pipe = faulty_sd(poison_prompt=PROMPTS[BAD], mode="scale", scale=1e30)
    with pytest.raises(NonFiniteOutputError, match="A\\^CFG") as info:
        memorization_score(pipe, PROMPTS, metric="cfg", num_images=2, num_inference_steps=5, max_timesteps=1)
    assert info.value.positions == [BAD]
    with pytest.raises(NonFiniteOutputError) as info:
        cfg_norm(pipe, PROMPTS, num_images=2, steps=(0, 3), num_inference_steps=5)
    assert info.value.positions == [BAD]
    with pytest.raises(NonFiniteOutputError) as info:
        cfg_norm_train(pipe, _images(), PROMPTS, n_euler=3)
    assert info.value.positions == [BAD]


# ----------------------------------------------------------------------------- chunking (item 10)

def _oom(limit):
    """float64 (batch-size effects ~1e-16), the weights of tiny_sd, OOM above ``limit`` UNet rows."""
    return faulty_sd(oom_above=limit, dtype=torch.float64)


def _close(a, b):
    # float64 convolutions summed in another order per batch size: ~1e-16 relative per op; 1e-10 leaves room
    # for the ~100 ops of a few UNet calls and DDIM steps while a real change (e.g. other latents) is O(1)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cfg_norm_halves_on_oom_and_equals_the_unchunked_call():
    ref = cfg_norm(tiny_sd(dtype=torch.float64), PROMPTS, num_images=3, steps=(0, 3), num_inference_steps=5,
                   seed=4)
    pipe = _oom(4)
    with pytest.warns(UserWarning, match="out of memory"):
        got = cfg_norm(pipe, PROMPTS, num_images=3, steps=(0, 3), num_inference_steps=5, seed=4)
    assert max(pipe.unet.calls) <= 4
    _close(got, ref)


def test_a_chunk_of_one_that_still_runs_out_of_memory_re_raises():
    pipe = _oom(1)  # a two-branch call on one row has 2 rows
    with pytest.raises(torch.OutOfMemoryError):
        cfg_norm(pipe, PROMPTS, num_images=1, num_inference_steps=5)


@pytest.mark.parametrize("metric", ["cfg", "flipd"])
def test_memorization_score_chunked_values_and_gradients_equal_the_unchunked_call(metric):
    kw = dict(metric=metric, num_images=3, num_inference_steps=6, t_range=(0.0, 1.0), max_timesteps=3, seed=2,
              n_probes=2)
    e = encode_prompts(tiny_sd(dtype=torch.float64), PROMPTS).detach()

    def run(pipe, **extra):
        leaf = e.clone().requires_grad_(True)
        a = memorization_score(pipe, leaf, **kw, **extra)
        (a * torch.tensor([1.0, -2.0, 0.5], dtype=a.dtype)).sum().backward()  # a mixed cotangent
        return a.detach(), leaf.grad

    ref_a, ref_g = run(tiny_sd(dtype=torch.float64))
    pipe = _oom(4)
    with pytest.warns(UserWarning, match="out of memory"):
        got_a, got_g = run(pipe)
    assert max(pipe.unet.calls) <= 4
    _close(got_a, ref_a)
    _close(got_g, ref_g)
    one_a, one_g = run(tiny_sd(dtype=torch.float64), batch_size=1)
    _close(one_a, ref_a)
    _close(one_g, ref_g)


def test_memorization_score_of_a_prompt_does_not_depend_on_the_others():
    """Latents keyed by (seed, image), probes by (seed, image, step): a prompt's
    A^FLIPD is the same alone, in another position, or beside other prompts."""
    pipe = tiny_sd(dtype=torch.float64)
    kw = dict(metric="flipd", num_images=2, num_inference_steps=6, max_timesteps=2, seed=7)
    both = memorization_score(pipe, PROMPTS, **kw)
    alone = memorization_score(pipe, PROMPTS[2], **kw)
    swapped = memorization_score(pipe, [PROMPTS[2], PROMPTS[0]], **kw)
    _close(both[2], alone)
    _close(swapped, both[[2, 0]])


def test_cfg_norm_train_and_attributions_chunked_equal_unchunked():
    imgs = _images(4, seed=3)
    caps = PROMPTS + ["a dog"]
    ref = cfg_norm_train(tiny_sd(dtype=torch.float64), imgs.double(), caps)
    pipe = _oom(3)
    with pytest.warns(UserWarning, match="out of memory"):
        got = cfg_norm_train(pipe, imgs.double(), caps)
    assert max(pipe.unet.calls) <= 3
    _close(got, ref)
    kw = dict(metric="flipd", num_images=3, num_inference_steps=6, max_timesteps=2, seed=1)
    ref = token_attributions(tiny_sd(dtype=torch.float64), "a red car", **kw)
    with pytest.warns(UserWarning, match="out of memory"):
        got = token_attributions(_oom(2), "a red car", **kw)
    assert [t for t, _ in got] == [t for t, _ in ref]
    _close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in ref]))


def test_default_chunk_sizes_come_from_the_model_and_input_size(monkeypatch):
    """With a budget of 3 two-branch rows, default calls run in chunks of at most
    3 rows (6 UNet rows) and give the unchunked values; the VAE encoder is chunked
    by its own estimate."""
    pipe = faulty_sd(dtype=torch.float64)
    per = batching.per_sample_bytes(pipe.unet, (4, 4, 4), passes=2)
    monkeypatch.setattr(batching, "CPU_BUDGET_BYTES", 3 * per)
    assert batching.default_batch_size(pipe.unet, (4, 4, 4), passes=2) == 3
    got = cfg_norm(pipe, PROMPTS, num_images=3, steps=(0, 2), num_inference_steps=5)
    assert max(pipe.unet.calls) == 6
    monkeypatch.undo()
    _close(got, cfg_norm(tiny_sd(dtype=torch.float64), PROMPTS, num_images=3, steps=(0, 2), num_inference_steps=5))
    # differentiable A^CFG: the evaluated steps (0 and 4) keep a graph, 3x the estimate: 1 row (2 UNet
    # rows) per call; the sampling steps between them run 3 rows (6 UNet rows) per call
    monkeypatch.setattr(batching, "CPU_BUDGET_BYTES", 3 * per)
    pipe.unet.calls.clear()
    emb = encode_prompts(pipe, PROMPTS).detach().requires_grad_(True)
    memorization_score(pipe, emb, metric="cfg", num_images=3, num_inference_steps=5, max_timesteps=2)
    assert pipe.unet.calls == [2] * 9 + [6] * 3 * 3 + [2] * 9
    # VAE: count the encoder's rows
    vae_per = batching.per_sample_bytes(pipe.vae, (3, 8, 8))
    monkeypatch.setattr(batching, "CPU_BUDGET_BYTES", 2 * vae_per)
    rows = []
    enc = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, *a, **k: (rows.append(x.shape[0]), enc(x, *a, **k))[1])
    cfg_norm_train(pipe, _images(5).double(), "a dog")
    assert max(rows) <= 2 and sum(rows) == 5


def test_bad_batch_sizes():
    pipe = tiny_sd()
    for fn in (lambda b: cfg_norm(pipe, "a dog", batch_size=b),
               lambda b: memorization_score(pipe, "a dog", batch_size=b, num_inference_steps=3),
               lambda b: token_attributions(pipe, "a dog", batch_size=b, num_inference_steps=3),
               lambda b: cfg_norm_train(pipe, _images(1), "a dog", batch_size=b),
               lambda b: generate(pipe, "a dog", batch_size=b, num_inference_steps=2)):
        with pytest.raises(ValueError, match="batch_size"):
            fn(0)
        with pytest.raises(TypeError, match="batch_size"):
            fn(2.5)


# ----------------------------------------------------------------------------- step-wise gradients (item 11)

def _all_at_once_flipd(pipe, leaf, prompts_n, *, num_images, num_inference_steps, steps, seed, n_probes):
    """A^FLIPD (Eq. 28) written out with ONE backward over every step's graph, the
    way memorization_score computed it before: states from its own CFG DDIM loop."""
    g = ddim_grid(pipe.scheduler, num_inference_steps)
    R = prompts_n * num_images
    img = torch.arange(R) % num_images
    pidx = torch.arange(R) // num_images
    from mmh_fast.models.sampling import sample_noise
    x = sample_noise((R, 4, 4, 4), seed=seed, sample_ids=img, dtype=torch.float64)
    u = encode_prompts(pipe, "").detach().expand(R, -1, -1)
    c_rows = leaf.index_select(0, pidx)
    total = 0
    d = x[0].numel()
    with math_attention():
        for i in range(max(steps) + 1):
            ts = torch.tensor(float(g.timesteps[i]))
            if i in steps:
                xin = x.detach().requires_grad_(True)
                out = pipe.unet(torch.cat([xin, xin]), ts, encoder_hidden_states=torch.cat([u, c_rows])).sample
                eu, ec = out.chunk(2)
                e = eu + LAM * (ec - eu)
                probes = hutchinson_probes(tuple(x.shape), n_probes, seed=seed, sample_ids=img * len(g) + i,
                                           dtype=torch.float64)
                tr = sum((torch.autograd.grad(e, xin, v, create_graph=True, retain_graph=True)[0] * v).flatten(1)
                         .sum(1) for v in probes)
                term = d - g.sigma[i] * tr / n_probes + e.flatten(1).pow(2).sum(1)
                total = total + term.reshape(prompts_n, num_images).mean(1) / len(steps)
                e = e.detach()
            else:
                with torch.no_grad():
                    out = pipe.unet(torch.cat([x, x]), ts, encoder_hidden_states=torch.cat([u, c_rows])).sample
                    eu, ec = out.chunk(2)
                    e = eu + LAM * (ec - eu)
            x = g.step(i, x, e)
    return total


def test_flipd_gradient_accumulated_step_by_step_equals_the_all_at_once_gradient():
    pipe = tiny_sd(dtype=torch.float64)
    e = encode_prompts(pipe, PROMPTS[:2]).detach()
    kw = dict(num_images=2, num_inference_steps=8, seed=3, n_probes=2)
    g = ddim_grid(pipe.scheduler, 8)
    steps = g.indices_in((0.0, 0.6))
    assert len(steps) >= 4  # several steps, so graphs of different steps meet in the old gradient
    leaf = e.clone().requires_grad_(True)
    a = memorization_score(pipe, leaf, metric="flipd", t_range=(0.0, 0.6), **kw)
    w = torch.tensor([1.0, -0.5], dtype=torch.float64)
    (gr,) = torch.autograd.grad((a * w).sum(), leaf)
    leaf2 = e.clone().requires_grad_(True)
    want = _all_at_once_flipd(pipe, leaf2, 2, steps=steps, **kw)
    (gw,) = torch.autograd.grad((want * w).sum(), leaf2)
    _close(a.detach(), want.detach())
    torch.testing.assert_close(gr, gw, rtol=1e-9, atol=1e-12)
    assert float(gr.abs().max()) > 0


class _SavedTensors:
    """Counts the tensors autograd saves for backward that are still alive, and
    the peak of that count (saved_tensors_hooks: pack when saved, the holder
    dies with the graph)."""

    class _Holder:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def __init__(self):
        self.live = self.peak = 0

    def _pack(self, t):
        # detached: holding a saved OUTPUT with its grad_fn would make a reference cycle (node -> holder
        # -> tensor -> node) that only the garbage collector frees; autograd restores the graph
        # metadata of an unpacked tensor itself
        h = self._Holder(t.detach())
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(h, self._dead)
        return h

    def _dead(self):
        self.live -= 1

    @staticmethod
    def _unpack(h):
        return h.t

    @contextlib.contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


def _peak_saved(fn):
    gc.collect()
    counter = _SavedTensors()
    with counter():
        out = fn()
        del out
        gc.collect()
    return counter.peak


def test_flipd_graph_memory_does_not_grow_with_steps_or_probes():
    """The peak number of live saved tensors is that of one evaluated step (and one
    probe's double-backward graph): the same for 1 and 4 steps, 1 and 3 probes.
    Keeping every step's graph until backward (the old path) made it grow ~4x."""
    pipe = tiny_sd()
    e = encode_prompts(pipe, PROMPTS[:2]).detach()

    def score(n_steps, n_probes):
        leaf = e.clone().requires_grad_(True)
        a = memorization_score(pipe, leaf, metric="flipd", num_images=1, num_inference_steps=4,
                               t_range=(0.0, 1.0), max_timesteps=n_steps, n_probes=n_probes)
        a.sum().backward()
        return leaf.grad

    one = _peak_saved(lambda: score(1, 1))
    assert one > 50  # a UNet forward + VJP graph saves many tensors: the counter sees them
    assert _peak_saved(lambda: score(4, 1)) == one
    assert _peak_saved(lambda: score(1, 3)) == one

    def attribute(n_steps, n_probes):
        return token_attributions(pipe, "a red car", metric="flipd", num_images=1, num_inference_steps=4,
                                  t_range=(0.0, 1.0), max_timesteps=n_steps, n_probes=n_probes)

    one = _peak_saved(lambda: attribute(1, 1))
    assert _peak_saved(lambda: attribute(4, 3)) == one


# ----------------------------------------------------------------------------- input checks

def test_every_entry_point_names_the_bad_argument():
    from mmh_fast import mitigations as M
    from mmh_fast.text import mitigate
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="callback"):
        memorization_score(pipe, "a dog", num_inference_steps=3, callback=3)
    with pytest.raises(TypeError, match="callback"):
        token_attributions(pipe, "a dog", num_inference_steps=3, callback="x")
    with pytest.raises(TypeError, match="prompt_or_embeds must be strings"):
        memorization_score(pipe, ["a dog", 3])
    with pytest.raises(TypeError, match="captions must be strings"):
        cfg_norm_train(pipe, _images(2), ["a dog", None])
    with pytest.raises(TypeError, match="attribution_kwargs"):
        mitigate(pipe, "a red car", attribution_kwargs=["num_images", 1])
    with pytest.raises(TypeError, match="target"):
        optimize_prompt_embedding(pipe, "a dog", target="low", iters=1)
    with pytest.raises(ValueError, match="weight_decay"):
        optimize_prompt_embedding(pipe, "a dog", weight_decay=-1.0, iters=1)
    with pytest.raises(TypeError, match="prompts must be"):
        generate(pipe, 5)
    with pytest.raises(TypeError, match="scale"):
        M.GaussianNoiseInjection("big")
    with pytest.raises(TypeError, match="seed"):
        M.GaussianNoiseInjection(0.1, seed=1.5)
    with pytest.raises(TypeError, match="seed"):
        M.CaptionWordRepeat(1, seed="x")
    with pytest.raises(TypeError, match="sample_ids"):
        M.CaptionWordRepeat(1).apply(["a b"], sample_ids=5)
    from mmh_fast.text import OpenAIChatRephraser, evaluate_mitigation, load_clip_score, load_sscd_similarity
    with pytest.raises(ValueError, match="batch_size"):
        load_sscd_similarity("model.pt", batch_size=0)
    with pytest.raises(ValueError, match="scale"):
        load_clip_score("clip_dir", scale=-1.0)
    with pytest.raises(TypeError, match="timeout"):
        OpenAIChatRephraser(timeout="soon")
    with pytest.raises(TypeError, match="include_original"):
        evaluate_mitigation(pipe, ["a dog"], ["a cat"], include_original="yes")
