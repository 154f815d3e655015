"""mmh_fast.text.attention (Ren et al., ECCV 2024): cross-attention read through
diffusers attention processors. The recording processor must leave the UNet's
output unchanged and restore its processors; the probabilities it reports must
equal softmax(Q K^T * scale) recomputed from the layer's inputs caught by
forward pre-hooks; the entropy must follow from them; the rescaling mitigation
must equal a sampler run with the rescaled logits written out."""
import math

import pytest
import torch

from mmh_fast.models.pipelines import encode_prompts, tokenize_prompts
from mmh_fast.models.sampling import sample_noise
from mmh_fast.text import generate
from mmh_fast.text._core import text_pipeline
from mmh_fast.text.attention import (cross_attention_entropy, cross_attention_layers, cross_attention_probabilities,
                                     generate_attention_rescaled)
from text_fixtures import planted, tiny_sd

PROMPTS = ["a red car", "a dog", "the blue sky"]


def _unet_call(pipe, x, t, ehs):
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=ehs).sample


def test_recording_leaves_the_unet_output_and_processors_unchanged():
    pipe = tiny_sd()
    e = encode_prompts(pipe, PROMPTS)
    x = sample_noise((3, 4, 4, 4), seed=0)
    before = dict(pipe.unet.attn_processors)
    want = _unet_call(pipe, x, 500, e)
    seen = []
    with cross_attention_probabilities(pipe.unet, lambda l, p: seen.append((l, p.shape))) as names:
        got = _unet_call(pipe, x, 500, e)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # explicit vs fused attention: rounding only
    assert dict(pipe.unet.attn_processors) == before
    assert names == cross_attention_layers(pipe.unet) and len(names) == 4  # down, 2 x up, mid
    # indices follow unet.attn_processors (mid block last); the calls follow the network (down, mid, up)
    assert names[3].startswith("mid_block") and [s[0] for s in seen] == [0, 3, 1, 2] and all(s[1][0] == 3 and s[1][-1] == e.shape[1] for s in seen)
    # restored even when the network fails inside the context
    with pytest.raises(RuntimeError):
        with cross_attention_probabilities(pipe.unet, lambda l, p: None):
            pipe.unet(x[:, :3], 500, encoder_hidden_states=e)
    assert dict(pipe.unet.attn_processors) == before


def test_probabilities_equal_softmax_of_the_layer_inputs():
    pipe = tiny_sd()
    e = encode_prompts(pipe, PROMPTS[:2])
    x = sample_noise((2, 4, 4, 4), seed=1)
    names = cross_attention_layers(pipe.unet)
    mods = [pipe.unet.get_submodule(n.rsplit(".processor", 1)[0]) for n in names]
    inputs, hooks = {}, []
    for k, m in enumerate(mods):
        def pre(mod, args, kwargs, _k=k):
            inputs[_k] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    got = {}
    try:
        with cross_attention_probabilities(pipe.unet, lambda l, p: got.__setitem__(l, p)):
            _unet_call(pipe, x, 700, e)
    finally:
        for h in hooks:
            h.remove()
    for k, m in enumerate(mods):
        h, c = inputs[k]
        q = m.to_q(h).reshape(2, h.shape[1], m.heads, -1).transpose(1, 2)
        kk = m.to_k(c).reshape(2, c.shape[1], m.heads, -1).transpose(1, 2)
        want = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)


def test_entropy_is_that_of_the_mean_conditional_attention():
    pipe = tiny_sd()
    got = cross_attention_entropy(pipe, PROMPTS, num_images=2, seed=3, num_inference_steps=10)
    assert got.shape == (3,) and got.dtype == torch.float64
    # by hand: the first step's conditional rows, attention averaged over heads, queries, then layers
    tp = text_pipeline(pipe)
    grid = tp.grid(10)
    e = encode_prompts(pipe, PROMPTS + [""])
    want = []
    for p in range(3):
        x = sample_noise((2, 4, 4, 4), seed=3)
        acc = []
        ehs = torch.cat([e[3:].expand(2, -1, -1), e[p:p + 1].expand(2, -1, -1)])
        with cross_attention_probabilities(pipe.unet, lambda l, pr: acc.append(pr[2:].double().mean((1, 2)))):
            _unet_call(pipe, torch.cat([x, x]), grid.timesteps[0], ehs)
        a = torch.stack(acc).mean(0)
        want.append(float((-(a * a.log()).sum(1)).mean()))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    assert bool((got > 0).all()) and bool((got <= math.log(e.shape[1]) + 1e-12).all())
    # one layer, later steps, batch independence
    one = cross_attention_entropy(pipe, PROMPTS, num_images=2, seed=3, num_inference_steps=10, layers=[-1],
                                  steps=(2, 4))
    again = cross_attention_entropy(pipe, PROMPTS[::-1], num_images=2, seed=3, num_inference_steps=10, layers=[3],
                                    steps=(2, 4), batch_size=1)
    torch.testing.assert_close(again, one.flip(0), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(one, got)


def test_rescaling_mitigation_equals_the_sampler_with_rescaled_logits():
    pipe = tiny_sd()
    kw = dict(num_images=2, num_inference_steps=4, seed=2)
    plain = generate(pipe, PROMPTS[:2], output="latents", **kw)
    same = generate_attention_rescaled(pipe, PROMPTS[:2], bos_scale=1.0, mask_summary=False, output="latents", **kw)
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    got = generate_attention_rescaled(pipe, PROMPTS[:2], output="latents", **kw)
    assert not torch.allclose(got, plain, atol=1e-4)
    # the same rescaling written out with diffusers' own processors: the conditional rows' keys and values
    # restricted to BOS + prompt tokens, and the BOS logit scaled by C = 1.25, equal to scaling the BOS key by C
    _, mask, _ = tokenize_prompts(pipe, PROMPTS[:2])
    n_keep = mask.sum(1) - 1
    tp = text_pipeline(pipe)
    grid = tp.grid(4)
    e = encode_prompts(pipe, PROMPTS[:2] + [""])
    names = cross_attention_layers(pipe.unet)
    mods = [pipe.unet.get_submodule(n.rsplit(".processor", 1)[0]) for n in names]
    for p in range(2):
        x = sample_noise((2, 4, 4, 4), seed=2)
        for i in range(4):
            ehs_u = e[2:].expand(2, -1, -1)
            with torch.no_grad():
                eu = pipe.unet(x, grid.timesteps[i], encoder_hidden_states=ehs_u).sample
                c = e[p:p + 1, :n_keep[p]].expand(2, -1, -1)
                hooks = [m.to_k.register_forward_hook(
                    lambda mod, a, out: torch.cat([out[:, :1] * 1.25, out[:, 1:]], 1) if out.shape[1] == c.shape[1]
                    else out) for m in mods]
                try:
                    ec = pipe.unet(x, grid.timesteps[i], encoder_hidden_states=c).sample
                finally:
                    for h in hooks:
                        h.remove()
            x = grid.step(i, x, eu + 7.5 * (ec - eu))
        torch.testing.assert_close(got[2 * p:2 * p + 2], x, rtol=1e-4, atol=1e-5)


def test_bad_input_names_the_argument():
    pipe = tiny_sd()
    with pytest.raises(TypeError, match="unexpected keyword argument 'layer'"):
        cross_attention_entropy(pipe, "a dog", layer=1)
    with pytest.raises(TypeError, match="prompts must be strings"):
        cross_attention_entropy(pipe, ["a dog", 1.5])
    with pytest.raises(ValueError, match="layers must hold indices"):
        cross_attention_entropy(pipe, "a dog", layers=[4])
    with pytest.raises(TypeError, match="layers must be None or a non-empty sequence"):
        cross_attention_entropy(pipe, "a dog", layers=1)
    with pytest.raises(ValueError, match="bos_scale must be a finite number > 0"):
        generate_attention_rescaled(pipe, "a dog", bos_scale=0)
    # a pipeline whose UNet has no attention processors (a closed-form model)
    with pytest.raises(TypeError, match=r"pipe.unet \(PlantedMemorizer\) has no diffusers attention processors"):
        cross_attention_entropy(planted().pipe, "a dog")


def test_nan_scores_raise_naming_the_prompt(monkeypatch):
    from mmh_fast.text import attention as A

    init = A._CrossAttentionProcessor.__init__

    def poisoned(self, layer, sink, logits):  # a network whose attention turns NaN
        init(self, layer, sink, lambda l, s: s * float("nan"))
    monkeypatch.setattr(A._CrossAttentionProcessor, "__init__", poisoned)
    with pytest.raises(FloatingPointError, match=r"prompts\[0\] = 'a dog'"):
        cross_attention_entropy(tiny_sd(), ["a dog"], num_inference_steps=2)


def test_nan_in_the_mitigated_sampler_names_prompts_not_batch_rows(monkeypatch):
    from mmh_fast.models.batching import NonFiniteOutputError
    from mmh_fast.text import attention as A

    init = A._CrossAttentionProcessor.__init__

    def poisoned(self, layer, sink, logits):
        init(self, layer, sink, lambda l, s: s * float("nan"))
    monkeypatch.setattr(A._CrossAttentionProcessor, "__init__", poisoned)
    # the first chunk holds rows 0 and 1, both images of prompt 0: the error must report prompt 0 only
    with pytest.raises(NonFiniteOutputError, match="prompt indices") as e:
        generate_attention_rescaled(tiny_sd(), ["a dog", "a cat"], num_images=2, batch_size=2,
                                    num_inference_steps=2, output="latents")
    assert e.value.positions == [0]
