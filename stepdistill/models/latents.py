"""Latent shapes, native resolutions and the seeded initial noise every sampler and coupling starts from."""
from __future__ import annotations

import torch

from ..errors import ModelError
from .family import denoiser_of, family_of


def native_resolution(pipe) -> int:
    """The image side (pixels) the pipeline samples at by default."""
    if family_of(pipe).name == "flux":  # FLUX has no sample_size; the pipeline's default_sample_size
        return int(pipe.default_sample_size * pipe.vae_scale_factor)
    return int(denoiser_of(pipe).config.sample_size * pipe.vae_scale_factor)


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of the (unpacked) latents for an image of ``height`` x ``width`` pixels (default: native)."""
    scale = pipe.vae_scale_factor
    channels = int(denoiser_of(pipe).config.in_channels)
    if not (height and width):
        native = native_resolution(pipe)
        height, width = height or native, width or native
    if family_of(pipe).name == "flux":  # in_channels counts packed 2x2 patches
        if height % (2 * scale) or width % (2 * scale):
            raise ModelError(f"FLUX needs height and width divisible by {2 * scale} (VAE factor x 2x2 "
                             f"packing), got {height}x{width}")
        channels //= 4
    return (channels, int(height) // scale, int(width) // scale)


def seeded_noise(indices, seed: int, shape) -> torch.Tensor:
    """``(len(indices), *shape)``: row ``i`` is ``torch.randn((1, *shape), generator=manual_seed(seed + i))``, so
    a sample's noise depends on its index only, never on the batch it is drawn in."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + int(i)))
                      for i in indices])
