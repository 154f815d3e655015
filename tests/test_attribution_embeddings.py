"""token_attributions(wrt="token_embeddings"): the metric's gradient taken
through the text encoder, w.r.t. its input token embeddings, checked against
finite differences of the public memorization_score with the encoder's
embedding table perturbed (the independent truth), plus the option's errors.

Why the option exists (measured on the committed quick lab, see the README's lab
section): with a causal text encoder the trigger's information also reaches the
EOS and padding positions, where 49-66% (mean 60%) of the A^CFG hidden-state
gradient lies; the default (hidden states at the prompt's own positions, Wen et al.'s
definition) loses it."""
import pytest
import torch

from mmh_fast.models.pipelines import encode_prompts, tokenize_prompts
from mmh_fast.text import memorization_score, token_attributions
from text_fixtures import MEM, planted, tiny_sd


def _fd_token_gradient_norms(pipe, prompt, kw, h=1e-5):
    """|d A / d e_j| for each prompt token j, by central differences of memorization_score
    with row ids[j] of the encoder's token-embedding table moved by +-h along each axis
    (each token of the prompt occurs once, so the row is that position's input embedding)."""
    ids = tokenize_prompts(pipe, [prompt])[0][0].tolist()
    n = ids.index(pipe.tokenizer.eos_token_id)
    toks = ids[1:n]
    assert len(set(toks)) == len(toks) and pipe.tokenizer.eos_token_id not in toks
    table = pipe.text_encoder.get_input_embeddings().weight
    norms = []
    with torch.no_grad():
        for tid in toks:
            g = torch.zeros(table.shape[1], dtype=torch.float64)
            for d in range(table.shape[1]):
                old = table[tid, d].item()
                table[tid, d] = old + h
                up = float(memorization_score(pipe, prompt, **kw))
                table[tid, d] = old - h
                down = float(memorization_score(pipe, prompt, **kw))
                table[tid, d] = old
                g[d] = (up - down) / (2 * h)
            norms.append(float(g.norm()))
    return torch.tensor(norms, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["cfg", "score"])
def test_token_embedding_attributions_equal_finite_differences_through_the_encoder(metric):
    pipe = tiny_sd(dtype=torch.float64)
    # one evaluated step (t_range keeps step 0 of 5): the attribution is |grad| of that step's term
    kw = dict(metric=metric, num_images=2, num_inference_steps=5, t_range=(0.7, 1.0), seed=3)
    att = token_attributions(pipe, "a red car", wrt="token_embeddings", **kw)
    assert [t for t, _ in att] == ["a", "red", "car"]
    fd = _fd_token_gradient_norms(pipe, "a red car", kw)
    assert float(fd.min()) > 0
    torch.testing.assert_close(torch.tensor([v for _, v in att], dtype=torch.float64), fd / fd.sum(),
                               rtol=1e-4, atol=1e-7)
    # and it is not the default (hidden states at the prompt's positions): a different number
    dflt = torch.tensor([v for _, v in token_attributions(pipe, "a red car", **kw)], dtype=torch.float64)
    assert float((dflt - fd / fd.sum()).abs().max()) > 1e-3


def test_token_embedding_attributions_follow_the_causal_encoder_on_the_planted_model():
    """The planted gate reads only the hidden state at "mona"'s position. Through the
    causal encoder that state depends on "a photo of mona" and not on "lisa" (after
    it): closed-form truth, lisa's input gradient is exactly 0 and the four tokens up
    to the trigger share the attribution (the default, at the output positions, puts
    > 0.99 on "mona": test_text_metrics)."""
    P = planted()
    for metric in ("cfg", "score", "flipd"):
        att = token_attributions(P.pipe, MEM, metric=metric, num_images=2, num_inference_steps=10,
                                 wrt="token_embeddings")
        assert [t for t, _ in att] == ["a", "photo", "of", "mona", "lisa"]
        vals = torch.tensor([v for _, v in att])
        assert float(vals.sum()) == pytest.approx(1.0) and bool((vals >= 0).all())
        assert float(vals[4]) < 1e-12, (metric, att)
        assert float(vals[:4].min()) > 0.05, (metric, att)


def test_wrt_errors_and_the_base_embedding():
    pipe = tiny_sd()
    with pytest.raises(ValueError, match="wrt must be one of"):
        token_attributions(pipe, "a dog", wrt="inputs", num_inference_steps=3)
    with pytest.raises(ValueError, match="wrt must be one of"):
        token_attributions(pipe, "a dog", wrt=None, num_inference_steps=3)
    # the differentiable encode is the library's ordinary one
    from mmh_fast.text.attribution import encode_with_token_embeddings
    from mmh_fast.text._core import text_pipeline
    hidden, leaf = encode_with_token_embeddings(text_pipeline(pipe), "a red car")
    assert leaf.requires_grad and leaf.shape[:2] == hidden.shape[:2]
    torch.testing.assert_close(hidden.detach(), encode_prompts(pipe, "a red car"), rtol=0, atol=0)


def test_token_embedding_attributions_in_float16_agree_with_float32():
    kw = dict(metric="cfg", num_images=1, num_inference_steps=10, max_timesteps=1, wrt="token_embeddings")
    want = token_attributions(tiny_sd(), "a cat painting", **kw)
    try:
        got = token_attributions(tiny_sd(dtype=torch.float16), "a cat painting", **kw)
    except RuntimeError as e:  # pragma: no cover
        pytest.skip(f"float16 not supported on this CPU torch: {e}")
    assert [t for t, _ in got] == [t for t, _ in want]
    # fp16 rounding of the encoder and UNet (the same tolerance as the hidden-state test in test_text_metrics)
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in want]),
                               rtol=0, atol=5e-2)


def test_token_embedding_attributions_of_a_truncated_prompt_warn_and_cover_the_kept_tokens():
    pipe = tiny_sd()
    with pytest.warns(UserWarning, match="truncated"):
        att = token_attributions(pipe, " ".join(["red"] * 30), metric="cfg", num_images=1, num_inference_steps=4,
                                 max_timesteps=1, wrt="token_embeddings")
    assert len(att) == 14  # 16 positions minus BOS and EOS
    assert sum(v for _, v in att) == pytest.approx(1.0)
