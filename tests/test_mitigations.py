"""Inference-time mitigations (GNI, RT, CWR, RNA): seeded, batch-invariant,
and doing exactly what they state."""
import numpy as np
import pytest
import torch
from scipy import stats

from mmh_fast.mitigations import (CaptionWordRepeat, GaussianNoiseInjection, RandomNumberAddition,
                                  RandomTokenAddition)


def _is_subsequence(short, long):
    it = iter(long)
    return all(w in it for w in short)


def test_gni_noise_scale_and_batch_invariance():
    e = torch.randn(6, 77, 32)
    gni = GaussianNoiseInjection(0.3, seed=2)
    out = gni(e, sample_ids=[10, 11, 12, 13, 14, 15])
    z = ((out - e) / 0.3).reshape(-1).double()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3  # N(0, lambda^2) added
    # a sample's noise depends on (seed, id) only, not on its batch
    part = gni(e[3:5], sample_ids=[13, 14])
    torch.testing.assert_close(part, out[3:5], rtol=0, atol=0)
    assert not torch.equal(GaussianNoiseInjection(0.3, seed=3)(e, sample_ids=range(10, 16)), out)
    assert torch.equal(GaussianNoiseInjection(0.0)(e), e)
    first = GaussianNoiseInjection(1.0, skip_first_token=True)(e)
    assert torch.equal(first[:, 0], e[:, 0]) and not torch.equal(first[:, 1], e[:, 1])
    assert gni(e.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="scale"):
        GaussianNoiseInjection(-1.0)
    with pytest.raises(ValueError, match="one entry per sample"):
        gni(e, sample_ids=[1, 2])
    with pytest.raises(TypeError, match="floating-point"):
        gni(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="scale must be a number"):
        GaussianNoiseInjection("0.1")
    with pytest.raises(TypeError, match="seed must be an integer"):
        GaussianNoiseInjection(0.1, seed=1.5)
    with pytest.raises(TypeError, match="seed must be an integer"):
        CaptionWordRepeat(1, seed=True)
    with pytest.raises(TypeError, match="sample_ids must be a sequence"):
        gni(e, sample_ids="abcdef")


def test_prompt_transforms_insert_what_they_say():
    prompt = "a photo of a red fox in the snow"
    words = prompt.split()
    rt = RandomTokenAddition(3, seed=1, vocabulary=["zebra", "quartz", "violet"])
    out = rt(prompt, 7)
    ow = out.split()
    assert len(ow) == len(words) + 3 and _is_subsequence(words, ow)
    extra = list(ow)
    for w in words:
        extra.remove(w)
    assert set(extra) <= {"zebra", "quartz", "violet"}
    assert rt(prompt, 7) == out and rt(prompt, 8) != out  # seeded per sample id
    assert rt.apply([prompt, prompt], [7, 8]) == [out, rt(prompt, 8)]

    cwr = CaptionWordRepeat(2, seed=0)(prompt, 1).split()
    assert len(cwr) == len(words) + 2 and _is_subsequence(words, cwr)
    assert all(w in words for w in cwr)
    assert CaptionWordRepeat(2)("", 0) == ""

    rna = RandomNumberAddition(2, seed=0, high=100)(prompt, 3).split()
    nums = [w for w in rna if w.isdigit()]
    assert len(nums) == 2 and all(0 <= int(n) < 100 for n in nums) and _is_subsequence(words, rna)

    plain = RandomTokenAddition(4, seed=0)(prompt, 0).split()  # random letter strings
    assert len(plain) == len(words) + 4


def test_random_tokens_from_a_tokenizer_vocabulary():
    class Tok:
        all_special_tokens = ["<|startoftext|>", "<|endoftext|>"]

        def get_vocab(self):
            return {"<|startoftext|>": 0, "<|endoftext|>": 1, "cat</w>": 2, "dog</w>": 3, "12</w>": 4, "!": 5}

    rt = RandomTokenAddition(50, seed=0, tokenizer=Tok())
    assert rt.vocabulary == ["cat", "dog"]
    ins = rt("x", 0).split()
    ins.remove("x")
    assert set(ins) == {"cat", "dog"}
    with pytest.raises(ValueError, match="non-negative"):
        RandomTokenAddition(-1)
    with pytest.raises(ValueError, match="empty"):
        RandomTokenAddition(1, vocabulary=[])
    with pytest.raises(TypeError, match="str"):
        CaptionWordRepeat()(3)


def test_insert_positions_are_uniform():
    counts = np.zeros(4)
    t = RandomNumberAddition(1, seed=0, high=10)
    for i in range(4000):
        words = t("a b c", i).split()
        pos = [j for j, w in enumerate(words) if w.isdigit()][0]
        counts[pos] += 1
    assert stats.chisquare(counts).pvalue > 1e-3
