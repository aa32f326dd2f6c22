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
coordinates a DDIM step *is* an Euler step (see :func:`velocity_from_vp_output`), so a window whose
teacher trajectory is straight in flow space is solved exactly by one Euler step.

VP (epsilon / v-prediction) teachers
------------------------------------
With ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)`` and ``x_t = alpha_t x0 + sigma_t eps``,
dividing by ``alpha_t + sigma_t`` gives ``z = x_t / (alpha_t + sigma_t) = (1 - s) x0 + s eps`` with
``s = sigma_t / (alpha_t + sigma_t)``: the VP point *is* a flow point, rescaled. Conversely a flow time
``s`` fixes the VP pair uniquely (``alpha^2 + sigma^2 = 1``)::

    n(s) = sqrt((1 - s)^2 + s^2),  alpha(s) = (1 - s) / n(s),  sigma(s) = s / n(s),  alpha + sigma = 1 / n(s)

so ``x_t = z / n(s)`` and ``z = n(s) x_t``. The log-SNR is ``log(alpha^2/sigma^2) = 2 log((1 - s)/s)``.
The VP conversions here are private helpers of this module (``_flow_scale``, ``_log_snr_of_sigma``); the project's
general-purpose conversions live in ``stepdistill.parametrization``.

Note on the discrete SD schedule: its last timestep (999) has ``abar ~ 0.0047``, i.e. flow time
``s ~ 0.936``, not 1. Flow times above :func:`vp_sigma_max` have no VP timestep (they are clamped to the
last one) and an epsilon-prediction model cannot give a velocity at ``s = 1`` (``x0 = (z - s eps)/(1 - s)``
is singular). Students of VP teachers therefore live on ``[0, vp_sigma_max(alphas_cumprod)]``; pass that as
``sigma_max`` to :func:`window_boundaries` and :func:`sample_flow_times` (the scheduler in
``stepdistill.flow_scheduler`` does so).
"""
from __future__ import annotations

from typing import Sequence

import torch

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
    "velocity_from_vp_output",
    "vp_sigma_max",
    "sigma_for_vp_timestep",
    "vp_alphas_cumprod_at",
    "vp_timestep_for_sigma",
    "flow_state_to_vp_input",
    "vp_state_to_flow",
    "straightness",
    "coupling_error",
]


# ----------------------------------------------------------------------------------------------------
# small helpers


def _as_tensor(x, like: torch.Tensor | None = None, dtype=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.as_tensor(x, dtype=dtype or torch.float32)
    if like is not None:
        t = t.to(device=like.device, dtype=dtype or like.dtype)
    elif dtype is not None:
        t = t.to(dtype)
    return t


def _bcast(t, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scalar or a per-sample ``(B,)`` tensor, shaped to broadcast against ``like`` ``(B, ...)``, on its
    device, in ``dtype`` (default: ``like``'s)."""
    t = _as_tensor(t, like, dtype)
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


def _flow_scale(s):
    """``n(s) = sqrt((1-s)^2 + s^2) = 1 / (alpha + sigma)``: ``z = n(s) * x_t``."""
    s = _as_tensor(s)
    return torch.sqrt((1 - s) ** 2 + s**2)


def _log_snr_of_sigma(s: torch.Tensor) -> torch.Tensor:
    """VP log-SNR ``log(alpha^2 / sigma^2) = 2 log((1-s)/s)`` of flow time ``s`` (+inf at 0, -inf at 1)."""
    s = s.to(torch.float64)
    return 2.0 * (torch.log1p(-s) - torch.log(s))


def _log_snr_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = _as_tensor(alphas_cumprod).detach().cpu().to(torch.float64)
    return torch.log(a) - torch.log1p(-a)  # decreasing in t


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
    s = _bcast(s, z_data)
    return (1 - s) * z_data + s * z_noise


def straight_velocity(z_noise: torch.Tensor, z_data: torch.Tensor) -> torch.Tensor:
    """The reflow regression target ``dx_s/ds = z_noise - z_data`` (Rectified Flow eq. 1, ``-(X_1 - X_0)``)."""
    return z_noise - z_data


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
    s = _as_tensor(s).float()
    b = _as_tensor(boundaries).to(device=s.device, dtype=torch.float32)
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
    s_start_b = _bcast(s_start, z_start)
    s_end_b = _bcast(s_end, z_start)
    s_b = _bcast(s, z_start)
    length = s_start_b - s_end_b
    if torch.any(length <= 0):
        raise ValueError("piecewise_target needs s_start > s_end (windows run from noise towards data)")
    v = (z_start - z_end) / length
    x_s = z_end + (s_b - s_end_b) * v
    return x_s, v


def reflow_loss(v_pred: torch.Tensor, v_target: torch.Tensor, weighting: torch.Tensor | None = None) -> torch.Tensor:
    """Reflow's objective (Rectified Flow eq. 1): ``mean_i w_i * mean_dims (v_pred_i - v_target_i)^2``.

    ``weighting`` is an optional per-sample ``(B,)`` weight (unnormalized: the result is the batch mean of the
    weighted per-sample MSEs). Computed in float32; returns a scalar tensor that carries gradients."""
    err = (v_pred.float() - v_target.float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    if weighting is not None:
        w = _as_tensor(weighting, per_sample).reshape(-1)
        if w.numel() not in (1, per_sample.numel()):
            raise ValueError(f"weighting has {w.numel()} entries for a batch of {per_sample.numel()}")
        per_sample = per_sample * w
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------------
# VP teachers <-> flow


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
    abar = _bcast(alphas_cumprod_t, out, torch.float32)
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
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return sigma / (alpha + sigma)


def vp_sigma_max(alphas_cumprod: torch.Tensor) -> float:
    """Flow time of the last training timestep (``~0.9358`` for SD's scaled_linear 0.00085-0.012 schedule):
    the noisiest flow time a VP model (and its students) can be queried at."""
    return float(sigma_for_vp_timestep(len(alphas_cumprod) - 1, alphas_cumprod))


def vp_alphas_cumprod_at(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``abar`` at a continuous VP timestep ``t`` (float64, on the CPU): the log-SNR is interpolated linearly between
    integer timesteps (exact at integers; ``t`` is clamped to ``[0, T-1]``)."""
    lam = _log_snr_table(alphas_cumprod)
    T = len(lam)
    t = _as_tensor(t).detach().cpu().to(torch.float64)
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
    s = _as_tensor(s).detach().cpu().to(torch.float64)
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
    n = _bcast(_flow_scale(_as_tensor(s, dtype=torch.float32)), x_s, torch.float32)
    x_t = (x_s.float() / n).to(x_s.dtype)
    return x_t, vp_timestep_for_sigma(s, alphas_cumprod, discrete=discrete).to(x_s.device)


def vp_state_to_flow(x_t: torch.Tensor, s) -> torch.Tensor:
    """Inverse of :func:`flow_state_to_vp_input`'s state map: ``z = x_t / (alpha + sigma) = sqrt((1-s)^2+s^2) x_t``."""
    n = _bcast(_flow_scale(_as_tensor(s, dtype=torch.float32)), x_t, torch.float32)
    return (x_t.float() * n).to(x_t.dtype)


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
    s = _as_tensor(sigmas).detach().cpu().to(torch.float64).reshape(-1)
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
