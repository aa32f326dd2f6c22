"""LADD's discriminator (Sauer et al. 2024, §3): the frozen teacher's own UNet as the feature network -- the
student's adapter disabled, latents re-noised to a teacher timestep -- and small trainable heads on its
intermediate features (read through :class:`~stepdistill.methods.features.FeatureTap`), conditioned on the noise
level and the prompt.

The heads and their optimizer belong to the objective, not to the adapter: :class:`Discriminator` has
``state_dict`` / ``load_state_dict`` so the training loop checkpoints it beside the LoRA
(``accelerator.register_for_checkpointing``) and a resumed run continues it exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .features import FeatureTap


class Head(nn.Module):
    """One discriminator head on a ``(B, C, H, W)`` feature map: conv -> GroupNorm -> SiLU, plus a noise-level
    embedding (LADD's heads are conditioned on ``t_hat``), then per-position logits and a projection term with the
    pooled prompt embedding (projection discriminator, Miyato & Koyama 2018, eq. 3). Logits: ``(B, H*W)``."""

    def __init__(self, channels: int, hidden: int, text_dim: int):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if hidden % g == 0)
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(groups, hidden)
        self.t_embed = nn.Linear(1, hidden)
        self.out = nn.Conv2d(hidden, 1, 1)
        self.text = nn.Linear(text_dim, hidden)

    def forward(self, feature, t_frac, text):
        h = self.norm(self.conv(feature.float()))
        h = nn.functional.silu(h + self.t_embed(t_frac.float().reshape(-1, 1))[:, :, None, None])
        logits = self.out(h).flatten(1)
        proj = (h * self.text(text.float())[:, :, None, None]).sum(1).flatten(1) / h.shape[1] ** 0.5
        return logits + proj


class Discriminator:
    """The trainable side of the discriminator: one :class:`Head` per tapped teacher layer and their AdamW
    (GAN-style betas (0, 0.99)). Its state (heads and optimizer) is what the training loop checkpoints."""

    def __init__(self, channels: list[int], text_dim: int, hidden: int, lr: float, device, seed: int):
        with torch.random.fork_rng(devices=[]):  # the heads' init leaves the global RNG (the LoRA's init) alone
            torch.manual_seed(seed)
            self.heads = nn.ModuleList([Head(c, hidden, text_dim) for c in channels]).to(device)
        self.optimizer = torch.optim.AdamW(self.heads.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=0.0)

    def logits(self, features, timesteps, text, num_train_timesteps: int = 1000) -> list[torch.Tensor]:
        t_frac = timesteps.float() / num_train_timesteps
        pooled = text.float().mean(1) if text.ndim == 3 else text.float()
        return [head(f, t_frac.to(f.device), pooled.to(f.device)) for head, f in zip(self.heads, features)]

    def state_dict(self) -> dict:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict):
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])


@torch.no_grad()
def feature_channels(unet, names, cond: dict, sample_shape) -> list[int]:
    """Channel counts of the tapped layers, from one forward of ``unet`` on zeros (any UNet layout)."""
    device = next(unet.parameters()).device
    x = torch.zeros(1, *sample_shape, device=device, dtype=unet.dtype)
    with FeatureTap(unet, names) as tap:
        unet(x, torch.tensor([500], device=device), **cond)
    for name, f in zip(names, tap.features):
        if f.ndim != 4:
            raise ConfigError(f"layer {name!r} gives a {f.ndim}-d output, not a (B, C, H, W) feature map: "
                              "tap UNet blocks such as 'mid_block' or 'down_blocks.1'")
    return [int(f.shape[1]) for f in tap.features]
