"""Conversions between what a diffusion model predicts and the (x0, eps) pair it implies.

VP (DDPM) schedule, as diffusers' ``DDPMScheduler``/``DDIMScheduler``::

    alpha_t = sqrt(alphas_cumprod[t]),  sigma_t = sqrt(1 - alphas_cumprod[t]),
    x_t = alpha_t * x0 + sigma_t * eps                      (Ho et al. 2020, eq. 4)

Prediction types (diffusers' names): ``"epsilon"`` (the model predicts eps), ``"sample"`` (x0) and
``"v_prediction"`` (v = alpha_t * eps - sigma_t * x0, Salimans & Ho 2022, §4).

Flow matching (rectified flow), diffusers' ``FlowMatchEulerDiscreteScheduler`` convention: s = 1 is
pure noise, ``x_s = (1 - s) * x0 + s * noise`` and the velocity is ``v = dx_s/ds = noise - x0``.
A VP state maps onto that straight line by dividing by (alpha_t + sigma_t).

Everything here is pure tensor math: torch tensors in, torch tensors out.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(map(repr, PREDICTION_TYPES))}"
        )


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to ``x`` until it has ``ndim`` dims (for per-sample broadcasting)."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims, more than the requested {ndim}")
    return x[(...,) + (None,) * missing]


def extract(alphas_cumprod: torch.Tensor, t: torch.Tensor | int, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(abar_t), sqrt(1 - abar_t)) at integer timesteps ``t``, shaped to broadcast
    against a tensor of ``ndim`` dims (a batch ``t`` of shape (B,) gives (B, 1, ..., 1))."""
    alphas_cumprod = torch.as_tensor(alphas_cumprod)
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    alpha_bar = append_dims(alphas_cumprod[t], ndim)
    return alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()


def model_output_to_x0_eps(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor | float,
    sigma_t: torch.Tensor | float,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) implied by a model output at x_t = alpha_t x0 + sigma_t eps.

    - ``epsilon``: eps = out, x0 = (x_t - sigma_t eps) / alpha_t  (DDIM, Song et al. 2021, eq. 12 "predicted x0");
    - ``sample``: x0 = out, eps = (x_t - alpha_t x0) / sigma_t;
    - ``v_prediction``: x0 = alpha_t x_t - sigma_t v, eps = alpha_t v + sigma_t x_t (Salimans & Ho 2022, §4;
      uses alpha_t^2 + sigma_t^2 = 1, i.e. a VP schedule — the same formulas as diffusers' schedulers).
    """
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - sigma_t * eps) / alpha_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - alpha_t * x0) / sigma_t
    else:  # v_prediction
        x0 = alpha_t * x_t - sigma_t * model_output
        eps = alpha_t * model_output + sigma_t * x_t
    return x0, eps


def x0_eps_to_model_output(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha_t: torch.Tensor | float,
    sigma_t: torch.Tensor | float,
    prediction_type: str,
) -> torch.Tensor:
    """Inverse of :func:`model_output_to_x0_eps`: eps, x0, or v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022, §4)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha_t * eps - sigma_t * x0


# --- flow matching (rectified flow) ------------------------------------------------------------------


def flow_state_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    """Point on the straight path: x_s = (1 - s) x0 + s eps.

    Rectified flow (Liu et al. 2022) with time reversed to diffusers' convention, s = 1 is noise.
    """
    return (1.0 - s) * x0 + s * eps


def flow_velocity_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Velocity of the straight path: v = dx_s/ds = eps - x0 (diffusers' flow-matching target ``noise - x0``)."""
    return eps - x0


def x0_eps_from_flow(
    x_s: torch.Tensor, v: torch.Tensor, s: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Endpoints from a flow state and velocity: x0 = x_s - s v, eps = x_s + (1 - s) v."""
    return x_s - s * v, x_s + (1.0 - s) * v


def vp_to_flow_time(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """Flow time of a VP noise level: s = sigma_t / (alpha_t + sigma_t).

    Since x_t / (alpha_t + sigma_t) = (1 - s) x0 + s eps with this s, the VP and flow paths share
    the same signal-to-noise ratio alpha_t / sigma_t = (1 - s) / s.
    """
    return sigma_t / (alpha_t + sigma_t)


def vp_to_flow_state(x_t: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """Flow state of a VP state: x_s = x_t / (alpha_t + sigma_t) = (1 - s) x0 + s eps, s = vp_to_flow_time(...)."""
    return x_t / (alpha_t + sigma_t)
