""":class:`PixelMLP`: the small MLP denoiser as a diffusers model.

``mmh-fast train --arch mlp`` saves a ``DDPMPipeline`` whose ``unet`` is a
:class:`PixelMLP`; ``DiffusionPipeline.from_pretrained`` (and so ``mmh-fast
scan --model DIR``) loads it back by importing this module, whose name the
pipeline's ``model_index.json`` records. diffusers finds the loading method by
looking up ``ModelMixin`` in the component's module, which is why it is
imported here at module level (and why this is not in ``training``, which
must not import diffusers when ``mmh_fast`` is imported).
"""
from __future__ import annotations

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .training import MLPDenoiser

__all__ = ["PixelMLP", "ModelMixin"]


class PixelMLP(ModelMixin, ConfigMixin):
    """:class:`~mmh_fast.models.training.MLPDenoiser` on ``in_channels`` x ``sample_size`` x
    ``sample_size`` images, with the diffusers UNet call ``forward(sample [B, C, H, W], timestep)``
    -> ``.sample`` (eps, same shape).

    Far cheaper per training step than a UNet on small images (8 x 8 digits train
    to memorization in about a minute on a CPU) but without a convolutional prior:
    for images of 32 px and more use :func:`~mmh_fast.models.training.small_unet`.
    """

    @register_to_config
    def __init__(self, sample_size: int = 8, in_channels: int = 3, hidden: int = 256, depth: int = 3,
                 time_dim: int = 64, seed: int = 0):
        super().__init__()
        self.net = MLPDenoiser((in_channels, sample_size, sample_size), hidden=hidden, depth=depth,
                               time_dim=time_dim, seed=seed)

    def forward(self, sample, timestep, return_dict: bool = True, **kwargs):
        return self.net(sample, timestep, return_dict=return_dict)
