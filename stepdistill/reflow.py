"""The pure math of reflow (flow-matching rectification): targets, losses, VP<->flow bridges, diagnostics.

No I/O, no models: tensors in, tensors (or floats) out.

Conventions
-----------
Everything here uses diffusers' FlowMatch convention (``FlowMatchEulerDiscreteScheduler``):

* flow time ``s`` ("sigma") in ``[0, 1]``; ``s = 1`` is pure noise, ``s = 0`` is data;
* ``x_s = (1 - s) * x0 + s * noise``;
* velocity ``v = dx_s/ds = noise - x0``;
* sampling integrates from ``s = 1`` down to ``0``; an Euler step is ``x_{s'} = x_s + (s' - s) * v``
  (``s' < s``, so the step moves against ``v``, towards the data).

Rectified Flow (Liu, Gong & Liu 2022, arXiv:2209.03003) and InstaFlow (arXiv:2309.06380) write the same
path with the opposite clock: ``t = 0`` is noise ``X_0``, ``t = 1`` is data ``X_1``,
``X_t = t X_1 + (1 - t) X_0`` and the velocity ``X_1 - X_0`` (data minus noise). The two are related by
``s = 1 - t`` (:func:`rf_time_to_sigma`) and ``v = -v_RF`` (:func:`rf_velocity_to_flow`); convert only
at the edges (e.g. when loading an InstaFlow checkpoint that predicts ``X_1 - X_0``).

PeRFlow (Yan et al. 2024, arXiv:2405.07510) runs its clock like diffusers' sigma (``t = 1`` noise,
``t = 0`` data) but measures it as the DDPM timestep fraction ``t = timestep / 1000`` and keeps the
states in VP space; its K windows are uniform in that ``t`` (``[1, 0.75], [0.75, 0.5], ...`` for K=4) and
inside a window ``[t_end, t_start]`` the student follows the straight line between the teacher's VP
states at the two window ends. This module does the same construction in *flow* coordinates: windows are
uniform in the flow time ``s`` (:func:`window_boundaries`) and the straight segment joins the teacher's
flow states ``z = x_t / (alpha_t + sigma_t)`` at the window ends (:func:`piecewise_target`). In flow
coordinates a DDIM step *is* an Euler step (see :func:`stepdistill.parametrization.velocity_from_vp_output`), so a window whose
teacher trajectory is straight in flow space is solved exactly by one Euler step.

VP (epsilon / v-prediction) teachers
------------------------------------
With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and ``x_t = alpha_t x0 + sigma_t eps``,
dividing by ``alpha_t + sigma_t`` gives ``z = x_t / (alpha_t + sigma_t) = (1 - s) x0 + s eps`` with
``s = sigma_t / (alpha_t + sigma_t)``: the VP point *is* a flow point, rescaled. Conversely a flow time
``s`` fixes the VP pair uniquely (``alpha^2 + sigma^2 = 1``)::

    n(s) = sqrt((1 - s)^2 + s^2),  alpha(s) = (1 - s) / n(s),  sigma(s) = s / n(s),  alpha + sigma = 1 / n(s)

so ``x_t = z / n(s)`` and ``z = n(s) x_t``. The log-SNR is ``log(alpha^2/sigma^2) = 2 log((1 - s)/s)``.
The VP <-> flow conversions (``flow_scale``, ``velocity_from_vp_output``, ``vp_sigma_max``, ...) live in
:mod:`stepdistill.parametrization`, the one home of that bridge.

Note on the discrete SD schedule: its last timestep (999) has ``abar ~ 0.0047``, i.e. flow time
``s ~ 0.936``, not 1. Flow times above :func:`stepdistill.parametrization.vp_sigma_max` have no VP timestep (they are clamped to the
last one) and an epsilon-prediction model cannot give a velocity at ``s = 1`` (``x0 = (z - s eps)/(1 - s)``
is singular). Students of VP teachers therefore live on ``[0, vp_sigma_max(alphas_cumprod)]``; pass that as
``sigma_max`` to :func:`window_boundaries` and :func:`sample_flow_times` (the scheduler in
``stepdistill.flow_scheduler`` does so).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .parametrization import as_tensor, broadcast_like, flow_state_from_x0_eps, flow_velocity_from_x0_eps

__all__ = [
    "rf_time_to_sigma",
    "sigma_to_rf_time",
    "rf_velocity_to_flow",
    "flow_velocity_to_rf",
    "straight_interpolation",
    "straight_velocity",
    "sample_flow_times",
    "window_boundaries",
    "window_of",
    "piecewise_target",
    "reflow_loss",
    "native_loss_weight",
    "straightness",
    "coupling_error",
]


# ----------------------------------------------------------------------------------------------------
# small helpers


# ----------------------------------------------------------------------------------------------------
# Rectified-Flow (t=0 noise, t=1 data) <-> diffusers FlowMatch (s=1 noise, s=0 data)


def rf_time_to_sigma(t):
    """Rectified Flow / InstaFlow time ``t`` (0 = noise, 1 = data) to flow time ``s = 1 - t``."""
    return 1 - t


def sigma_to_rf_time(s):
    """Flow time ``s`` (1 = noise) to Rectified Flow time ``t = 1 - s``."""
    return 1 - s


def rf_velocity_to_flow(v_rf):
    """Rectified Flow velocity ``X_1 - X_0`` (data minus noise) to the FlowMatch velocity ``noise - data``."""
    return -v_rf


def flow_velocity_to_rf(v):
    """FlowMatch velocity ``noise - data`` to the Rectified Flow velocity ``X_1 - X_0`` (data minus noise)."""
    return -v


# ----------------------------------------------------------------------------------------------------
# straight paths (Rectified Flow eq. 1, in the FlowMatch convention)


def straight_interpolation(z_noise: torch.Tensor, z_data: torch.Tensor, s) -> torch.Tensor:
    """``x_s = (1 - s) z_data + s z_noise`` (Rectified Flow's ``X_t = t X_1 + (1-t) X_0`` with ``s = 1 - t``).

    ``s`` is a float or a per-sample ``(B,)`` tensor."""
    return flow_state_from_x0_eps(z_data, z_noise, broadcast_like(s, z_data))


def straight_velocity(z_noise: torch.Tensor, z_data: torch.Tensor) -> torch.Tensor:
    """The reflow regression target ``dx_s/ds = z_noise - z_data`` (Rectified Flow eq. 1, ``-(X_1 - X_0)``)."""
    return flow_velocity_from_x0_eps(z_data, z_noise)


def sample_flow_times(
    batch: int,
    generator: torch.Generator | None = None,
    distribution: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    sigma_min: float = 0.0,
    sigma_max: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training flow times ``s``, shape ``(batch,)``, float32, in ``[sigma_min, sigma_max]``.

    ``"uniform"``: ``u ~ U(0, 1)`` (Rectified Flow). ``"logit_normal"``: ``u = sigmoid(n)``,
    ``n ~ N(logit_mean, logit_std)`` (SD3, Esser et al. 2024, Sec. 3.1 "logit-normal sampling"; SD3 uses
    the same noise-at-1 clock as here). ``"noise"``: ``u = 1`` always: the one-step distillation of InstaFlow
    (Liu et al. 2023, eq. 6 with an L2 distance): the velocity at the noise end is regressed onto
    ``z_noise - z_data``, i.e. one Euler step from the noise must land on the coupling's data. Then ``s = sigma_min + (sigma_max - sigma_min) * u``; use
    ``sigma_max = vp_sigma_max(alphas_cumprod)`` for students of VP teachers.
    """
    gen_device = generator.device if generator is not None else (device or "cpu")
    if distribution == "uniform":
        u = torch.rand(batch, generator=generator, device=gen_device)
    elif distribution == "logit_normal":
        n = torch.randn(batch, generator=generator, device=gen_device)
        u = torch.sigmoid(logit_mean + logit_std * n)
    elif distribution == "noise":
        u = torch.ones(batch, device=gen_device)
    else:
        raise ValueError(f"unknown distribution {distribution!r}; expected 'uniform', 'logit_normal' or 'noise'")
    s = sigma_min + (sigma_max - sigma_min) * u
    return s.to(device) if device is not None else s


# ----------------------------------------------------------------------------------------------------
# piecewise rectified flow (PeRFlow)


def window_boundaries(num_windows: int, sigma_max: float = 1.0, sigma_min: float = 0.0) -> torch.Tensor:
    """The ``K + 1`` window boundaries ``b_0 = sigma_max > b_1 > ... > b_K = sigma_min``, uniform in ``s``.

    Window ``k`` is ``(b_{k+1}, b_k]`` and is traversed from ``b_k`` (its start, noisier) to ``b_{k+1}``.
    PeRFlow's windows are uniform in its own clock ``t = timestep/1000`` (see the module docstring)."""
    if num_windows < 1:
        raise ValueError(f"num_windows must be >= 1, got {num_windows}")
    if not sigma_max > sigma_min:
        raise ValueError(f"need sigma_max > sigma_min, got {sigma_max} <= {sigma_min}")
    return torch.linspace(float(sigma_max), float(sigma_min), num_windows + 1, dtype=torch.float64).float()


def window_of(s, boundaries: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """Index ``k`` (long tensor, shape of ``s``) of the window ``(b_{k+1}, b_k]`` holding each ``s``.

    A point on an interior boundary ``b_k`` belongs to window ``k`` (the one that starts there), as does
    anything within ``atol`` above it; ``s = b_K`` belongs to the last window, ``s > b_0`` to window 0."""
    s = as_tensor(s).float()
    b = as_tensor(boundaries).to(device=s.device, dtype=torch.float32)
    interior = b[1:-1]
    flat = s.reshape(-1, 1)
    k = (interior.reshape(1, -1) >= flat - atol).sum(dim=-1)
    return k.reshape(s.shape).long()


def piecewise_target(z_start: torch.Tensor, z_end: torch.Tensor, s_start, s_end, s) -> tuple[torch.Tensor, torch.Tensor]:
    """PeRFlow's per-window straight target (PeRFlow Sec. 3, "piecewise reflow"), in flow coordinates.

    ``z_start`` is the (teacher ODE) state at the window start ``s_start`` (noisier), ``z_end`` the state at
    the window end ``s_end < s_start``; for ``s`` in ``[s_end, s_start]``::

        x_s = z_end + (s - s_end) / (s_start - s_end) * (z_start - z_end)
        v   = (z_start - z_end) / (s_start - s_end)          (= dx_s/ds)

    With one window ``[1, 0]``, ``z_start = noise`` and ``z_end = data`` this is
    :func:`straight_interpolation` / :func:`straight_velocity`. The ``s`` arguments are floats or per-sample
    ``(B,)`` tensors. Returns ``(x_s, v)``.
    """
    s_start_b = broadcast_like(s_start, z_start)
    s_end_b = broadcast_like(s_end, z_start)
    s_b = broadcast_like(s, z_start)
    length = s_start_b - s_end_b
    if torch.any(length <= 0):
        raise ValueError("piecewise_target needs s_start > s_end (windows run from noise towards data)")
    v = (z_start - z_end) / length
    x_s = z_end + (s_b - s_end_b) * v
    return x_s, v


REFLOW_LOSS_TYPES = ("l2", "pseudo_huber")


def pseudo_huber_c(sample_shape) -> float:
    """The pseudo-Huber constant of Song & Dhariwal 2023 (iCT, Sec. 3.3), ``c = 0.00054 sqrt(d)`` for ``d`` dimensions
    per sample, which Lee et al. 2024 (arXiv:2405.20320, Sec. 4) carry over to the reflow regression."""
    return 0.00054 * math.sqrt(math.prod(int(n) for n in sample_shape))


def reflow_loss(v_pred: torch.Tensor, v_target: torch.Tensor, weighting: torch.Tensor | None = None,
                loss_type: str = "l2", huber_c: float | None = None) -> torch.Tensor:
    """Reflow's objective: the batch mean of ``w_i * d(v_pred_i, v_target_i)``.

    * ``"l2"`` (Rectified Flow eq. 1): ``d = mean_dims (v_pred - v_target)^2``;
    * ``"pseudo_huber"`` (Lee et al. 2024, eq. 7, after iCT): ``d = sqrt(||v_pred - v_target||^2 + c^2) - c`` with
      the norm over the whole sample and ``c`` = :func:`pseudo_huber_c` unless given -- every sample pulls with
      the same strength whatever its error, so a few couplings the student cannot fit do not dominate.

    ``weighting`` is an optional per-sample ``(B,)`` weight (unnormalized). Computed in float32; returns a scalar
    tensor that carries gradients."""
    diff = (v_pred.float() - v_target.float()).reshape(v_pred.shape[0], -1)
    if loss_type == "l2":
        per_sample = (diff ** 2).mean(dim=1)
    elif loss_type == "pseudo_huber":
        c = pseudo_huber_c(v_pred.shape[1:]) if huber_c is None else float(huber_c)
        per_sample = torch.sqrt((diff ** 2).sum(dim=1) + c * c) - c
    else:
        raise ValueError(f"unknown reflow loss_type {loss_type!r}; expected one of {REFLOW_LOSS_TYPES}")
    if weighting is not None:
        w = as_tensor(weighting, per_sample).reshape(-1)
        if w.numel() not in (1, per_sample.numel()):
            raise ValueError(f"weighting has {w.numel()} entries for a batch of {per_sample.numel()}")
        per_sample = per_sample * w
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------------
# diagnostics


def straightness(trajectory: torch.Tensor | Sequence[torch.Tensor], sigmas, reduction: str = "sum") -> float:
    """Rectified Flow's straightness ``S(Z) = int_0^1 E ||(Z_1 - Z_0) - dZ_t/dt||^2 dt`` (Liu et al. 2022,
    Sec. 2.3 / Definition "straightness"), 0 iff the path is a straight line traversed at constant speed.

    ``trajectory``: states ``x_{s_0}, ..., x_{s_M}`` (a sequence or a ``(M+1, B, ...)`` tensor) recorded at the
    flow times ``sigmas`` (monotone, e.g. from 1 down to 0). The path is taken as piecewise linear between
    the recorded states and time is normalized to unit length, ``u = (s_0 - s) / (s_0 - s_M)``, so a path
    recorded on a sub-interval (e.g. ``[0, 0.936]`` or one PeRFlow window) is scored like a full one. The
    sign/time direction does not matter: reversing the clock negates both the chord and the velocity.

    Discretized: ``S = sum_i du_i * E_b ||(x_{s_M} - x_{s_0}) - (x_{s_{i+1}} - x_{s_i})/du_i||^2``. The norm is
    the squared Euclidean norm over all non-batch dims (``reduction="sum"``, as in the paper) or its
    per-element mean (``"mean"``). Returns the batch mean as a float.
    """
    traj = torch.stack(list(trajectory)) if not isinstance(trajectory, torch.Tensor) else trajectory
    traj = traj.detach().cpu().to(torch.float64)  # a diagnostic: float64 on the CPU
    s = as_tensor(sigmas).detach().cpu().to(torch.float64).reshape(-1)
    if traj.shape[0] != s.numel() or s.numel() < 2:
        raise ValueError(f"need >= 2 states, one per sigma; got {traj.shape[0]} states and {s.numel()} sigmas")
    total = s[0] - s[-1]
    if total == 0:
        raise ValueError("sigmas span an empty interval")
    u = (s[0] - s) / total
    du = u[1:] - u[:-1]
    if torch.any(du <= 0):
        raise ValueError("sigmas must be strictly monotone")
    if traj.dim() == 1:
        traj = traj[:, None]
    if traj.dim() == 2:  # (M+1, B) scalars per sample
        traj = traj[..., None]
    chord = traj[-1] - traj[0]
    seg_vel = (traj[1:] - traj[:-1]) / du.reshape(-1, *([1] * (traj.dim() - 1)))
    sq = (chord[None] - seg_vel) ** 2
    sq = sq.reshape(sq.shape[0], sq.shape[1], -1)
    if reduction == "sum":
        per = sq.sum(-1)
    elif reduction == "mean":
        per = sq.mean(-1)
    else:
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    return float((du[:, None] * per).sum(0).mean())


def coupling_error(z1_candidate: torch.Tensor, z1_reference: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE ``sqrt(mean_dims (a - b)^2)``, shape ``(B,)``: how far a student's endpoint (e.g. its
    one-step sample from a noise) is from the reference coupling's endpoint (the teacher ODE's sample from
    the same noise), the pairing reflow trains on (Rectified Flow Sec. 2.2, the coupling ``(Z_0, Z_1)``)."""
    d = (z1_candidate.float() - z1_reference.float()) ** 2
    return d.reshape(d.shape[0], -1).mean(dim=1).sqrt()


def native_loss_weight(s: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample ``w(s)`` with ``w * |v_pred - v|^2 = |out_pred - out_target|^2`` in the model's own output space
    (``(dv/d out)^-2``): eps ``(1-s)^2``, v_prediction ``(1-s)^2 + s^2``, sample ``s^2``, flow 1."""
    s = s.float()
    if prediction_type == "epsilon":
        return (1 - s) ** 2
    if prediction_type == "v_prediction":
        return (1 - s) ** 2 + s**2
    if prediction_type == "sample":
        return s**2
    return torch.ones_like(s)
