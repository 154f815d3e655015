"""Shared builders of the text tests: the tiny Stable Diffusion pipeline with a
word-level tokenizer, and the same pipeline with a planted memorized prompt
token (mmh_fast.testing.PlantedMemorizer in place of its UNet)."""
import functools
import warnings
from types import SimpleNamespace

import torch

from mmh_fast.models.pipelines import encode_images
from mmh_fast.testing import PlantedMemorizer, tiny_stable_diffusion_pipeline, word_merges

WORDS = ["photo", "of", "zebra", "mona", "lisa", "painting", "cat", "dog", "red", "car", "the", "blue", "sky",
         "house", "by", "old", "man"]
MEM = "A photo of Mona Lisa"  # memorized; its token "mona" is the trigger
TRIGGER = "mona"
OTHERS = ["a photo of a zebra", "a red car", "the blue sky", "a dog", "a cat painting", "the house of lisa",
          "a photo of lisa", "an old man"]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@functools.lru_cache(maxsize=None)
def tiny_sd(image_size: int = 8, dtype=torch.float32):
    """The tiny pipeline (random UNet), words of WORDS as single tokens. Shared: do not mutate."""
    pipe = _quiet(tiny_stable_diffusion_pipeline, image_size=image_size, merges=word_merges(WORDS))
    return pipe if dtype == torch.float32 else _quiet(pipe.to, dtype)


@functools.lru_cache(maxsize=None)
def planted(image_size: int = 16):
    """A tiny pipeline whose UNet is a PlantedMemorizer of one image for MEM's token "mona"."""
    pipe = _quiet(tiny_stable_diffusion_pipeline, image_size=image_size, merges=word_merges(WORDS))
    img = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(123)) * 2 - 1
    z = encode_images(pipe, img)[0]
    model = PlantedMemorizer.calibrate(pipe, MEM, TRIGGER, z, reference_prompts=OTHERS)
    pipe.unet = model
    others = torch.rand(len(OTHERS), 3, image_size, image_size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    return SimpleNamespace(pipe=pipe, image=img, latent=z, model=model, other_images=others)
