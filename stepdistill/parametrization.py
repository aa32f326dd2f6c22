"""Conversions between what a diffusion model predicts and the (x0, eps) pair it implies.

VP (DDPM) schedule, as diffusers' ``DDPMScheduler``/``DDIMScheduler``::

    alpha_t = sqrt(alphas_cumprod[t]),  sigma_t = sqrt(1 - alphas_cumprod[t]),
    x_t = alpha_t * x0 + sigma_t * eps                      (Ho et al. 2020, eq. 4)

Prediction types (diffusers' names): ``"epsilon"`` (the model predicts eps), ``"sample"`` (x0) and
``"v_prediction"`` (v = alpha_t * eps - sigma_t * x0, Salimans & Ho 2022, §4).

Flow matching (rectified flow), diffusers' ``FlowMatchEulerDiscreteScheduler`` convention: s = 1 is
pure noise, ``x_s = (1 - s) * x0 + s * noise`` and the velocity is ``v = dx_s/ds = noise - x0``.
A VP state maps onto that straight line by dividing by (alpha_t + sigma_t).

This module is the one home of the VP <-> flow bridge (used by the reflow objective, the teacher ODE, the
PeRFlow scheduler and the diagnostics). With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``,
dividing ``x_t`` by ``alpha_t + sigma_t`` gives ``z = (1 - s) x0 + s eps`` with ``s = sigma_t / (alpha_t +
sigma_t)``: the VP point *is* a flow point, rescaled. Conversely a flow time ``s`` fixes the VP pair
uniquely (``alpha^2 + sigma^2 = 1``)::

    n(s) = sqrt((1 - s)^2 + s^2),  alpha(s) = (1 - s) / n(s),  sigma(s) = s / n(s),  alpha + sigma = 1 / n(s)

so ``x_t = z / n(s)`` and ``z = n(s) x_t`` (:func:`flow_scale`); the log-SNR is ``2 log((1 - s)/s)``. SD's
discrete schedule ends at ``abar ~ 0.0047`` (timestep 999), i.e. flow time ``~0.936``
(:func:`vp_sigma_max`): VP models and their students live on ``[0, vp_sigma_max]``.

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


def x0_eps_to_model_output(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor | float,
                           sigma_t: torch.Tensor | float, prediction_type: str) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------------
# VP <-> flow: helpers and the bridge (see the module docstring)


def as_tensor(x, like: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.as_tensor(x, dtype=dtype or torch.float32)
    if like is not None:
        t = t.to(device=like.device, dtype=dtype or like.dtype)
    elif dtype is not None:
        t = t.to(dtype)
    return t


def broadcast_like(t, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar or a per-sample ``(B,)`` tensor, shaped to broadcast against ``like`` ``(B, ...)``, on its
    device, in ``dtype`` (default: ``like``'s)."""
    t = as_tensor(t, like, dtype)
    if t.dim() == 0:
        return t
    return t.reshape(t.shape + (1,) * (like.dim() - t.dim()))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``numpy.interp`` in torch: piecewise-linear, ``xp`` increasing, clamped outside ``[xp[0], xp[-1]]``."""
    x = x.to(xp.dtype)
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1]).contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    w = ((x.clamp(xp[0], xp[-1]) - x0) / (x1 - x0)).nan_to_num(0.0)
    return f0 + w * (f1 - f0)


def flow_scale(s):
    """``n(s) = sqrt((1-s)^2 + s^2) = 1 / (alpha + sigma)``: ``z = n(s) * x_t``."""
    s = as_tensor(s)
    return torch.sqrt((1 - s) ** 2 + s**2)


def _log_snr_of_sigma(s: torch.Tensor) -> torch.Tensor:
    """VP log-SNR ``log(alpha^2 / sigma^2) = 2 log((1-s)/s)`` of flow time ``s`` (+inf at 0, -inf at 1)."""
    s = s.to(torch.float64)
    return 2.0 * (torch.log1p(-s) - torch.log(s))


def _log_snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = as_tensor(alphas_cumprod).detach().cpu().to(torch.float64)
    return torch.log(a) - torch.log1p(-a)  # decreasing in t


def vp_abar_of_sigma(s):
    """``alpha(s)^2 = (1-s)^2 / ((1-s)^2 + s^2)``: the VP ``abar`` of flow time ``s`` (float or tensor)."""
    if isinstance(s, torch.Tensor):
        s = s.float()
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


def velocity_from_vp_output(
    model_output: torch.Tensor, x_t: torch.Tensor, alphas_cumprod_t, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """Flow velocity ``eps - x0`` from a VP model's output at ``x_t = alpha x0 + sigma eps``.

    ``alphas_cumprod_t`` is ``abar_t`` (float or per-sample ``(B,)``), ``alpha = sqrt(abar)``,
    ``sigma = sqrt(1 - abar)``. Since ``z = x_t/(alpha+sigma) = (1-s) x0 + s eps``, ``dz/ds = eps - x0`` for
    the model's (eps, x0) estimate, and an Euler step in ``(s, z)`` is exactly a DDIM step (Song et al.
    2021, eq. 12):

    * ``"epsilon"``: ``x0 = (x_t - sigma eps)/alpha``, so ``v = ((alpha + sigma) eps - x_t) / alpha``;
    * ``"v_prediction"`` (``v_vp = alpha eps - sigma x0``, Salimans & Ho 2022): ``x0 = alpha x_t - sigma v_vp``,
      ``eps = sigma x_t + alpha v_vp``, so ``v = (sigma - alpha) x_t + (alpha + sigma) v_vp``;
    * ``"sample"`` (``x0``): ``eps = (x_t - alpha x0)/sigma``, so ``v = (x_t - (alpha + sigma) x0) / sigma``.

    Singular where the parametrization is: ``"epsilon"`` at ``alpha = 0`` (``s = 1``), ``"sample"`` at
    ``sigma = 0`` (``s = 0``). Computed and returned in float32.
    """
    out = model_output.float()
    x = x_t.float()
    abar = broadcast_like(alphas_cumprod_t, out, torch.float32)
    alpha = abar.sqrt()
    sigma = (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return ((alpha + sigma) * out - x) / alpha
    if prediction_type == "v_prediction":
        return (sigma - alpha) * x + (alpha + sigma) * out
    if prediction_type == "sample":
        return (x - (alpha + sigma) * out) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'")


def sigma_for_vp_timestep(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Flow time ``s = sigma_t / (alpha_t + sigma_t)`` of a (continuous) VP timestep ``t`` (float64, on the CPU)."""
    abar = vp_alphas_cumprod_at(t, alphas_cumprod)
    return vp_to_flow_time(abar.sqrt(), (1 - abar).sqrt())


def vp_sigma_max(alphas_cumprod: torch.Tensor) -> float:
    """Flow time of the last training timestep (``~0.9358`` for SD's scaled_linear 0.00085-0.012 schedule):
    the noisiest flow time a VP model (and its students) can be queried at."""
    return float(sigma_for_vp_timestep(len(alphas_cumprod) - 1, alphas_cumprod))


def vp_alphas_cumprod_at(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``abar`` at a continuous VP timestep ``t`` (float64, on the CPU): the log-SNR is interpolated linearly between
    integer timesteps (exact at integers; ``t`` is clamped to ``[0, T-1]``)."""
    lam = _log_snr_table(alphas_cumprod)
    T = len(lam)
    t = as_tensor(t).detach().cpu().to(torch.float64)
    grid = torch.arange(T, dtype=torch.float64, device=lam.device)
    return torch.sigmoid(_interp(t, grid, lam))


def vp_timestep_for_sigma(s, alphas_cumprod: torch.Tensor, discrete: bool = False) -> torch.Tensor:
    """The VP timestep ``t`` whose flow time ``sigma_t/(alpha_t + sigma_t)`` equals ``s``.

    Solved in log-SNR: ``log(abar_t/(1-abar_t)) = 2 log((1-s)/s)``, inverting the table of ``alphas_cumprod``
    with linear interpolation (the inverse of :func:`vp_alphas_cumprod_at`; the table math runs in float64
    on the CPU and so does the result). Continuous (float32) by default; ``discrete=True`` returns the nearest integer timestep (long). Flow times outside the schedule's
    range ``[s(0), s(T-1)]`` are clamped to ``t = 0`` / ``t = T-1``.
    """
    lam = _log_snr_table(alphas_cumprod)
    T = len(lam)
    s = as_tensor(s).detach().cpu().to(torch.float64)
    target = _log_snr_of_sigma(s)
    grid = torch.arange(T, dtype=torch.float64, device=lam.device)
    t = _interp(target, lam.flip(0), grid.flip(0))  # log-SNR is decreasing in t
    if discrete:
        return t.round().long()
    return t.float()


def flow_state_to_vp_input(x_s: torch.Tensor, s, alphas_cumprod: torch.Tensor, discrete: bool = False):
    """Where to query a VP model at the flow point ``(s, x_s)``: returns ``(x_t, t)``.

    ``x_t = (alpha + sigma) x_s = x_s / sqrt((1-s)^2 + s^2)`` is the VP state with the same signal and noise
    (``alpha = (1-s)/n``, ``sigma = s/n`` are fixed by ``s`` and ``alpha^2 + sigma^2 = 1``), and
    ``t = vp_timestep_for_sigma(s)``. With ``discrete=True`` (or ``s`` outside the schedule's range) the
    timestep is rounded/clamped while ``x_t`` keeps the exact VP scale of ``s``, a small mismatch the model
    sees as a slightly different noise level."""
    n = broadcast_like(flow_scale(as_tensor(s, dtype=torch.float32)), x_s, torch.float32)
    x_t = (x_s.float() / n).to(x_s.dtype)
    return x_t, vp_timestep_for_sigma(s, alphas_cumprod, discrete=discrete).to(x_s.device)


def vp_state_to_flow(x_t: torch.Tensor, s) -> torch.Tensor:
    """Inverse of :func:`flow_state_to_vp_input`'s state map: ``z = x_t / (alpha + sigma) = sqrt((1-s)^2+s^2) x_t``
    (computed in float64 for float64 input, else in float32)."""
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
    n = broadcast_like(flow_scale(as_tensor(s, dtype=dtype)), x_t, dtype)
    return (x_t.to(dtype) * n).to(x_t.dtype)