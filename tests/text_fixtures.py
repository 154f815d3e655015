"""Shared builders of the text tests: the tiny Stable Diffusion pipeline with a
word-level tokenizer, and the same pipeline with a planted memorized prompt
token (mmh_fast.testing.PlantedMemorizer in place of its UNet)."""
import functools
import warnings
from types import SimpleNamespace

import torch

from mmh_fast.models.pipelines import encode_images, encode_prompts
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


class FaultyUNet(torch.nn.Module):
    """A pipeline's UNet with planted faults, for the error-path tests.

    - rows whose ``encoder_hidden_states`` equal ``poison`` [L, D] (the
      embedding of one prompt) get NaN (``mode="nan"``) or their output times
      ``scale`` (``mode="scale"``);
    - a call on more than ``oom_above`` rows raises ``torch.OutOfMemoryError``
      (as CUDA does), before any work.
    ``calls`` records the batch size of every call that ran.
    """

    def __init__(self, inner, *, poison=None, mode: str = "nan", scale: float = 1e30, oom_above: int | None = None):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.poison = None if poison is None else poison.detach().clone()
        self.mode, self.scale, self.oom_above = mode, float(scale), oom_above
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None, **kw):
        if self.oom_above is not None and sample.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (planted: {sample.shape[0]} rows > {self.oom_above})")
        self.calls.append(int(sample.shape[0]))
        out = self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kw).sample
        if self.poison is not None and encoder_hidden_states is not None:
            p = self.poison.to(encoder_hidden_states.device, encoder_hidden_states.dtype)
            hit = (encoder_hidden_states.detach() == p).flatten(1).all(1)
            if bool(hit.any()):
                m = hit.reshape(-1, *[1] * (out.dim() - 1))
                bad = torch.full_like(out, float("nan")) if self.mode == "nan" else out * self.scale
                out = torch.where(m, bad, out)
        return SimpleNamespace(sample=out)


def faulty_sd(*, poison_prompt: str | None = None, mode: str = "nan", scale: float = 1e30,
              oom_above: int | None = None, dtype=torch.float32):
    """A fresh tiny pipeline with the same weights as :func:`tiny_sd` whose UNet is a
    :class:`FaultyUNet` (poisoning the rows of ``poison_prompt``). Not cached: the
    caller may read ``pipe.unet.calls``."""
    pipe = _quiet(tiny_stable_diffusion_pipeline, image_size=8, merges=word_merges(WORDS))
    if dtype != torch.float32:
        pipe = _quiet(pipe.to, dtype)
    poison = None if poison_prompt is None else encode_prompts(pipe, poison_prompt)[0]
    pipe.unet = FaultyUNet(pipe.unet, poison=poison, mode=mode, scale=scale, oom_above=oom_above)
    return pipe
