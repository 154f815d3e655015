"""mmh_fast.text mitigation: attribution-weighted token perturbation, the
OpenAI-compatible rephraser (fake transport only), prompt-embedding
optimisation, generation and the evaluation table with its offline loaders."""
import json
import math
import warnings

import pytest
import torch

from mmh_fast.models.pipelines import decode_latents, encode_prompts
from mmh_fast.models.sampling import sample_noise
from mmh_fast.text import (BOX1_INSTRUCTION, OpenAIChatRephraser, cfg_norm, evaluate_mitigation, generate,
                           load_clip_score, load_sscd_similarity, memorization_score, mitigate,
                           optimize_prompt_embedding, prompt_tokens)
from mmh_fast.text.mitigation import rewrite
from text_fixtures import MEM, planted, tiny_sd


# ----------------------------------------------------------------------------- mitigate

def test_mitigate_removes_the_planted_trigger_and_the_memorization():
    P = planted()
    new = mitigate(P.pipe, MEM, k=1, n=4, attribution_kwargs={"num_images": 2})
    assert new == ["A photo of Lisa"] * 4  # "mona" carries ~all the attribution: P(drawn) ~ 1 - 4 e^-10
    scores = cfg_norm(P.pipe, [MEM] + new, num_images=2)
    assert float(scores[0]) > 0 and bool((scores[1:] == 0).all())
    two = mitigate(P.pipe, MEM, k=2, n=3, metric="cfg", attribution_kwargs={"num_images": 1})
    assert all("Mona" not in p and len(p.split()) == 3 for p in two)


def test_token_draws_follow_the_tempered_softmax_without_replacement():
    pipe = tiny_sd()
    prompt = "a red car by the house"
    att = [("a", 0.1), ("red", 0.4), ("car", 0.3), ("by", 0.0), ("the", 0.05), ("house", 0.15)]
    seen = []

    def record(p, toks):
        seen.append(tuple(toks))
        return p

    T = 0.2
    n = 3000
    mitigate(pipe, prompt, k=1, n=n, temperature=T, rephraser=record, attributions=att, seed=1)
    a = torch.tensor([v for _, v in att], dtype=torch.float64)
    want = torch.softmax(a / T, 0)
    freq = torch.tensor([sum(s == (t,) for s in seen) for t, _ in att], dtype=torch.float64) / n
    se = (want * (1 - want) / n).sqrt()
    assert bool(((freq - want).abs() <= 4 * se + 1e-12).all()), (freq, want)
    seen.clear()
    mitigate(pipe, prompt, k=3, n=200, temperature=T, rephraser=record, attributions=att, seed=1)
    order = [t for t, _ in att]
    assert all(len(set(s)) == 3 and list(s) == sorted(s, key=order.index) for s in seen)  # distinct, prompt order
    seen.clear()
    mitigate(pipe, prompt, k=6, n=3, rephraser=record, attributions=att)
    assert seen == [tuple(order)] * 3
    # seeded
    r1 = mitigate(pipe, prompt, k=2, n=6, attributions=att, seed=5)
    assert r1 == mitigate(pipe, prompt, k=2, n=6, attributions=att, seed=5)
    assert r1 != mitigate(pipe, prompt, k=2, n=6, attributions=att, seed=6)


def test_drop_edits_the_original_text_or_its_tokens():
    pipe = tiny_sd()
    prompt = "A Photo of Mona-Lisa,  by  X!"
    pt = prompt_tokens(pipe, prompt)
    assert pt.text == ["a", "photo", "of", "mona", "-", "lisa", ",", "by", "x", "!"]
    assert pt.spans is not None and pt.spans[3] == (11, 15)
    i = pt.text.index("mona")
    assert rewrite(pt, {i: ""}) == "A Photo of -Lisa, by X!"
    assert rewrite(pt, {i: "Gioconda", 1: ""}) == "A of Gioconda -Lisa, by X!"
    slow = type(pt)(pt.prompt, pt.positions, pt.raw, pt.text, None)  # a tokenizer without offsets
    assert rewrite(slow, {i: ""}) == "a photo of - lisa , by x !"
    assert rewrite(slow, {i: "gioconda"}) == "a photo of gioconda - lisa , by x !"
    att = [(t, 1.0 if t == "mona" else 0.0) for t in pt.text]
    assert mitigate(pipe, prompt, k=1, n=2, attributions=att) == ["A Photo of -Lisa, by X!"] * 2


def test_mitigate_bad_inputs():
    pipe = tiny_sd()
    att = [("a", 0.5), ("dog", 0.5)]
    with pytest.raises(ValueError, match=r"k = 3 exceeds the prompt's 2 token"):
        mitigate(pipe, "a dog", k=3, attributions=att)
    with pytest.raises(ValueError, match="k must be >= 1"):
        mitigate(pipe, "a dog", k=0, attributions=att)
    with pytest.raises(ValueError, match="temperature"):
        mitigate(pipe, "a dog", k=1, temperature=0, attributions=att)
    with pytest.raises(ValueError, match="rephraser must be one of"):
        mitigate(pipe, "a dog", k=1, rephraser="gpt", attributions=att)
    with pytest.raises(TypeError, match="returned int"):
        mitigate(pipe, "a dog", k=1, rephraser=lambda p, t: 3, attributions=att)
    with pytest.raises(ValueError, match="attributions are for tokens"):
        mitigate(pipe, "a dog", k=1, attributions=[("a", 1.0)])
    with pytest.raises(ValueError, match="no tokens"):
        mitigate(pipe, "", k=1, attributions=[])
    with pytest.raises(TypeError, match="prompt must be a string"):
        mitigate(pipe, ["a dog"], k=1)


@pytest.mark.parametrize("kind", ["random_token", "caption_word", "random_number"])
def test_somepalli_rephrasers_replace_the_drawn_tokens(kind):
    pytest.importorskip("mmh_fast.mitigations")
    pipe = tiny_sd()
    prompt = "a red car by the house"
    att = [(t, 1.0 if t == "car" else 0.0) for t in prompt.split()]
    out = mitigate(pipe, prompt, k=1, n=4, rephraser=kind, attributions=att, seed=2)
    assert out == mitigate(pipe, prompt, k=1, n=4, rephraser=kind, attributions=att, seed=2)
    for new in out:
        words = new.split()
        assert len(words) == 6 and words[:2] == ["a", "red"] and words[3:] == ["by", "the", "house"]
        if kind == "random_number":
            assert words[2].isdigit()
        elif kind == "caption_word":
            assert words[2] in prompt.split()
        else:
            assert words[2].isalpha()


# ----------------------------------------------------------------------------- the chat rephraser

class _FakeTransport:
    def __init__(self, reply):
        self.reply, self.calls = reply, []

    def __call__(self, url, headers, body, timeout):
        self.calls.append((url, headers, json.loads(body.decode("utf-8")), timeout))
        return json.dumps(self.reply).encode("utf-8")


def test_openai_rephraser_builds_the_box1_request(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:9/v1/")
    fake = _FakeTransport({"choices": [{"message": {"role": "assistant", "content": ' "Talks on Buddhist morals" '}}]})
    pipe = tiny_sd()
    r = OpenAIChatRephraser(model="gpt-4o", tokenizer=pipe.tokenizer, temperature=0.7, transport=fake, timeout=5)
    out = r("a photo of the house", ["the", "house"])
    assert out == "Talks on Buddhist morals"
    url, headers, body, timeout = fake.calls[0]
    assert url == "http://localhost:9/v1/chat/completions" and timeout == 5
    assert headers["Authorization"] == "Bearer sk-test" and headers["Content-Type"] == "application/json"
    assert body["model"] == "gpt-4o" and body["temperature"] == 0.7
    msg = body["messages"][0]
    assert msg["role"] == "user"
    orig = prompt_tokens(pipe, "a photo of the house").text
    assert orig == ["a", "photo", "of", "the", "house"]
    assert msg["content"] == BOX1_INSTRUCTION.format(original_tokens=json.dumps(orig),
                                                     selected_tokens=json.dumps(["the", "house"]))
    assert "perturb the following tokens: [\"the\", \"house\"]" in msg["content"]
    assert "should not be replaced" in msg["content"]
    # as mitigate's rephraser
    att = [("a", 0.0), ("dog", 1.0)]
    assert mitigate(pipe, "a dog", k=1, n=2, rephraser=r, attributions=att) == ["Talks on Buddhist morals"] * 2
    assert fake.calls[-1][2]["messages"][0]["content"].count('["dog"]') == 1
    # whitespace words without a tokenizer; server-default temperature
    r2 = OpenAIChatRephraser(transport=fake)
    r2("Hello big world", ["big"])
    assert '["Hello", "big", "world"]' in fake.calls[-1][2]["messages"][0]["content"]
    assert "temperature" not in fake.calls[-1][2]


def test_openai_rephraser_errors(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIChatRephraser(transport=_FakeTransport({}))("a dog", ["dog"])
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    fake = _FakeTransport({"error": "quota"})
    with pytest.raises(RuntimeError, match="unexpected reply"):
        OpenAIChatRephraser(transport=fake)("a dog", ["dog"])
    assert fake.calls[0][0] == "https://api.openai.com/v1/chat/completions"


# ----------------------------------------------------------------------------- embedding optimisation

def test_optimize_prompt_embedding_lowers_acfg_and_raises_aflipd_on_the_planted_model():
    P = planted()
    base = encode_prompts(P.pipe, MEM)
    emb, hist = optimize_prompt_embedding(P.pipe, MEM, metric="cfg", iters=3, num_images=2, return_history=True)
    assert emb.shape == base.shape and emb.dtype == base.dtype and not emb.requires_grad
    torch.testing.assert_close(emb[:, 0], base[:, 0], rtol=0, atol=0)  # BOS frozen
    assert hist[0] > 1 and hist[-1] < 1e-3 * hist[0] and len(hist) == 4
    again = memorization_score(P.pipe, emb[0], metric="cfg", num_images=2)
    assert float(again) == pytest.approx(hist[-1], abs=1e-9)  # the last entry belongs to the embedding
    emb2, hist2 = optimize_prompt_embedding(P.pipe, MEM, metric="flipd", iters=2, num_images=2, return_history=True)
    assert hist2[0] < 0 < 0.5 * P.model.dim < hist2[-1]
    # early stop at the target: the first value past it ends the run
    _, h3 = optimize_prompt_embedding(P.pipe, MEM, metric="cfg", iters=10, target=0.5 * hist[0], num_images=2,
                                      return_history=True)
    assert len(h3) == 2 and h3[-1] <= 0.5 * hist[0]
    e0, h0 = optimize_prompt_embedding(P.pipe, MEM, iters=0, num_images=2, return_history=True)
    torch.testing.assert_close(e0, base) and len(h0) == 1


def test_optimize_prompt_embedding_descends_on_the_unet():
    pipe = tiny_sd()
    kw = dict(metric="cfg", num_images=1, num_inference_steps=5, t_range=(0.7, 1.0), lr=0.05)
    _, hist = optimize_prompt_embedding(pipe, "a red car", iters=4, return_history=True, **kw)
    assert hist[-1] < hist[0] and all(math.isfinite(h) for h in hist)
    with pytest.raises(ValueError, match="lr"):
        optimize_prompt_embedding(pipe, "a red car", lr=-1)
    with pytest.raises(ValueError, match="one prompt"):
        optimize_prompt_embedding(pipe, ["a", "b"])
    with pytest.raises(ValueError, match="metric"):
        optimize_prompt_embedding(pipe, "a", metric="nb")


# ----------------------------------------------------------------------------- generation and evaluation

def test_generate_is_the_pipelines_sampler():
    pipe = tiny_sd()
    imgs = generate(pipe, ["a red car", "a dog"], num_images=2, num_inference_steps=4, seed=3)
    assert imgs.shape == (4, 3, 8, 8) and imgs.dtype == torch.float32 and float(imgs.abs().max()) <= 1
    lat = generate(pipe, "a dog", num_images=2, num_inference_steps=4, seed=3, output="latents")
    torch.testing.assert_close(decode_latents(pipe, lat), imgs[2:])
    x = sample_noise((2, 4, 4, 4), seed=3)
    with torch.no_grad():
        ref = pipe(["a dog"] * 2, num_inference_steps=4, guidance_scale=7.5, latents=x, output_type="latent").images
    torch.testing.assert_close(lat, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="output"):
        generate(pipe, "a dog", output="pil")


def test_evaluate_mitigation_table():
    # float64: the `alone` run below samples in other batch compositions, and float32 convolutions
    # differ by ~1e-6 relative between batch sizes (measured: 1.6e-6 on these rows)
    pipe = tiny_sd(dtype=torch.float64)
    prompts = ["a red car", "a dog"]
    new = [["a car", "red car"], "a cat"]

    def sim(images, refs):  # negative distance: 0 for identical images
        return -(images - refs).flatten(1).norm(dim=1)

    def clip(images, texts):
        return [float(len(t)) for t in texts]

    kw = dict(num_images=2, num_inference_steps=3, seed=1)
    rows = evaluate_mitigation(pipe, prompts, new, similarity=sim, clip_score=clip, **kw)
    assert len(rows) == (3 + 2) * 2
    assert set(rows[0]) == {"prompt_index", "variant", "prompt", "image_index", "similarity", "clip_score"}
    orig = [r for r in rows if r["variant"] == -1]
    assert [r["prompt"] for r in orig] == ["a red car"] * 2 + ["a dog"] * 2
    assert all(r["similarity"] == pytest.approx(0.0, abs=1e-6) for r in orig)  # references = the originals' samples
    assert all(r["similarity"] < 0 for r in rows if r["variant"] >= 0)
    assert [r["clip_score"] for r in rows if r["prompt_index"] == 1] == [len("a dog")] * 4  # against the original
    assert [(r["prompt_index"], r["variant"], r["image_index"]) for r in rows[:6]] == [
        (0, -1, 0), (0, -1, 1), (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    alone = evaluate_mitigation(pipe, prompts, new, similarity=sim, include_original=False, **kw)
    assert [r["similarity"] for r in alone] == pytest.approx([r["similarity"] for r in rows if r["variant"] >= 0])
    # explicit references: each image is compared with its own prompt's reference
    refs = torch.stack([torch.full((3, 8, 8), -0.5), torch.full((3, 8, 8), 0.5)])
    rows = evaluate_mitigation(pipe, prompts, new, similarity=lambda i, r: r.flatten(1).mean(1), references=refs,
                               include_original=False, clip_score=clip, clip_against="new", **kw)
    assert [r["similarity"] for r in rows] == pytest.approx([-0.5] * 4 + [0.5] * 2)
    assert [r["clip_score"] for r in rows] == [5.0] * 2 + [7.0] * 2 + [5.0] * 2  # against the new prompts
    with pytest.raises(ValueError, match="one entry"):
        evaluate_mitigation(pipe, prompts, ["x"], similarity=sim)
    with pytest.raises(ValueError, match="references"):
        evaluate_mitigation(pipe, prompts, new, similarity=sim, references=refs[:1], **kw)
    with pytest.raises(ValueError, match="returned 1 scores"):
        evaluate_mitigation(pipe, ["a dog"], ["a cat"], similarity=lambda i, r: [0.0], references=refs[:1],
                            num_inference_steps=1)
    with pytest.raises(ValueError, match="prompts is empty"):
        evaluate_mitigation(pipe, [], [], similarity=sim)


class _TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_sscd_loader_on_a_saved_torchscript_model(tmp_path):
    torch.manual_seed(0)
    net = _TinyDescriptor().eval()
    path = tmp_path / "sscd_tiny.torchscript.pt"
    torch.jit.script(net).save(str(path))
    sim = load_sscd_similarity(path, size=32, device="cpu")
    x = torch.rand(3, 3, 8, 12, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.rand(3, 3, 8, 12, generator=torch.Generator().manual_seed(2)) * 2 - 1
    s = sim(x, y)
    assert s.shape == (3,) and bool((s.abs() <= 1 + 1e-6).all())
    torch.testing.assert_close(sim(x, x), torch.ones(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(sim(y, x), s)
    # by hand: [0, 1], short side to 32 (bicubic, antialiased), ImageNet normalisation, cosine
    def prep(z):
        z = torch.nn.functional.interpolate((z + 1) / 2, size=(32, 48), mode="bicubic", antialias=True).clamp(0, 1)
        m = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        return (z - m) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        want = torch.nn.functional.cosine_similarity(net(prep(x)), net(prep(y)), dim=1)
    torch.testing.assert_close(s, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError):
        load_sscd_similarity(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="TorchScript"):
        load_sscd_similarity(bad)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        sim(x * 3, y)


def _tiny_clip_dir(path, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id),
                     vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    model = CLIPModel(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path))
        tokenizer.save_pretrained(str(path))
    return model


def test_clip_score_loader_on_a_saved_tiny_clip(tmp_path):
    pipe = tiny_sd()
    model = _tiny_clip_dir(tmp_path / "clip", pipe.tokenizer)
    score = load_clip_score(tmp_path / "clip", device="cpu")
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    texts = ["a red car", "a dog", "the blue sky"]
    got = score(x, texts)
    assert got.shape == (3,) and bool((got >= 0).all() & (got <= 100).all())
    pix = torch.nn.functional.interpolate((x + 1) / 2, size=(16, 16), mode="bicubic", antialias=True).clamp(0, 1)
    m = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    sd = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    enc = pipe.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=(pix - m) / sd)
    want = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=1).clamp_min(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FileNotFoundError):
        load_clip_score(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="CLIP"):
        load_clip_score(tmp_path / "empty")
    with pytest.raises(ValueError, match="texts"):
        score(x, texts[:2])
    # end to end with the pipeline and both loaders
    torch.jit.script(_TinyDescriptor().eval()).save(str(tmp_path / "d.pt"))
    rows = evaluate_mitigation(pipe, ["a red car"], [["a car"]], similarity=load_sscd_similarity(tmp_path / "d.pt",
                               size=16), clip_score=score, num_inference_steps=2)
    assert len(rows) == 2 and rows[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert all(0 <= r["clip_score"] <= 100 for r in rows)
