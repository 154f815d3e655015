"""The lab's data: scikit-learn's 8x8 digits upscaled, captions from labels
and a small vocabulary, and the planted memorization.

Kinds of training image (column ``kind``):

- ``"generic"``: one copy in the dataset, seen at the base rate; its caption
  ``"<template> <style> <digit>"`` is shared by tens of images, so the model
  should generalize on it.
- ``"dd"`` (DD-Mem, duplication): ``dd_copies`` copies in the dataset, all with
  one unique caption that ends in a rare made-up word (the analogue of LAION's
  duplicated "The Great Wave off Kanagawa").
- ``"od"`` (OD-Mem, overfitting): one copy in the dataset, a unique caption
  with its own rare word, but oversampled ``od_boost`` times in the training
  stream.

The rare word of a planted caption appears in no other caption: it is that
prompt's trigger token, the ground truth for token attribution. Held-out
prompts reuse the generic words in templates never trained on.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLE_WORDS = ("thin", "plain", "bold")  # ink terciles: the style word describes the image
TRAIN_TEMPLATES = ("a {s} {d}", "a drawing of a {s} {d}")
# held-out templates reuse the training words only, so no untrained token enters a held-out prompt
HELDOUT_TEMPLATES = ("{s} {d}", "a {d} {s}", "a {s} {d} drawing", "drawing {s} {d}", "of a {s} {d}", "{d} a {s}",
                     "drawing of a {s} {d}", "a {d} drawing {s}")
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class LabData:
    """Everything about the training set and the prompts, as plain columns.

    images: [N, 3, H, W] float32 in [-1, 1], one row per *distinct* image
    (a DD-Mem image once; its ``dataset_count`` says how often it is in the
    dataset). ``keys[i]`` names image i; ``captions[i]`` is its caption.
    """

    images: np.ndarray
    keys: list
    captions: list
    kinds: list
    digits: np.ndarray
    dataset_count: np.ndarray
    stream_weight: np.ndarray
    prompts: list = field(default_factory=list)  # dicts: prompt, kind, train_keys, trigger, split, digit
    words: list = field(default_factory=list)  # the tokenizer's words, in merge order


def rare_words(n: int, rng: np.random.Generator, exclude: set) -> list[str]:
    """n distinct made-up lowercase words of three consonant-vowel syllables
    (none in ``exclude``): tokens that no generic caption contains."""
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(3))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def write_tokenizer(directory: str, words, max_length: int):
    """A CLIPTokenizer in ``directory`` whose vocabulary makes each of ``words``
    one token (byte-level BPE with one merge chain per word); returns the
    tokenizer and the words that are not one token (merge chains can collide)."""
    from transformers import CLIPTokenizer

    from ..testing import word_merges, write_tiny_clip_tokenizer

    words = list(words)
    write_tiny_clip_tokenizer(directory, merges=tuple(word_merges(words)))
    tok = CLIPTokenizer.from_pretrained(directory, model_max_length=max_length)
    bad = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
    return tok, bad


def single_token_rare_words(n: int, rng: np.random.Generator, base_words: list[str]) -> list[str]:
    """:func:`rare_words`, redrawing any word whose BPE merge chain collides with
    another's (the word would not be one token)."""
    import tempfile

    rares = rare_words(n, rng, set(base_words))
    for _ in range(50):
        with tempfile.TemporaryDirectory(prefix="mmh_lab_tok_") as tdir:
            _, bad = write_tokenizer(tdir, base_words + rares, 16)
        if not bad:
            return rares
        if set(bad) & set(base_words):
            raise RuntimeError(f"lab vocabulary: the caption words {sorted(set(bad) & set(base_words))} are not "
                               "single tokens")
        keep = [w for w in rares if w not in bad]
        rares = keep + rare_words(n - len(keep), rng, set(base_words) | set(rares))
    raise RuntimeError("lab vocabulary: could not draw rare words that are single tokens")


def upscale(x8: np.ndarray, image_size: int) -> np.ndarray:
    """[N, 8, 8] digits in 0..16 -> [N, 3, S, S] float32 in [-1, 1] by pixel
    repetition (S a multiple of 8; gray replicated to RGB)."""
    if image_size % 8:
        raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
    r = image_size // 8
    x = np.kron(x8.astype(np.float32) / 16.0, np.ones((r, r), np.float32)) * 2 - 1
    return np.repeat(x[:, None], 3, axis=1)


def make_data(*, n_dd: int, dd_copies: int, n_od: int, od_boost: float, n_generic: int | None, image_size: int,
              seed: int) -> LabData:
    """Draw the planted images, build captions and prompts (deterministic in ``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x8, y = d.images, d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_gen = len(y) - n_dd - n_od if n_generic is None else int(n_generic)
    if n_dd + n_od + n_gen > len(y):
        raise ValueError(f"n_dd + n_od + n_generic must be at most {len(y)}, got {n_dd + n_od + n_gen}")
    ink = x8.reshape(len(y), -1).sum(1)
    cuts = np.quantile(ink, [1 / 3, 2 / 3])
    style = np.digitize(ink, cuts)
    idx = order[: n_dd + n_od + n_gen]
    vocab = set(DIGIT_WORDS) | set(STYLE_WORDS) | {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES
                                                   for w in t.split() if "{" not in w}
    rares = single_token_rare_words(n_dd + n_od, rng, sorted(vocab))
    keys, caps, kinds, counts, weights = [], [], [], [], []
    prompts = []
    for j, i in enumerate(idx):
        s, dg = STYLE_WORDS[style[i]], DIGIT_WORDS[y[i]]
        key = f"digit{i:04d}"
        if j < n_dd + n_od:
            kind = "dd" if j < n_dd else "od"
            cap = f"a {s} {dg} {rares[j]}"
            counts.append(dd_copies if kind == "dd" else 1)
            weights.append(float(dd_copies) if kind == "dd" else float(od_boost))
            prompts.append(dict(prompt=cap, kind=kind, train_keys=[key], trigger=rares[j], split="train",
                                digit=int(y[i])))
        else:
            kind = "generic"
            cap = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))].format(s=s, d=dg)
            counts.append(1)
            weights.append(1.0)
        keys.append(key)
        caps.append(cap)
        kinds.append(kind)
    by_cap: dict[str, list] = {}
    for k, c, kd in zip(keys, caps, kinds):
        if kd == "generic":
            by_cap.setdefault(c, []).append(k)
    for c in sorted(by_cap):
        dg = next(n for n, w in enumerate(DIGIT_WORDS) if w in c.split())
        prompts.append(dict(prompt=c, kind="generic", train_keys=by_cap[c], trigger=None, split="train", digit=dg))
    for t in HELDOUT_TEMPLATES:
        for dg, w in enumerate(DIGIT_WORDS):
            for s in STYLE_WORDS:
                prompts.append(dict(prompt=t.format(s=s, d=w), kind="heldout", train_keys=[], trigger=None,
                                    split="heldout", digit=dg))
    return LabData(images=upscale(x8[idx], image_size), keys=keys, captions=caps, kinds=kinds, digits=y[idx],
                   dataset_count=np.asarray(counts, np.int64), stream_weight=np.asarray(weights, np.float64),
                   prompts=prompts, words=sorted(vocab) + rares)


def vocabulary(data: LabData) -> list[str]:
    """The words the tokenizer makes single tokens (in the order their merge
    chains were checked: BPE merge ranks depend on it); every caption and
    prompt word is among them."""
    used = {w for c in data.captions for w in c.split()} | {w for p in data.prompts for w in p["prompt"].split()}
    missing = used - set(data.words)
    if missing:
        raise RuntimeError(f"lab vocabulary lacks {sorted(missing)}")
    return list(data.words)


def png_bytes(image: np.ndarray) -> bytes:
    """[3, H, W] in [-1, 1] -> 8-bit grayscale PNG bytes (the digits are gray)."""
    from PIL import Image

    a = np.clip(np.round((image[0] + 1) * 127.5), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()
