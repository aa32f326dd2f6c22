"""Loss math of latent consistency distillation (LCD; Luo et al. 2023, Algorithm 1; LCM-LoRA, Luo et al. 2023b).

One LCD step, with the grid n ~ U{0..N-1}, t_{n+k} = grid.timesteps(n), t_n = grid.prev_timesteps(n)::

    x_{t_{n+k}}  = alpha x0 + sigma eps                           (forward noising of the data latent)
    x_{t_n}      = lcd_target(x_{t_{n+k}}, teacher cond/uncond outputs at t_{n+k}, w, grid, n)
    prediction   = consistency_output(x_{t_{n+k}}, student output at t_{n+k}, t_{n+k}, ...)
    target       = consistency_output(x_{t_n}, target (EMA) student output at t_n, t_n, ...)   (no grad)
    loss         = consistency_loss(prediction, target, "l2" | "huber")

Model calls stay with the caller: these functions take model outputs, so they are unit-testable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .parametrization import append_dims, extract, model_output_to_x0_eps
from .solvers import DDIMSolverGrid, lcm_guided

LOSS_TYPES = ("l2", "huber")


def scalings_for_boundary_conditions(
    timestep: torch.Tensor | float, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency parametrization (Song et al. 2023, "Consistency Models", §3), as
    diffusers' ``LCMScheduler.get_scalings_for_boundary_condition_discrete``: with tau = timestep * timestep_scaling,
    c_skip = sigma_data^2 / (tau^2 + sigma_data^2), c_out = tau / sqrt(tau^2 + sigma_data^2).

    At t = 0, c_skip = 1 and c_out = 0, so f(x, 0) = x (the boundary condition).
    """
    scaled = torch.as_tensor(timestep, dtype=torch.float32) * timestep_scaling
    denominator = scaled**2 + sigma_data**2
    return sigma_data**2 / denominator, scaled / denominator**0.5


def consistency_output(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    sigma_data: float = 0.5,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """Consistency function of LCM (Luo et al. 2023, §4.1): f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t),
    with x0_hat the model's predicted original sample (e.g. (x_t - sigma_t eps_hat) / alpha_t for epsilon models).

    ``t`` holds integer timesteps, one per sample (shape (B,)).
    """
    t = torch.as_tensor(t, device=x_t.device)
    alpha_t, sigma_t = extract(alphas_cumprod.to(x_t.device), t, x_t.ndim)
    x0_hat, _ = model_output_to_x0_eps(model_output, x_t, alpha_t, sigma_t, prediction_type)
    c_skip, c_out = scalings_for_boundary_conditions(t, sigma_data, timestep_scaling)
    c_skip = append_dims(c_skip.to(x_t.device), x_t.ndim)
    c_out = append_dims(c_out.to(x_t.device), x_t.ndim)
    return c_skip * x_t + c_out * x0_hat


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.001) -> torch.Tensor:
    """Pseudo-Huber distance, mean over all elements: mean(sqrt((a - b)^2 + c^2) - c).

    Elementwise, as diffusers' LCD scripts (``--loss_type huber``); Song & Dhariwal 2023 ("Improved techniques
    for training consistency models", §3.3) apply sqrt(||a - b||^2 + c^2) - c to the whole sample instead.
    """
    a, b = _at_least_float32(a), _at_least_float32(b)
    return torch.mean(torch.sqrt((a - b) ** 2 + c**2) - c)


def consistency_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.001
) -> torch.Tensor:
    """LCD loss d(prediction, target) (Luo et al. 2023, §4.1): mean squared error (``"l2"``) or
    :func:`pseudo_huber` (``"huber"``), computed in float32 or wider. The target should carry no gradient."""
    if loss_type == "l2":
        return F.mse_loss(_at_least_float32(prediction), _at_least_float32(target), reduction="mean")
    if loss_type == "huber":
        return pseudo_huber(prediction, target, huber_c)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(map(repr, LOSS_TYPES))}")


def lcd_target(
    x_t: torch.Tensor,
    cond_output: torch.Tensor,
    uncond_output: torch.Tensor | None,
    w: torch.Tensor | float | None,
    grid: DDIMSolverGrid,
    index: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Teacher's estimate of x_{t_n} from x_{t_{n+k}}: one guided DDIM step along the augmented PF-ODE
    (Luo et al. 2023, §4.2-4.3; Algorithm 1's Psi(z_{t_{n+k}}, t_{n+k}, t_n, c) with CFG weight w).

    ``x_t`` is x at ``grid.timesteps(index)``; ``cond_output``/``uncond_output`` are the teacher's raw outputs
    there with and without the condition. Both are turned into (x0_hat, eps_hat), combined with
    :func:`~stepdistill.solvers.lcm_guided` (CFG scale 1 + w; ``w`` is a float or one value per sample),
    and stepped with ``grid.step``. Pass ``uncond_output=None, w=None`` for an unguided teacher.
    """
    if (uncond_output is None) != (w is None):
        raise ValueError("pass both uncond_output and w for a guided teacher, or neither for an unguided one")
    alpha_t, sigma_t = extract(grid.alphas_cumprod.to(x_t.device), grid.timesteps(index.to(x_t.device)), x_t.ndim)
    x0_hat, eps_hat = model_output_to_x0_eps(cond_output, x_t, alpha_t, sigma_t, prediction_type)
    if uncond_output is not None:
        uncond_x0, uncond_eps = model_output_to_x0_eps(uncond_output, x_t, alpha_t, sigma_t, prediction_type)
        w = torch.as_tensor(w, device=x_t.device)
        w = append_dims(w, x_t.ndim) if w.ndim > 0 else w
        x0_hat = lcm_guided(x0_hat, uncond_x0, w)
        eps_hat = lcm_guided(eps_hat, uncond_eps, w)
    return grid.step(x0_hat, eps_hat, index.to(x_t.device)).to(x_t.dtype)
