"""ODE solver steps and classifier-free guidance used for the teacher step of latent consistency distillation.

``DDIMSolverGrid`` is the skipping-step grid of LCM (Luo et al. 2023, §4.3): N DDIM timesteps over the T
training timesteps, k = T // N apart; the teacher jumps from t_{n+k} to t_n in one DDIM step. Its numbers
are those of ``DDIMSolver`` in diffusers' ``examples/consistency_distillation`` scripts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .parametrization import append_dims


def ddim_step(
    x0_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    alpha_prev: torch.Tensor | float,
    sigma_prev: torch.Tensor | float,
) -> torch.Tensor:
    """Deterministic DDIM update (Song et al. 2021, eq. 12 with eta = 0):
    x_prev = alpha_prev x0_hat + sigma_prev eps_hat."""
    return alpha_prev * x0_hat + sigma_prev * eps_hat


def euler_flow_step(
    x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float, s_prev: torch.Tensor | float
) -> torch.Tensor:
    """Euler step of the flow-matching ODE dx/ds = v: x_{s_prev} = x_s + (s_prev - s) v
    (as diffusers' ``FlowMatchEulerDiscreteScheduler.step``; s_prev < s moves toward data)."""
    return x_s + (s_prev - s) * v


def guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance with scale w (Ho & Salimans 2022): uncond + w (cond - uncond).

    w = 1 gives ``cond``, w = 0 gives ``uncond``; this is the ``guidance_scale`` of diffusers' pipelines.
    """
    return uncond + w * (cond - uncond)


def lcm_guided(cond: torch.Tensor, uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """LCM's guidance (Luo et al. 2023, §4.2, augmented PF-ODE): (1 + w) cond - w uncond = cond + w (cond - uncond).

    Equals :func:`guided` with CFG scale 1 + w: w = 0 is the plain conditional prediction. diffusers'
    ``train_lcm_distill_lora_sd_wds.py`` samples ``w ~ U[w_min, w_max]`` (defaults 5, 15) and applies exactly
    this, ``cond + w * (cond - uncond)``, to the x0 and the eps predictions, so its teacher runs at CFG
    scales 1 + w in [6, 16] (its ``--w_min`` help text, which says w already is the CFG scale, disagrees
    with its code).
    """
    return cond + w * (cond - uncond)


@dataclass
class DDIMSolverGrid:
    """LCM's skipping-step DDIM grid over a VP schedule (Luo et al. 2023, §4.3; diffusers' ``DDIMSolver``).

    With T = len(alphas_cumprod), N = ``num_ddim_timesteps`` and k = T // N:
    ``ddim_timesteps[n] = round((n + 1) * k) - 1`` (19, 39, ..., 999 for T=1000, N=50),
    ``ddim_alphas_cumprod_prev = [alphas_cumprod[0]] + alphas_cumprod[ddim_timesteps[:-1]]``, so index n
    steps from t = ddim_timesteps[n] to t - k (to t = 0 for n = 0).
    """

    alphas_cumprod: torch.Tensor
    num_ddim_timesteps: int = 50
    ddim_timesteps: torch.Tensor = field(init=False, repr=False)
    ddim_alphas_cumprod: torch.Tensor = field(init=False, repr=False)
    ddim_alphas_cumprod_prev: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.alphas_cumprod = torch.as_tensor(self.alphas_cumprod)
        if self.alphas_cumprod.ndim != 1:
            raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(self.alphas_cumprod.shape)}")
        num_train_timesteps = self.alphas_cumprod.shape[0]
        if not 1 <= self.num_ddim_timesteps <= num_train_timesteps:
            raise ValueError(
                f"num_ddim_timesteps must be in [1, {num_train_timesteps}], got {self.num_ddim_timesteps}"
            )
        step_ratio = num_train_timesteps // self.num_ddim_timesteps
        timesteps = (np.arange(1, self.num_ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        self.ddim_timesteps = torch.from_numpy(timesteps).to(self.alphas_cumprod.device)
        self.ddim_alphas_cumprod = self.alphas_cumprod[self.ddim_timesteps]
        self.ddim_alphas_cumprod_prev = torch.cat(
            [self.alphas_cumprod[:1], self.alphas_cumprod[self.ddim_timesteps[:-1]]]
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def step_ratio(self) -> int:
        """k = T // N, the number of training timesteps skipped by one teacher step."""
        return self.num_train_timesteps // self.num_ddim_timesteps

    def to(self, device: torch.device | str) -> "DDIMSolverGrid":
        return DDIMSolverGrid(self.alphas_cumprod.to(device), self.num_ddim_timesteps)

    def sample_index(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Grid indices n ~ U{0, ..., N-1}, one per sample (long tensor of shape (batch_size,))."""
        if device is None:
            device = generator.device if generator is not None else self.alphas_cumprod.device
        return torch.randint(0, self.num_ddim_timesteps, (batch_size,), generator=generator, device=device)

    def timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Start timesteps t_{n+k} = ddim_timesteps[index]."""
        return self.ddim_timesteps.to(index.device)[index]

    def prev_timesteps(self, index: torch.Tensor) -> torch.Tensor:
        """Target timesteps t_n = max(ddim_timesteps[index] - k, 0)."""
        return (self.timesteps(index) - self.step_ratio).clamp(min=0)

    def alpha_sigma_prev(self, index: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at the target timestep of ``index``, shaped (B, 1, ..., 1) with ``ndim`` dims."""
        alpha_bar_prev = append_dims(self.ddim_alphas_cumprod_prev.to(index.device)[index], ndim)
        return alpha_bar_prev.sqrt(), (1.0 - alpha_bar_prev).sqrt()

    def step(self, x0_hat: torch.Tensor, eps_hat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One skipping DDIM step from ddim_timesteps[index] to its previous grid point (:func:`ddim_step`).

        Computed in the promoted dtype of the schedule and ``x0_hat`` (so float16 latents are stepped in the
        schedule's float32), returned in ``x0_hat``'s dtype.
        """
        alpha_prev, sigma_prev = self.alpha_sigma_prev(index.to(x0_hat.device), x0_hat.ndim)
        return ddim_step(x0_hat, eps_hat, alpha_prev, sigma_prev).to(x0_hat.dtype)
