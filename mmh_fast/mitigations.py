"""Inference-time memorization mitigations of Somepalli et al. (2023,
"Understanding and mitigating copying in diffusion models"), as seeded
prompt / embedding transforms usable with any pipeline call.

- GNI, :class:`GaussianNoiseInjection`: e -> e + lambda * N(0, I) on the
  prompt embeddings (the text encoder's output hidden states, or any
  conditioning embedding such as a class embedding).
- RT, :class:`RandomTokenAddition`: insert random vocabulary tokens at random
  word positions of the prompt.
- CWR, :class:`CaptionWordRepeat`: insert copies of randomly chosen words of
  the caption at random word positions.
- RNA, :class:`RandomNumberAddition`: insert random integers at random word
  positions.

Randomness is keyed by ``(seed, sample_id)`` only (a keyed BLAKE2b hash seeds
a private generator per sample), so a sample's perturbation is the same
whatever batch it is in, in every process and on every platform. Pass the
same ``sample_ids`` that identify the samples elsewhere (e.g. their position
in the evaluation set; :func:`mmh_fast.solidmark.evaluate` passes the global
index of each image).

Default strengths are this library's choices (GNI 0.1 as in the source
paper's default; one inserted item for the three prompt transforms); the
SolidMark paper found GNI only helps at much larger scales than the default.
This module sits below :mod:`mmh_fast.solidmark` and :mod:`mmh_fast.text` so
both reuse it; it depends only on torch.
"""
from __future__ import annotations

import numbers
import random
import string
from typing import Iterable, Sequence

import torch

from ._hashing import sample_seed

__all__ = [
    "GaussianNoiseInjection",
    "RandomTokenAddition",
    "CaptionWordRepeat",
    "RandomNumberAddition",
    "PromptTransform",
]


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _ids(sample_ids, n: int) -> list:
    if sample_ids is None:
        return list(range(n))
    if isinstance(sample_ids, (str, bytes)) or not hasattr(sample_ids, "__len__"):
        raise TypeError(f"sample_ids must be a sequence of ids (one per sample), got {type(sample_ids).__name__}")
    ids = [int(i) if isinstance(i, torch.Tensor) else i for i in sample_ids]
    if len(ids) != n:
        raise ValueError(f"sample_ids must have one entry per sample: got {len(ids)} for {n} samples")
    return ids


class GaussianNoiseInjection:
    """GNI: add ``scale * N(0, I)`` to conditioning embeddings.

    Args:
        scale: lambda >= 0, the noise standard deviation in embedding units.
        seed: integer seed; the noise of a sample depends on (seed, sample id) only.
        skip_first_token: leave position 0 (CLIP's BOS token, identical for
            all prompts) unperturbed for [B, L, E] embeddings.

    Call as ``gni(embeds, sample_ids=None)`` with embeds [B, ...] (any float
    dtype and device; the noise is drawn on the CPU in float32 and moved, so
    results do not depend on the device). Returns a new tensor.
    """

    def __init__(self, scale: float = 0.1, *, seed: int = 0, skip_first_token: bool = False):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a number >= 0, got {scale!r}")
        scale = float(scale)
        if not scale >= 0 or scale == float("inf"):
            raise ValueError(f"scale must be a finite number >= 0, got {scale}")
        self.scale, self.seed, self.skip_first_token = scale, _check_seed(seed), bool(skip_first_token)

    def noise(self, shape: Sequence[int], sample_ids=None) -> torch.Tensor:
        """The standard normal draws [B, *shape[1:]] (before scaling)."""
        ids = _ids(sample_ids, int(shape[0]))
        out = torch.empty(tuple(shape), dtype=torch.float32)
        for row, sid in enumerate(ids):
            g = torch.Generator().manual_seed(sample_seed(self.seed, sid, "gni"))
            out[row] = torch.randn(tuple(shape[1:]), generator=g)
        return out

    def __call__(self, embeds: torch.Tensor, sample_ids=None) -> torch.Tensor:
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.dim() < 1:
            raise TypeError("embeds must be a floating-point torch.Tensor [B, ...]")
        if self.scale == 0:
            return embeds.clone()
        z = self.noise(embeds.shape, sample_ids).to(device=embeds.device, dtype=embeds.dtype)
        if self.skip_first_token and embeds.dim() >= 3:
            z[:, 0] = 0
        return embeds + self.scale * z

    def __repr__(self):
        return f"GaussianNoiseInjection(scale={self.scale}, seed={self.seed})"


class PromptTransform:
    """Base of the prompt transforms: ``t(prompt, sample_id=0) -> str`` and
    ``t.apply(prompts, sample_ids=None) -> list[str]``. Subclasses implement
    :meth:`insertions` (the words to insert); positions are drawn uniformly
    among the len(words) + 1 gaps between words, one at a time."""

    stream = "prompt"

    def __init__(self, n: int = 1, *, seed: int = 0):
        self.n = _check_count(n, "n")
        self.seed = _check_seed(seed)

    def insertions(self, words: list[str], rng: random.Random) -> list[str]:
        raise NotImplementedError

    def __call__(self, prompt: str, sample_id=0) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        rng = random.Random(sample_seed(self.seed, sample_id, self.stream))
        words = prompt.split()
        for item in self.insertions(words, rng):
            words.insert(rng.randrange(len(words) + 1), item)
        return " ".join(words)

    def apply(self, prompts: Iterable[str], sample_ids=None) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [self(p, i) for p, i in zip(prompts, _ids(sample_ids, len(prompts)))]

    def __repr__(self):
        return f"{type(self).__name__}(n={self.n}, seed={self.seed})"


class RandomTokenAddition(PromptTransform):
    """RT: insert ``n`` random tokens at random positions.

    Tokens are drawn uniformly from ``vocabulary`` (a sequence of strings), or
    from a Hugging Face ``tokenizer``'s vocabulary (special tokens dropped,
    CLIP's end-of-word marker ``</w>`` stripped, non-alphabetic tokens dropped),
    or, when neither is given, are random lowercase strings of 3-8 letters.
    """

    stream = "rt"

    def __init__(self, n: int = 1, *, seed: int = 0, tokenizer=None, vocabulary: Sequence[str] | None = None):
        super().__init__(n, seed=seed)
        if vocabulary is None and tokenizer is not None:
            special = set(getattr(tokenizer, "all_special_tokens", []) or [])
            vocab = []
            for tok in sorted(tokenizer.get_vocab()):
                if tok in special:
                    continue
                word = tok[:-4] if tok.endswith("</w>") else tok
                if word.isalpha():
                    vocab.append(word)
            vocabulary = sorted(set(vocab))
        if vocabulary is not None:
            vocabulary = [str(v) for v in vocabulary]
            if not vocabulary:
                raise ValueError("vocabulary is empty")
        self.vocabulary = vocabulary

    def insertions(self, words, rng):
        if self.vocabulary is not None:
            return [self.vocabulary[rng.randrange(len(self.vocabulary))] for _ in range(self.n)]
        return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
                for _ in range(self.n)]


class CaptionWordRepeat(PromptTransform):
    """CWR: insert copies of ``n`` words drawn (with replacement) from the
    caption itself at random positions. An empty caption is left empty."""

    stream = "cwr"

    def insertions(self, words, rng):
        if not words:
            return []
        return [words[rng.randrange(len(words))] for _ in range(self.n)]


class RandomNumberAddition(PromptTransform):
    """RNA: insert ``n`` random integers drawn uniformly from [0, high) at
    random positions."""

    stream = "rna"

    def __init__(self, n: int = 1, *, seed: int = 0, high: int = 10**6):
        super().__init__(n, seed=seed)
        if isinstance(high, bool) or not isinstance(high, int) or high < 1:
            raise ValueError(f"high must be a positive integer, got {high!r}")
        self.high = high

    def insertions(self, words, rng):
        return [str(rng.randrange(self.high)) for _ in range(self.n)]
