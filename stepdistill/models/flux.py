"""FLUX.1's latent packing: 2x2 patches as tokens, and the image position ids (as ``FluxPipeline`` builds them)."""
from __future__ import annotations

import torch

from ..errors import ModelError


def pack_flux_latents(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: FLUX's 2x2 patch tokens (``FluxPipeline._pack_latents``)."""
    B, C, H, W = z.shape
    if H % 2 or W % 2:
        raise ModelError(f"FLUX latents need even height and width, got {H}x{W}")
    return z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_flux_latents(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_flux_latents` for latent ``height`` x ``width``."""
    B, _, D = x.shape
    return x.view(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, height, width)


def flux_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``img_ids`` of a ``height`` x ``width`` latent (``FluxPipeline._prepare_latent_image_ids`` at H/2, W/2)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)
