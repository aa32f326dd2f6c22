"""Solvers for a (guided) probability-flow ODE in flow coordinates: the teacher side of reflow couplings.

Pure math: a velocity function in, states out (the model call is the caller's, see
:class:`stepdistill.models.denoiser.TeacherFlow`). Conventions as :mod:`stepdistill.reflow`: flow time ``s``
(1 = noise, 0 = data), state ``z = (1 - s) x0 + s eps``, velocity ``v = dz/ds = eps - x0``.

* ``"ddim"``: Euler in flow coordinates, ``z' = z + (s' - s) v``; for VP teachers exactly DDIM (eta = 0,
  Song et al. 2021, eq. 12) between ``t(s)`` and ``t(s')``, for flow teachers ``FlowMatchEulerDiscreteScheduler``.
* ``"euler"``: Euler in the VP teacher's native sampler space, the Karras/EDM ODE of diffusers'
  ``EulerDiscreteScheduler`` (``y = x/alpha`` against ``sigma/alpha``; Karras et al. 2022, Alg. 1); for flow
  teachers the same as ``"ddim"``.
* ``"dpmpp"``: DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, half-log-SNR
  ``lambda = log((1-s)/s)``, first order on the first and the last step (``lower_order_final``).

:func:`coupling_grid` places the steps so that every PeRFlow window boundary is a step point (the recorded
boundary states are then the solver's own states: no interpolation).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .errors import CouplingError

SOLVERS = ("ddim", "euler", "dpmpp")
SPACINGS = ("sigma", "teacher")


def coupling_grid(num_steps: int, num_windows: int, sigma_max: float, spacing: str = "sigma",
                  clock: tuple[Callable, Callable] | None = None) -> tuple[torch.Tensor, list[int]]:
    """The ``num_steps + 1`` flow times (float64, ``sigma_max`` ... 0) and the grid indices of the ``K + 1``
    window boundaries. Window k gets ``num_steps // K`` steps (+1 for the first ``num_steps % K`` windows); with
    ``spacing="sigma"`` this is ``PiecewiseRectifiedFlowScheduler.window_aligned_sigmas(num_steps)``. With
    ``spacing="teacher"`` the steps inside a window are uniform in the teacher's native clock, given as
    ``clock = (to_native, from_native)`` (flow time <-> VP timestep or shifted FlowMatch sigma)."""
    N, K = int(num_steps), int(num_windows)
    if K < 1:
        raise CouplingError(f"num_windows must be >= 1, got {K}")
    if N < K:
        raise CouplingError(f"num_steps ({N}) must be >= num_windows ({K}): every window boundary must be a step "
                       "point for its state to be exact")
    if spacing not in SPACINGS:
        raise CouplingError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    b = torch.linspace(float(sigma_max), 0.0, K + 1, dtype=torch.float64)
    q, r = divmod(N, K)
    pts, idx = [], [0]
    for k in range(K):
        n_k = q + 1 if k < r else q
        if spacing == "sigma" or clock is None:
            seg = torch.linspace(float(b[k]), float(b[k + 1]), n_k + 1, dtype=torch.float64)
        else:
            to_native, from_native = clock
            c0, c1 = to_native(b[k:k + 1]), to_native(b[k + 1:k + 2])
            seg = from_native(torch.linspace(float(c0), float(c1), n_k + 1, dtype=torch.float64))
            seg[0], seg[-1] = b[k], b[k + 1]  # the boundaries themselves stay exact
        pts.append(seg[:-1])
        idx.append(idx[-1] + n_k)
    pts.append(b[-1:])
    grid = torch.cat(pts)
    if torch.any(grid[1:] >= grid[:-1]):
        raise CouplingError("the step grid is not strictly decreasing")
    return grid, idx


def half_log_snr(s: float) -> float:
    """DPM-Solver's half log-SNR ``log(alpha/sigma) = log((1-s)/s)`` (-inf at s=1, +inf at s=0)."""
    if s <= 0.0:
        return math.inf
    if s >= 1.0:
        return -math.inf
    return math.log((1 - s) / s)


@torch.no_grad()
def solve_flow_ode(velocity: Callable[[torch.Tensor, float], torch.Tensor], z: torch.Tensor, grid: torch.Tensor,
                   solver: str, record: list[int] | None = None, vp: bool = True):
    """Integrate ``dz/ds = velocity(z, s)`` from the start state ``z`` (at ``grid[0]``) along ``grid``.

    ``vp``: whether ``"euler"`` means the VP teacher's Karras ODE (else it is the flow Euler step). Returns
    ``(z_end, states)``: the state at the last grid point and the states at the grid indices ``record``
    (stacked on dim 1, ``(B, len(record), ...)``; None without ``record``)."""
    if solver not in SOLVERS:
        raise CouplingError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    g = [float(x) for x in grid]
    record = list(record or [])
    states = {0: z} if 0 in record else {}
    prev_d, prev_h = None, None
    for i in range(len(g) - 1):
        s, s1 = g[i], g[i + 1]
        v = velocity(z, s)
        if solver == "ddim" or (solver == "euler" and not vp):
            z = z + (s1 - s) * v
        elif solver == "euler":  # Karras/EDM ODE: y = x_t/alpha = z/(1-s), sigma_ve = s/(1-s), dy/dsigma_ve = eps
            eps = z + (1 - s) * v
            y = z / (1 - s) + (s1 / (1 - s1) - s / (1 - s)) * eps
            z = (1 - s1) * y
        else:  # DPM-Solver++(2M), data prediction, in flow coordinates: z' = (s'/s) z + (1 - s'/s) D
            d = z - s * v
            h = half_log_snr(s1) - half_log_snr(s)
            ratio = s1 / s
            if prev_d is None or s1 == 0.0 or not math.isfinite(prev_h) or not math.isfinite(h):
                d_eff = d
            else:
                r = prev_h / h
                d_eff = d + (d - prev_d) / (2 * r)
            z = ratio * z + (1 - ratio) * d_eff
            prev_d, prev_h = d, h
        if i + 1 in record:
            states[i + 1] = z
    stacked = torch.stack([states[j] for j in record], dim=1) if record else None
    return z, stacked
